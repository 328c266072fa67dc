"""The dispatcher's subscriptions to real slotd processes: sync, resume, resubscribe, staleness, health."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    dispatch_stubs,
    free_port,
    model,
    running_dispatcher,
    running_slotd,
    slot,
    subprocess_env,
)
from test_dispatch_resolve import error_info, running_box, until, write_config

from slotroute import rpc
from slotroute.dispatch.sources import SourceTable
from slotroute.dispatch.upstream import Channels, Subscriber
from slotroute.dispatch.v1 import route_pb2, transport_pb2
from slotroute.slot.app import Slotd
from slotroute.slot.v1 import slot_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def resolve(transport, model_id: str, **policy) -> transport_pb2.ResolveResponse:
    request = transport_pb2.ResolveRequest(model=model_id, policy=route_pb2.WaitPolicy(**policy))
    return await transport.Resolve(request, timeout=15)


async def resolve_error(transport, model_id: str, **policy) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(transport, model_id, **policy)
    return caught.value


def table_matches(dispatcher, slotd: Slotd) -> bool:
    """Return whether the dispatcher's table of `slotd` equals slotd's own state."""
    table = dispatcher.tables[slotd.address]
    view = table.view()
    current = {status.name: (status.state.value, status.model_id, status.generation)
               for status in slotd.manager.table.all()}
    copied = {name: (entry.state.value, entry.model_id, entry.generation)
              for name, entry in view.slots.items()}
    return (table.synced and table.epoch == slotd.manager.log.epoch
            and table.revision == slotd.manager.log.revision and copied == current)


# -- keepalive --------------------------------------------------------------------------


def test_keepalive_settings_agree():
    server = dict(rpc.SERVER_OPTIONS)
    client = dict(rpc.CLIENT_OPTIONS)

    # A client that pings more often than the server permits collects ping strikes and
    # gets GOAWAY too_many_pings after max_ping_strikes of them.
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    # Clients ping idle connections, so servers must accept pings without calls.
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_timeout_ms"] < server["grpc.keepalive_time_ms"]


# -- the source table, fed directly ---------------------------------------------------------


def event(kind: int, epoch: str, revision: int, *, snapshot: bool = False, name: str = "",
          state: int = slot_pb2.SLOT_STATE_OFFLINE) -> slot_pb2.WatchSlotsResponse:
    message = slot_pb2.WatchSlotsResponse(type=kind, epoch=epoch, revision=revision, snapshot=snapshot)
    if name:
        message.slot.name = name
        message.slot.state = state
    return message


def feed(subscriber: Subscriber, *events: slot_pb2.WatchSlotsResponse) -> None:
    for item in events:
        subscriber._apply(item)


def snapshot(epoch: str, revision: int, *names: str) -> list[slot_pb2.WatchSlotsResponse]:
    return [
        event(slot_pb2.EVENT_TYPE_CATALOG, epoch, revision, snapshot=True),
        *(event(slot_pb2.EVENT_TYPE_SLOT, epoch, revision, snapshot=True, name=name) for name in names),
        event(slot_pb2.EVENT_TYPE_SYNCED, epoch, revision, snapshot=True),
    ]


def test_snapshot_replaces_table_wholesale():
    table = SourceTable("s:1")
    subscriber = Subscriber(table, Channels())
    feed(subscriber, *snapshot("e1", 5, "a", "old"))
    feed(subscriber, event(slot_pb2.EVENT_TYPE_SLOT, "e1", 6, name="a", state=slot_pb2.SLOT_STATE_STARTING))

    assert (table.epoch, table.revision) == ("e1", 6)
    assert table.view().slots["a"].state.value == "STARTING"

    feed(subscriber, *snapshot("e2", 2, "a", "new"))

    assert (table.epoch, table.revision) == ("e2", 2)
    assert list(table.view().slots) == ["a", "new"]
    assert table.view().slots["a"].state.value == "OFFLINE"
    assert subscriber.snapshots == 2


def test_lost_snapshot_keeps_resume_point():
    table = SourceTable("s:1")
    subscriber = Subscriber(table, Channels())
    feed(subscriber, *snapshot("e1", 5, "a"))
    table.on_disconnected()

    # A snapshot of a new epoch that breaks off before SYNCED changes nothing.
    feed(subscriber, *snapshot("e2", 3, "b")[:-1])
    table.on_disconnected()

    assert (table.epoch, table.revision) == ("e1", 5)
    assert list(table.view().slots) == ["a"]


def test_empty_snapshot_clears_table():
    table = SourceTable("s:1")
    subscriber = Subscriber(table, Channels())
    feed(subscriber, *snapshot("e1", 5, "a"))
    feed(subscriber, event(slot_pb2.EVENT_TYPE_SYNCED, "e2", 1, snapshot=True))

    assert (table.epoch, table.revision) == ("e2", 1)
    assert list(table.view().slots) == []


def test_early_drops_keep_staleness_clock():
    table = SourceTable("s:1")
    subscriber = Subscriber(table, Channels())
    feed(subscriber, *snapshot("e1", 5, "a"))
    table.on_connected()
    table.on_disconnected()
    lost_at = table.disconnected_since

    # Streams that deliver events but end before SYNCED do not restart the clock.
    table.on_connected()
    feed(subscriber, event(slot_pb2.EVENT_TYPE_SLOT, "e1", 6, name="a"))
    table.on_disconnected()

    assert lost_at is not None
    assert table.disconnected_since == lost_at
    assert table.view().stale(lost_at + 11.0, 10.0) is True


# -- sync and resume --------------------------------------------------------------------------


@pytest.fixture
def one_slot_box(tmp_path):
    return write_config(tmp_path, slots=[slot("a", model="m1"), slot("b", "embed", model="e1")],
                        models=[model("m1", ["a"]), model("m2", ["a"]), model("e1", ["b"], capability="embed")],
                        dispatcher={})


async def test_table_follows_slotd_changes(one_slot_box):
    async with running_box(one_slot_box) as box:
        await box.slots.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m1", wait=True))
        await box.slots.LoadModel(slot_pb2.LoadModelRequest(slot="a", model_id="m2", wait=True))
        await box.slots.UnloadModel(slot_pb2.UnloadModelRequest(slot="a", wait=True))
        await until(lambda: table_matches(box.dispatcher, box.slotd), "the table matches slotd")
        subscriber = box.dispatcher.subscribers[0]

        assert box.table_slot("a").state.value == "OFFLINE"
        assert box.table_slot("a").generation == 2
        assert subscriber.snapshots == 1
        assert subscriber.connects == 1


async def test_stream_end_resumes_from_revision(one_slot_box):
    async with running_box(one_slot_box) as box:
        subscriber = box.dispatcher.subscribers[0]
        epoch = box.dispatcher.tables[box.slotd.address].epoch

        # End every watch stream cleanly, then change state while the dispatcher resubscribes.
        box.slotd.manager.log.close_all()
        await box.slots.LoadModel(slot_pb2.LoadModelRequest(slot="b", model_id="e1", wait=True))
        await until(lambda: subscriber.resumes == 1, "the dispatcher resumed")
        await until(lambda: table_matches(box.dispatcher, box.slotd), "the table matches slotd")

        assert subscriber.snapshots == 1
        assert subscriber.connects == 2
        assert box.dispatcher.tables[box.slotd.address].epoch == epoch
        assert box.table_slot("b").state.value == "READY"
        answer = await resolve(box.transport, "e1", no_wait=True)
        assert answer.target.slot == "b"


async def test_slotd_restart_new_snapshot(tmp_path):
    first_path = write_config(tmp_path, slots=[slot("a", model="m1", preload=True), slot("old", model="m2")],
                              models=[model("m1", ["a"]), model("m2", ["old"])],
                              dispatcher={}, name="first.toml")
    second_path = write_config(tmp_path, slots=[slot("a", model="m1"), slot("new", model="m3")],
                               models=[model("m1", ["a"]), model("m3", ["new"])],
                               dispatcher={}, name="second.toml")
    async with running_slotd(first_path) as first:
        address = first.address
        async with running_dispatcher(first_path, [address]) as dispatcher, \
                dispatch_stubs(dispatcher.address) as (transport, _capability):
            table = dispatcher.tables[address]
            await until(lambda: table_matches(dispatcher, first) and table.view().slots["a"].state.value
                        == "READY", "a is READY in the table")
            old_epoch = table.epoch
            assert (await resolve(transport, "m1")).target.slot == "a"

            await first.stop()
            async with running_slotd(second_path, listen=address) as second:
                await until(lambda: table_matches(dispatcher, second), "the table matches the new slotd")
                answer = await resolve(transport, "m3")
                missing = await resolve_error(transport, "m2")

                assert table.epoch == second.manager.log.epoch
                assert table.epoch != old_epoch
                assert list(table.view().slots) == ["a", "new"]
                assert dispatcher.subscribers[0].snapshots == 2
                assert answer.target.slot == "new"
                assert answer.target.source == address
                assert answer.tier == route_pb2.TIER_PREFETCH
                assert missing.code() == grpc.StatusCode.NOT_FOUND


# -- health and several sources -------------------------------------------------------------


async def test_health_waits_for_every_source(tmp_path):
    first_path = write_config(tmp_path, slots=[slot("a", model="m1")], models=[model("m1", ["a"])],
                              dispatcher={}, name="first.toml")
    second_path = write_config(tmp_path, slots=[slot("b", model="m2")], models=[model("m2", ["b"])],
                               dispatcher={}, name="second.toml")
    pending = f"127.0.0.1:{free_port()}"
    async with (
        running_slotd(first_path) as first,
        running_dispatcher(first_path, [first.address, pending]) as dispatcher,
        dispatch_stubs(dispatcher.address) as (transport, _capability),
        grpc.aio.insecure_channel(dispatcher.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        await until(lambda: dispatcher.tables[first.address].synced, "the first source synced")
        before = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        served = await resolve(transport, "m1")
        waiting = await resolve_error(transport, "m2")
        watch = health.Watch(health_pb2.HealthCheckRequest())
        opening = await watch.read()

        assert before.status == NOT_SERVING
        assert opening.status == NOT_SERVING
        assert served.target.source == first.address
        assert waiting.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(waiting)[0].metadata["source"] == pending

        async with running_slotd(second_path, listen=pending) as second:
            serving = await asyncio.wait_for(watch.read(), 10)
            watch.cancel()
            answer = await resolve(transport, "m2")
            await until(lambda: table_matches(dispatcher, first) and table_matches(dispatcher, second),
                        "both tables match their slotd")

            assert serving.status == SERVING
            assert answer.target.source == pending
            assert answer.target.slot == "b"
            assert dispatcher.tables[pending].epoch == second.manager.log.epoch
            assert dispatcher.tables[first.address].epoch == first.manager.log.epoch
            assert second.manager.log.epoch != first.manager.log.epoch


async def test_health_not_serving_before_sync(tmp_path):
    path = write_config(tmp_path, slots=[slot("a", model="m1")], models=[model("m1", ["a"])], dispatcher={})
    address = f"127.0.0.1:{free_port()}"
    async with (
        running_dispatcher(path, [address]) as dispatcher,
        dispatch_stubs(dispatcher.address) as (transport, _capability),
        grpc.aio.insecure_channel(dispatcher.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        service = "slotroute.dispatch.v1.TransportService"
        before = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        before_service = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        unsynced = await resolve_error(transport, "m1")
        info, retry_delay = error_info(unsynced)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        await watch.read()

        async with running_slotd(path, listen=address):
            serving = await asyncio.wait_for(watch.read(), 10)
            watch.cancel()
            after_service = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)

        assert before.status == NOT_SERVING
        assert before_service.status == NOT_SERVING
        assert unsynced.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "SOURCE_UNAVAILABLE"
        assert info.metadata["source"] == address
        assert retry_delay == 1.0
        assert serving.status == SERVING
        assert after_service.status == SERVING


# -- staleness ----------------------------------------------------------------------------


async def test_stale_source_becomes_unavailable(tmp_path):
    # A long reconnect backoff keeps the dispatcher from resyncing while slotd shuts down,
    # so its table keeps the READY state slotd last sent.
    path = write_config(tmp_path, slots=[slot("a", model="m1", preload=True)], models=[model("m1", ["a"])],
                        registry=[{"id": "m1", "aliases": ["main"], "slot": "a"}],
                        dispatcher={"staleness": 1.5, "reconnect_backoff": 2.0, "reconnect_backoff_max": 2.0})
    async with running_slotd(path) as slotd:
        address = slotd.address
        async with running_dispatcher(path, [address]) as dispatcher, \
                dispatch_stubs(dispatcher.address) as (transport, _capability):
            table = dispatcher.tables[address]
            await until(lambda: table.synced and "a" in table.view().slots
                        and table.view().slots["a"].state.value == "READY", "a is READY in the table")
            live = await resolve(transport, "main")

            await slotd.stop()
            await until(lambda: table.disconnected_since is not None, "the dispatcher lost the stream")
            lost_at = table.disconnected_since
            within = await resolve(transport, "main")
            within_elapsed = time.monotonic() - lost_at
            await until(lambda: time.monotonic() > lost_at + 1.6, "the staleness bound passed", limit=5)
            error = await resolve_error(transport, "main")
            info, retry_delay = error_info(error)
            listed = await transport.ListRoutes(transport_pb2.ListRoutesRequest())

    assert within_elapsed < 1.5
    assert within.target.endpoint_url == live.target.endpoint_url
    assert within.target.state == slot_pb2.SLOT_STATE_READY
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert info.reason == "SOURCE_UNAVAILABLE"
    assert info.metadata["source"] == address
    assert f"slotd {address} is unreachable for" in error.details()
    assert "its slots are not routable until it is back" in error.details()
    assert retry_delay == 1.0
    assert list(listed.routes) == []


def slotd_process(path: pathlib.Path, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slotroute", "--log-level", "warning", "slotd", "--config", str(path),
         "--listen", address],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


async def test_silent_slotd_becomes_stale(tmp_path):
    # slotd sends a heartbeat every 0.2 s; a stopped slotd sends nothing but keeps its socket.
    path = write_config(tmp_path, slots=[slot("a", model="m1", preload=True)], models=[model("m1", ["a"])],
                        registry=[{"id": "m1", "slot": "a"}],
                        dispatcher={"staleness": 0.8, "watch_timeout": 0.5})
    address = f"127.0.0.1:{free_port()}"
    process = slotd_process(path, address)
    try:
        async with running_dispatcher(path, [address]) as dispatcher, \
                dispatch_stubs(dispatcher.address) as (transport, _capability):
            table = dispatcher.tables[address]
            await until(lambda: table.synced and table.view().slots["a"].state.value == "READY",
                        "a is READY in the table", limit=20)
            live = await resolve(transport, "m1")

            os.kill(process.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            await until(lambda: table.disconnected_since is not None, "the dispatcher dropped the stream")
            dropped_after = time.monotonic() - stopped_at
            await until(lambda: time.monotonic() > table.disconnected_since + 0.9, "the staleness bound passed")
            error = await resolve_error(transport, "m1")

            os.kill(process.pid, signal.SIGCONT)
            await until(lambda: table.disconnected_since is None, "the dispatcher resynced")
            again = await resolve(transport, "m1")
            subscriber = dispatcher.subscribers[0]
    finally:
        stop_process(process)

    assert 0.4 < dropped_after < 2.0
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"slotd {address} is unreachable for" in error.details()
    assert again.target.endpoint_url == live.target.endpoint_url
    assert subscriber.failures >= 1
    assert subscriber.snapshots == 1
