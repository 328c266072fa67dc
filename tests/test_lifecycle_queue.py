"""The load queue of a slot over a real slotd: joins, first-in-first-out order, max_queue, deadlines."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest
from support import model, read_until, running_slotd, slot, slot_stub, write_config

from slotroute import rpc
from slotroute.slot.v1 import slot_pb2


def queue_box(directory: pathlib.Path, *, max_queue: int, load_delay: float) -> pathlib.Path:
    """Slot a may run m1..m4, each start taking `load_delay` seconds to become ready."""
    return write_config(
        directory,
        slots=[slot("a", load_delay=load_delay, max_queue=max_queue)],
        models=[model(f"m{number}", ["a"]) for number in range(1, 5)],
    )


def is_synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def is_ready_with(model_id: str):
    def check(event) -> bool:
        return (event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == "a"
                and event.slot.state == slot_pb2.SLOT_STATE_READY and event.slot.model_id == model_id)
    return check


def started_models(events) -> list[str]:
    """Model ids of slot a's starts, in stream order."""
    models = []
    last_generation = 0
    for event in events:
        if event.type != slot_pb2.EVENT_TYPE_SLOT or event.slot.name != "a":
            continue
        if event.slot.state == slot_pb2.SLOT_STATE_STARTING and event.slot.generation != last_generation:
            models.append(event.slot.model_id)
            last_generation = event.slot.generation
    return models


def load(stub, model_id: str, *, wait: bool = True, timeout: float = 15.0):
    return stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id=model_id, wait=wait), timeout=timeout)


async def test_same_model_loads_join(tmp_path):
    path = queue_box(tmp_path, max_queue=0, load_delay=0.2)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        answers = await asyncio.gather(*(load(stub, "m1") for _ in range(5)))

    assert [answer.slot.state for answer in answers] == [slot_pb2.SLOT_STATE_READY] * 5
    assert sorted(answer.joined for answer in answers) == [False, True, True, True, True]
    assert {answer.slot.generation for answer in answers} == {1}


async def test_third_load_gets_queue_full(tmp_path):
    path = queue_box(tmp_path, max_queue=1, load_delay=0.3)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        first = await load(stub, "m1", wait=False)
        second = await load(stub, "m2", wait=False)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "m3", wait=False)
        events = await read_until(call, is_ready_with("m2"))
        call.cancel()

    assert first.joined is False
    assert second.joined is False
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, retry_delay = rpc.error_details(caught.value)
    assert info.reason == "LOAD_QUEUE_FULL"
    assert retry_delay == 1.0
    assert "slot 'a' already has 1 loads queued behind the one running (max_queue = 1)" in caught.value.details()
    assert started_models(events) == ["m1", "m2"]


async def test_queued_same_model_shares_ticket(tmp_path):
    # With max_queue 1, a second queued load of another model would be rejected;
    # callers of the model already queued share its place.
    path = queue_box(tmp_path, max_queue=1, load_delay=0.3)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        await load(stub, "m1", wait=False)
        answers = await asyncio.gather(load(stub, "m2"), load(stub, "m2"), load(stub, "m2"))
        events = await read_until(call, is_ready_with("m2"))
        call.cancel()

    assert [answer.slot.model_id for answer in answers] == ["m2", "m2", "m2"]
    assert [answer.slot.state for answer in answers] == [slot_pb2.SLOT_STATE_READY] * 3
    assert sorted(answer.joined for answer in answers) == [False, True, True]
    assert started_models(events) == ["m1", "m2"]


async def test_expired_waiter_leaves_queue(tmp_path):
    path = queue_box(tmp_path, max_queue=2, load_delay=0.6)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        await load(stub, "m1", wait=False)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "m2", timeout=0.2)
        third = await load(stub, "m3")
        events = await read_until(call, is_ready_with("m3"))
        call.cancel()
        final = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))
        queue_length = len(slotd.manager._queues["a"])

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert third.slot.model_id == "m3"
    assert third.joined is False
    # m2's caller gave up while m2 waited in the queue, so m2 never started.
    assert started_models(events) == ["m1", "m3"]
    assert final.model_id == "m3"
    assert final.generation == 2
    assert queue_length == 0


async def test_waiter_past_its_turn_finishes_load(tmp_path):
    # A caller that gives up after its load took the slot's turn leaves the load
    # running, because other callers may join the start.
    path = queue_box(tmp_path, max_queue=2, load_delay=0.6)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "m1", timeout=0.2)
        events = await read_until(call, is_ready_with("m1"))
        call.cancel()

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert started_models(events) == ["m1"]
