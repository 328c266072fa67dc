"""Leases, draining and idle unloads over a real slotd, and leases taken through the dispatcher."""

from __future__ import annotations

import asyncio
import pathlib
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from support import (
    dispatch_stubs,
    model,
    read_until,
    running_dispatcher,
    running_slotd,
    slot,
    slot_stub,
    write_config,
)

from slotroute import rpc
from slotroute.dispatch.v1 import route_pb2, transport_pb2
from slotroute.slot.v1 import slot_pb2


def one_fit_box(directory: pathlib.Path, **slot_fields) -> pathlib.Path:
    """Slots a (m1) and b (m2) on a device with room for one of the two 1 GiB models."""
    return write_config(
        directory,
        devices=[{"name": "dev0", "memory": "1.5GiB"}],
        slots=[slot("a", model="m1", **slot_fields), slot("b", model="m2", **slot_fields)],
        models=[model("m1", ["a"]), model("m2", ["b"])],
    )


def is_synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def is_heartbeat(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_HEARTBEAT


def slot_event(name: str, state: int):
    def check(event) -> bool:
        return event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name and event.slot.state == state
    return check


def of_slot(events, name: str) -> list:
    return [event.slot for event in events if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name]


def seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def load(stub, name: str, *, timeout: float = 15.0):
    return stub.LoadModel(slot_pb2.LoadModelRequest(slot=name, wait=True), timeout=timeout)


def lease(stub, name: str, ttl: float = 30.0):
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(ttl * 1e9))
    return stub.AcquireLease(slot_pb2.AcquireLeaseRequest(slot=name, ttl=duration, holder="test"))


def release(stub, lease_id: str):
    return stub.ReleaseLease(slot_pb2.ReleaseLeaseRequest(id=lease_id))


async def get(stub, name: str):
    return await stub.GetSlot(slot_pb2.GetSlotRequest(name=name))


# -- draining before eviction ---------------------------------------------------------


async def test_leased_victim_drains_before_eviction(tmp_path):
    path = one_fit_box(tmp_path, drain_timeout=10.0)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        held = await lease(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        loading = asyncio.ensure_future(load(stub, "b"))
        draining = (await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_DRAINING)))[-1].slot
        pending_during_drain = not loading.done()
        released = await release(stub, held.id)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        answer = await loading
        call.cancel()

    assert draining.reason == slot_pb2.TRANSITION_REASON_EVICTED
    assert draining.message == "draining 1 lease: evicted to make room for m2"
    assert draining.in_flight == 1
    assert pending_during_drain
    assert released.released is True
    # The lease ended (in_flight 0) before the slot left DRAINING.
    a_events = of_slot(events, "a")
    assert [status.in_flight for status in a_events][0] == 0
    assert [status.state for status in a_events][0] == slot_pb2.SLOT_STATE_DRAINING
    assert [status.state for status in a_events][1:] == [slot_pb2.SLOT_STATE_UNLOADING, slot_pb2.SLOT_STATE_OFFLINE]
    assert list(answer.evicted) == ["a"]
    assert answer.slot.state == slot_pb2.SLOT_STATE_READY


async def test_drain_timeout_ends_held_lease(tmp_path):
    path = one_fit_box(tmp_path, drain_timeout=0.3)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        held = await lease(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        answer = await load(stub, "b")
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        call.cancel()
        released = await release(stub, held.id)
        a_status = await get(stub, "a")

    by_state = {status.state: status for status in of_slot(events, "a")}
    drain_seconds = (seconds(by_state[slot_pb2.SLOT_STATE_UNLOADING].state_since)
                     - seconds(by_state[slot_pb2.SLOT_STATE_DRAINING].state_since))
    assert drain_seconds >= 0.3
    assert answer.slot.state == slot_pb2.SLOT_STATE_READY
    # The lease ended with the process it was taken on.
    assert released.released is False
    assert a_status.in_flight == 0


async def test_victim_lease_races_eviction(tmp_path):
    # The lease and the load reach slotd in either order. A lease taken first is
    # drained for up to drain_timeout, and a lease requested after the eviction
    # began is rejected. Either way the load finishes within its deadline.
    path = one_fit_box(tmp_path, drain_timeout=0.5)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        started = time.monotonic()
        answer, taken = await asyncio.gather(load(stub, "b", timeout=5.0), lease(stub, "a"),
                                             return_exceptions=True)
        elapsed = time.monotonic() - started
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        again = await load(stub, "a", timeout=5.0)
        call.cancel()

    assert not isinstance(answer, BaseException), answer
    assert answer.slot.state == slot_pb2.SLOT_STATE_READY
    assert list(answer.evicted) == ["a"]
    assert elapsed < 5.0
    a_states = [status.state for status in of_slot(events, "a")]
    if isinstance(taken, BaseException):
        assert taken.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert slot_pb2.SLOT_STATE_DRAINING not in a_states
    else:
        assert taken.slot == "a"
        assert a_states[-3:] == [slot_pb2.SLOT_STATE_DRAINING, slot_pb2.SLOT_STATE_UNLOADING,
                                 slot_pb2.SLOT_STATE_OFFLINE]
    assert again.slot.state == slot_pb2.SLOT_STATE_READY
    assert list(again.evicted) == ["b"]


async def test_load_past_deadline_finishes_after_drain(tmp_path):
    path = one_fit_box(tmp_path, drain_timeout=0.5)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        await lease(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "b", timeout=0.2)
        await read_until(call, slot_event("b", slot_pb2.SLOT_STATE_READY))
        later = await load(stub, "a", timeout=5.0)
        call.cancel()

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert later.slot.state == slot_pb2.SLOT_STATE_READY
    assert list(later.evicted) == ["b"]


# -- lease rules ----------------------------------------------------------------------


async def test_lease_refused_on_offline_slot(tmp_path):
    path = one_fit_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lease(stub, "a")

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _delay = rpc.error_details(caught.value)
    assert info.reason == "SLOT_NOT_READY"
    assert caught.value.details() == "slot 'a' is OFFLINE, not READY; leases are taken on READY slots"


async def test_lease_expires_after_ttl(tmp_path):
    path = one_fit_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        held = await lease(stub, "a", ttl=0.2)
        events = await read_until(call, lambda event: event.slot.name == "a" and event.slot.in_flight == 0)
        call.cancel()
        released = await release(stub, held.id)

    counts = [status.in_flight for status in of_slot(events, "a")]
    assert counts == [1, 0]
    expired = of_slot(events, "a")[-1]
    assert seconds(expired.last_used_time) - seconds(held.expire_time) >= -0.01
    assert released.released is False


# -- idle unload ----------------------------------------------------------------------


async def test_idle_slot_unloads_with_reason(tmp_path):
    path = one_fit_box(tmp_path, idle_timeout=0.3)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        await load(stub, "a")
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        call.cancel()

    by_state = {status.state: status for status in of_slot(events, "a")}
    offline = by_state[slot_pb2.SLOT_STATE_OFFLINE]
    assert offline.reason == slot_pb2.TRANSITION_REASON_IDLE
    assert offline.message == "idle for 0.3 s without leases"
    assert by_state[slot_pb2.SLOT_STATE_UNLOADING].reason == slot_pb2.TRANSITION_REASON_IDLE
    idle_seconds = (seconds(by_state[slot_pb2.SLOT_STATE_UNLOADING].state_since)
                    - seconds(by_state[slot_pb2.SLOT_STATE_READY].state_since))
    assert idle_seconds >= 0.3


async def test_lease_postpones_idle_unload(tmp_path):
    path = one_fit_box(tmp_path, idle_timeout=0.3)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        held = await lease(stub, "a")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        # Heartbeats come every 0.2 s while nothing changes: three of them span
        # more than the idle timeout.
        quiet = []
        for _beat in range(3):
            quiet += await read_until(call, is_heartbeat)
        await release(stub, held.id)
        events = await read_until(call, slot_event("a", slot_pb2.SLOT_STATE_OFFLINE))
        call.cancel()

    assert of_slot(quiet, "a") == []
    released_at = seconds(of_slot(events, "a")[0].last_used_time)
    unloading = next(status for status in of_slot(events, "a") if status.state == slot_pb2.SLOT_STATE_UNLOADING)
    assert of_slot(events, "a")[0].in_flight == 0
    assert seconds(unloading.state_since) - released_at >= 0.3
    assert unloading.reason == slot_pb2.TRANSITION_REASON_IDLE


# -- through the dispatcher -----------------------------------------------------------


async def test_resolve_lease_counts_in_flight(tmp_path):
    path = write_config(
        tmp_path,
        slots=[slot("a", model="m1")],
        models=[model("m1", ["a"])],
        dispatcher={},
    )
    async with (
        running_slotd(path) as slotd,
        running_dispatcher(path, [slotd.address]) as dispatcher,
        dispatch_stubs(dispatcher.address) as (transport, _capability),
        slot_stub(slotd.address) as stub,
    ):
        deadline = time.monotonic() + 10
        while not dispatcher.dispatcher.all_synced_once():
            assert time.monotonic() < deadline, "the dispatcher never synced with slotd"
            await asyncio.sleep(0.01)

        resolved = await transport.Resolve(
            transport_pb2.ResolveRequest(model="m1", policy=route_pb2.WaitPolicy(lease=True)), timeout=15)
        during = await get(stub, "a")
        released = await transport.ReleaseLease(
            route_pb2.ReleaseLeaseRequest(source=resolved.target.source, lease_id=resolved.target.lease.id))
        after = await get(stub, "a")

    assert len(resolved.target.lease.id) == 32
    assert resolved.target.lease.slot == "a"
    assert resolved.target.lease.generation == 1
    assert during.in_flight == 1
    assert released.released is True
    assert after.in_flight == 0
