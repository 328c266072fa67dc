"""Operating settings shared by slotd and the dispatcher: metrics, TLS, tokens, insecure binds.

Both `[slotd]` and `[dispatcher]` accept the same server-side fields:

    metrics_listen = "127.0.0.1:9451"   # "" disables the metrics endpoint
    allow_insecure_bind = false          # allow plaintext gRPC on a non-loopback address
    token_file = "slotd.token"           # or token_env = "SLOTROUTE_TOKEN", not both
    protect = "mutating"                 # or "all"; needs a token
    [slotd.tls]
    cert_file = "slotd.crt"
    key_file = "slotd.key"
    client_ca_file = "clients-ca.crt"    # optional: require client certificates

The dispatcher's connection to slotd reads `slotd_token_file` or
`slotd_token_env` and the table `[dispatcher.slotd_tls]` with `ca_file`,
`cert_file` and `key_file`. Relative paths are relative to the config file.
Only paths and variable names are stored here; the token itself is read when
a service starts (see slotroute.security), so a config object never contains it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from slotroute.configfile import Fields
from slotroute.netaddr import parse_listen

SLOTD_METRICS_LISTEN = "127.0.0.1:9451"
DISPATCHER_METRICS_LISTEN = "127.0.0.1:9452"
PROTECT_MUTATING = "mutating"
PROTECT_ALL = "all"
PROTECT_CHOICES = (PROTECT_MUTATING, PROTECT_ALL)

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """Certificate and key a gRPC server presents, and the CA that signs its clients."""

    cert_file: pathlib.Path
    key_file: pathlib.Path
    # When set, clients must present a certificate signed by this CA (mutual TLS).
    client_ca_file: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """CA that signs the server's certificate, and the client's own certificate for mTLS."""

    # None trusts the default root certificates that grpc ships.
    ca_file: pathlib.Path | None = None
    cert_file: pathlib.Path | None = None
    key_file: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Source of a bearer token: exactly one of a file and an environment variable."""

    file: pathlib.Path | None = None
    env: str = ""

    def describe(self) -> str:
        if self.file is not None:
            return f"token file {self.file}"
        return f"environment variable {self.env}"


@dataclasses.dataclass(frozen=True)
class ServerOps:
    """Operating settings of one gRPC server."""

    # HOST:PORT of the Prometheus endpoint; "" disables it, port 0 picks a free port.
    metrics_listen: str = ""
    tls: ServerTls | None = None
    # None leaves every RPC open.
    token: TokenSource | None = None
    # Which RPCs need the token: PROTECT_MUTATING or PROTECT_ALL.
    protect: str = PROTECT_MUTATING
    allow_insecure_bind: bool = False


def read_server_ops(section: Fields, *, metrics_default: str) -> ServerOps:
    """Read the shared server fields from `section`, resolving paths against its file."""
    metrics_listen = section.string("metrics_listen", metrics_default)
    if metrics_listen:
        try:
            parse_listen(metrics_listen)
        except ValueError as error:
            raise section.error("metrics_listen", f"{error}, or \"\" to disable metrics") from None

    token = read_token_source(section, "token_file", "token_env")
    protect = section.string("protect", PROTECT_MUTATING, choices=PROTECT_CHOICES)
    if "protect" in section.table and token is None:
        raise section.error("protect", "protect needs a token; set 'token_file' or 'token_env'")

    return ServerOps(
        metrics_listen=metrics_listen,
        tls=read_server_tls(section.table_of("tls")),
        token=token,
        protect=protect,
        allow_insecure_bind=section.boolean("allow_insecure_bind", False),
    )


def read_server_tls(table: Fields | None) -> ServerTls | None:
    if table is None:
        return None
    tls = ServerTls(
        cert_file=_existing_file(table, "cert_file", required=True),
        key_file=_existing_file(table, "key_file", required=True),
        client_ca_file=_existing_file(table, "client_ca_file"),
    )
    table.finish()
    return tls


def read_client_tls(table: Fields | None) -> ClientTls | None:
    if table is None:
        return None
    tls = ClientTls(
        ca_file=_existing_file(table, "ca_file"),
        cert_file=_existing_file(table, "cert_file"),
        key_file=_existing_file(table, "key_file"),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise table.error("cert_file", "set both 'cert_file' and 'key_file' for a client certificate, or neither")
    table.finish()
    return tls


def read_token_source(section: Fields, file_field: str, env_field: str) -> TokenSource | None:
    """Read a pair of token fields; at most one of them may be set."""
    file = _existing_file(section, file_field)
    env = section.string(env_field, "")
    if file is not None and env:
        raise section.error(env_field, f"set either '{file_field}' or '{env_field}', not both")
    if env and not _ENV_NAME_RE.match(env):
        raise section.error(env_field, f"invalid environment variable name {env!r}; "
                                       "use letters, digits and '_', such as 'SLOTROUTE_TOKEN'")
    if file is None and not env:
        return None
    return TokenSource(file=file, env=env)


def _existing_file(table: Fields, field: str, *, required: bool = False) -> pathlib.Path | None:
    value = table.string(field) if required else table.string(field, "")
    if not value:
        if required:
            raise table.error(field, "empty; give the path of a PEM file")
        return None
    path = (table.path.parent / value).resolve()
    if not path.is_file():
        raise table.error(field, f"file not found: {path}; paths are relative to the config file")
    return path
