"""Swaps between two models on one slot: min_residency bounds them."""

from support import model, read_until, running_slotd, slot, slot_stub, write_config

from slotroute.slot.v1 import slot_pb2


def timestamp(slot_message) -> float:
    return slot_message.state_since.ToNanoseconds() / 1e9


async def test_swap_waits_for_min_residency(tmp_path):
    path = write_config(
        tmp_path,
        slots=[slot("a", model="m1", min_residency=0.5)],
        models=[model("m1", ["a"]), model("m2", ["a"])],
    )
    async with running_slotd(path) as slotd, slot_stub(slotd.address) as stub:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(call, lambda event: event.type == slot_pb2.EVENT_TYPE_SYNCED)
        await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=True))
        swapped = await stub.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m2", wait=True))
        events = await read_until(
            call, lambda event: event.slot.model_id == "m2" and event.slot.state == slot_pb2.SLOT_STATE_READY
        )
        call.cancel()

    ready_m1 = next(e.slot for e in events if e.slot.model_id == "m1" and e.slot.state == slot_pb2.SLOT_STATE_READY)
    unloading = next(e.slot for e in events if e.slot.state == slot_pb2.SLOT_STATE_UNLOADING)
    assert swapped.slot.model_id == "m2"
    assert unloading.model_id == "m1"
    assert timestamp(unloading) - timestamp(ready_m1) >= 0.5
