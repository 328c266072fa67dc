"""Memory admission over a real slotd: reservations, evictions, min_residency, exclusive groups."""

from __future__ import annotations

import asyncio
import pathlib
import time

import grpc
import pytest
from support import model, read_until, running_slotd, slot, slot_stub, write_config

from slotroute import rpc
from slotroute.slot.config import DeviceSpec
from slotroute.slot.memory import MemoryUnknown, read_device
from slotroute.slot.v1 import slot_pb2

GIB = 2**30



def two_slot_box(directory: pathlib.Path, device_memory: str, **slot_fields) -> pathlib.Path:
    """Slots a (model m1) and b (model m2) on dev0, each model declaring 1 GiB."""
    return write_config(
        directory,
        devices=[{"name": "dev0", "memory": device_memory}],
        slots=[slot("a", model="m1", **slot_fields), slot("b", model="m2", **slot_fields)],
        models=[model("m1", ["a"]), model("m2", ["b"])],
    )


def is_synced(event) -> bool:
    return event.type == slot_pb2.EVENT_TYPE_SYNCED


def slot_event(name: str, state: int, model_id: str | None = None):
    def check(event) -> bool:
        return (event.type == slot_pb2.EVENT_TYPE_SLOT and event.slot.name == name
                and event.slot.state == state
                and (model_id is None or event.slot.model_id == model_id))
    return check


def start_times(events) -> list[tuple[str, float]]:
    """(slot, wall-clock time) of every process start in the events, in stream order."""
    starts = []
    seen = set()
    for event in events:
        if event.type != slot_pb2.EVENT_TYPE_SLOT or event.slot.state != slot_pb2.SLOT_STATE_STARTING:
            continue
        key = (event.slot.name, event.slot.generation)
        if key not in seen:
            seen.add(key)
            starts.append((event.slot.name, event.slot.state_since.ToNanoseconds() / 1e9))
    return starts


async def drain_events(call, until_revision: int) -> list:
    """Read events until one at `until_revision` or later arrives."""
    return await read_until(call, lambda event: event.revision >= until_revision)


def load(stub, slot_name: str, model_id: str = "", *, timeout: float = 15.0):
    return stub.LoadModel(slot_pb2.LoadModelRequest(slot=slot_name, model_id=model_id, wait=True),
                          timeout=timeout)


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info, _delay = rpc.error_details(error)
    assert info is not None, f"no ErrorInfo in {error.code().name}: {error.details()}"
    return info.reason


# -- starts and thrashing -----------------------------------------------------------


async def test_alternating_loads_start_twice(tmp_path):
    path = two_slot_box(tmp_path, "64GiB")
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        answers = []
        for _round in range(20):
            answers.append(await load(stub, "a", "m1"))
            answers.append(await load(stub, "b", "m2"))
        events = await drain_events(call, slotd.manager.log.revision)
        call.cancel()
        listing = await stub.ListSlots(slot_pb2.ListSlotsRequest())

    assert [name for name, _time in start_times(events)] == ["a", "b"]
    assert {entry.name: entry.generation for entry in listing.slots} == {"a": 1, "b": 1}
    assert [answer.joined for answer in answers[:2]] == [False, False]
    assert all(answer.joined for answer in answers[2:])
    assert all(not answer.evicted for answer in answers)


async def test_min_residency_stops_thrashing(tmp_path):
    # The device has room for one model. A start evicts the other slot only once that
    # slot was READY for min_residency, so two starts are at least min_residency
    # apart and N alternations within T seconds start at most 1 + T / min_residency
    # processes.
    min_residency = 0.5
    path = two_slot_box(tmp_path, "1.5GiB", min_residency=min_residency)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)

        outcomes = []
        for _round in range(20):
            for name in ("a", "b"):
                try:
                    await load(stub, name)
                    outcomes.append((name, "ok"))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                    assert error_reason(error) == "INSUFFICIENT_MEMORY"
                    outcomes.append((name, "exhausted"))
        loop_end = time.time()

        # Polling with a deadline: the slot that is not loaded gets its turn once
        # the loaded one has been READY for min_residency.
        loaded = (await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))).state == slot_pb2.SLOT_STATE_READY
        resident, other = ("a", "b") if loaded else ("b", "a")
        deadline = time.monotonic() + 10
        while True:
            try:
                swapped = await load(stub, other)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert time.monotonic() < deadline, f"slot {other} never evicted slot {resident}"
                await asyncio.sleep(0.05)
        events = await drain_events(call, slotd.manager.log.revision)
        call.cancel()

    starts = start_times(events)
    loop_starts = [when for _name, when in starts if when <= loop_end]
    assert len(loop_starts) <= 1 + int((loop_end - loop_starts[0]) / min_residency)
    gaps = [later - earlier for (_a, earlier), (_b, later) in zip(starts, starts[1:], strict=False)]
    assert all(gap >= min_residency for gap in gaps), gaps
    assert outcomes[0] == ("a", "ok")
    assert ("b", "exhausted") in outcomes
    assert swapped.slot.state == slot_pb2.SLOT_STATE_READY
    assert list(swapped.evicted) == [resident]
    assert starts[-1][0] == other


# -- admission failures ---------------------------------------------------------------


async def test_unfittable_load_fails_at_once(tmp_path):
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "memory": "3GiB"}],
        slots=[slot("a", model="m1", pinned=True), slot("b", model="m2")],
        models=[model("m1", ["a"], memory="2GiB"), model("m2", ["b"], memory="2GiB")],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "b")
        elapsed = time.perf_counter() - started
        status_b = await stub.GetSlot(slot_pb2.GetSlotRequest(name="b"))

    error = caught.value
    assert elapsed < 0.5
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) == "INSUFFICIENT_MEMORY"
    assert error.details() == (
        "model 'm2' needs 2.0 GiB on device 'dev0', but only 1.0 GiB is free and evicting frees "
        "at most 0 B more (total 3.0 GiB, held by other processes 0 B; pinned slots: a (2.0 GiB); "
        "slots that may not be evicted now: none); unload or unpin a slot, or declare a smaller model"
    )
    assert status_b.state == slot_pb2.SLOT_STATE_OFFLINE
    assert status_b.generation == 0


async def test_model_larger_than_device_fails(tmp_path):
    # A declared size that cannot fit is a config error; an estimated one is found at load.
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "memory": "100MiB"}],
        slots=[slot("a", model="big")],
        models=[{"id": "big", "path": "big.bin", "capability": "chat", "slots": ["a"]}],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "a")

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details().startswith(
        "model 'big' needs 256.0 MiB on device 'dev0', but only 100.0 MiB is free"
    )


async def test_estimated_memory_from_file_size(tmp_path):
    # No declared memory: file size * 1.2 + 256 MiB. The stand-in model file is tiny.
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "memory": "300MiB"}],
        slots=[slot("a", model="m1")],
        models=[{"id": "m1", "path": "m1.bin", "capability": "chat", "slots": ["a"]}],
    )
    size = len("test model m1\n")
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        answer = await load(stub, "a")
        catalog = await stub.ListModels(slot_pb2.ListModelsRequest())

    assert answer.slot.reserved_bytes == int(size * 1.2) + 256 * 2**20
    assert catalog.models[0].memory_bytes == int(size * 1.2) + 256 * 2**20


# -- concurrency ---------------------------------------------------------------------


async def test_concurrent_loads_never_overcommit(tmp_path):
    # Four 1 GiB models on a 2.5 GiB device: two fit. Loads that start together
    # see each other's pending reservations, so the rest fail and the ledger
    # never reserves more than the device has. min_residency keeps a slot that became
    # READY early from being evicted by a late load, so exactly two succeed.
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "memory": "2.5GiB"}],
        slots=[slot(name, model=f"m-{name}", min_residency=60) for name in "abcd"],
        models=[model(f"m-{name}", [name]) for name in "abcd"],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        ledger = slotd.manager.ledger
        samples: list[int] = []
        slotd.manager.table.add_listener(lambda _old, _new, _rev: samples.append(ledger.reserved("dev0")))

        results = await asyncio.gather(*(load(stub, name) for name in "abcd"), return_exceptions=True)
        listing = await stub.ListSlots(slot_pb2.ListSlotsRequest())

    loaded = [result for result in results if not isinstance(result, BaseException)]
    failed = [result for result in results if isinstance(result, BaseException)]
    assert len(loaded) == 2
    assert len(failed) == 2
    assert {error.code() for error in failed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # At least STARTING, the pid update and READY of each of the two starts.
    assert len(samples) >= 6
    assert max(samples) <= int(2.5 * GIB)
    ready = [entry.name for entry in listing.slots if entry.state == slot_pb2.SLOT_STATE_READY]
    assert len(ready) == 2
    assert sum(entry.reserved_bytes for entry in listing.slots) == 2 * GIB


async def test_eviction_picks_lower_priority(tmp_path):
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "memory": "2.5GiB"}],
        slots=[slot("low", model="m-low", priority=-5), slot("high", model="m-high", priority=5),
               slot("new", model="m-new")],
        models=[model("m-low", ["low"]), model("m-high", ["high"]), model("m-new", ["new"])],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "low")
        await load(stub, "high")
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, is_synced)
        answer = await load(stub, "new")
        events = await read_until(call, slot_event("low", slot_pb2.SLOT_STATE_OFFLINE))
        call.cancel()
        high = await stub.GetSlot(slot_pb2.GetSlotRequest(name="high"))

    assert list(answer.evicted) == ["low"]
    offline = events[-1].slot
    assert offline.reason == slot_pb2.TRANSITION_REASON_EVICTED
    assert offline.message == "evicted to make room for m-new"
    assert high.state == slot_pb2.SLOT_STATE_READY
    assert high.generation == 1


# -- exclusive groups -----------------------------------------------------------------


def group_box(directory: pathlib.Path, **a_fields) -> pathlib.Path:
    """Slots x1 (group x), y1 (group y) and free (no group) on one large device."""
    return write_config(
        directory,
        slots=[slot("x1", model="mx", exclusive_group="x", **a_fields),
               slot("y1", model="my", exclusive_group="y"),
               slot("free", model="mf")],
        models=[model("mx", ["x1"]), model("my", ["y1"]), model("mf", ["free"])],
    )


async def test_exclusive_group_stops_other_group(tmp_path):
    path = group_box(tmp_path)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "x1")
        await load(stub, "free")
        answer = await load(stub, "y1")
        listing = await stub.ListSlots(slot_pb2.ListSlotsRequest())

    states = {entry.name: entry for entry in listing.slots}
    assert list(answer.evicted) == ["x1"]
    assert states["x1"].state == slot_pb2.SLOT_STATE_OFFLINE
    assert states["x1"].reason == slot_pb2.TRANSITION_REASON_EVICTED
    assert states["x1"].message == "evicted to make room for my"
    assert states["free"].state == slot_pb2.SLOT_STATE_READY
    assert states["y1"].state == slot_pb2.SLOT_STATE_READY


async def test_pinned_group_blocks_other_group(tmp_path):
    path = group_box(tmp_path, pinned=True)
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "x1")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load(stub, "y1")

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "EXCLUSIVE_GROUP_BUSY"
    assert caught.value.details() == (
        "cannot load 'my' into slot 'y1': pinned slot 'x1' of exclusive group 'x' runs on "
        "device 'dev0', and group 'y' may not run beside it; unpin or unload it"
    )


# -- reading device memory ------------------------------------------------------------


def test_amd_memory_read_from_sysfs(tmp_path):
    for card, total, used in (("card0", 8 * GIB, GIB), ("card1", 16 * GIB, 3 * GIB)):
        directory = tmp_path / card / "device"
        directory.mkdir(parents=True)
        (directory / "mem_info_vram_total").write_text(f"{total}\n")
        (directory / "mem_info_vram_used").write_text(f"{used}\n")
    (tmp_path / "renderD128").mkdir()

    first = read_device(DeviceSpec("gpu0", "amd", None, index=0), drm_root=tmp_path)
    second = read_device(DeviceSpec("gpu1", "amd", None, index=1), drm_root=tmp_path)
    with pytest.raises(MemoryUnknown) as caught:
        read_device(DeviceSpec("gpu2", "amd", None, index=2), drm_root=tmp_path)

    assert (first.total, first.used) == (8 * GIB, GIB)
    assert (second.total, second.used) == (16 * GIB, 3 * GIB)
    assert "AMD GPU index 2 not found; 2 cards" in str(caught.value)


async def test_auto_cpu_device_counts_other_processes(tmp_path):
    path = write_config(
        tmp_path,
        devices=[{"name": "dev0", "kind": "cpu", "memory": "auto"}],
        slots=[slot("a", model="m1")],
        models=[model("m1", ["a"], memory="64MiB")],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        await load(stub, "a")
        ledger = slotd.manager.ledger
        total = ledger.total("dev0")
        reserved = ledger.reserved("dev0")
        held = ledger.held_by_others("dev0")
        free = ledger.free("dev0")

    assert total == read_device(DeviceSpec("dev0", "cpu", None)).total
    assert reserved == 64 * 2**20
    # This test process and the rest of the machine hold some memory.
    assert held > 0
    assert 0 < free < total - reserved
