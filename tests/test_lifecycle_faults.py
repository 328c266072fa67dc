"""Crashes, restart backoff, start timeouts and the stall watchdog over a real slotd."""

from __future__ import annotations

import logging
import pathlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    model,
    pid_alive,
    read_until,
    running_slotd,
    slot,
    slot_stub,
    standin,
    write_config,
)

from slotroute import rpc
from slotroute.slot.v1 import slot_pb2

# Runs the stand-in, crashing 0.5 s after start while the flag file exists.
# argv: FLAG, then the stand-in's own arguments.
CRASH_WHILE_FLAGGED = (
    "import os, sys\n"
    "flag, arguments = sys.argv[1], sys.argv[2:]\n"
    "if os.path.exists(flag):\n"
    "    arguments += ['--crash-after', '0.5', '--exit-code', '3']\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'slotroute.standin', *arguments])\n"
)

# Exits with code 3 at once while the flag file exists, else runs the stand-in.
FAIL_WHILE_FLAGGED = (
    "import os, sys\n"
    "flag, arguments = sys.argv[1], sys.argv[2:]\n"
    "if os.path.exists(flag):\n"
    "    sys.stderr.write('flag file present, exiting\\n')\n"
    "    sys.exit(3)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'slotroute.standin', *arguments])\n"
)

# Listens on the port and never accepts, so every HTTP probe waits for its timeout.
SILENT_LISTENER = (
    "import socket, sys, time\n"
    "server = socket.socket()\n"
    "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "server.bind((sys.argv[1], int(sys.argv[2])))\n"
    "server.listen(16)\n"
    "time.sleep(3600)\n"
)



def wrapped_slot(script: str, flag: pathlib.Path, **fields) -> dict:
    """Slot a running `script` with the flag path, then the stand-in's arguments."""
    entry = slot("a", model="m1", **fields)
    entry["command"] = ["{python}", "-c", script, str(flag), *standin()[3:]]
    return entry


def is_synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def slot_event(state: int, **matches):
    def check(event) -> bool:
        if event.type != slot_pb2.EVENT_TYPE_SLOT or event.slot.name != "a" or event.slot.state != state:
            return False
        return all(getattr(event.slot.failure, key) == value for key, value in matches.items())
    return check


def errors_of(events) -> list:
    """Slot a's ERROR statuses, one per failure."""
    return [event.slot for event in events
            if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == "a"
            and event.slot.state == slot_pb2.SLOT_STATE_ERROR]


def seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def load(stub, *, wait: bool = True, timeout: float = 15.0):
    return stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=wait), timeout=timeout)


# -- crash loops ----------------------------------------------------------------------


async def test_crash_loop_backs_off_then_recovers(tmp_path):
    flag = tmp_path / "crash"
    flag.touch()
    backoff, backoff_max = 0.05, 0.4
    path = write_config(
        tmp_path,
        slots=[wrapped_slot(CRASH_WHILE_FLAGGED, flag, max_restarts=50,
                            restart_backoff=backoff, restart_backoff_max=backoff_max)],
        models=[model("m1", ["a"])],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        await load(stub)
        events = await read_until(call, slot_event(slot_pb2.SLOT_STATE_ERROR, restart_count=3))
        flag.unlink()
        events += await read_until(call, lambda event: event.slot.name == "a"
                                   and event.slot.state == slot_pb2.SLOT_STATE_READY
                                   and event.slot.reason == slot_pb2.TRANSITION_REASON_PROBE
                                   and event.slot.generation >= 4)
        final = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))
        call.cancel()

    failures = errors_of(events)
    assert [status.failure.restart_count for status in failures][:3] == [1, 2, 3]
    # The crash comes 0.5 s after the process started: usually after READY
    # (CRASHED), but on a busy machine the start may not be done by then.
    crash_messages = {
        slot_pb2.TRANSITION_REASON_CRASHED: "backend exited with code 3 unexpectedly",
        slot_pb2.TRANSITION_REASON_LAUNCH_FAILED: "backend exited with code 3 while starting",
    }
    for number, status in enumerate(failures[:3], start=1):
        assert status.reason in crash_messages
        assert status.message.startswith(crash_messages[status.reason])
        assert status.failure.exit_code == 3
        assert status.failure.restarts_exhausted is False
        assert status.failure.HasField("next_retry_time")
        delay = seconds(status.failure.next_retry_time) - seconds(status.state_since)
        expected = min(backoff * 2 ** (number - 1), backoff_max)
        assert 0.8 * expected - 0.01 <= delay <= 1.2 * expected + 0.01, (number, delay)
    start_reasons = {event.slot.generation: event.slot.reason for event in events
                     if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.state == slot_pb2.SLOT_STATE_STARTING}
    assert start_reasons[1] == slot_pb2.TRANSITION_REASON_REQUESTED
    assert {start_reasons[generation] for generation in range(2, 5)} == {slot_pb2.TRANSITION_REASON_RESTART}
    assert final.state == slot_pb2.SLOT_STATE_READY
    assert final.generation >= 4


async def test_restarts_exhausted_then_load_again(tmp_path):
    flag = tmp_path / "fail"
    flag.touch()
    path = write_config(
        tmp_path,
        slots=[wrapped_slot(FAIL_WHILE_FLAGGED, flag, max_restarts=2,
                            restart_backoff=0.3, restart_backoff_max=0.5)],
        models=[model("m1", ["a"])],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        await load(stub, wait=False)
        events = await read_until(call, slot_event(slot_pb2.SLOT_STATE_ERROR, restarts_exhausted=True))

        # With the backend still failing, an explicit load gets a fresh budget.
        with pytest.raises(grpc.aio.AioRpcError) as failed_again:
            await load(stub)
        fresh = (await read_until(call, slot_event(slot_pb2.SLOT_STATE_ERROR, restart_count=1)))[-1].slot

        flag.unlink()
        await read_until(call, slot_event(slot_pb2.SLOT_STATE_READY))
        call.cancel()
        final = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    failures = errors_of(events)
    assert [status.failure.restart_count for status in failures] == [1, 2, 3]
    assert [status.failure.restarts_exhausted for status in failures] == [False, False, True]
    exhausted = failures[-1]
    assert not exhausted.failure.HasField("next_retry_time")
    assert exhausted.reserved_bytes == 0
    assert exhausted.message.endswith("2 restarts spent, load the slot again to retry")
    assert exhausted.failure.stderr_tail[-1] == "flag file present, exiting"
    assert failed_again.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fresh.failure.restarts_exhausted is False
    assert fresh.failure.HasField("next_retry_time")
    assert final.state == slot_pb2.SLOT_STATE_READY
    assert final.generation == 5


async def test_load_during_backoff_gets_retry_delay(tmp_path):
    flag = tmp_path / "fail"
    flag.touch()
    path = write_config(
        tmp_path,
        slots=[wrapped_slot(FAIL_WHILE_FLAGGED, flag, restart_backoff=30.0, restart_backoff_max=30.0)],
        models=[model("m1", ["a"])],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await load(stub)
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await load(stub)
        status = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    assert first.value.code() == grpc.StatusCode.UNAVAILABLE
    first_info, first_delay = rpc.error_details(first.value)
    assert first_info.reason == "START_FAILED"
    assert 24.0 - 0.5 <= first_delay <= 30.0
    assert second.value.code() == grpc.StatusCode.UNAVAILABLE
    second_info, second_delay = rpc.error_details(second.value)
    assert second_info.reason == "BACKOFF"
    assert 24.0 - 0.5 <= second_delay <= 30.0
    assert second.value.details().startswith("slot 'a' failed (backend exited with code 3 while starting")
    assert status.state == slot_pb2.SLOT_STATE_ERROR
    assert status.generation == 1


# -- start timeout --------------------------------------------------------------------


async def test_unready_start_killed_after_timeout(tmp_path):
    entry = slot("a", model="m1", start_timeout=1.0, max_restarts=0, standin_args=["--fail-health"])
    path = write_config(tmp_path, slots=[entry], models=[model("m1", ["a"])])
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub)
        events = await read_until(call, slot_event(slot_pb2.SLOT_STATE_ERROR))
        call.cancel()

    pids = {event.slot.pid for event in events if event.slot.name == "a" and event.slot.pid}
    failed = events[-1].slot
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == slot_pb2.TRANSITION_REASON_START_TIMEOUT
    assert failed.message == ("not ready after 1 s (last probe: GET /health answered 503); "
                              "0 restarts spent, load the slot again to retry")
    assert failed.pid == 0
    assert len(pids) == 1
    assert not pid_alive(pids.pop())


# -- stall watchdog -------------------------------------------------------------------


async def test_stalled_start_sets_not_serving(tmp_path, caplog):
    # The probe timeout (2 s) outlasts start_timeout + stop_grace + stall_margin
    # (0.7 s): the start overruns its bound until the probe returns and the
    # supervisor kills the backend.
    entry = slot("a", model="m1", start_timeout=0.5, stop_grace=0.1, max_restarts=0,
                 probe={"interval": 0.005, "timeout": 2.0})
    entry["command"] = ["{python}", "-c", SILENT_LISTENER, "{host}", "{port}"]
    path = write_config(tmp_path, slots=[entry], models=[model("m1", ["a"])],
                        slotd={"stall_margin": 0.1, "watchdog_interval": 0.02})
    caplog.set_level(logging.INFO, logger="slotroute.slot")
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        async with grpc.aio.insecure_channel(slotd.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await health.read()
            await load(stub, wait=False)
            second = await health.read()
            stalled_flag = slotd.manager.stalled
            third = await health.read()
            health.cancel()
        final = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert [first.status, second.status, third.status] == [serving, not_serving, serving]
    assert stalled_flag is True
    stall_lines = [record.getMessage() for record in caplog.records if "slotd stalled" in record.getMessage()]
    assert len(stall_lines) == 1
    assert "slot a: start of m1 began" in stall_lines[0]
    assert "past its bound of 0.6 s + stall_margin 0.1 s" in stall_lines[0]
    assert any("slotd no longer stalled" in record.getMessage() for record in caplog.records)
    assert final.state == slot_pb2.SLOT_STATE_ERROR
    assert final.reason == slot_pb2.TRANSITION_REASON_START_TIMEOUT
