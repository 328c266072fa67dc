"""WatchSlots over a real slotd on port 0: snapshot, order, resume, heartbeats, cleanup, slow readers."""

import asyncio
import os
import resource

import psutil
import pytest
from support import model, read_until, running_slotd, slot, slot_states, slot_stub, write_config

from slotroute.slot.states import Reason, State
from slotroute.slot.v1 import slot_pb2
from slotroute.slot.watch import EventKind, RevisionLog


def synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


@pytest.fixture
def box(tmp_path):
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1"), slot("b", "embed", model="e1")],
        models=[model("m1", ["a"]), model("e1", ["b"], capability="embed")],
    )


async def test_watch_snapshot_then_synced(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        events = await read_until(call, synced)
        call.cancel()

    kinds = [slot_pb2.EventType.Name(event.type) for event in events]
    assert kinds == ["EVENT_TYPE_CATALOG", "EVENT_TYPE_SLOT", "EVENT_TYPE_SLOT", "EVENT_TYPE_SYNCED"]
    assert [event.slot.name for event in events[1:3]] == ["a", "b"]
    assert all(event.snapshot for event in events)
    assert {event.snapshot_reason for event in events} == {slot_pb2.SNAPSHOT_REASON_NEW_SUBSCRIBER}
    assert {event.epoch for event in events} == {slotd.manager.log.epoch}
    assert events[-1].revision == slotd.manager.log.revision
    assert [entry.id for entry in events[0].catalog] == ["m1", "e1"]


async def test_watch_changes_in_order(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, synced)
        await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=True))
        events = await read_until(
            call, lambda e: e.slot.name == "a" and e.slot.state == slot_pb2.SLOT_STATE_READY
        )
        call.cancel()

    assert slot_states(events, "a") == ["STARTING", "WARMING", "READY"]
    revisions = [event.revision for event in events]
    assert revisions == sorted(revisions)
    assert len(set(revisions)) == len(revisions)
    assert not any(event.snapshot for event in events)


async def test_watch_resume_inside_history(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        first = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        opening = await read_until(first, synced)
        first.cancel()
        epoch, revision = opening[-1].epoch, opening[-1].revision

        await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=True))
        current = slotd.manager.log.revision

        resumed = stub.WatchSlots(slot_pb2.WatchSlotsRequest(resume_epoch=epoch, resume_revision=revision))
        events = await read_until(resumed, synced)
        resumed.cancel()

    assert [event.revision for event in events[:-1]] == list(range(revision + 1, current + 1))
    assert slot_states(events, "a") == ["STARTING", "WARMING", "READY"]
    assert events[-1].revision == current
    assert not events[-1].snapshot
    assert events[-1].snapshot_reason == slot_pb2.SNAPSHOT_REASON_UNSPECIFIED


async def test_watch_resume_old_epoch_gives_snapshot(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest(resume_epoch="an-old-epoch", resume_revision=3))
        events = await read_until(call, synced)
        call.cancel()

    assert [event.type for event in events] == [
        slot_pb2.EVENT_TYPE_CATALOG, slot_pb2.EVENT_TYPE_SLOT, slot_pb2.EVENT_TYPE_SLOT,
        slot_pb2.EVENT_TYPE_SYNCED,
    ]
    assert {event.snapshot_reason for event in events} == {slot_pb2.SNAPSHOT_REASON_EPOCH_CHANGED}
    assert all(event.snapshot for event in events)


async def test_watch_resume_after_history_gone(tmp_path):
    path = write_config(tmp_path, slots=[slot("a", model="m1")], models=[model("m1", ["a"])],
                        slotd={"history_size": 2})
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        log = slotd.manager.log
        for _ in range(5):
            slotd.manager.table.update("a", message=f"tick {log.revision}")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest(resume_epoch=log.epoch, resume_revision=1))
        events = await read_until(call, synced)
        call.cancel()

    assert events[-1].snapshot_reason == slot_pb2.SNAPSHOT_REASON_HISTORY_GONE
    assert [event.type for event in events] == [
        slot_pb2.EVENT_TYPE_CATALOG, slot_pb2.EVENT_TYPE_SLOT, slot_pb2.EVENT_TYPE_SYNCED,
    ]


async def test_watch_heartbeats_while_idle(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, synced)
        events = await read_until(call, lambda e: e.type == slot_pb2.EVENT_TYPE_HEARTBEAT, timeout=3)
        call.cancel()

    assert len(events) == 1
    assert events[0].revision == slotd.manager.log.revision
    assert events[0].epoch == slotd.manager.log.epoch


async def test_cancelled_streams_leave_no_subscribers(box):
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        calls = [stub.WatchSlots(slot_pb2.WatchSlotsRequest()) for _ in range(100)]
        for call in calls:
            await read_until(call, synced)
        assert slotd.manager.log.subscriber_count == 100

        for call in calls:
            call.cancel()
        async with asyncio.timeout(5):
            while slotd.manager.log.subscriber_count:
                await asyncio.sleep(0.01)

        assert slotd.manager.log.subscriber_count == 0


async def test_slow_subscriber_memory_bounded(box):
    """10,000 changes while one subscriber reads one event per second: memory stays bounded."""
    async with running_slotd(box) as slotd, slot_stub(slotd.address) as stub:
        manager = slotd.manager
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, synced)
        subscription = next(iter(manager.log._subscribers))
        rss_before = psutil.Process(os.getpid()).memory_info().rss

        for index in range(10_000):
            manager.table.update("a", message=f"change {index}")
            if index % 500 == 0:
                await asyncio.sleep(0)  # let gRPC flush what it can
        max_pending = manager.config.max_pending_events
        assert subscription.pending() <= max_pending + len(manager.table.names())
        rss_after = psutil.Process(os.getpid()).memory_info().rss

        # The reader takes one event per second for a few seconds, then drains the rest.
        for _ in range(3):
            await call.read()
            await asyncio.sleep(1.0)
        last = None
        async with asyncio.timeout(10):
            while True:
                event = await call.read()
                if event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == "a":
                    last = event
                    if event.slot.message == "change 9999":
                        break
        call.cancel()

    assert last.slot.message == "change 9999"
    assert subscription.coalesced > 0
    # 10,000 retained events would hold about 10,000 Slot messages; the bound keeps growth small.
    assert rss_after - rss_before < 20 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_revision_log_coalesces_to_latest_per_key():
    log = RevisionLog(history_size=10, max_pending=3)
    subscription, _opening = log.subscribe(lambda: [])
    for index in range(6):
        log.publish(EventKind.SLOT, "a" if index % 2 else "b", index)

    events = []
    while subscription.pending():
        events.append(subscription._queue.popleft())
    assert [(event.key, event.payload) for event in events] == [("b", 4), ("a", 5)]
    assert subscription.coalesced == 4
    assert [event.revision for event in events] == [5, 6]


def test_state_enum_matches_wire_enum():
    assert [f"SLOT_STATE_{state.value}" for state in State] == [
        name for name in slot_pb2.SlotState.keys() if name != "SLOT_STATE_UNSPECIFIED"
    ]
    assert [f"TRANSITION_REASON_{reason.value}" for reason in Reason] == list(
        slot_pb2.TransitionReason.keys()
    )
