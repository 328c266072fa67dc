"""slotd's process supervision with real stand-in backends.

Covers crashes, stops, start timeouts, ports held by other programs and signals to slotd.
"""

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    free_port,
    model,
    pid_alive,
    read_until,
    running_slotd,
    slot,
    slot_states,
    slot_stub,
    slotd_process,
    standin,
    write_config,
)

from slotroute.slot.supervisor import LineSplitter
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

SLOT_SERVICE = "slotroute.slot.v1.SlotService"
EXHAUSTED = "; 0 restarts spent, load the slot again to retry"
# Channel options for a server that is still starting: retry the connection quickly.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


# -- helpers ---------------------------------------------------------------------------


def private_ports() -> str:
    """A random 100-port range above the fixed ranges of other test files, for parallel runs.

    Every slotd of a run starts at the low end of its range. With the shared
    range, two runs at once often start backends on the same port, and the
    second backend fails to bind.
    """
    low = random.randrange(47000, 59900)
    return f"{low}-{low + 99}"


def one_slot_box(tmp_path, slotd=None, **fields):
    """Config with slot "a" running model "m1"; a failure is final unless `max_restarts` is set."""
    fields.setdefault("max_restarts", 0)
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1", **fields)],
        models=[model("m1", ["a"])],
        slotd={"ports": private_ports(), **(slotd or {})},
    )


def two_slot_box(tmp_path):
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1", preload=True), slot("b", "embed", model="e1", preload=True)],
        models=[model("m1", ["a"]), model("e1", ["b"], capability="embed")],
        slotd={"ports": private_ports()},
    )


def synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def slot_event(name: str, state: int, *, with_pid: bool = False):
    def match(event) -> bool:
        return (event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name
                and event.slot.state == state and (event.slot.pid > 0 or not with_pid))
    return match


# Slot "a" is STARTING and its process runs.
STARTED = slot_event("a", slot_pb2.SLOT_STATE_STARTING, with_pid=True)


async def subscribe(stub):
    """Open WatchSlots and read past the snapshot."""
    call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
    await read_until(call, synced)
    return call


async def load(stub, wait: bool = True):
    return await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=wait))


def _live_processes() -> list[tuple[int, list[str]]]:
    """(pid, stat fields after the command name) of every live, non-zombie process, from /proc."""
    processes = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            processes.append((int(name), fields))
    return processes


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live processes in group `pgid`."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def children_of(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid`."""
    return [child for child, fields in _live_processes() if int(fields[1]) == pid]


async def still_alive_after(pids, max_wait: float) -> list[int]:
    """Poll until every pid is gone; return the ones still alive after `max_wait` seconds."""
    deadline = time.monotonic() + max_wait
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def serving_line(port: int, load_delay: str = "0.05") -> str:
    return f"standin: serving m1 on http://127.0.0.1:{port} (load delay {load_delay} s)"


class ForeignServer:
    """A small HTTP server, in place of another program, that returns 200 to every request."""

    def __init__(self):
        self.requests = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        # Read the whole request first, so that closing does not reset the connection.
        while await reader.readline() not in (b"\r\n", b"\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def serving(self, port: int):
        server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


async def backend_pids_when_ready(address: str, names: set[str]) -> dict[str, int]:
    """Wait until every named slot is READY; return the backend pid of each."""
    async with grpc.aio.insecure_channel(address, options=FAST_RECONNECT) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=20)
        stub = slot_pb2_grpc.SlotServiceStub(channel)
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        states: dict[str, int] = {}

        def all_ready(event) -> bool:
            if event.type == slot_pb2.EVENT_TYPE_SLOT:
                states[event.slot.name] = event.slot.state
            return all(states.get(name) == slot_pb2.SLOT_STATE_READY for name in names)

        await read_until(call, all_ready, timeout=20)
        call.cancel()
        listed = await stub.ListSlots(slot_pb2.ListSlotsRequest())
    return {entry.name: entry.pid for entry in listed.slots}


# -- crashes ---------------------------------------------------------------------------


async def test_sigkill_reported_within_100_ms(tmp_path):
    # Probes once READY are a minute apart, so only the exit watcher can report the kill in time.
    box = one_slot_box(tmp_path, probe={"interval": 0.005, "ready_interval": 60.0})
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        loaded = await load(stub)
        await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_READY))
        pid = loaded.slot.pid

        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        elapsed = time.monotonic() - killed_at
        call.cancel()

    failed = events[-1].slot
    assert elapsed < 0.1, f"ERROR arrived {elapsed * 1000:.0f} ms after the kill"
    assert slot_states(events, "a") == ["ERROR"]
    assert failed.reason == slot_pb2.TRANSITION_REASON_CRASHED
    assert failed.failure.signal == 9
    assert failed.failure.signal_name == "SIGKILL"
    assert not failed.failure.HasField("exit_code")
    assert failed.message == (
        "backend killed by SIGKILL unexpectedly; last stderr line: "
        + serving_line(loaded.slot.port) + EXHAUSTED
    )
    assert failed.pid == 0
    assert failed.generation == loaded.slot.generation
    assert not pid_alive(pid)


async def test_crash_restarts_after_backoff(tmp_path):
    box = one_slot_box(tmp_path, max_restarts=1, probe={"interval": 0.005, "ready_interval": 60.0})
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        loaded = await load(stub)
        await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_READY))
        os.kill(loaded.slot.pid, signal.SIGKILL)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_READY))
        call.cancel()

    failed = next(event.slot for event in events if event.slot.state == slot_pb2.SLOT_STATE_ERROR)
    restarted = next(event.slot for event in events
                     if event.slot.state == slot_pb2.SLOT_STATE_STARTING)
    ready = events[-1].slot
    assert slot_states(events, "a") == ["ERROR", "STARTING", "WARMING", "READY"]
    assert failed.failure.restart_count == 1
    assert failed.failure.HasField("next_retry_time")
    assert not failed.failure.restarts_exhausted
    assert restarted.reason == slot_pb2.TRANSITION_REASON_RESTART
    assert restarted.generation == loaded.slot.generation + 1
    assert ready.pid not in (0, loaded.slot.pid)
    assert ready.failure.restart_count == 1
    assert not ready.failure.HasField("next_retry_time")


async def test_unload_cancels_pending_restart(tmp_path):
    box = one_slot_box(tmp_path, max_restarts=1, restart_backoff=0.3, restart_backoff_max=0.3,
                       probe={"interval": 0.005, "ready_interval": 60.0})
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        loaded = await load(stub)
        os.kill(loaded.slot.pid, signal.SIGKILL)
        await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        unloaded = await stub.UnloadModel(slot_pb2.UnloadModelRequest(slot="a", wait=True))

        # The restart was due 0.24 to 0.36 s after the crash (backoff with 20 % jitter).
        quiet_until = time.monotonic() + 0.6
        later = await read_until(
            call, lambda event: event.type == slot_pb2.EVENT_TYPE_HEARTBEAT
            and time.monotonic() > quiet_until,
        )
        call.cancel()

    assert unloaded.slot.state == slot_pb2.SLOT_STATE_OFFLINE
    assert slot_states(later, "a") in ([], ["OFFLINE"])


async def test_missing_command_fails_at_launch(tmp_path):
    box = one_slot_box(tmp_path, command=["/nonexistent/backend", "--port", "{port}"])
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await load(stub)
        failed = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.state == slot_pb2.SLOT_STATE_ERROR
    assert failed.reason == slot_pb2.TRANSITION_REASON_LAUNCH_FAILED
    assert failed.message == (
        "cannot launch '/nonexistent/backend': not found, or not an executable file, on PATH; "
        "check the slot's command" + EXHAUSTED
    )
    assert failed.pid == 0


async def test_crash_seen_while_child_holds_pipes(tmp_path):
    # The sleep inherits the backend's stdout and stderr and keeps them open after the kill.
    command = ["/bin/sh", "-c", 'sleep 60 & exec "$@"', "sh", *standin()]
    box = one_slot_box(tmp_path, command=command, probe={"interval": 0.005, "ready_interval": 60.0})
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        loaded = await load(stub)
        pid = loaded.slot.pid
        sleeper = [child.pid for child in psutil.Process(pid).children()]

        os.kill(pid, signal.SIGKILL)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR), timeout=5)
        call.cancel()

    failed = events[-1].slot
    assert len(sleeper) == 1
    assert failed.reason == slot_pb2.TRANSITION_REASON_CRASHED
    assert failed.failure.signal == 9
    # ERROR means that no process of the backend runs, the leader's child included.
    assert not pid_alive(sleeper[0])
    assert live_group_members(pid) == []


async def test_crash_while_starting_keeps_stderr(tmp_path):
    box = one_slot_box(tmp_path, load_delay=2.0,
                       standin_args=["--crash-after", "0.05", "--exit-code", "3"])
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await load(stub)
        failed = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    crash_line = "standin: crashing on purpose after 0.05 s"
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.state == slot_pb2.SLOT_STATE_ERROR
    assert failed.reason == slot_pb2.TRANSITION_REASON_LAUNCH_FAILED
    assert failed.failure.exit_code == 3
    assert not failed.failure.HasField("signal")
    assert failed.failure.signal_name == ""
    assert list(failed.failure.stderr_tail) == [serving_line(failed.port, "2.0"), crash_line]
    assert failed.message == (
        f"backend exited with code 3 while starting; last stderr line: {crash_line}" + EXHAUSTED
    )


async def test_long_stderr_line_cut_not_blocking(tmp_path):
    # 200 000 bytes without a newline: more than a pipe buffer and the line limit.
    script = 'head -c 200000 /dev/zero | tr "\\0" x >&2; echo >&2; exec "$@"'
    box = one_slot_box(tmp_path, command=["/bin/sh", "-c", script, "sh", *standin()])
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        loaded = await load(stub)
        os.kill(loaded.slot.pid, signal.SIGKILL)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        call.cancel()

    assert loaded.slot.state == slot_pb2.SLOT_STATE_READY
    assert list(events[-1].slot.failure.stderr_tail) == [
        "x" * 4096 + " [line cut]",
        serving_line(loaded.slot.port),
    ]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"one\ntwo"], ["one", "two"]),
        ([b"one\r\ntwo\r\n"], ["one", "two"]),
        ([b"10%\r50%\r100%\n"], ["100%"]),
        ([b"li", b"ne\r", b"\n"], ["line"]),
        ([b"0123456789abc\nnext\n"], ["01234567 [line cut]", "next"]),
        ([b"\r1234567\r2345678\r3456789"], ["3456789"]),
        ([b"abcd\r", b"wxyz", b"\n"], ["wxyz"]),
        ([b"caf\xc3", b"\xa9\n"], ["caf\u00e9"]),
        ([b""], []),
    ],
)
def test_line_splitter_cases(chunks, expected):
    splitter = LineSplitter(max_bytes=8)
    lines = []
    for chunk in chunks:
        lines += splitter.feed(chunk)
    lines += splitter.finish()
    assert lines == expected


# -- stops -----------------------------------------------------------------------------


async def test_ignored_sigterm_killed_after_grace(tmp_path, caplog):
    # sh ignores SIGTERM for itself and its sleep, then becomes a stand-in that ignores it too.
    command = ["/bin/sh", "-c", 'trap "" TERM; sleep 60 & exec "$@"', "sh",
               *standin(extra=["--ignore-sigterm"])]
    box = one_slot_box(tmp_path, command=command, stop_grace=0.3)
    caplog.set_level(logging.WARNING, logger="slotroute.slot")
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        loaded = await load(stub)
        pid = loaded.slot.pid
        sleeper = [child.pid for child in psutil.Process(pid).children()]

        started = time.monotonic()
        unloaded = await stub.UnloadModel(slot_pb2.UnloadModelRequest(slot="a", wait=True))
        elapsed = time.monotonic() - started

    assert len(sleeper) == 1
    assert unloaded.slot.state == slot_pb2.SLOT_STATE_OFFLINE
    assert unloaded.slot.pid == 0
    assert elapsed >= 0.3
    assert elapsed < 2.0
    assert not pid_alive(pid)
    assert not pid_alive(sleeper[0])
    assert live_group_members(pid) == []
    assert f"slot=a process group {pid} still running 0.3 s after SIGTERM; sending SIGKILL" \
        in caplog.messages


async def test_unload_while_starting_aborts_waiters(tmp_path):
    box = one_slot_box(tmp_path, load_delay=2.0)
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        waiter = asyncio.create_task(load(stub, wait=True))
        starting = await read_until(call, STARTED)
        pid = starting[-1].slot.pid
        joined = await load(stub, wait=False)

        unloaded = await stub.UnloadModel(slot_pb2.UnloadModelRequest(slot="a", wait=True))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await waiter
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        call.cancel()

    assert joined.joined
    assert unloaded.slot.state == slot_pb2.SLOT_STATE_OFFLINE
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert raised.value.details() == "slot 'a': the start was stopped (unload requested)"
    assert slot_pb2.SLOT_STATE_READY not in [event.slot.state for event in events]
    assert not pid_alive(pid)
    assert live_group_members(pid) == []


async def test_unload_after_nowait_load_is_clean(tmp_path, caplog):
    box = one_slot_box(tmp_path, load_delay=2.0)
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        accepted = await load(stub, wait=False)
        starting = await read_until(call, STARTED)
        pid = starting[-1].slot.pid

        unloaded = await stub.UnloadModel(slot_pb2.UnloadModelRequest(slot="a", wait=True))
        call.cancel()
    gc.collect()

    assert not accepted.joined
    assert unloaded.slot.state == slot_pb2.SLOT_STATE_OFFLINE
    assert unloaded.slot.reason == slot_pb2.TRANSITION_REASON_UNLOAD_REQUESTED
    assert not pid_alive(pid)
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []


async def test_start_timeout_kills_backend(tmp_path):
    box = one_slot_box(tmp_path, start_timeout=0.5, stop_grace=0.3, standin_args=["--fail-health"])
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await load(stub)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        call.cancel()

    pids = {event.slot.pid for event in events if event.slot.pid}
    failed = events[-1].slot
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert slot_states(events, "a") == ["STARTING", "WARMING", "ERROR"]
    assert failed.reason == slot_pb2.TRANSITION_REASON_START_TIMEOUT
    assert failed.message.startswith("not ready after 0.5 s")
    assert failed.message == (
        "not ready after 0.5 s (last probe: GET /health answered 503)" + EXHAUSTED
    )
    assert len(pids) == 1
    assert not pid_alive(pids.pop())


# -- ports -----------------------------------------------------------------------------


async def test_busy_port_fails_without_launch(tmp_path):
    port = free_port()
    foreign = ForeignServer()
    box = one_slot_box(tmp_path, slotd={"ports": f"{port}-{port}"})
    async with foreign.serving(port), running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await load(stub)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        call.cancel()

    message = (f"no free port in {port}-{port} for slot 'a': 0 held by slots, the rest in use "
               "by other programs; widen [slotd] ports or stop what holds them" + EXHAUSTED)
    failed = events[-1].slot
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() == f"slot 'a': {message}"
    assert slot_states(events, "a") == ["STARTING", "ERROR"]
    assert failed.reason == slot_pb2.TRANSITION_REASON_LAUNCH_FAILED
    assert failed.message == message
    assert failed.port == 0
    assert {event.slot.pid for event in events} == {0}
    assert foreign.requests == 0


async def test_foreign_listener_never_ready(tmp_path):
    port = free_port()
    backend_port = free_port()
    while backend_port == port:
        backend_port = free_port()
    # The stand-in listens on another port, so only the foreign server listens on `port`.
    command = [str(backend_port) if part == "{port}" else part for part in standin()]
    box = one_slot_box(tmp_path, slotd={"ports": f"{port}-{port}"}, command=command,
                       start_timeout=0.5, stop_grace=0.3)
    foreign = ForeignServer()
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = await subscribe(stub)
        await load(stub, wait=False)
        starting = await read_until(call, STARTED)
        async with foreign.serving(port):
            events = starting + await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_ERROR))
        call.cancel()

    pid = starting[-1].slot.pid
    failed = events[-1].slot
    assert starting[-1].slot.port == port
    assert slot_pb2.SLOT_STATE_READY not in [event.slot.state for event in events]
    assert slot_states(events, "a") == ["STARTING", "WARMING", "ERROR"]
    assert failed.reason == slot_pb2.TRANSITION_REASON_START_TIMEOUT
    assert failed.message == (
        f"not ready after 0.5 s (last probe: port {port} answered, but process {pid} does not "
        "listen on it; another program holds the port)" + EXHAUSTED
    )
    assert foreign.requests > 0
    assert not pid_alive(pid)


# -- the slotd process -----------------------------------------------------------------


async def test_slotd_sigterm_stops_backends(tmp_path):
    box = two_slot_box(tmp_path)
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "slotd.log"
    async with slotd_process(box, port, log_path) as process:
        pids = await backend_pids_when_ready(address, {"a", "b"})
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = {
                name: (await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in ("", SLOT_SERVICE)
            }

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=10)
        elapsed = time.monotonic() - signalled

    log = log_path.read_text()
    assert serving == {"": health_pb2.HealthCheckResponse.SERVING,
                       SLOT_SERVICE: health_pb2.HealthCheckResponse.SERVING}
    assert sorted(pids) == ["a", "b"]
    assert all(pid > 0 for pid in pids.values())
    assert code == 0, log
    # Within the stand-ins' stop_grace (2 s), far below slotd's shutdown_grace (5 s).
    assert elapsed < 2.0
    assert [pid for pid in pids.values() if pid_alive(pid)] == []
    assert children_of(process.pid) == []
    # slotd stopped the backends itself: each went through UNLOADING to OFFLINE.
    assert "slot=a UNLOADING -> OFFLINE" in log
    assert "slot=b UNLOADING -> OFFLINE" in log
    assert "slotd stopped" in log


async def test_slotd_sigkill_takes_backends_along(tmp_path):
    box = two_slot_box(tmp_path)
    port = free_port()
    log_path = tmp_path / "slotd.log"
    async with slotd_process(box, port, log_path) as process:
        pids = await backend_pids_when_ready(f"127.0.0.1:{port}", {"a", "b"})
        process.kill()
        code = await process.wait()

    assert code == -signal.SIGKILL
    assert all(pid > 0 for pid in pids.values())
    # The kernel sends SIGKILL to each backend when slotd dies (PR_SET_PDEATHSIG).
    assert await still_alive_after(pids.values(), max_wait=5.0) == []
    assert "UNLOADING" not in log_path.read_text()
