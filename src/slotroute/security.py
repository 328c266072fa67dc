"""Transport security for both services: TLS credentials, bearer tokens and the bind check.

`ServerSecurity.build()` turns a server's ServerOps into gRPC server
credentials and interceptors. It raises SecurityError, before anything binds,
when a plaintext server would listen on a non-loopback address without
`allow_insecure_bind`, or when a certificate, key or token cannot be read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import pathlib
from collections.abc import Iterable

import grpc

from slotroute import logs, rpc
from slotroute.dispatch.v1 import transport_pb2 as _transport_pb2
from slotroute.netaddr import is_loopback, parse_listen
from slotroute.opsconfig import PROTECT_ALL, ClientTls, ServerOps, ServerTls, TokenSource
from slotroute.slot.v1 import slot_pb2 as _slot_pb2

logger = logging.getLogger("slotroute.security")

AUTH_HEADER = "authorization"
DOMAIN = "slotroute.auth"
# Shorter tokens are rejected at startup: they are guessable and would make
# log redaction replace common words.
MIN_TOKEN_LENGTH = 16

# Methods that stay open whatever `protect` is set to, so probes and grpcurl's
# service listing work without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _methods(service, names: Iterable[str]) -> frozenset[str]:
    return frozenset(f"/{service.full_name}/{name}" for name in names)


# RPCs that change state; `protect = "mutating"` guards only these.
SLOTD_MUTATING = _methods(
    _slot_pb2.DESCRIPTOR.services_by_name["SlotService"],
    ("LoadModel", "UnloadModel", "ReloadConfig", "AcquireLease", "ReleaseLease"),
)
DISPATCHER_MUTATING = _methods(
    _transport_pb2.DESCRIPTOR.services_by_name["TransportService"], ("ReleaseLease",)
)


class SecurityError(ValueError):
    """A TLS or token setting that stops a service from starting; the message names the fix."""


class InsecureBindError(SecurityError):
    """Plaintext gRPC on a non-loopback address without explicit permission."""


# -- bind check -----------------------------------------------------------------------


def check_bind(listen: str, *, tls: bool, allow_insecure: bool, section: str) -> None:
    """Raise InsecureBindError when `listen` would serve plaintext beyond this machine."""
    host, _port = parse_listen(listen)
    if tls or allow_insecure or is_loopback(host):
        return
    raise InsecureBindError(
        f"refusing to serve plaintext gRPC on non-loopback address {listen}; bind to 127.0.0.1, "
        f"configure [{section}.tls], or set allow_insecure_bind = true in [{section}] "
        "(--allow-insecure-bind on the command line)"
    )


# -- TLS ------------------------------------------------------------------------------


def _read_pem(path: pathlib.Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SecurityError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise SecurityError(f"invalid {what} {path}: no PEM block found; give a PEM-encoded file")
    return data


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Build server credentials; a client CA turns on required client certificates."""
    key = _read_pem(tls.key_file, "TLS key")
    certificate = _read_pem(tls.cert_file, "TLS certificate")
    client_ca = _read_pem(tls.client_ca_file, "client CA") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, certificate)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Build channel credentials: the CA to trust, and a client certificate when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls.ca_file, "CA certificate") if tls.ca_file else None,
        private_key=_read_pem(tls.key_file, "TLS key") if tls.key_file else None,
        certificate_chain=_read_pem(tls.cert_file, "TLS certificate") if tls.cert_file else None,
    )


# -- tokens ---------------------------------------------------------------------------


def load_token(source: TokenSource) -> str:
    """Read a bearer token and register it for log redaction; raise SecurityError if unusable."""
    if source.file is not None:
        try:
            token = source.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise SecurityError(f"cannot read {source.describe()}: {error}") from None
    else:
        token = os.environ.get(source.env, "").strip()
    if not token:
        raise SecurityError(f"{source.describe()} is empty or unset; put the token there")
    if len(token) < MIN_TOKEN_LENGTH:
        raise SecurityError(
            f"the token in {source.describe()} is {len(token)} characters long; use at least "
            f"{MIN_TOKEN_LENGTH}, for example the output of `openssl rand -hex 32`"
        )
    if not all(33 <= ord(char) <= 126 for char in token):
        raise SecurityError(
            f"the token in {source.describe()} contains spaces or characters outside printable "
            "ASCII; a token must be sendable as an HTTP header value"
        )
    logs.register_secret(token)
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata that carries `token` to a protected server."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of
    # the presented token's length as well as its content.
    return hashlib.sha256(value.encode("utf-8", "replace")).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED.

    `methods` lists the full method names that need the token; None means every
    method except health checking and reflection.
    """

    def __init__(self, token: str, methods: frozenset[str] | None):
        self._expected = _digest(token)
        self._methods = methods

    def requires_token(self, method: str) -> bool:
        if method.startswith(OPEN_SERVICES):
            return False
        return self._methods is None or method in self._methods

    def _problem(self, metadata) -> tuple[str, str] | None:
        """Return (reason, message) when the call must be rejected, else None."""
        values = [value for key, value in metadata or () if key == AUTH_HEADER]
        if not values:
            return ("TOKEN_MISSING", "missing bearer token; send the metadata header "
                                     "'authorization: Bearer <token>'")
        scheme, _separator, presented = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return ("TOKEN_MALFORMED", "malformed authorization header; send "
                                       "'authorization: Bearer <token>'")
        if not hmac.compare_digest(_digest(presented.strip()), self._expected):
            return ("TOKEN_INVALID", "invalid bearer token; send the token configured for this "
                                     "service in the header 'authorization: Bearer <token>'")
        return None

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self.requires_token(method):
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        reason, message = problem
        return _rejecting_handler(handler, method, reason, message)


def _rejecting_handler(handler: grpc.RpcMethodHandler, method: str, reason: str, message: str):
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    status = rpc.rich_status(grpc.StatusCode.UNAUTHENTICATED, message, domain=DOMAIN, reason=reason,
                             metadata={"header": AUTH_HEADER, "method": method})

    async def reject(context) -> None:
        logger.warning("rejected %s from %s: %s", method, context.peer(), reason.lower())
        await rpc.abort(context, status)

    async def unary_response(_request, context):
        await reject(context)

    async def stream_response(_request, context):
        await reject(context)
        yield  # makes this an async generator, as streaming handlers must be

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_response, **serializers)
    return grpc.unary_unary_rpc_method_handler(unary_response, **serializers)


# -- putting it together ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """Server credentials and interceptors that apply the configured TLS and token checks."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    # Summary for the startup log line, such as "mtls, token for all RPCs".
    summary: str

    @classmethod
    def build(cls, ops: ServerOps, listen: str, *, section: str,
              mutating: frozenset[str]) -> ServerSecurity:
        """Check the bind and read certificates and token; raise SecurityError on any problem."""
        check_bind(listen, tls=ops.tls is not None, allow_insecure=ops.allow_insecure_bind,
                   section=section)
        credentials = None
        summary = "plaintext"
        if ops.tls is not None:
            credentials = server_credentials(ops.tls)
            summary = "mtls" if ops.tls.client_ca_file else "tls"
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        if ops.token is not None:
            methods = None if ops.protect == PROTECT_ALL else mutating
            interceptors = (TokenAuthInterceptor(load_token(ops.token), methods),)
            summary += ", token for all RPCs" if methods is None else ", token for mutating RPCs"
        else:
            summary += ", no token"
        return cls(credentials, interceptors, summary)


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """Channel credentials and call metadata for one service calling another."""

    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, tls: ClientTls | None, token: TokenSource | None) -> ClientSecurity:
        """Read the CA, client certificate and token; raise SecurityError on any problem."""
        credentials = channel_credentials(tls) if tls is not None else None
        metadata = bearer_metadata(load_token(token)) if token is not None else ()
        return cls(credentials, metadata)


def slotd_security(config) -> ServerSecurity:
    """Build slotd's server security from a SlotdConfig."""
    return ServerSecurity.build(config.ops, config.listen, section="slotd", mutating=SLOTD_MUTATING)


def dispatcher_security(config) -> tuple[ServerSecurity, ClientSecurity]:
    """Build the dispatcher's server security and its client security toward slotd."""
    server = ServerSecurity.build(config.ops, config.listen, section="dispatcher",
                                  mutating=DISPATCHER_MUTATING)
    return server, ClientSecurity.build(config.slotd_tls, config.slotd_token)
