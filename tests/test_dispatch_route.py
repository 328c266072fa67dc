"""Route and ListCapabilities over a real slotd and dispatcher, and the example box end to end."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import tomllib

import grpc
import pytest
import tomli_w
from support import (
    dispatch_stubs,
    model,
    repo_root,
    running_dispatcher,
    running_slotd,
    slot,
    slot_stub,
)
from test_dispatch_resolve import Box, error_info, http_status, running_box, until, write_config

from slotroute.dispatch.v1 import capability_pb2, route_pb2, transport_pb2
from slotroute.slot.v1 import slot_pb2


async def route(box: Box, capability: str, *, deadline: float = 15.0, labels=None, **policy):
    """Call Route with a client deadline of `deadline` seconds."""
    request = capability_pb2.RouteRequest(capability=capability, labels=labels or {},
                                          policy=route_pb2.WaitPolicy(**policy))
    return await box.capability.Route(request, timeout=deadline)


async def route_error(box: Box, capability: str, **arguments) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await route(box, capability, **arguments)
    return caught.value


def ready(box: Box, *names: str):
    return lambda: all(box.table_slot(name).state.value == "READY" for name in names)


@pytest.fixture
def chat_box(tmp_path):
    """Chat slots: first (preloaded), second (preloaded, default for chat), small (off, labelled)."""
    return write_config(
        tmp_path,
        slots=[
            slot("first", model="m1", preload=True, labels={"size": "large"}),
            slot("second", model="m2", preload=True, default_for=["chat"], labels={"size": "large"}),
            slot("small", model="m3", labels={"size": "small"}),
            slot("embed", "embed", model="e1"),
        ],
        models=[model("m1", ["first"]), model("m2", ["second"]), model("m3", ["small"]),
                model("e1", ["embed"], capability="embed")],
        dispatcher={},
    )


async def test_route_prefers_default_ready_slot(chat_box):
    async with running_box(chat_box) as box:
        await until(ready(box, "first", "second"), "first and second are READY")
        answer = await route(box, "chat")

        assert answer.capability == "chat"
        assert answer.cold_start is False
        assert answer.target.slot == "second"
        assert answer.target.model_id == "m2"
        assert answer.target.state == slot_pb2.SLOT_STATE_READY
        assert answer.target.endpoint_url == box.slotd.manager.slot("second").endpoint_url


async def test_route_prefers_fewest_in_flight(chat_box):
    async with running_box(chat_box) as box:
        await until(ready(box, "first", "second"), "first and second are READY")
        lease = await box.slots.AcquireLease(slot_pb2.AcquireLeaseRequest(slot="second", holder="test"))
        await until(lambda: box.table_slot("second").in_flight == 1, "the dispatcher sees the lease")

        busy = await route(box, "chat")
        await box.slots.ReleaseLease(slot_pb2.ReleaseLeaseRequest(id=lease.id))
        await until(lambda: box.table_slot("second").in_flight == 0, "the dispatcher sees the release")
        idle = await route(box, "chat")

        assert busy.target.slot == "first"
        assert idle.target.slot == "second"


async def test_route_labels_start_matching_slot(chat_box):
    async with running_box(chat_box) as box:
        await until(ready(box, "first", "second"), "first and second are READY")
        answer = await route(box, "chat", labels={"size": "small"})

        assert answer.target.slot == "small"
        assert answer.target.model_id == "m3"
        assert answer.cold_start is True
        assert await http_status(answer.target.endpoint_url) == 200


async def test_route_starts_offline_default(chat_box):
    async with running_box(chat_box) as box:
        answer = await route(box, "embed")
        generations = await box.generations()

        assert answer.target.slot == "embed"
        assert answer.target.model_id == "e1"
        assert answer.cold_start is True
        assert generations["embed"] == 1


async def test_route_no_cold_start_refused(chat_box):
    async with running_box(chat_box) as box:
        error = await route_error(box, "embed", no_cold_start=True)
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "COLD_START_REFUSED"
        assert info.metadata["capability"] == "embed"
        assert (await box.generations())["embed"] == 0


async def test_route_skips_failed_slot(tmp_path):
    path = write_config(
        tmp_path,
        slots=[slot("fragile", "vision", model="v1", preload=True, max_restarts=0, default_for=["vision"]),
               slot("spare", "vision", model="v2")],
        models=[model("v1", ["fragile"], capability="vision"), model("v2", ["spare"], capability="vision")],
        dispatcher={},
    )
    async with running_box(path) as box:
        await until(ready(box, "fragile"), "fragile is READY")
        os.kill(box.slotd.manager.slot("fragile").pid, signal.SIGKILL)
        await until(lambda: box.table_slot("fragile").state.value == "ERROR", "the dispatcher sees ERROR")

        answer = await route(box, "vision")

        assert answer.target.slot == "spare"
        assert answer.cold_start is True
        assert box.table_slot("fragile").state.value == "ERROR"


async def test_route_only_failed_slot(tmp_path):
    path = write_config(tmp_path, slots=[slot("fragile", "vision", model="v1", preload=True, max_restarts=0)],
                        models=[model("v1", ["fragile"], capability="vision")], dispatcher={})
    async with running_box(path) as box:
        await until(ready(box, "fragile"), "fragile is READY")
        os.kill(box.slotd.manager.slot("fragile").pid, signal.SIGKILL)
        await until(lambda: box.table_slot("fragile").state.value == "ERROR", "the dispatcher sees ERROR")

        error = await route_error(box, "vision")
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.reason == "SLOT_FAILED"
        assert info.metadata["slot"] == "fragile"


async def test_route_unknown_capability(chat_box):
    async with running_box(chat_box) as box:
        error = await route_error(box, "speak")
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert info.reason == "NO_SLOT"
        assert info.metadata["known_capabilities"] == "chat,embed"
        assert error.details() == "no slot offers capability 'speak'; offered capabilities: chat, embed"


async def test_route_unmatched_labels(chat_box):
    async with running_box(chat_box) as box:
        error = await route_error(box, "chat", labels={"size": "medium"})

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == ("no slot offers 'chat' with labels size=medium; slots offering it: "
                                   "first, second, small")


@pytest.mark.parametrize("capability", ["", "Chat", "chat!", "9chat", "c" * 65, "ch at", "chat\x00"])
async def test_route_malformed_capability(chat_box, capability):
    async with running_box(chat_box) as box:
        error = await route_error(box, capability)
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.reason == "INVALID_CAPABILITY"
        assert info.metadata["field"] == "capability"


async def test_route_lease_and_release(chat_box):
    async with running_box(chat_box) as box:
        await until(ready(box, "first", "second"), "first and second are READY")
        answer = await route(box, "chat", lease=True, lease_ttl_seconds=30)
        leases_held = box.slotd.manager.slot("second").in_flight
        released = await box.transport.ReleaseLease(route_pb2.ReleaseLeaseRequest(
            source=answer.target.source, lease_id=answer.target.lease.id))

        assert answer.target.slot == "second"
        assert answer.target.lease.slot == "second"
        assert answer.target.lease.generation == 1
        assert leases_held == 1
        assert released.released is True
        assert box.slotd.manager.slot("second").in_flight == 0


async def test_list_capabilities_groups_slots(chat_box):
    async with running_box(chat_box) as box:
        await until(ready(box, "first", "second"), "first and second are READY")
        listing = await box.capability.ListCapabilities(capability_pb2.ListCapabilitiesRequest())

        assert [entry.name for entry in listing.capabilities] == ["chat", "embed"]
        chat = listing.capabilities[0]
        assert [item.slot.name for item in chat.slots] == ["first", "second", "small"]
        assert {item.source for item in chat.slots} == {box.slotd.address}
        assert [item.slot.state for item in chat.slots] == [
            slot_pb2.SLOT_STATE_READY, slot_pb2.SLOT_STATE_READY, slot_pb2.SLOT_STATE_OFFLINE,
        ]
        assert list(chat.slots[1].slot.default_for) == ["chat"]
        assert dict(chat.slots[2].slot.labels) == {"size": "small"}


# -- the example box ------------------------------------------------------------------


def example_box(directory: pathlib.Path) -> pathlib.Path:
    """Copy examples/box.toml with its metrics endpoints off and its model cache path made absolute.

    The example's metrics ports are fixed, and a box started by hand on the same
    machine may hold them; nothing else changes.
    """
    examples = repo_root() / "examples"
    document = tomllib.loads((examples / "box.toml").read_text())
    document["slotd"]["cache_dir"] = str(examples / document["slotd"]["cache_dir"])
    document["slotd"]["metrics_listen"] = ""
    document["dispatcher"]["metrics_listen"] = ""
    path = directory / "box.toml"
    path.write_text(tomli_w.dumps(document))
    return path


async def test_example_box_end_to_end(tmp_path):
    path = example_box(tmp_path)
    async with (
        running_slotd(path, listen="127.0.0.1:0") as slotd,
        running_dispatcher(path, [slotd.address], listen="127.0.0.1:0") as dispatcher,
        dispatch_stubs(dispatcher.address) as (transport, capability),
        slot_stub(slotd.address) as slots,
    ):
        box = Box(slotd, dispatcher, transport, capability, slots)
        await until(dispatcher.dispatcher.all_synced_once, "the dispatcher synced")

        models = ["hermes", "text-embedding-3-small", "whisper-1", "tts-1", "dall-e-3"]
        answers = await asyncio.gather(*(box.resolve(name, deadline=30) for name in models))

        assert [(a.model, a.target.slot) for a in answers] == [
            ("hermes-4-14b", "agent"), ("bge-m3", "embed"), ("moonshine-small-streaming-en", "stt"),
            ("kokoro", "tts"), ("sdxl-turbo", "img"),
        ]
        assert [a.capability for a in answers] == ["", "", "stt", "tts", "image"]
        for answer in answers:
            assert answer.target.state == slot_pb2.SLOT_STATE_READY
            assert await http_status(answer.target.endpoint_url) == 200

        # Routed one at a time: vision needs the memory of img, which slotd evicts for it.
        chosen = {}
        for name in ["chat", "embed", "rerank", "stt", "tts", "image", "vision"]:
            answer = await route(box, name, deadline=30)
            chosen[name] = answer.target.slot
            assert answer.target.state == slot_pb2.SLOT_STATE_READY
            assert await http_status(answer.target.endpoint_url) == 200

        assert chosen == {"chat": "agent", "embed": "embed", "rerank": "rerank", "stt": "stt",
                          "tts": "tts", "image": "img", "vision": "vision"}

        listing = await transport.ListRoutes(transport_pb2.ListRoutesRequest())
        assert [entry.model for entry in listing.routes] == [
            "hermes-4-14b", "qwen3-4b", "qwen2.5-vl-7b", "bge-m3", "bge-reranker-v2-m3",
            "moonshine-small-streaming-en", "kokoro", "sdxl-turbo",
        ]


def test_label_problem_rules():
    from slotroute.dispatch.service import label_problem

    assert label_problem({"size": "large"}) == ""
    assert label_problem({f"k{i}": "v" for i in range(33)}) == "33 labels given; pass at most 32"
    assert label_problem({"": "x"}).startswith("invalid label key ''")
    assert label_problem({"size": "s" * 129}).startswith("invalid value for label 'size': ")
    assert label_problem({"size": "a\x1b[31m"}).startswith("invalid value for label 'size': ")
