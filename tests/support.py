"""Helpers shared by the tests: config files, stand-in commands, running services, stream reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import tomli_w

from slotroute import rpc
from slotroute.dispatch.app import DispatcherServer
from slotroute.dispatch.config import load_dispatcher_config
from slotroute.dispatch.v1 import capability_pb2_grpc, transport_pb2_grpc
from slotroute.slot.app import Slotd
from slotroute.slot.config import load_slotd_config
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

# Backend ports for tests: a 500-port range picked per test process, so that
# test runs in parallel (and the example box's 41000 range) do not collide.
_PORT_BASE = 43000 + (os.getpid() % 20) * 500
TEST_PORTS = f"{_PORT_BASE}-{_PORT_BASE + 499}"


def standin(capability: str = "chat", *, load_delay: float = 0.05, extra: Sequence[str] = ()) -> list[str]:
    """Command of a stand-in backend slot, as a config `command` list."""
    return [
        "{python}", "-m", "slotroute.standin", "--host", "{host}", "--port", "{port}",
        "--model", "{model_id}", "--model-path", "{model_path}", "--capability", capability,
        "--load-delay", str(load_delay), *extra,
    ]


def slot(name: str, capability: str = "chat", *, model: str = "", **fields: Any) -> dict[str, Any]:
    """A [[slotd.slots]] entry running a stand-in with short timing knobs."""
    entry: dict[str, Any] = {
        "name": name,
        "device": "dev0",
        "capabilities": [capability],
        "command": standin(capability, load_delay=fields.pop("load_delay", 0.05),
                           extra=fields.pop("standin_args", ())),
        "start_timeout": 10.0,
        "stop_grace": 2.0,
        "restart_backoff": 0.05,
        "restart_backoff_max": 0.2,
        "probe": {"interval": 0.005, "ready_interval": 0.2},
    }
    if model:
        entry["default_model"] = model
    entry.update(fields)
    return entry


def model(model_id: str, slots: Sequence[str], capability: str = "chat", **fields: Any) -> dict[str, Any]:
    entry = {"id": model_id, "path": f"{_file_name(model_id)}.bin", "capability": capability,
             "slots": list(slots), "memory": "1GiB"}
    entry.update(fields)
    return entry


def _file_name(model_id: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in model_id)


def write_config(
    directory: pathlib.Path,
    *,
    slots: Sequence[dict[str, Any]],
    models: Sequence[dict[str, Any]] = (),
    devices: Sequence[dict[str, Any]] | None = None,
    slotd: dict[str, Any] | None = None,
    dispatcher: dict[str, Any] | None = None,
    registry: Sequence[dict[str, Any]] = (),
    create_files: bool = True,
    name: str = "box.toml",
) -> pathlib.Path:
    """Write a TOML config (and the model files it names) and return its path."""
    cache = directory / "models"
    cache.mkdir(exist_ok=True)
    if create_files:
        for entry in models:
            (cache / entry["path"]).write_text(f"test model {entry['id']}\n")
    document: dict[str, Any] = {
        "slotd": {
            "listen": "127.0.0.1:0",
            "ports": TEST_PORTS,
            "cache_dir": "models",
            "heartbeat_interval": 0.2,
            # Metrics off: the fixed default ports would collide between tests.
            "metrics_listen": "",
            "shutdown_grace": 5.0,
            **(slotd or {}),
            "devices": list(devices or [{"name": "dev0", "memory": "64GiB"}]),
            "slots": list(slots),
            "models": list(models),
        },
    }
    if dispatcher is not None or registry:
        document["dispatcher"] = {
            "listen": "127.0.0.1:0",
            "staleness": 2.0,
            "reconnect_backoff": 0.02,
            "reconnect_backoff_max": 0.1,
            # Metrics off: the fixed default ports would collide between tests.
            "metrics_listen": "",
            **(dispatcher or {}),
            "models": list(registry),
        }
    path = directory / name
    path.write_text(tomli_w.dumps(document))
    return path


@contextlib.asynccontextmanager
async def running_slotd(config_path: pathlib.Path, listen: str | None = None):
    """Start a real slotd on port 0 (or `listen`); stop it on exit."""
    slotd = Slotd(load_slotd_config(config_path, listen=listen))
    await slotd.start()
    try:
        yield slotd
    finally:
        await slotd.stop()


@contextlib.asynccontextmanager
async def running_dispatcher(config_path: pathlib.Path, sources: Sequence[str], listen: str | None = None):
    """Start a real dispatcher on the config's listen address (or `listen`); stop it on exit."""
    server = DispatcherServer(load_dispatcher_config(config_path, listen=listen, sources=list(sources)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def slot_stub(address: str):
    async with grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS) as channel:
        yield slot_pb2_grpc.SlotServiceStub(channel)


@contextlib.asynccontextmanager
async def dispatch_stubs(address: str):
    async with grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS) as channel:
        yield (transport_pb2_grpc.TransportServiceStub(channel),
               capability_pb2_grpc.CapabilityServiceStub(channel))


def state_name(state: int) -> str:
    return slot_pb2.SlotState.Name(state).removeprefix("SLOT_STATE_")


async def read_until(
    call, predicate: Callable[[slot_pb2.WatchSlotsResponse], bool], timeout: float = 10.0
) -> list[slot_pb2.WatchSlotsResponse]:
    """Read stream events until one satisfies `predicate`; return all events read."""
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = await call.read()
            if event is grpc.aio.EOF:
                break
            events.append(event)
            if predicate(event):
                return events
    raise AssertionError(f"stream ended before the expected event; read {len(events)} events")


def slot_states(events, name: str) -> list[str]:
    """The states of slot `name` in a list of events, with repeats collapsed."""
    states: list[str] = []
    for event in events:
        if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name:
            state = state_name(event.slot.state)
            if not states or states[-1] != state:
                states.append(state)
    return states


def pid_alive(pid: int) -> bool:
    """Return whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root() / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextlib.asynccontextmanager
async def slotd_process(config: pathlib.Path, port: int, log_path: pathlib.Path):
    """Run `python -m slotroute slotd` as a real process; kill it on exit if it still runs."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "slotroute", "slotd",
            "--config", str(config), "--listen", f"127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=subprocess_env(),
        )
    finally:
        os.close(log)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
