"""Prometheus metrics for slotd and the dispatcher, each service on its own registry.

Counters and histograms are updated by listeners: slotd's table change
listener and the dispatcher service's decision observer. Gauges that mirror
live state (slot states, watch subscribers, the memory ledger, source lag)
are read by collectors at scrape time. Those reads run on the service's
event loop, because the HTTP server serves scrapes on its own thread and
the state they read belongs to the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slotroute.netaddr import format_address, parse_listen
from slotroute.slot.states import State

logger = logging.getLogger("slotroute.metrics")

T = TypeVar("T")

# Seconds a scrape waits for the event loop before it reports no live gauges.
LOOP_READ_TIMEOUT = 2.0

# Resolve and Route take well under a millisecond when the slot is READY and
# up to minutes when they wait for a cold start.
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
NO_TIER = "NONE"


class MetricsServer:
    """The HTTP endpoint that serves one registry in the Prometheus text format."""

    def __init__(self, registry: CollectorRegistry, listen: str):
        self.registry = registry
        self.listen = listen
        self.port = 0
        self.address = ""
        self._server = None
        self._thread = None

    def start(self) -> None:
        """Bind and serve on a daemon thread; raise OSError when the address is taken."""
        host, port = parse_listen(self.listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"failed to bind the metrics endpoint to {self.listen}: "
                          f"{error.strerror or error}; "
                          "change metrics_listen or set it to \"\" to disable metrics") from None
        self.port = self._server.server_port
        self.address = format_address(host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._server = None
        self._thread = None


class _LoopCollector(Collector):
    """Collects metric families by running `read` on the event loop that owns the state."""

    def __init__(self, read: Callable[[], list[Metric]], name: str):
        self._read = read
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterable[Metric]:
        try:
            return self._on_loop(self._read)
        except (TimeoutError, concurrent.futures.TimeoutError) as error:
            logger.warning("metrics scrape skipped the %s gauges: the event loop did not respond "
                           "within %.1f s (%s)", self._name, LOOP_READ_TIMEOUT,
                           error or type(error).__name__)
            return []
        except Exception as error:
            # A failed read must not fail the whole scrape: the counters still matter.
            logger.warning("metrics scrape skipped the %s gauges: %s: %s",
                           self._name, type(error).__name__, error)
            return []

    def _on_loop(self, read: Callable[[], T]) -> T:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            return read()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(read())
            except Exception as error:  # handed to the scraping thread
                future.set_exception(error)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=LOOP_READ_TIMEOUT)


def _gauge(name: str, documentation: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class _ServiceMetrics:
    """A service's registry, the collector that reads its live state, and its HTTP endpoint."""

    def __init__(self, read: Callable[[], list[Metric]], name: str):
        self.registry = CollectorRegistry()
        self.collector = _LoopCollector(read, name)
        self.registry.register(self.collector)
        self.server: MetricsServer | None = None

    @property
    def url(self) -> str:
        """The scrape URL, or "" while no endpoint is served."""
        return f"http://{self.server.address}/metrics" if self.server is not None else ""

    def serve(self, listen: str) -> None:
        """Serve the registry on `listen` ("" serves nothing); call on the service's event loop."""
        self.collector.bind(asyncio.get_running_loop())
        if not listen:
            return
        server = MetricsServer(self.registry, listen)
        server.start()
        self.server = server

    async def close(self) -> None:
        """Stop the endpoint. Stopping waits up to 0.5 s for the server thread, so off the loop."""
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.stop)


# -- slotd ------------------------------------------------------------------------------


class SlotdMetrics(_ServiceMetrics):
    """slotd's metrics. `on_change` is a SlotTable change listener.

    `manager` is read at scrape time through `manager_getter`, because a config
    reload may replace parts of it (the ledger).
    """

    def __init__(self, manager_getter: Callable[[], Any]):
        super().__init__(self._collect, "slotd")
        self._manager = manager_getter
        self.transitions = Counter(
            "slotroute_slot_transitions", "Slot state changes by new state and reason.",
            ["slot", "state", "reason"], registry=self.registry,
        )
        self.cold_start = Histogram(
            "slotroute_slot_cold_start_seconds",
            "Seconds from STARTING to READY for each backend start that reached READY.",
            ["slot"], buckets=COLD_START_BUCKETS, registry=self.registry,
        )
        self._starting: dict[str, float] = {}

    def on_change(self, previous, status, revision: int) -> None:
        """Count state changes and time cold starts; field-only updates are ignored."""
        if status is None:
            if previous is not None:
                self._starting.pop(previous.name, None)
            return
        if previous is None or previous.state is status.state:
            return
        name = status.name
        self.transitions.labels(name, status.state.value, status.reason.value).inc()
        if status.state is State.STARTING:
            self._starting[name] = time.monotonic()
        elif status.state is State.READY:
            started = self._starting.pop(name, None)
            if started is not None:
                self.cold_start.labels(name).observe(time.monotonic() - started)
        elif status.state in (State.ERROR, State.OFFLINE, State.UNLOADING):
            self._starting.pop(name, None)

    def _collect(self) -> list[Metric]:
        manager = self._manager()
        state = _gauge("slotroute_slot_state",
                       "1 for the slot's current state, 0 for every other state.", ["slot", "state"])
        in_flight = _gauge("slotroute_slot_in_flight", "Leases held on the slot.", ["slot"])
        for status in manager.table.all():
            for candidate in State:
                state.add_metric([status.name, candidate.value], 1.0 if status.state is candidate else 0.0)
            in_flight.add_metric([status.name], status.in_flight)

        log = manager.log
        revision = _gauge("slotroute_slotd_revision", "Revision of the last published slot change.")
        revision.add_metric([], log.revision)
        subscribers = _gauge("slotroute_watch_subscribers", "Open WatchSlots streams.")
        subscribers.add_metric([], log.subscriber_count)
        published = CounterMetricFamily(
            "slotroute_watch_events_published",
            "Events published to the revision log; each one is queued for every subscriber.")
        published.add_metric([], log.published_total)
        coalesced = CounterMetricFamily(
            "slotroute_watch_events_coalesced",
            "Queued events dropped because a newer event for the same slot replaced them "
            "in a slow subscriber's queue.")
        coalesced.add_metric([], log.coalesced_total)

        ledger = manager.ledger
        total = _gauge("slotroute_device_memory_total_bytes", "Device memory slotd may use.", ["device"])
        reserved = _gauge("slotroute_device_memory_reserved_bytes",
                          "Device memory reserved by slots and admitted loads.", ["device"])
        free = _gauge("slotroute_device_memory_free_bytes",
                      "Device memory left for new loads.", ["device"])
        for device in ledger.devices():
            total.add_metric([device], ledger.total(device))
            reserved.add_metric([device], ledger.reserved(device))
            try:
                # For devices declared "auto" this reads the machine, which may fail.
                free.add_metric([device], ledger.free(device))
            except (ValueError, OSError) as error:
                logger.warning("metrics: free memory of device %s not readable: %s", device, error)
        return [state, in_flight, revision, subscribers, published, coalesced, total, reserved, free]


# -- dispatcher ---------------------------------------------------------------------------


class DispatcherMetrics(_ServiceMetrics):
    """The dispatcher's metrics. `on_decision` is the services' decision observer."""

    def __init__(self, tables: Mapping[str, Any]):
        super().__init__(self._collect, "dispatcher")
        self._tables = tables
        self._created = time.monotonic()
        self.counts = {
            kind: Counter(f"slotroute_{kind}", f"{kind.capitalize()} calls by tier and status code.",
                          ["tier", "code"], registry=self.registry)
            for kind in ("resolve", "route")
        }
        self.durations = {
            kind: Histogram(f"slotroute_{kind}_duration_seconds",
                            f"Seconds to answer {kind.capitalize()}, by tier and status code.",
                            ["tier", "code"], buckets=DECISION_BUCKETS, registry=self.registry)
            for kind in ("resolve", "route")
        }
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.cold_starts = Counter(
            "slotroute_dispatch_cold_starts",
            "Resolve and Route answers that waited for a backend to start.",
            ["kind"], registry=self.registry,
        )

    def on_decision(self, kind: str, outcome, code: str, seconds: float) -> None:
        """Record one Resolve or Route response; `outcome` is None when the request was invalid."""
        if kind not in self.counts:
            return
        tier = NO_TIER
        if outcome is not None and outcome.decision.tier is not None:
            tier = outcome.decision.tier.value
        # labels() costs a locked lookup per call; the children are cached per label set.
        key = (kind, tier, code)
        children = self._children.get(key)
        if children is None:
            children = (self.counts[kind].labels(tier, code), self.durations[kind].labels(tier, code))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if outcome is not None and outcome.cold_start:
            self.cold_starts.labels(kind).inc()

    def _collect(self) -> list[Metric]:
        now = time.monotonic()
        lag = _gauge("slotroute_source_lag_revisions",
                     "Revisions slotd announced in heartbeats that the dispatcher has not applied.",
                     ["source"])
        since = _gauge("slotroute_source_seconds_since_event",
                       "Seconds since the last event from the source's watch stream "
                       "(since dispatcher start if none arrived).", ["source"])
        connected = _gauge("slotroute_source_connected", "1 while the watch stream is open.", ["source"])
        synced = _gauge("slotroute_source_synced", "1 once the source's snapshot is applied.", ["source"])
        revision = _gauge("slotroute_source_revision", "Last applied revision of the source.", ["source"])
        for address, table in self._tables.items():
            lag.add_metric([address], max(table.heartbeat_revision - table.revision, 0))
            last = table.last_event_at if table.last_event_at is not None else self._created
            since.add_metric([address], max(now - last, 0.0))
            connected.add_metric([address], 1.0 if table.connected else 0.0)
            synced.add_metric([address], 1.0 if table.synced else 0.0)
            revision.add_metric([address], table.revision)
        return [lag, since, connected, synced, revision]
