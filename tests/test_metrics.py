"""Prometheus endpoints of slotd and the dispatcher, scraped over HTTP from real servers."""

import asyncio
import dataclasses
import socket
import types
import urllib.request

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import dispatch_stubs, model, running_dispatcher, running_slotd, slot, write_config

from slotroute.dispatch.v1 import capability_pb2, transport_pb2
from slotroute.metrics import SlotdMetrics
from slotroute.slot.app import Slotd
from slotroute.slot.config import DeviceSpec, load_slotd_config
from slotroute.slot.memory import Ledger
from slotroute.slot.states import Reason, State
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.watch import RevisionLog

GIB = 2**30


def _box(tmp_path, **slotd_fields):
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1"), slot("b", "embed", model="e1")],
        models=[model("m1", ["a"]), model("e1", ["b"], capability="embed", memory="2GiB")],
        devices=[{"name": "dev0", "memory": "16GiB"}],
        # A backend port range of its own, away from other test files running at the same time.
        slotd={"metrics_listen": "127.0.0.1:0", "ports": "45100-45199", **slotd_fields},
        dispatcher={"metrics_listen": "127.0.0.1:0"},
        registry=[{"id": "m1", "slot": "a"}],
    )


async def scrape(url: str) -> str:
    """Fetch a metrics page off the event loop, which must stay free to run the collectors."""
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()
    return await asyncio.to_thread(fetch)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Map (sample name, labels) to value for every sample of a scrape."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no sample {name}{labels}"
    return found[key]


async def _wait_synced(server, seconds: float = 10.0) -> None:
    """Wait until the dispatcher applied every source's snapshot."""
    async with asyncio.timeout(seconds):
        for table in server.tables.values():
            while not table.synced:
                await table.changed()


async def test_scrape_after_resolve(tmp_path):
    box = _box(tmp_path)
    async with running_slotd(box) as slotd, running_dispatcher(box, [slotd.address]) as server:
        await _wait_synced(server)
        async with dispatch_stubs(server.address) as (transport, capability):
            answer = await transport.Resolve(transport_pb2.ResolveRequest(model="m1"), timeout=15)
            with pytest.raises(grpc.aio.AioRpcError):
                await transport.Resolve(transport_pb2.ResolveRequest(model=""), timeout=5)
            routed = await capability.Route(capability_pb2.RouteRequest(capability="chat"), timeout=15)
        dispatcher_text = await scrape(server.metrics.url)
        slotd_text = await scrape(slotd.metrics.url)

    assert answer.cold_start
    assert routed.target.slot == "a"
    # prometheus-client writes labels in alphabetical order.
    assert 'slotroute_resolve_total{code="OK",tier="REGISTRY"} 1.0' in dispatcher_text

    dispatcher = samples(dispatcher_text)
    assert value(dispatcher, "slotroute_resolve_total", tier="REGISTRY", code="OK") == 1
    assert value(dispatcher, "slotroute_resolve_duration_seconds_count", tier="REGISTRY", code="OK") == 1
    assert value(dispatcher, "slotroute_resolve_total", tier="NONE", code="INVALID_ARGUMENT") == 1
    # Route decisions carry no tier.
    assert value(dispatcher, "slotroute_route_total", tier="NONE", code="OK") == 1
    assert value(dispatcher, "slotroute_route_duration_seconds_count", tier="NONE", code="OK") == 1
    assert value(dispatcher, "slotroute_dispatch_cold_starts_total", kind="resolve") == 1

    source = slotd.address
    assert value(dispatcher, "slotroute_source_lag_revisions", source=source) >= 0
    assert value(dispatcher, "slotroute_source_seconds_since_event", source=source) >= 0
    assert value(dispatcher, "slotroute_source_connected", source=source) == 1
    assert value(dispatcher, "slotroute_source_synced", source=source) == 1
    assert value(dispatcher, "slotroute_source_revision", source=source) > 0

    found = samples(slotd_text)
    assert value(found, "slotroute_slot_state", slot="a", state="READY") == 1
    assert value(found, "slotroute_slot_state", slot="a", state="OFFLINE") == 0
    assert value(found, "slotroute_slot_state", slot="b", state="OFFLINE") == 1
    assert sum(count for (name, labels), count in found.items()
               if name == "slotroute_slot_state" and ("slot", "a") in labels) == 1
    assert value(found, "slotroute_slot_transitions_total", slot="a", state="STARTING",
                 reason="REQUESTED") == 1
    assert value(found, "slotroute_slot_transitions_total", slot="a", state="READY",
                 reason="PROBE") == 1
    assert value(found, "slotroute_slot_cold_start_seconds_count", slot="a") == 1
    assert value(found, "slotroute_slot_cold_start_seconds_sum", slot="a") > 0
    assert value(found, "slotroute_watch_subscribers") == 1
    assert value(found, "slotroute_watch_events_published_total") >= 3
    assert value(found, "slotroute_watch_events_coalesced_total") == 0
    assert value(found, "slotroute_device_memory_total_bytes", device="dev0") == 16 * GIB
    assert value(found, "slotroute_device_memory_reserved_bytes", device="dev0") == 1 * GIB
    assert value(found, "slotroute_device_memory_free_bytes", device="dev0") == 15 * GIB


async def test_metrics_port_zero_and_disabled(tmp_path):
    box = _box(tmp_path)
    async with running_slotd(box) as slotd:
        assert slotd.metrics.server.port > 0
        assert slotd.metrics.url == f"http://127.0.0.1:{slotd.metrics.server.port}/metrics"
    assert slotd.metrics.server is None

    off = _box(tmp_path, metrics_listen="")
    async with running_slotd(off) as slotd:
        assert slotd.metrics.url == ""


def test_metrics_default_address(tmp_path):
    box = write_config(tmp_path, slots=[slot("a")], slotd={"metrics_listen": "127.0.0.1:9451"})
    assert load_slotd_config(box).ops.metrics_listen == "127.0.0.1:9451"
    document = box.read_text().replace('metrics_listen = "127.0.0.1:9451"\n', "")
    box.write_text(document)
    assert load_slotd_config(box).ops.metrics_listen == "127.0.0.1:9451"


async def test_metrics_port_taken_fails_start(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        slotd = Slotd(load_slotd_config(_box(tmp_path, metrics_listen=f"127.0.0.1:{taken}")))
        try:
            with pytest.raises(OSError) as failure:
                await slotd.start()
        finally:
            await slotd.stop()
    assert f"failed to bind the metrics endpoint to 127.0.0.1:{taken}" in str(failure.value)
    assert "metrics_listen" in str(failure.value)


def _sample(metric, name: str, labels: dict[str, str]) -> float | None:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_cold_start_timed_from_last_start():
    metrics = SlotdMetrics(lambda: None)
    offline = SlotStatus(name="a", device="dev0", capabilities=("chat",))

    def moved(status, state, reason):
        return dataclasses.replace(status, state=state, reason=reason)

    starting = moved(offline, State.STARTING, Reason.REQUESTED)
    crashed = moved(starting, State.ERROR, Reason.CRASHED)
    restarting = moved(crashed, State.STARTING, Reason.RESTART)
    warming = moved(restarting, State.WARMING, Reason.PROBE)
    ready = moved(warming, State.READY, Reason.PROBE)
    for revision, (previous, status) in enumerate(
            [(offline, starting), (starting, crashed), (crashed, restarting),
             (restarting, warming), (warming, ready), (ready, ready)], start=1):
        metrics.on_change(previous, status, revision)

    # An external slot becomes READY without a start: no cold start.
    external = SlotStatus(name="x", device="dev0", capabilities=("chat",), external=True)
    metrics.on_change(external, moved(external, State.READY, Reason.PROBE), 7)

    assert _sample(metrics.cold_start, "slotroute_slot_cold_start_seconds_count", {"slot": "a"}) == 1
    assert _sample(metrics.cold_start, "slotroute_slot_cold_start_seconds_count", {"slot": "x"}) is None
    transitions = metrics.transitions
    assert _sample(transitions, "slotroute_slot_transitions_total",
                   {"slot": "a", "state": "STARTING", "reason": "RESTART"}) == 1
    assert _sample(transitions, "slotroute_slot_transitions_total",
                   {"slot": "a", "state": "ERROR", "reason": "CRASHED"}) == 1
    # The last change kept the state, so READY was counted once.
    assert _sample(transitions, "slotroute_slot_transitions_total",
                   {"slot": "a", "state": "READY", "reason": "PROBE"}) == 1


def test_watch_gauges_read_live_log():
    log = RevisionLog(history_size=16, max_pending=2)
    table = SlotTable(log)
    table.add(SlotStatus(name="a", device="dev0", capabilities=("chat",)))
    ledger = Ledger((DeviceSpec(name="dev0", kind="other", memory_bytes=8 * GIB),), table)
    subscription, _opening = log.subscribe(table.snapshot_items)
    for count in range(1, 6):
        table.update("a", in_flight=count)
    metrics = SlotdMetrics(lambda: types.SimpleNamespace(table=table, log=log, ledger=ledger))

    found = samples(generate_latest(metrics.registry).decode())
    subscription.close()

    assert log.coalesced_total > 0
    assert value(found, "slotroute_watch_events_coalesced_total") == log.coalesced_total
    assert value(found, "slotroute_watch_events_published_total") == log.published_total
    assert value(found, "slotroute_watch_subscribers") == 1
    assert value(found, "slotroute_slotd_revision") == log.revision
    assert value(found, "slotroute_slot_in_flight", slot="a") == 5
    assert value(found, "slotroute_device_memory_free_bytes", device="dev0") == 8 * GIB
