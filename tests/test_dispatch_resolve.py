"""Resolve over a real slotd and a real dispatcher on port 0, with stand-in backends."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import random
import signal
import time
from collections.abc import Callable

import grpc
import psutil
import pytest
from support import (
    dispatch_stubs,
    model,
    pid_alive,
    read_until,
    running_dispatcher,
    running_slotd,
    slot,
    slot_states,
    slot_stub,
)
from support import write_config as write_support_config

from slotroute import rpc
from slotroute.dispatch.app import DispatcherServer
from slotroute.dispatch.v1 import route_pb2, transport_pb2
from slotroute.slot.app import Slotd
from slotroute.slot.v1 import slot_pb2

DOMAIN = "slotroute.dispatch.v1"


def write_config(directory: pathlib.Path, **sections) -> pathlib.Path:
    """Write a test config whose backends take ports from a random 25-port window.

    slotd checks that a port is free, and the backend binds it a moment later.
    Test processes that run at the same time and start from the same port would
    race for it.
    """
    low = random.randrange(43000, 43999 - 25)
    sections["slotd"] = {"ports": f"{low}-{low + 24}", **sections.get("slotd", {})}
    return write_support_config(directory, **sections)


@dataclasses.dataclass
class Box:
    slotd: Slotd
    dispatcher: DispatcherServer
    transport: object
    capability: object
    slots: object

    def table_slot(self, name: str):
        """The dispatcher's copy of one slot."""
        return self.dispatcher.tables[self.slotd.address].view().slots[name]

    async def generations(self) -> dict[str, int]:
        listing = await self.slots.ListSlots(slot_pb2.ListSlotsRequest())
        return {entry.name: entry.generation for entry in listing.slots}

    async def resolve(self, model_id: str, *, deadline: float = 15.0, **policy):
        """Call Resolve with a client deadline of `deadline` seconds."""
        request = transport_pb2.ResolveRequest(model=model_id, policy=route_pb2.WaitPolicy(**policy))
        return await self.transport.Resolve(request, timeout=deadline)

    async def resolve_error(self, model_id: str, *, deadline: float = 15.0, **policy) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.resolve(model_id, deadline=deadline, **policy)
        return caught.value


@contextlib.asynccontextmanager
async def running_box(path: pathlib.Path):
    """A slotd and a dispatcher subscribed to it, synced, with stubs for both."""
    async with (
        running_slotd(path) as slotd,
        running_dispatcher(path, [slotd.address]) as dispatcher,
        dispatch_stubs(dispatcher.address) as (transport, capability),
        slot_stub(slotd.address) as slots,
    ):
        await until(dispatcher.dispatcher.all_synced_once, "the dispatcher synced")
        yield Box(slotd, dispatcher, transport, capability, slots)


async def until(predicate: Callable[[], bool], condition: str, limit: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail after `limit` seconds naming `condition`."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting until {condition}")
        await asyncio.sleep(0.01)


async def http_status(url: str, path: str = "/health") -> int:
    """Send GET `path` to a base URL such as http://127.0.0.1:43000 and return the status code."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    return int(status_line.split()[1])


def backend_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def error_info(error: grpc.aio.AioRpcError):
    info, retry_delay = rpc.error_details(error)
    assert info is not None, f"no ErrorInfo in {error.code().name}: {error.details()}"
    assert info.domain == DOMAIN
    return info, retry_delay


# -- tiers ------------------------------------------------------------------------------


@pytest.fixture
def tiers_box(tmp_path):
    """Slot a runs chat models (m1 by default), slot p is preloaded with p1 outside the registry."""
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1"), slot("p", model="p1", preload=True)],
        models=[model("m1", ["a"]), model("m2", ["a"]), model("p1", ["p"])],
        registry=[{"id": "m1", "aliases": ["chat-one", "Chat One"], "slot": "a"}],
    )


async def test_registry_tier_cold_start(tiers_box):
    async with running_box(tiers_box) as box:
        await until(lambda: box.table_slot("p").state.value == "READY", "p is READY")
        answer = await box.resolve("chat-one")
        status = box.slotd.manager.slot("a")

        assert answer.model == "m1"
        assert answer.tier == route_pb2.TIER_REGISTRY
        assert answer.cold_start is True
        assert answer.capability == ""
        assert answer.target.source == box.slotd.address
        assert answer.target.slot == "a"
        assert answer.target.model_id == "m1"
        assert answer.target.state == slot_pb2.SLOT_STATE_READY
        assert answer.target.endpoint_url == status.endpoint_url
        assert answer.target.revision == box.dispatcher.tables[box.slotd.address].revision
        assert await http_status(answer.target.endpoint_url) == 200


async def test_alias_and_canonical_identical(tiers_box):
    async with running_box(tiers_box) as box:
        # Every response carries the source revision, so no slot may change between them.
        await until(lambda: box.table_slot("p").state.value == "READY", "p is READY")
        await box.resolve("m1")
        answers = [await box.resolve(name) for name in ("m1", "chat-one", "  CHAT ONE ", "M1")]

        assert answers[1] == answers[0]
        assert answers[2] == answers[0]
        assert answers[3] == answers[0]
        assert answers[0].model == "m1"
        assert answers[0].cold_start is False


async def test_passthrough_tier_ready_slot(tiers_box):
    async with running_box(tiers_box) as box:
        await until(lambda: box.table_slot("p").state.value == "READY", "p is READY")
        before = await box.generations()
        answer = await box.resolve("P1")

        assert answer.model == "p1"
        assert answer.tier == route_pb2.TIER_PASSTHROUGH
        assert answer.cold_start is False
        assert answer.target.slot == "p"
        assert answer.target.endpoint_url == box.slotd.manager.slot("p").endpoint_url
        assert await box.generations() == before


async def test_prefetch_tier_loads_model(tiers_box):
    async with running_box(tiers_box) as box:
        answer = await box.resolve("m2")
        generations = await box.generations()

        assert answer.model == "m2"
        assert answer.tier == route_pb2.TIER_PREFETCH
        assert answer.cold_start is True
        assert answer.target.slot == "a"
        assert answer.target.model_id == "m2"
        assert answer.target.state == slot_pb2.SLOT_STATE_READY
        assert generations["a"] == 1
        assert await http_status(answer.target.endpoint_url) == 200

        again = await box.resolve("m2")

        assert again.tier == route_pb2.TIER_PASSTHROUGH
        assert again.cold_start is False
        assert again.target.endpoint_url == answer.target.endpoint_url


async def test_list_routes_every_tier(tiers_box):
    async with running_box(tiers_box) as box:
        await until(lambda: box.table_slot("p").state.value == "READY", "p is READY")
        plain = await box.transport.ListRoutes(transport_pb2.ListRoutesRequest())
        full = await box.transport.ListRoutes(transport_pb2.ListRoutesRequest(include_prefetch=True))

        assert [(r.model, r.tier, r.slot) for r in plain.routes] == [
            ("m1", route_pb2.TIER_REGISTRY, "a"), ("p1", route_pb2.TIER_PASSTHROUGH, "p"),
        ]
        assert list(plain.routes[0].aliases) == ["chat-one", "Chat One"]
        assert plain.routes[0].state == slot_pb2.SLOT_STATE_OFFLINE
        assert [(r.model, r.tier, r.slot) for r in full.routes] == [
            ("m1", route_pb2.TIER_REGISTRY, "a"), ("p1", route_pb2.TIER_PASSTHROUGH, "p"),
            ("m2", route_pb2.TIER_PREFETCH, "a"),
        ]


async def test_capability_bound_speech_and_image(tmp_path):
    path = write_config(
        tmp_path,
        slots=[slot("stt", "stt", model="moonshine"), slot("tts", "tts", model="kokoro"),
               slot("img", "image", model="sdxl"), slot("chat", model="m1", preload=True)],
        models=[model("moonshine", ["stt"], capability="stt"), model("kokoro", ["tts"], capability="tts"),
                model("sdxl", ["img"], capability="image"), model("m1", ["chat"])],
        registry=[
            {"id": "moonshine", "aliases": ["whisper-1"], "capability": "stt"},
            {"id": "kokoro", "aliases": ["tts-1", "tts-1-hd"], "capability": "tts"},
            {"id": "sdxl", "aliases": ["dall-e-3"], "capability": "image"},
        ],
    )
    async with running_box(path) as box:
        answers = await asyncio.gather(*(box.resolve(name) for name in ("whisper-1", "tts-1", "dall-e-3")))

        assert [(a.model, a.capability, a.target.slot) for a in answers] == [
            ("moonshine", "stt", "stt"), ("kokoro", "tts", "tts"), ("sdxl", "image", "img"),
        ]
        assert [a.target.model_id for a in answers] == ["moonshine", "kokoro", "sdxl"]
        assert {a.tier for a in answers} == {route_pb2.TIER_REGISTRY}
        assert {a.target.state for a in answers} == {slot_pb2.SLOT_STATE_READY}
        for answer in answers:
            assert await http_status(answer.target.endpoint_url) == 200


# -- misses and invalid ids ----------------------------------------------------------------


async def test_unknown_model_no_route(tiers_box):
    async with running_box(tiers_box) as box:
        await until(lambda: box.table_slot("p").state.value == "READY", "p is READY")
        pids = backend_pids()
        before = await box.generations()
        error = await box.resolve_error("chat-onee")
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert info.reason == "NO_ROUTE"
        assert info.metadata["model"] == "chat-onee"
        assert info.metadata["tiers_tried"] == "REGISTRY,PASSTHROUGH,PREFETCH"
        assert info.metadata["close_matches"] == "chat-one,Chat One"
        assert retry_delay is None
        assert error.details() == (
            "no route for model 'chat-onee': not in the registry, not served by a READY slot, "
            "not in any slotd catalog; did you mean 'chat-one', 'Chat One'?"
        )
        assert await box.generations() == before
        assert backend_pids() == pids


@pytest.mark.parametrize("model_id", ["../../etc/passwd", "/etc/passwd", "models/../m1", "..", "~/m1"])
async def test_path_shaped_ids_not_found(tiers_box, model_id):
    async with running_box(tiers_box) as box:
        pids = backend_pids()
        before = await box.generations()
        error = await box.resolve_error(model_id)
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert info.reason == "NO_ROUTE"
        assert info.metadata["model"] == model_id
        assert f"no route for model {model_id!r}" in error.details()
        assert await box.generations() == before
        assert backend_pids() == pids


@pytest.fixture
def unusual_ids_box(tmp_path):
    registry = [
        {"id": "Org/Model-v1.2:Q4_K_M", "capability": "chat"},
        {"id": "modèle-ünï-模型", "capability": "chat"},
        {"id": "x" * 255, "capability": "chat"},
    ]
    return write_config(
        tmp_path,
        slots=[slot("a", model="llama3.2:1b", preload=True)],
        models=[model("llama3.2:1b", ["a"]), model("Qwen/Qwen3-8B", ["a"])],
        registry=registry,
    )


async def test_unusual_ids_resolve(unusual_ids_box):
    async with running_box(unusual_ids_box) as box:
        await until(lambda: box.table_slot("a").state.value == "READY", "a is READY")
        requests = {
            "Org/Model-v1.2:Q4_K_M": "Org/Model-v1.2:Q4_K_M",
            "  org/model-V1.2:q4_k_m\t": "Org/Model-v1.2:Q4_K_M",
            "MODÈLE-ÜNÏ-模型": "modèle-ünï-模型",
            "x" * 255: "x" * 255,
            "X" * 255: "x" * 255,
            "LLAMA3.2:1B": "llama3.2:1b",
        }
        for requested, canonical in requests.items():
            answer = await box.resolve(requested)

            assert answer.model == canonical
            assert answer.target.slot == "a"


async def test_slash_id_prefetches(unusual_ids_box):
    async with running_box(unusual_ids_box) as box:
        answer = await box.resolve("qwen/qwen3-8b")

        assert answer.model == "Qwen/Qwen3-8B"
        assert answer.tier == route_pb2.TIER_PREFETCH
        assert answer.target.model_id == "Qwen/Qwen3-8B"


@pytest.mark.parametrize(("model_id", "problem"), [
    ("x" * 256, "model id of 256 characters is longer than the maximum of 255"),
    ("", "model id is empty"),
    ("   ", "model id is empty"),
    ("m1\x00", "contains the control character U+0000 at position 2"),
    ("chat\none", "contains the control character U+000A at position 4"),
    ("a\x1bb", "contains the control character U+001B at position 1"),
])
async def test_invalid_ids_rejected(unusual_ids_box, model_id, problem):
    async with running_box(unusual_ids_box) as box:
        error = await box.resolve_error(model_id)
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.reason == "INVALID_MODEL_ID"
        assert info.metadata["field"] == "model"
        assert problem in error.details()


# -- waiting policy -----------------------------------------------------------------------


async def test_no_cold_start_refuses_load(tiers_box):
    async with running_box(tiers_box) as box:
        error = await box.resolve_error("m1", no_cold_start=True)
        info, _ = error_info(error)

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "COLD_START_REFUSED"
        assert info.metadata["slot"] == "a"
        assert "no_cold_start" in error.details()
        assert (await box.generations())["a"] == 0


async def test_no_wait_starts_load(tiers_box):
    async with running_box(tiers_box) as box:
        error = await box.resolve_error("m1", no_wait=True)
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "SLOT_LOADING"
        assert retry_delay == 1.0
        assert "load started, retry shortly" in error.details()

        await until(lambda: box.table_slot("a").state.value == "READY", "a is READY")
        answer = await box.resolve("m1", no_wait=True)

        assert answer.cold_start is False
        assert (await box.generations())["a"] == 1


async def test_no_wait_while_loading(tmp_path):
    path = write_config(tmp_path, slots=[slot("a", model="m1", load_delay=1.0)],
                        models=[model("m1", ["a"])], registry=[{"id": "m1", "slot": "a"}])
    async with running_box(path) as box:
        await box.slots.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=False))
        await until(lambda: box.table_slot("a").state.value in ("STARTING", "WARMING"), "a is loading")
        error = await box.resolve_error("m1", no_wait=True)
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "SLOT_LOADING"
        assert info.metadata["slot"] == "a"
        assert info.metadata["state"] in ("STARTING", "WARMING")
        assert retry_delay == 1.0


async def test_deadline_exceeded_load_goes_on(tmp_path):
    path = write_config(tmp_path, slots=[slot("slow", model="m1", load_delay=2.0)],
                        models=[model("m1", ["slow"])], registry=[{"id": "m1", "slot": "slow"}])
    async with running_box(path) as box:
        started = time.monotonic()
        error = await box.resolve_error("m1", deadline=0.5)
        elapsed = time.monotonic() - started
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.reason == "LOAD_IN_PROGRESS"
        assert info.metadata["slot"] == "slow"
        assert "slot 'slow' was not READY before the deadline" in error.details()
        assert "the load goes on" in error.details()
        assert retry_delay == 1.0
        assert elapsed < 0.5

        await until(lambda: box.table_slot("slow").state.value == "READY", "slow is READY")
        answer = await box.resolve("m1", deadline=2)

        assert answer.cold_start is False
        assert (await box.generations())["slow"] == 1


async def test_max_wait_bounds_wait(tmp_path):
    path = write_config(tmp_path, slots=[slot("slow", model="m1", load_delay=2.0)],
                        models=[model("m1", ["slow"])], registry=[{"id": "m1", "slot": "slow"}],
                        dispatcher={"max_wait": 0.3})
    async with running_box(path) as box:
        started = time.monotonic()
        error = await box.resolve_error("m1", deadline=10)
        elapsed = time.monotonic() - started

        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_info(error)[0].reason == "LOAD_IN_PROGRESS"
        assert 0.3 <= elapsed < 2.0


async def test_concurrent_resolves_share_load(tiers_box):
    async with running_box(tiers_box) as box:
        watch = box.slots.WatchSlots(slot_pb2.WatchSlotsRequest())
        await read_until(watch, lambda event: event.type == slot_pb2.EVENT_TYPE_SYNCED)

        answers = await asyncio.gather(*(box.resolve("m2") for _ in range(50)))
        events = await read_until(
            watch, lambda event: event.slot.name == "a" and event.slot.state == slot_pb2.SLOT_STATE_READY,
        )
        watch.cancel()

        assert slot_states(events, "a") == ["STARTING", "WARMING", "READY"]
        assert (await box.generations())["a"] == 1
        assert {answer.target.endpoint_url for answer in answers} == {
            box.slotd.manager.slot("a").endpoint_url
        }
        assert {answer.model for answer in answers} == {"m2"}
        assert {answer.tier for answer in answers} == {route_pb2.TIER_PREFETCH}


# -- failures -----------------------------------------------------------------------------


def crash_box(tmp_path: pathlib.Path, **fields) -> pathlib.Path:
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1", preload=True, **fields)],
        models=[model("m1", ["a"])],
        registry=[{"id": "m1", "aliases": ["main"], "slot": "a"}],
    )


async def test_killed_backend_not_returned(tmp_path):
    path = crash_box(tmp_path, restart_backoff=1.0, restart_backoff_max=1.0)
    async with running_box(path) as box:
        first = await box.resolve("main")
        dead_pid = box.slotd.manager.slot("a").pid
        os.kill(dead_pid, signal.SIGKILL)
        await until(lambda: box.table_slot("a").state.value == "ERROR", "the dispatcher sees ERROR")

        error = await box.resolve_error("main", no_wait=True)
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "SLOT_RESTARTING"
        assert info.metadata["slot"] == "a"
        assert info.metadata["state"] == "ERROR"
        # slotd waits restart_backoff (1 s) times a jitter factor of at most 1.2.
        assert 0.0 <= retry_delay <= 1.2
        assert "slot 'a' failed and restarts in" in error.details()

        answer = await box.resolve("main")
        status = box.slotd.manager.slot("a")

        assert answer.cold_start is True
        assert answer.target.endpoint_url == status.endpoint_url
        assert status.generation == 2
        assert status.pid != dead_pid
        assert not pid_alive(dead_pid)
        assert first.target.slot == answer.target.slot
        assert await http_status(answer.target.endpoint_url) == 200


async def test_killed_backend_restarts_spent(tmp_path):
    path = crash_box(tmp_path, max_restarts=0)
    async with running_box(path) as box:
        await box.resolve("m1")
        os.kill(box.slotd.manager.slot("a").pid, signal.SIGKILL)
        await until(lambda: box.table_slot("a").state.value == "ERROR", "the dispatcher sees ERROR")

        error = await box.resolve_error("m1")
        info, retry_delay = error_info(error)

        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.reason == "SLOT_FAILED"
        assert info.metadata["slot"] == "a"
        assert info.metadata["model"] == "m1"
        assert retry_delay is None
        assert "slot 'a' is in ERROR and slotd stopped restarting it" in error.details()
        assert (await box.generations())["a"] == 1


# -- logging ----------------------------------------------------------------------------


async def test_one_log_line_per_decision(tiers_box, caplog):
    async with running_box(tiers_box) as box:
        await box.resolve("m1")
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="slotroute.dispatch"):
            await box.resolve(" Chat-One ")
            await box.resolve_error("m9")
        records = [record for record in caplog.records if record.name == "slotroute.dispatch"]
        lines = [record.getMessage() for record in records]

    assert len(lines) == 2
    # A warm hit logs at debug, a miss at info.
    assert [record.levelno for record in records] == [logging.DEBUG, logging.INFO]
    assert lines[0].startswith(
        f"resolve requested='Chat-One' canonical='m1' tier=REGISTRY slot=a source={box.slotd.address} "
        "revision="
    )
    assert " outcome=OK cold_start=False latency_ms=" in lines[0]
    assert lines[1].startswith("resolve requested='m9' canonical='m9' tier=- slot=- source=- revision=0 "
                               "outcome=NOT_FOUND")
    assert "latency_ms=" in lines[1]
