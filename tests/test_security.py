"""TLS, mutual TLS, bearer tokens and the plaintext bind check, against real servers on port 0."""

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import logging
import pathlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import model, running_dispatcher, running_slotd, slot, write_config

from slotroute import cli, rpc, security
from slotroute.configfile import ConfigError
from slotroute.dispatch.v1 import route_pb2, transport_pb2, transport_pb2_grpc
from slotroute.opsconfig import ServerOps, TokenSource
from slotroute.slot.app import Slotd
from slotroute.slot.config import load_slotd_config
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

TOKEN = "test-token-0123456789abcdef"
DISPATCHER_TOKEN = "dispatcher-token-fedcba9876543210"
# Short deadline for calls that are expected to fail the TLS handshake.
FAIL_DEADLINE = 2.0


# -- certificates -------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclasses.dataclass
class Pki:
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    # A client certificate from a CA the servers do not trust.
    rogue_cert: pathlib.Path
    rogue_key: pathlib.Path

    def read(self, *paths: pathlib.Path) -> list[bytes]:
        return [path.read_bytes() for path in paths]


def _write_pki(directory: pathlib.Path) -> Pki:
    directory.mkdir(exist_ok=True)
    files: dict[str, bytes] = {}

    def issue(prefix: str, subject: str, issuer_name, issuer_key, **kinds):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(subject, key, issuer_name, issuer_key, **kinds)
        files[f"{prefix}.crt"] = certificate.public_bytes(serialization.Encoding.PEM)
        files[f"{prefix}.key"] = _pem_key(key)
        return key

    ca_key = ec.generate_private_key(ec.SECP256R1())
    files["ca.crt"] = _certificate("slotroute test CA", ca_key, _name("slotroute test CA"), ca_key,
                                   ca=True).public_bytes(serialization.Encoding.PEM)
    issue("server", "localhost", _name("slotroute test CA"), ca_key, server=True)
    issue("client", "dispatcher", _name("slotroute test CA"), ca_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    issue("rogue", "intruder", _name("rogue CA"), rogue_ca_key)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt", server_key=directory / "server.key",
        client_cert=directory / "client.crt", client_key=directory / "client.key",
        rogue_cert=directory / "rogue.crt", rogue_key=directory / "rogue.key",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"))


def _box(tmp_path, *, slotd=None, dispatcher=None, registry=()):
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1")],
        models=[model("m1", ["a"])],
        # A backend port range of its own, away from other test files running at the same time.
        slotd={"ports": "45200-45299", **(slotd or {})},
        dispatcher=dispatcher,
        registry=registry,
    )


def _secure_channel(address: str, pki: Pki, *, cert=None, key=None):
    root, = pki.read(pki.ca)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=rpc.CLIENT_OPTIONS)


async def _list_slots(channel) -> slot_pb2.ListSlotsResponse:
    stub = slot_pb2_grpc.SlotServiceStub(channel)
    return await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=FAIL_DEADLINE)


async def _wait_synced(server, seconds: float = 10.0) -> None:
    """Wait until the dispatcher applied every source's snapshot."""
    async with asyncio.timeout(seconds):
        for table in server.tables.values():
            while not table.synced:
                await table.changed()


# -- TLS --------------------------------------------------------------------------------


async def test_tls_client_with_ca_succeeds(tmp_path, pki):
    box = _box(tmp_path, slotd={"tls": {"cert_file": str(pki.server_cert),
                                        "key_file": str(pki.server_key)}})
    async with running_slotd(box) as slotd:
        async with _secure_channel(slotd.address, pki) as channel:
            answer = await _list_slots(channel)
    assert [entry.name for entry in answer.slots] == ["a"]
    assert slotd.security.summary.startswith("tls")


async def test_tls_plaintext_client_fails(tmp_path, pki):
    box = _box(tmp_path, slotd={"tls": {"cert_file": str(pki.server_cert),
                                        "key_file": str(pki.server_key)}})
    async with running_slotd(box) as slotd:
        async with grpc.aio.insecure_channel(slotd.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await _list_slots(channel)
    assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_tls_paths_relative_to_config(tmp_path, pki):
    for source in (pki.server_cert, pki.server_key):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    box = _box(tmp_path, slotd={"tls": {"cert_file": "server.crt", "key_file": "server.key"}})
    config = load_slotd_config(box)
    assert config.ops.tls.cert_file == tmp_path.resolve() / "server.crt"
    assert config.ops.tls.key_file == tmp_path.resolve() / "server.key"
    assert config.ops.tls.client_ca_file is None


def test_tls_missing_file_is_config_error(tmp_path):
    box = _box(tmp_path, slotd={"tls": {"cert_file": "nope.crt", "key_file": "nope.key"}})
    with pytest.raises(ConfigError) as failure:
        load_slotd_config(box)
    assert "slotd.tls" in str(failure.value)
    assert "cert_file" in str(failure.value)
    assert "file not found" in str(failure.value)


async def test_mtls_known_client_succeeds(tmp_path, pki):
    box = _box(tmp_path, slotd={"tls": {"cert_file": str(pki.server_cert),
                                        "key_file": str(pki.server_key),
                                        "client_ca_file": str(pki.ca)}})
    async with running_slotd(box) as slotd:
        async with _secure_channel(slotd.address, pki, cert=pki.client_cert,
                                   key=pki.client_key) as channel:
            answer = await _list_slots(channel)
    assert [entry.name for entry in answer.slots] == ["a"]
    assert slotd.security.summary.startswith("mtls")


async def test_mtls_unknown_client_rejected(tmp_path, pki):
    box = _box(tmp_path, slotd={"tls": {"cert_file": str(pki.server_cert),
                                        "key_file": str(pki.server_key),
                                        "client_ca_file": str(pki.ca)}})
    async with running_slotd(box) as slotd:
        async with _secure_channel(slotd.address, pki, cert=pki.rogue_cert,
                                   key=pki.rogue_key) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as rogue:
                await _list_slots(channel)
        async with _secure_channel(slotd.address, pki) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await _list_slots(channel)
    assert rogue.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert anonymous.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- tokens -------------------------------------------------------------------------------


def _token_file(tmp_path, token: str = TOKEN, name: str = "slotd.token") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


async def _load(stub, metadata=None):
    return await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=True),
                                timeout=15, metadata=metadata)


async def test_token_missing_or_wrong_unauthenticated(tmp_path):
    box = _box(tmp_path, slotd={"token_file": str(_token_file(tmp_path))})
    async with running_slotd(box) as slotd:
        async with grpc.aio.insecure_channel(slotd.address) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await _load(stub)
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await _load(stub, (("authorization", "Bearer wrong-token-0123456789"),))
            with pytest.raises(grpc.aio.AioRpcError) as no_scheme:
                await _load(stub, (("authorization", TOKEN),))
            listed = await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=5)

    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in missing.value.details()
    info, _delay = rpc.error_details(missing.value)
    assert info.reason == "TOKEN_MISSING"
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc.error_details(wrong.value)[0].reason == "TOKEN_INVALID"
    assert no_scheme.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Reads stay open with the default protect = "mutating".
    assert [entry.name for entry in listed.slots] == ["a"]


async def test_token_right_one_succeeds(tmp_path):
    box = _box(tmp_path, slotd={"token_file": str(_token_file(tmp_path))})
    async with running_slotd(box) as slotd:
        async with grpc.aio.insecure_channel(slotd.address) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            answer = await _load(stub, security.bearer_metadata(TOKEN))
    assert answer.slot.state == slot_pb2.SLOT_STATE_READY


async def test_token_protect_all_keeps_health_open(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTROUTE_TEST_TOKEN", TOKEN)
    box = _box(tmp_path, slotd={"token_env": "SLOTROUTE_TEST_TOKEN", "protect": "all"})
    async with running_slotd(box) as slotd:
        async with grpc.aio.insecure_channel(slotd.address) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as listing:
                await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=5)
            watch = stub.WatchSlots(slot_pb2.WatchSlotsRequest(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as watching:
                await watch.read()
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            allowed = await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=5,
                                           metadata=security.bearer_metadata(TOKEN))

    assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert watching.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert [entry.name for entry in allowed.slots] == ["a"]


async def test_dispatcher_token_and_mtls_reach_slotd(tmp_path, pki):
    slotd_token = _token_file(tmp_path)
    box = _box(
        tmp_path,
        slotd={"token_file": str(slotd_token), "protect": "all",
               "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                       "client_ca_file": str(pki.ca)}},
        dispatcher={"slotd_token_file": str(slotd_token),
                    "token_file": str(_token_file(tmp_path, DISPATCHER_TOKEN, "dispatcher.token")),
                    "slotd_tls": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                                  "key_file": str(pki.client_key)}},
        registry=[{"id": "m1", "slot": "a"}],
    )
    async with running_slotd(box) as slotd, running_dispatcher(box, [slotd.address]) as server:
        await _wait_synced(server)
        async with grpc.aio.insecure_channel(server.address) as channel:
            transport = transport_pb2_grpc.TransportServiceStub(channel)
            # Resolve stays open; the cold start makes the dispatcher call LoadModel on slotd.
            answer = await transport.Resolve(transport_pb2.ResolveRequest(model="m1"), timeout=15)
            with pytest.raises(grpc.aio.AioRpcError) as release:
                await transport.ReleaseLease(route_pb2.ReleaseLeaseRequest(lease_id="x"), timeout=5)

    assert answer.cold_start
    assert answer.target.state == slot_pb2.SLOT_STATE_READY
    assert release.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_config_errors(tmp_path):
    cases = [
        ({"protect": "all"}, "protect needs a token"),
        ({"token_file": str(_token_file(tmp_path)), "token_env": "X"}, "not both"),
        ({"token_env": "NOT A NAME"}, "invalid environment variable name"),
        ({"token_file": "missing.token"}, "file not found"),
        ({"token_file": str(_token_file(tmp_path)), "protect": "some"}, "expected one of"),
    ]
    for fields, expected in cases:
        box = _box(tmp_path, slotd=fields)
        with pytest.raises(ConfigError) as failure:
            load_slotd_config(box)
        assert expected in str(failure.value), fields


def test_token_unusable_values_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv("SLOTROUTE_TEST_UNSET", raising=False)
    cases = [
        (TokenSource(env="SLOTROUTE_TEST_UNSET"), "empty or unset"),
        (TokenSource(file=_token_file(tmp_path, "short", "short.token")), "at least 16"),
        (TokenSource(file=_token_file(tmp_path, "has space 0123456789", "space.token")),
         "printable ASCII"),
    ]
    for source, expected in cases:
        with pytest.raises(security.SecurityError) as failure:
            security.load_token(source)
        assert expected in str(failure.value)


def test_token_interceptor_scope():
    mutating = security.TokenAuthInterceptor(TOKEN, security.SLOTD_MUTATING)
    everything = security.TokenAuthInterceptor(TOKEN, None)
    load = "/slotroute.slot.v1.SlotService/LoadModel"
    listing = "/slotroute.slot.v1.SlotService/ListSlots"
    health = "/grpc.health.v1.Health/Check"
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    assert mutating.requires_token(load)
    assert not mutating.requires_token(listing)
    assert everything.requires_token(listing)
    assert not everything.requires_token(health)
    assert not everything.requires_token(reflection)
    assert security.SLOTD_MUTATING == {
        f"/slotroute.slot.v1.SlotService/{name}"
        for name in ("LoadModel", "UnloadModel", "ReloadConfig", "AcquireLease", "ReleaseLease")
    }


# -- plaintext bind check -----------------------------------------------------------------


def test_insecure_bind_refused_before_binding(tmp_path, monkeypatch):
    box = _box(tmp_path, slotd={"listen": "0.0.0.0:0"})
    config = load_slotd_config(box)

    def must_not_bind(*_args, **_kwargs):
        raise AssertionError("the gRPC server was created before the bind check")

    monkeypatch.setattr(rpc.Service, "__init__", must_not_bind)
    with pytest.raises(security.InsecureBindError) as failure:
        Slotd(config)
    assert "0.0.0.0:0" in str(failure.value)
    assert "allow_insecure_bind" in str(failure.value)


def test_insecure_bind_allowed_when_configured(tmp_path, pki):
    allowed = security.ServerSecurity.build(ServerOps(allow_insecure_bind=True), "0.0.0.0:0",
                                            section="slotd", mutating=security.SLOTD_MUTATING)
    assert allowed.credentials is None
    config = load_slotd_config(_box(tmp_path, slotd={"listen": "0.0.0.0:0",
                                                     "allow_insecure_bind": True}))
    assert config.ops.allow_insecure_bind
    security.slotd_security(config)

    tls_config = load_slotd_config(_box(tmp_path, slotd={
        "listen": "0.0.0.0:0",
        "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}}))
    assert security.slotd_security(tls_config).credentials is not None
    for loopback in ("127.0.0.1:0", "[::1]:0", "localhost:0"):
        security.check_bind(loopback, tls=False, allow_insecure=False, section="slotd")


def test_insecure_bind_cli_exit_code(tmp_path, capsys):
    box = _box(tmp_path, slotd={"listen": "0.0.0.0:0"})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["slotd", "--config", str(box)])
    assert exit_info.value.code == cli.EXIT_CONFIG
    assert "refusing to serve plaintext gRPC on non-loopback address 0.0.0.0:0" in \
        capsys.readouterr().err


# -- command line client --------------------------------------------------------------------


async def test_cli_client_tls_and_token(tmp_path, pki, capsys):
    token_file = _token_file(tmp_path)
    box = _box(tmp_path, slotd={"token_file": str(token_file), "protect": "all",
                                "tls": {"cert_file": str(pki.server_cert),
                                        "key_file": str(pki.server_key),
                                        "client_ca_file": str(pki.ca)}})
    async with running_slotd(box) as slotd:
        base = ["slots", "--slotd", slotd.address, "--json", "--timeout", str(FAIL_DEADLINE)]
        tls = ["--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert),
               "--key-file", str(pki.client_key)]
        # cli.main runs its own event loop, so it runs on a thread of its own.
        allowed = await asyncio.to_thread(cli.main, [*base, *tls, "--token-file", str(token_file)])
        listed = capsys.readouterr().out
        no_token = await asyncio.to_thread(cli.main, [*base, *tls])
        no_tls = await asyncio.to_thread(cli.main, [*base, "--token-file", str(token_file)])

    assert allowed == cli.EXIT_OK
    assert [entry["name"] for entry in json.loads(listed)["slots"]] == ["a"]
    assert no_token == cli.EXIT_DENIED
    assert no_tls == cli.EXIT_RETRY


class _ErrorWaiter(logging.Handler):
    """Collects ERROR records and sets an event when the first one arrives."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.arrived = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.arrived.set()


async def test_dispatcher_without_slotd_token_logs_error(tmp_path):
    box = _box(tmp_path, slotd={"token_file": str(_token_file(tmp_path)), "protect": "all"},
               dispatcher={}, registry=[{"id": "m1", "slot": "a"}])
    waiter = _ErrorWaiter()
    dispatch_logger = logging.getLogger("slotroute.dispatch")
    dispatch_logger.addHandler(waiter)
    try:
        async with running_slotd(box) as slotd, running_dispatcher(box, [slotd.address]) as server:
            async with asyncio.timeout(10):
                await waiter.arrived.wait()
            synced = [table.synced for table in server.tables.values()]
    finally:
        dispatch_logger.removeHandler(waiter)

    assert "UNAUTHENTICATED" in waiter.messages[0]
    assert "missing bearer token" in waiter.messages[0]
    assert synced == [False]
