"""The dispatcher's core loop: ask the resolver, then respond, wait or load, and ask again.

Waiting is bounded by the caller's deadline and by max_wait. Concurrent
requests that need the same cold start share one load call per (source, slot,
model). Calls to slotd go through a `Backend` that the gRPC layer provides, so
this module does not import grpc.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from slotroute.dispatch.config import DispatcherConfig
from slotroute.dispatch.resolver import Decision, Kind, Registry, list_routes, resolve, route
from slotroute.dispatch.sources import SourceTable, SourceView
from slotroute.ids import model_key

logger = logging.getLogger("slotroute.dispatch")


class LoadError(Exception):
    """A load or lease call to slotd failed; `code` is the gRPC status code name."""

    def __init__(self, code: str, message: str, *, reason: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    id: str
    slot: str
    generation: int
    expires_at: float


class Backend(Protocol):
    async def load(self, source: str, slot: str, model_id: str, rpc_timeout: float) -> None: ...

    async def acquire_lease(self, source: str, slot: str, ttl: float) -> LeaseInfo: ...

    async def release_lease(self, source: str, lease_id: str) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Policy:
    no_wait: bool = False
    no_cold_start: bool = False
    lease: bool = False
    lease_ttl: float = 0.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The final decision of a Resolve or Route, with what happened on the way."""

    decision: Decision
    cold_start: bool = False
    timed_out: bool = False
    lease: LeaseInfo | None = None
    # Set when a load call failed: the slotd status to pass on.
    load_error: LoadError | None = None
    # ErrorInfo reason for an UNAVAILABLE decision, when its slot state alone does not tell it.
    reason: str = ""


class Dispatcher:
    """Decides Resolve and Route from the source tables."""

    def __init__(
        self,
        config: DispatcherConfig,
        tables: Mapping[str, SourceTable],
        backend: Backend,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.registry = Registry(config.entries)
        self.tables = dict(tables)
        self._backend = backend
        self._clock = clock
        self._wall_clock = wall_clock
        self._loads: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        for table in self.tables.values():
            table.add_listener(self._on_change)

    def _on_change(self, _table: SourceTable) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def views(self) -> list[SourceView]:
        return [table.view() for table in self.tables.values()]

    # -- decisions -----------------------------------------------------------

    def decide_resolve(self, model: str) -> Decision:
        return resolve(model, self.registry, self.views(), now=self._clock(),
                       wall_now=self._wall_clock(), staleness=self.config.staleness)

    def decide_route(self, capability: str, labels: Mapping[str, str]) -> Decision:
        return route(capability, labels, self.views(), now=self._clock(),
                     wall_now=self._wall_clock(), staleness=self.config.staleness)

    def routes(self, include_prefetch: bool = False):
        return list_routes(self.registry, self.views(), now=self._clock(),
                           wall_now=self._wall_clock(), staleness=self.config.staleness,
                           include_prefetch=include_prefetch)

    # -- acting on decisions ----------------------------------------------------

    async def resolve(self, model: str, policy: Policy, wait_limit: float) -> Outcome:
        """Resolve a model id, waiting at most `wait_limit` seconds (and max_wait) for a load."""
        return await self._settle(lambda: self.decide_resolve(model), policy, wait_limit)

    async def route(self, capability: str, labels: Mapping[str, str], policy: Policy,
                    wait_limit: float) -> Outcome:
        """Route a capability, waiting at most `wait_limit` seconds (and max_wait) for a load."""
        return await self._settle(lambda: self.decide_route(capability, labels), policy, wait_limit)

    async def _settle(self, decide: Callable[[], Decision], policy: Policy,
                      wait_limit: float) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_limit, self.config.max_wait)
        cold_start = False
        # The tier that found the route: a prefetch stays PREFETCH once the slot is READY.
        tier = None
        while True:
            decision = decide()
            # Changes from here on wake the waits below, even if they land during the load call.
            changed = self._changed
            if decision.kind is Kind.ROUTED:
                if tier is not None and decision.tier is not None:
                    decision = dataclasses.replace(decision, tier=tier)
                outcome = await self._routed(decision, policy, cold_start)
                if outcome is not None:
                    return outcome
                # The slot left READY between the decision and the lease (a queued
                # swap began): decide again once the table shows the change.
                try:
                    await asyncio.wait_for(changed.wait(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    return Outcome(decision, cold_start=True, timed_out=True)
                continue
            if decision.kind not in (Kind.WAIT, Kind.LOAD):
                return Outcome(decision, cold_start=cold_start)
            tier = tier or decision.tier

            if decision.kind is Kind.LOAD:
                if policy.no_cold_start:
                    return Outcome(dataclasses.replace(
                        decision, kind=Kind.UNAVAILABLE, retry_after=None,
                        message=f"{decision.message}: that needs a cold start and the caller set "
                                "no_cold_start",
                    ), reason="COLD_START_REFUSED")
                load = self._shared_load(decision)
                if policy.no_wait:
                    return Outcome(dataclasses.replace(
                        decision, kind=Kind.UNAVAILABLE, retry_after=1.0,
                        message=f"{decision.message}: load started, retry shortly",
                    ), cold_start=True)
                cold_start = True
                try:
                    await asyncio.wait_for(asyncio.shield(load), max(deadline - loop.time(), 0))
                except TimeoutError:
                    return Outcome(decision, cold_start=True, timed_out=True)
                except LoadError as error:
                    # The load call's own timeout (max_wait) ended it; slotd goes on loading.
                    if error.code == "DEADLINE_EXCEEDED":
                        return Outcome(decision, cold_start=True, timed_out=True)
                    return Outcome(decision, cold_start=True, load_error=error)
                # slotd reported the slot READY. Wait for the watch stream to bring that state
                # into the table instead of calling slotd again.
            elif policy.no_wait:
                return Outcome(dataclasses.replace(decision, kind=Kind.UNAVAILABLE),
                               cold_start=cold_start)

            cold_start = True
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(changed.wait(), max(remaining, 0))
            except TimeoutError:
                return Outcome(decision, cold_start=True, timed_out=True)

    def _shared_load(self, decision: Decision) -> asyncio.Task[None]:
        """Start the load that a decision requests, or return the one already running for it.

        The load call's own timeout is max_wait, not the caller's deadline: a
        load goes on after the caller who started it gives up.
        """
        assert decision.slot is not None
        key = (decision.source, decision.slot.name, model_key(decision.load_model))
        task = self._loads.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._backend.load(
                decision.source, decision.slot.name, decision.load_model, self.config.max_wait,
            ))
            task.add_done_callback(
                lambda done, key=key, model=decision.load_model: self._load_done(key, model, done))
            self._loads[key] = task
        return task

    def _load_done(self, key: tuple[str, str, str], model: str, task: asyncio.Task[None]) -> None:
        self._forget_load(key, task)
        if task.cancelled():
            return
        # Retrieving the exception here also keeps asyncio from warning about a load
        # without a waiting caller (no_wait callers, callers past their deadline).
        error = task.exception()
        if error is not None:
            source, slot, _key = key
            logger.warning("load of %s into slot %r on %s failed: %s",
                           repr(model) if model else "the default model", slot, source, error)

    def _forget_load(self, key: tuple[str, str, str], task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]

    async def _routed(self, decision: Decision, policy: Policy, cold_start: bool) -> Outcome | None:
        """Take the lease the caller asked for; None when the slot is no longer READY."""
        if not policy.lease:
            return Outcome(decision, cold_start=cold_start)
        assert decision.slot is not None
        try:
            lease = await self._backend.acquire_lease(decision.source, decision.slot.name,
                                                      policy.lease_ttl)
        except LoadError as error:
            if error.reason == "SLOT_NOT_READY":
                return None
            return Outcome(decision, cold_start=cold_start, load_error=error)
        return Outcome(decision, cold_start=cold_start, lease=lease)

    async def close(self) -> None:
        """Cancel the load calls still running; slotd goes on with the loads themselves."""
        tasks = list(self._loads.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def release_lease(self, source: str, lease_id: str) -> bool:
        return await self._backend.release_lease(source, lease_id)

    # -- health --------------------------------------------------------------

    def all_synced_once(self) -> bool:
        return all(table.ever_synced for table in self.tables.values())
