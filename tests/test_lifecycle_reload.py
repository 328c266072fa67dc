"""Config reload over a real slotd: ReloadConfig in process and SIGHUP to a slotd process."""

from __future__ import annotations

import asyncio
import pathlib
import signal

import grpc
import psutil
import pytest
from support import (
    free_port,
    model,
    pid_alive,
    read_until,
    running_slotd,
    slot,
    slot_stub,
    slotd_process,
    write_config,
)

from slotroute import rpc
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

# Channel options for a server that is still starting: retry the connection quickly.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def write_box(directory: pathlib.Path, *, b_delay: float = 0.05, with_b: bool = True,
              m1_args: tuple[str, ...] = (), **extra) -> pathlib.Path:
    """Slots a (m1) and b (m2), both preloaded; the arguments vary one part per reload."""
    slots = [slot("a", model="m1", preload=True)]
    models = [model("m1", ["a"], args=list(m1_args))]
    if with_b:
        slots.append(slot("b", model="m2", preload=True, load_delay=b_delay, drain_timeout=10.0))
        models.append(model("m2", ["b"]))
    return write_config(directory, slots=slots, models=models, **extra)


def is_synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def ready(name: str, generation: int):
    def check(event) -> bool:
        return (event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name
                and event.slot.state == slot_pb2.SLOT_STATE_READY and event.slot.generation == generation)
    return check


def slot_event(name: str, state: int):
    def check(event) -> bool:
        return event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name and event.slot.state == state
    return check


async def slots_by_name(stub) -> dict:
    listing = await stub.ListSlots(slot_pb2.ListSlotsRequest())
    return {entry.name: entry for entry in listing.slots}


async def preloaded(stub, names: tuple[str, ...] = ("a", "b")) -> tuple[object, dict]:
    """Subscribe, wait until every named slot is READY, and return the stream and the slots."""
    call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
    states: dict[str, int] = {}

    def all_ready(event) -> bool:
        if event.type == slot_pb2.EVENT_TYPE_SLOT:
            states[event.slot.name] = event.slot.state
        return event.type != slot_pb2.EVENT_TYPE_CATALOG and \
            all(states.get(name) == slot_pb2.SLOT_STATE_READY for name in names)

    await read_until(call, all_ready)
    return call, await slots_by_name(stub)


async def test_reload_restarts_only_changed_slot(tmp_path):
    path = write_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call, before = await preloaded(stub)
        write_box(tmp_path, b_delay=0.06)
        answer = await stub.ReloadConfig(slot_pb2.ReloadConfigRequest())
        await read_until(call, ready("b", 2))
        call.cancel()
        after = await slots_by_name(stub)

    assert list(answer.restarted) == ["b"]
    assert list(answer.unchanged) == ["a"]
    assert list(answer.added) == []
    assert list(answer.removed) == []
    assert after["a"].pid == before["a"].pid
    assert after["a"].generation == before["a"].generation == 1
    assert after["b"].generation == 2
    assert after["b"].model_id == "m2"
    assert after["b"].pid != before["b"].pid
    assert not pid_alive(before["b"].pid)


async def test_reload_restarts_slot_of_changed_model(tmp_path):
    path = write_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call, before = await preloaded(stub)
        write_box(tmp_path, m1_args=("--load-delay", "0.06"))
        answer = await stub.ReloadConfig(slot_pb2.ReloadConfigRequest())
        await read_until(call, ready("a", 2))
        call.cancel()
        after = await slots_by_name(stub)

    assert list(answer.restarted) == ["a"]
    assert list(answer.unchanged) == ["b"]
    assert after["b"].pid == before["b"].pid
    assert after["a"].pid != before["a"].pid


async def test_reload_drains_and_removes_slot(tmp_path):
    path = write_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call, before = await preloaded(stub)
        lease = await stub.AcquireLease(slot_pb2.AcquireLeaseRequest(slot="b", holder="test"))
        write_box(tmp_path, with_b=False)

        reloading = asyncio.ensure_future(stub.ReloadConfig(slot_pb2.ReloadConfigRequest()))
        draining = (await read_until(call, slot_event("b", slot_pb2.SLOT_STATE_DRAINING)))[-1].slot
        reload_waited = not reloading.done()
        await stub.ReleaseLease(slot_pb2.ReleaseLeaseRequest(id=lease.id))
        answer = await reloading
        events = await read_until(call, lambda event: event.type == slot_pb2.EVENT_TYPE_SLOT_REMOVED)
        call.cancel()
        after = await slots_by_name(stub)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.LoadModel(slot_pb2.LoadModelRequest(slot="b", wait=True))

    assert draining.reason == slot_pb2.TRANSITION_REASON_CONFIG_RELOAD
    assert draining.message == "draining 1 lease: slot removed from the config"
    assert reload_waited
    assert list(answer.removed) == ["b"]
    assert list(answer.unchanged) == ["a"]
    assert events[-1].slot.name == "b"
    b_states = [event.slot.state for event in events
                if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == "b"]
    assert b_states[-2:] == [slot_pb2.SLOT_STATE_UNLOADING, slot_pb2.SLOT_STATE_OFFLINE]
    assert not pid_alive(before["b"].pid)
    assert list(after) == ["a"]
    assert after["a"].pid == before["a"].pid
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_invalid_reload_keeps_running_config(tmp_path):
    path = write_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call, before = await preloaded(stub)
        call.cancel()
        running_config = slotd.manager.config
        document = path.read_text().replace('device = "dev0"', 'device = "gpu9"', 1)
        path.write_text(document)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReloadConfig(slot_pb2.ReloadConfigRequest())
        after = await slots_by_name(stub)
        kept_config = slotd.manager.config

    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _delay = rpc.error_details(error)
    assert info.reason == "INVALID_CONFIG"
    assert error.details() == (
        f"config rejected, the running config stays: {path}: [[slotd.slots]] name = 'a': "
        "field 'device': unknown device 'gpu9'; known devices: dev0"
    )
    assert kept_config is running_config
    assert {name: (entry.pid, entry.generation) for name, entry in after.items()} == \
        {name: (entry.pid, entry.generation) for name, entry in before.items()}


async def test_unreadable_device_rejects_reload(tmp_path):
    # Whether or not nvidia-ml-py is installed, this machine has no NVIDIA GPU 7.
    path = write_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call, before = await preloaded(stub)
        call.cancel()
        running_config = slotd.manager.config
        write_box(tmp_path, b_delay=0.06, devices=[
            {"name": "dev0", "memory": "64GiB"},
            {"name": "gpu7", "kind": "nvidia", "memory": "auto", "index": 7},
        ])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReloadConfig(slot_pb2.ReloadConfigRequest())
        after = await slots_by_name(stub)
        kept_config = slotd.manager.config

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(
        f"config rejected, the running config stays: {path}: [[slotd.devices]] name = 'gpu7': "
        "field 'memory': "
    )
    assert kept_config is running_config
    assert after["b"].pid == before["b"].pid
    assert after["b"].generation == 1


async def test_reload_waits_for_running_load(tmp_path):
    # The reload takes slot a's turn after the load of m1 in progress, and a
    # load of m2 queued behind the reload starts under the new definition.

    def write(delay: str) -> pathlib.Path:
        entry = slot("a", model="m1", load_delay=float(delay))
        return write_config(tmp_path, slots=[entry], models=[model("m1", ["a"]), model("m2", ["a"])])

    path = write("0.4")
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=False))
        write("0.05")
        reloading = asyncio.ensure_future(stub.ReloadConfig(slot_pb2.ReloadConfigRequest()))
        queue = slotd.manager._queues["a"]
        deadline = asyncio.get_running_loop().time() + 10
        while len(queue) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the reload never queued for slot a"
            await asyncio.sleep(0.005)
        swapping = asyncio.ensure_future(
            stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m2", wait=True)))
        answer = await reloading
        loaded = await swapping
        argv = psutil.Process(loaded.slot.pid).cmdline()
        events = await read_until(call, ready("a", 2))
        call.cancel()

    a_events = [event.slot for event in events if event.type == slot_pb2.EVENT_TYPE_SLOT]
    starts = {status.generation: status.model_id for status in a_events
              if status.state == slot_pb2.SLOT_STATE_STARTING}
    assert list(answer.restarted) == ["a"]
    assert starts == {1: "m1", 2: "m2"}
    ready_first = [status for status in a_events if status.state == slot_pb2.SLOT_STATE_READY]
    assert ready_first[0].generation == 1
    unloading = next(status for status in a_events if status.state == slot_pb2.SLOT_STATE_UNLOADING)
    assert unloading.reason == slot_pb2.TRANSITION_REASON_CONFIG_RELOAD
    assert loaded.slot.model_id == "m2"
    assert loaded.slot.generation == 2
    assert argv[argv.index("--load-delay") + 1] == "0.05"


async def test_sighup_reloads_slotd_process(tmp_path):
    path = write_box(tmp_path)
    port = free_port()
    async with slotd_process(path, port, tmp_path / "slotd.log") as process:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=20)
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            call, before = await preloaded(stub)

            write_box(tmp_path, b_delay=0.06)
            process.send_signal(signal.SIGHUP)
            await read_until(call, ready("b", 2))
            call.cancel()
            after = await slots_by_name(stub)

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=20)

    assert after["a"].pid == before["a"].pid
    assert after["a"].generation == 1
    assert after["b"].generation == 2
    assert not pid_alive(before["b"].pid)
    assert code == 0
    assert not pid_alive(after["a"].pid)
    assert not pid_alive(after["b"].pid)
