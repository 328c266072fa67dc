"""slotroute.client against real services: DispatcherClient calls and the SlotCache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    free_port,
    model,
    running_dispatcher,
    running_slotd,
    slot,
    slot_stub,
    write_config,
)

from slotroute import rpc
from slotroute.client import DispatcherClient, SlotCache
from slotroute.slot.states import State
from slotroute.slot.v1 import slot_pb2

# Backend ports of this file, apart from the shared test range so that test
# runs in parallel do not race for the same ports.
PORTS = {"ports": "46200-46299"}


@pytest.fixture
def config(tmp_path):
    return write_config(
        tmp_path,
        slots=[
            slot("agent", model="m-chat", labels={"size": "large"}),
            slot("tts", "tts", model="kokoro"),
            slot("spare", model="m-chat"),
        ],
        models=[model("m-chat", ["agent", "spare"]), model("kokoro", ["tts"], capability="tts")],
        registry=[
            {"id": "m-chat", "aliases": ["chat-alias"], "slot": "agent"},
            {"id": "kokoro", "aliases": ["tts-1"], "capability": "tts"},
        ],
        slotd=PORTS,
    )


def fetch_models(endpoint_url: str) -> list[str]:
    with urllib.request.urlopen(f"{endpoint_url}/v1/models", timeout=5) as response:
        return [entry["id"] for entry in json.load(response)["data"]]


@contextlib.asynccontextmanager
async def serving(config):
    """Run slotd and a dispatcher; yield both once the dispatcher reports SERVING."""
    async with running_slotd(config) as slotd, running_dispatcher(config, [slotd.address]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(10):
                # Health has no change event to wait on, so poll it.
                while (await health.Check(health_pb2.HealthCheckRequest())).status \
                        != health_pb2.HealthCheckResponse.SERVING:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        yield slotd, server


async def wait_until(condition, cache: SlotCache, deadline: float = 10.0) -> None:
    """Wait on the cache's change events until `condition()` holds."""
    async with asyncio.timeout(deadline):
        while not condition():
            await cache.changed()


# -- DispatcherClient -----------------------------------------------------------------


async def test_resolve_alias_cold_start(config):
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            target = await client.resolve("TTS-1", timeout=10)

        models = await asyncio.to_thread(fetch_models, target.endpoint_url)

    assert target.model == "kokoro"
    assert target.slot == "tts"
    assert target.tier == "REGISTRY"
    assert target.state == "READY"
    assert target.cold_start is True
    assert target.source == slotd.address
    assert models == ["kokoro"]


async def test_resolve_unknown_raises_not_found(config):
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.resolve("no-such-model", timeout=10)

    info, _retry_after = rpc.error_details(caught.value)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.reason == "NO_ROUTE"


async def test_resolve_no_cold_start_unavailable(config):
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.resolve("m-chat", timeout=10, no_cold_start=True)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_route_with_labels(config):
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            target = await client.route("chat", {"size": "large"}, timeout=10)

    assert target.slot == "agent"
    assert target.model == "m-chat"
    assert target.tier == "CAPABILITY"


async def test_resolve_lease_then_release(config):
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            target = await client.resolve("m-chat", timeout=10, lease=True, lease_ttl=30)
            held = slotd.manager.table.get("agent").in_flight
            released = await client.release(target)
            again = await client.release(target)

    assert target.lease_id
    assert held == 1
    assert released is True
    assert again is False


async def test_resolve_deadline_exceeded(tmp_path):
    config = write_config(
        tmp_path,
        slots=[slot("slow", model="m-slow", load_delay=5.0)],
        models=[model("m-slow", ["slow"])],
        registry=[{"id": "m-slow", "slot": "slow"}],
        slotd=PORTS,
    )
    async with serving(config) as (slotd, server):
        async with DispatcherClient(server.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.resolve("m-slow", timeout=0.3)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# -- SlotCache -------------------------------------------------------------------------


async def test_cache_snapshot_lists_slots(config):
    async with running_slotd(config) as slotd, SlotCache(slotd.address) as cache:
        await cache.wait_synced(timeout=10)

        assert list(cache.slots) == ["agent", "tts", "spare"]
        assert cache.slots["agent"].state is State.OFFLINE
        assert cache.view().epoch == slotd.manager.log.epoch
        assert cache.fresh


async def test_cache_endpoint_follows_load_and_unload(config):
    async with running_slotd(config) as slotd, slot_stub(slotd.address) as stub, \
            SlotCache(slotd.address) as cache:
        await cache.wait_synced(timeout=10)
        before = cache.endpoint_for("m-chat")

        loaded = await stub.LoadModel(slot_pb2.LoadModelRequest(slot="agent", wait=True))
        await wait_until(lambda: cache.endpoint_for("m-chat") is not None, cache)
        endpoint = cache.endpoint_for("  M-CHAT ")

        await stub.UnloadModel(slot_pb2.UnloadModelRequest(slot="agent", wait=True))
        await wait_until(lambda: cache.endpoint_for("m-chat") is None, cache)

    assert before is None
    assert endpoint == loaded.slot.endpoint_url


async def test_cache_ignores_loading_slot(config):
    async with running_slotd(config) as slotd, slot_stub(slotd.address) as stub, \
            SlotCache(slotd.address) as cache:
        await cache.wait_synced(timeout=10)
        await stub.LoadModel(slot_pb2.LoadModelRequest(slot="tts", wait=False))
        await wait_until(lambda: cache.slots["tts"].state is not State.OFFLINE, cache)
        while_loading = cache.slots["tts"].state, cache.endpoint_for("kokoro")
        await wait_until(lambda: cache.slots["tts"].state is State.READY, cache)

    assert while_loading[0] in (State.STARTING, State.WARMING)
    assert while_loading[1] is None


async def test_cache_prefers_fewest_in_flight(config):
    async with running_slotd(config) as slotd, slot_stub(slotd.address) as stub, \
            SlotCache(slotd.address) as cache:
        await cache.wait_synced(timeout=10)
        agent = await stub.LoadModel(slot_pb2.LoadModelRequest(slot="agent", wait=True))
        spare = await stub.LoadModel(slot_pb2.LoadModelRequest(slot="spare", wait=True))
        await wait_until(lambda: cache.slots["spare"].state is State.READY, cache)
        first = cache.endpoint_for("m-chat")

        await stub.AcquireLease(slot_pb2.AcquireLeaseRequest(slot="agent", holder="test"))
        await wait_until(lambda: cache.slots["agent"].in_flight == 1, cache)
        busy = cache.endpoint_for("m-chat")

    assert first == agent.slot.endpoint_url
    assert busy == spare.slot.endpoint_url


async def test_cache_resyncs_after_slotd_restart(config):
    address = f"127.0.0.1:{free_port()}"
    cache = SlotCache(address, staleness=0.2, backoff=0.02, backoff_max=0.1)
    cache.start()
    try:
        async with running_slotd(config, listen=address) as first, slot_stub(address) as stub:
            await cache.wait_synced(timeout=10)
            await stub.LoadModel(slot_pb2.LoadModelRequest(slot="agent", wait=True))
            await wait_until(lambda: cache.endpoint_for("m-chat") is not None, cache)
            first_epoch = first.manager.log.epoch

        # slotd is gone: after `staleness` seconds endpoint_for returns None.
        await wait_until(lambda: not cache.view().connected, cache)
        # Freshness ends with the passing of time, not with an event, so poll it.
        async with asyncio.timeout(5):
            while cache.fresh:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        stale_answer = cache.endpoint_for("m-chat")

        async with running_slotd(config, listen=address) as second:
            await wait_until(lambda: cache.view().epoch == second.manager.log.epoch
                             and cache.view().synced and cache.view().connected, cache)
            restarted = cache.slots["agent"].state, cache.fresh
    finally:
        await cache.close()

    assert stale_answer is None
    assert second.manager.log.epoch != first_epoch
    assert restarted == (State.OFFLINE, True)


async def test_cache_wait_synced_times_out():
    async with SlotCache(f"127.0.0.1:{free_port()}", backoff=0.02, backoff_max=0.05) as cache:
        with pytest.raises(TimeoutError):
            await cache.wait_synced(timeout=0.3)

        assert cache.endpoint_for("m-chat") is None
        assert not cache.fresh
