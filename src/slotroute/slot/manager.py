"""SlotManager: loads, swaps, unloads and leases across all slots of one slotd.

Lock order, where more than one is held: a slot's queue turn (LoadQueue), then
a device's admission lock, then a supervisor's lifecycle lock. Evicting
another slot takes only that slot's lifecycle lock, never its queue turn, so
two loads that evict each other's slots cannot deadlock. A config reload is
the only holder of several queue turns at once, and it never waits for a
device lock while holding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from slotroute.ids import InvalidModelId, check_model_id
from slotroute.slot import errors, probes
from slotroute.slot.admission import Admission
from slotroute.slot.config import ModelSpec, SlotdConfig, SlotSpec, estimate_memory
from slotroute.slot.idle import IdleTimers
from slotroute.slot.leases import LeaseBook, LeaseRecord
from slotroute.slot.loadqueue import LoadQueue, Ticket
from slotroute.slot.memory import Ledger, measure_totals
from slotroute.slot.ports import PortAllocator
from slotroute.slot.reload import plan_reload
from slotroute.slot.states import LOADING_STATES, Reason, State
from slotroute.slot.supervisor import Launch, StartFailed, Supervisor
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.timeline import Timeline
from slotroute.slot.watch import RevisionLog
from slotroute.slot.watchdog import LoadPathBounds, Watchdog

logger = logging.getLogger("slotroute.slot")


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    id: str
    capability: str
    slots: tuple[str, ...]
    memory_bytes: int
    cached: bool
    file_bytes: int


@dataclasses.dataclass(frozen=True)
class LoadOutcome:
    status: SlotStatus
    joined: bool
    evicted: tuple[str, ...] = ()


class SlotManager:
    """The core of slotd; the gRPC service is a thin adapter over it."""

    def __init__(self, config: SlotdConfig, log: RevisionLog | None = None):
        self.config = config
        self.log = log or RevisionLog(config.history_size, config.max_pending_events)
        self.table = SlotTable(self.log)
        self.ports = PortAllocator(*config.port_range, reserved=config.reserved_ports)
        self.ledger = Ledger(config.devices, self.table, measure_totals(config))
        # The timeline listens first, so the idle timers read this change's times.
        self.timeline = Timeline(self.table)
        self.leases = LeaseBook(self.table, config.lease_ttl, config.lease_ttl_max)
        self._supervisors: dict[str, Supervisor] = {}
        self._queues: dict[str, LoadQueue] = {}
        self.admission = Admission(self.table, self.ledger, self._supervisors, self.timeline, self._evict)
        self.idle = IdleTimers(self.table, self.timeline, self._spec_of, self._on_idle)
        self.watchdog = Watchdog(config.watchdog_interval, LoadPathBounds(
            self.table, self.timeline, self._supervisors, self._queues, self.admission, lambda: self.config,
        ))
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[object]] = set()
        self._external_tasks: dict[str, asyncio.Task[None]] = {}
        self._watchdog_task: asyncio.Task[None] | None = None
        self._shutting_down = False

    # -- startup and shutdown -------------------------------------------------

    async def start(self) -> None:
        """Publish the slots and catalog, start external probes, the watchdog and preloads."""
        self.table.set_catalog(self.catalog())
        for spec in self.config.slots:
            self._add_slot(spec)
        self._watchdog_task = asyncio.create_task(self.watchdog.run(), name="slotd-watchdog")
        for spec in self.config.slots:
            if spec.preload and not spec.external:
                self._spawn(self._start_quietly(spec.name, "", Reason.PRELOAD))

    def _add_slot(self, spec: SlotSpec) -> None:
        self.table.add(SlotStatus(
            name=spec.name,
            device=spec.device,
            capabilities=spec.capabilities,
            default_for=spec.default_for,
            labels=dict(spec.labels),
            external=spec.external,
            default_model=spec.default_model,
            pinned=spec.pinned,
            priority=spec.priority,
            endpoint_url=spec.external_url,
            message="external endpoint, probing" if spec.external else "not loaded",
        ))
        self._supervisors[spec.name] = Supervisor(
            spec, self.table, self.ports, stderr_tail_lines=self.config.stderr_tail_lines
        )
        self._queues[spec.name] = LoadQueue(spec.name, spec.max_queue)
        if spec.external:
            self._external_tasks[spec.name] = asyncio.create_task(self._probe_external(spec))

    async def _start_quietly(self, slot: str, model_id: str, reason: Reason) -> None:
        """Load for a preload or a reload, where no caller waits: log the failure."""
        try:
            await self.load(slot, model_id, reason=reason)
        except (errors.SlotError, StartFailed) as error:
            logger.warning("slot=%s %s load of %s failed: %s",
                           slot, reason.value.lower(), model_id or "the default model", error)

    async def shutdown(self) -> None:
        """Stop every backend in parallel; return when all have exited."""
        self._shutting_down = True
        tasks = [*self._background, *self._external_tasks.values()]
        if self._watchdog_task is not None:
            tasks.append(self._watchdog_task)
        for task in tasks:
            task.cancel()
        self.idle.cancel_all()
        self.leases.clear()
        await asyncio.gather(
            *(supervisor.stop(Reason.SHUTDOWN, "slotd is shutting down")
              for supervisor in self._supervisors.values() if not supervisor.spec.external),
            return_exceptions=True,
        )

    async def kill_all(self) -> None:
        for supervisor in self._supervisors.values():
            await supervisor.kill_now()

    def _spawn(self, coroutine) -> asyncio.Task[object]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Failures are logged or returned where they happen. Retrieving them here
        # keeps asyncio from warning about tasks that no caller awaited.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task

    # -- queries -------------------------------------------------------------

    def slot(self, name: str) -> SlotStatus:
        status = self.table.get(name)
        if status is None:
            known = ", ".join(self.table.names()) or "none"
            raise errors.SlotNotFound(f"slot {name!r} not found; known slots: {known}")
        return status

    def catalog(self) -> list[CatalogEntry]:
        entries = []
        for model in self.config.models:
            path = self.config.model_file(model)
            try:
                file_bytes = path.stat().st_size if path.is_file() else 0
            except OSError:
                file_bytes = 0
            entries.append(CatalogEntry(
                id=model.id,
                capability=model.capability,
                slots=model.slots,
                memory_bytes=estimate_memory(model, file_bytes),
                cached=file_bytes > 0 or path.is_file(),
                file_bytes=file_bytes,
            ))
        return entries

    @property
    def stalled(self) -> bool:
        """True while the watchdog finds a load step past its bound."""
        return self.watchdog.stalled

    # -- load ----------------------------------------------------------------

    async def load(
        self,
        slot: str,
        model_id: str,
        *,
        wait: bool = True,
        reason: Reason = Reason.REQUESTED,
    ) -> LoadOutcome:
        """Load a catalog model into a slot, joining a load of the same model in progress.

        A load of another model queues behind the slot's current work, first in
        first out, and at most `max_queue` loads wait per slot. When the last
        caller of a queued load is cancelled before its turn, the load leaves
        the queue and never runs (see LoadQueue).
        """
        if self._shutting_down:
            raise errors.ShuttingDown("slotd is shutting down; retry against the new instance")
        supervisor = self._supervisor(slot)
        spec = supervisor.spec
        if spec.external:
            raise errors.ModelNotAllowed(
                f"slot {slot!r} is external ({spec.external_url}); its models are loaded by "
                "whatever runs it, not by slotd"
            )
        model = self._model_for(spec, model_id)

        joined = self._join(supervisor, model)
        if joined is not None:
            return await self._finish_join(supervisor, joined, wait)

        queue = self._queues[slot]
        ticket = queue.find(model.key)
        shared = ticket is not None
        if ticket is None:
            self.admission.precheck(supervisor, model.id, self._need(model))
            ticket = queue.enter(model.key)
            ticket.task = self._spawn(self._load_in_turn(queue, model.id, reason, ticket))
        if not wait:
            ticket.kept = True
            return LoadOutcome(supervisor.status, joined=shared)
        try:
            outcome = await queue.wait(ticket)
        except asyncio.CancelledError:
            if self._shutting_down and not _is_cancelling():
                raise errors.ShuttingDown("slotd is shutting down; retry against the new instance") from None
            raise
        return dataclasses.replace(outcome, joined=outcome.joined or shared)

    def _join(self, supervisor: Supervisor, model: ModelSpec) -> asyncio.Future[SlotStatus] | SlotStatus | None:
        status = supervisor.status
        if status.model_id != model.id:
            return None
        if status.state is State.READY:
            # A call that finds its model loaded counts as use for the idle timeout.
            return self.table.update(status.name, last_used=time.time())
        if status.state in LOADING_STATES:
            return supervisor.current_start()
        if status.state is State.ERROR and supervisor.retry_pending():
            failure = status.failure
            delay = (failure.next_retry_at - time.time()) if failure and failure.next_retry_at else 0.0
            raise errors.RetryLater(
                f"slot {status.name!r} failed ({status.message}); the next start of "
                f"{model.id!r} is in {max(delay, 0):.1f} s",
                max(delay, 0.0),
            )
        return None

    async def _finish_join(self, supervisor: Supervisor, joined, wait: bool) -> LoadOutcome:
        if isinstance(joined, SlotStatus):
            return LoadOutcome(joined, joined=True)
        if not wait:
            return LoadOutcome(supervisor.status, joined=True)
        status = await asyncio.shield(joined)
        return LoadOutcome(status, joined=True)

    async def _load_in_turn(self, queue: LoadQueue, model_id: str, reason: Reason, ticket: Ticket) -> LoadOutcome:
        slot = queue.slot
        try:
            async with queue.turn(ticket):
                if self._shutting_down:
                    raise errors.ShuttingDown("slotd is shutting down; retry against the new instance")
                # A reload may have replaced or removed the slot, or changed the catalog.
                supervisor = self._supervisor(slot)
                model = self._model_for(supervisor.spec, model_id)
                # The queue ahead may have loaded this very model.
                joined = self._join(supervisor, model)
                if joined is not None:
                    return await self._finish_join(supervisor, joined, wait=True)
                return await self._swap_in(supervisor, model, reason)
        except (errors.SlotError, StartFailed) as error:
            if ticket.waiters == 0:
                # No caller receives this error: the load did not wait, or its callers left.
                logger.warning("slot=%s load of %s failed: %s", slot, model_id, error)
            raise
        finally:
            queue.leave(ticket)
            self.idle.refresh(slot)

    async def _wait_residency(self, supervisor: Supervisor) -> None:
        """Let a model that just became READY serve `min_residency` seconds before a swap.

        Without this, callers alternating two models on one slot would swap it
        on every request, and each caller would receive a URL that dies at once.
        """
        residency = supervisor.spec.min_residency
        ready_at = self.timeline.ready_at(supervisor.name)
        if residency <= 0 or ready_at is None or supervisor.status.state is not State.READY:
            return
        remaining = ready_at + residency - time.time()
        if remaining > 0:
            logger.info("slot=%s swap waits %.1f s for min_residency of %s",
                        supervisor.name, remaining, supervisor.status.model_id)
            await asyncio.sleep(remaining)

    async def _swap_in(self, supervisor: Supervisor, model: ModelSpec, reason: Reason) -> LoadOutcome:
        """Admit the model, stop what the slot runs, start the model and wait for READY."""
        slot = supervisor.name
        await self._wait_residency(supervisor)
        need = self._need(model)
        evicted = await self.admission.admit(supervisor, model.id, need)
        try:
            if supervisor.status.state is not State.OFFLINE:
                previous = supervisor.status.model_id or "nothing"
                await self._drain_and_stop(supervisor, Reason.REQUESTED, f"swapping {previous} for {model.id}")
            self._reset_restarts(slot)
            launch = Launch(
                model_id=model.id,
                model_path=str(self.config.model_file(model)),
                args=model.args,
                reserved_bytes=need,
            )
            future = await supervisor.begin_start(launch, reason)
        finally:
            self.ledger.clear_pending(slot)
        status = await asyncio.shield(future)
        return LoadOutcome(status, joined=False, evicted=evicted)

    def _reset_restarts(self, slot: str) -> None:
        """Give a load through the manager a fresh restart budget. Crash restarts keep counting."""
        failure = self.slot(slot).failure
        if failure is not None and (failure.restart_count or failure.restarts_exhausted):
            self.table.update(slot, failure=dataclasses.replace(
                failure, restart_count=0, restarts_exhausted=False, next_retry_at=None,
            ))

    def _need(self, model: ModelSpec) -> int:
        path = self.config.model_file(model)
        try:
            file_bytes = path.stat().st_size
        except OSError:
            file_bytes = 0
        return estimate_memory(model, file_bytes)

    async def _evict(self, name: str, model_id: str) -> None:
        """Stop one eviction victim for `model_id`, draining its leases first."""
        supervisor = self._supervisors[name]
        status = supervisor.status
        if status.state in (State.DRAINING, State.UNLOADING):
            # Already going down for another reason: wait for it, as long as its bounds allow.
            spec = supervisor.spec
            bound = spec.drain_timeout + spec.stop_grace + self.config.stall_margin
            with contextlib.suppress(TimeoutError):
                await self.table.wait_until(
                    name, lambda s: s is None or s.state is State.OFFLINE, timeout=bound
                )
            return
        await self._drain_and_stop(supervisor, Reason.EVICTED, f"evicted to make room for {model_id}")

    async def _drain_and_stop(self, supervisor: Supervisor, reason: Reason, message: str) -> SlotStatus:
        """Stop a slot. A READY slot with leases goes DRAINING until they end or drain_timeout passes.

        A READY slot without leases goes to UNLOADING in the same event loop
        step, so no lease can be taken between this check and the stop.
        """
        status = supervisor.status
        spec = supervisor.spec
        if status.state is State.READY and status.in_flight > 0:
            drained = self.table.transition(
                status.name, State.READY, State.DRAINING, reason=reason,
                message=f"draining {status.in_flight} {'lease' if status.in_flight == 1 else 'leases'}: {message}",
            )
            if drained is not None:
                try:
                    await self.table.wait_until(
                        status.name,
                        lambda s: s is None or s.in_flight == 0 or s.state is not State.DRAINING,
                        timeout=spec.drain_timeout,
                    )
                except TimeoutError:
                    logger.warning("slot=%s drain_timeout of %g s passed with %d leases held; stopping",
                                   status.name, spec.drain_timeout, self.leases.count(status.name))
        return await supervisor.stop(reason, message)

    def _supervisor(self, slot: str) -> Supervisor:
        supervisor = self._supervisors.get(slot)
        if supervisor is None:
            known = ", ".join(self._supervisors) or "none"
            raise errors.SlotNotFound(f"slot {slot!r} not found; known slots: {known}")
        return supervisor

    def _spec_of(self, slot: str) -> SlotSpec | None:
        supervisor = self._supervisors.get(slot)
        return supervisor.spec if supervisor is not None else None

    def _model_for(self, spec: SlotSpec, model_id: str) -> ModelSpec:
        if not model_id.strip():
            if not spec.default_model:
                raise errors.ModelNotFound(
                    f"slot {spec.name!r} has no default_model; name the model to load"
                )
            model_id = spec.default_model
        try:
            model_id = check_model_id(model_id)
        except InvalidModelId as error:
            raise errors.ModelNotFound(str(error)) from None
        model = self.config.model(model_id)
        if model is None:
            known = ", ".join(m.id for m in self.config.models) or "none"
            raise errors.ModelNotFound(
                f"model {model_id!r} is not in the catalog of this slotd; catalog models: {known}"
            )
        if spec.name not in model.slots:
            raise errors.ModelNotAllowed(
                f"model {model.id!r} may not run in slot {spec.name!r}; allowed slots: "
                f"{', '.join(model.slots)}"
            )
        path = self.config.model_file(model)
        if not path.is_file():
            raise errors.ModelFileMissing(
                f"model file {path} for {model.id!r} is missing from the cache; "
                "download it there or fix the catalog path"
            )
        return model

    # -- unload --------------------------------------------------------------

    async def unload(self, slot: str, *, force: bool = False, wait: bool = True,
                     reason: Reason = Reason.UNLOAD_REQUESTED) -> SlotStatus:
        supervisor = self._supervisor(slot)
        if supervisor.spec.external:
            raise errors.ModelNotAllowed(
                f"slot {slot!r} is external ({supervisor.spec.external_url}); slotd does not stop it"
            )
        message = "unload requested" + (" (forced)" if force else "")

        async def run() -> SlotStatus:
            if force:
                return await supervisor.stop(reason, message)
            return await self._drain_and_stop(supervisor, reason, message)

        task = self._spawn(run())
        if not wait:
            return supervisor.status
        return await asyncio.shield(task)  # type: ignore[return-value]

    def _on_idle(self, slot: str) -> None:
        self._spawn(self._unload_idle(slot))

    async def _unload_idle(self, slot: str) -> None:
        supervisor = self._supervisors.get(slot)
        status = self.table.get(slot)
        if supervisor is None or status is None or self._shutting_down:
            return
        due = self.idle.due(status)
        if due is None:
            return
        if due > time.time():
            # Used again since the timer was armed: wait for the new due time.
            self.idle.refresh(slot)
            return
        if len(self._queues.get(slot, ())) > 0:
            # A load waits for the slot. It re-arms the timer when it leaves the queue.
            return
        # No await between these checks and stop(), which leaves READY before it yields.
        await supervisor.stop(Reason.IDLE, f"idle for {supervisor.spec.idle_timeout:g} s without leases")

    # -- leases --------------------------------------------------------------

    def acquire_lease(self, slot: str, ttl: float, holder: str) -> LeaseRecord:
        return self.leases.acquire(slot, ttl, holder)

    def release_lease(self, lease_id: str) -> bool:
        return self.leases.release(lease_id)

    # -- config reload -------------------------------------------------------

    async def reload(self, config: SlotdConfig) -> dict[str, list[str]]:
        """Apply a new config: restart only changed slots, drain and stop removed ones.

        The caller validated the file. Device memory is read here before
        anything changes, so a device that cannot be read rejects the whole
        config with ConfigError. A slot counts as changed when its
        definition changed or the catalog entry of the model it runs did. A
        changed or removed slot is stopped in its queue turn. Loads queued
        ahead of the reload run first, and loads queued behind it see the new
        definition. Reloads run one at a time.
        """
        async with self._reload_lock:
            totals = measure_totals(config)
            plan = plan_reload(self.config, config, self.table)
            added, removed, changed = plan.added, plan.removed, plan.changed
            new_specs = {spec.name: spec for spec in config.slots}

            async with contextlib.AsyncExitStack() as turns:
                for name in removed + changed:
                    queue = self._queues[name]
                    ticket = queue.enter_turn()
                    turns.callback(queue.leave, ticket)
                    await turns.enter_async_context(queue.turn(ticket))

                self._apply_settings(config, totals)
                running = {name: self.slot(name).model_id for name in removed + changed
                           if self.slot(name).model_id and self.slot(name).state is not State.OFFLINE}
                await asyncio.gather(*(self._retire(name, name in removed) for name in removed + changed))
                for name in removed:
                    self.table.remove(name)
                    del self._supervisors[name]
                    del self._queues[name]
                self.table.set_catalog(self.catalog())
                for name in changed:
                    self._replace_slot(new_specs[name])
                for name in added:
                    self._add_slot(new_specs[name])

        # Start what ran before, or what the new definition preloads, unless
        # loads queued behind the reload already decide what the slot runs.
        for name in changed + added:
            spec = new_specs[name]
            if spec.external or len(self._queues[name]) > 0:
                continue
            model = running.get(name, "")
            if model or spec.preload:
                self._spawn(self._start_quietly(name, model, Reason.CONFIG_RELOAD))
        logger.info("slotd reload: added=%s removed=%s restarted=%s", added, removed, changed)
        return {"added": added, "removed": removed, "restarted": changed, "unchanged": plan.unchanged}

    def _apply_settings(self, config: SlotdConfig, totals: dict[str, int]) -> None:
        self.config = config
        self.ledger.set_devices(config.devices, totals)
        self.leases.default_ttl = config.lease_ttl
        self.leases.max_ttl = config.lease_ttl_max
        self.ports.low, self.ports.high = config.port_range
        self.watchdog.interval = config.watchdog_interval

    async def _retire(self, name: str, removed: bool) -> None:
        supervisor = self._supervisors[name]
        message = "slot removed from the config" if removed else "slot definition changed"
        task = self._external_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        if supervisor.spec.external:
            # No process: the slot is only marked unreachable until a new probe reports otherwise.
            self.table.transition(name, (State.READY, State.WARMING), State.OFFLINE,
                                  reason=Reason.CONFIG_RELOAD, message=message, port=0)
        else:
            await self._drain_and_stop(supervisor, Reason.CONFIG_RELOAD, message)
        self.leases.drop_slot(name)

    def _replace_slot(self, spec: SlotSpec) -> None:
        self.table.update(
            spec.name, device=spec.device, capabilities=spec.capabilities,
            default_for=spec.default_for, labels=dict(spec.labels), external=spec.external,
            default_model=spec.default_model, pinned=spec.pinned, priority=spec.priority,
            endpoint_url=spec.external_url,
        )
        self._supervisors[spec.name] = Supervisor(
            spec, self.table, self.ports, stderr_tail_lines=self.config.stderr_tail_lines
        )
        self._queues[spec.name].max_queue = spec.max_queue
        if spec.external:
            self._external_tasks[spec.name] = asyncio.create_task(self._probe_external(spec))

    # -- external slots ------------------------------------------------------

    async def _probe_external(self, spec: SlotSpec) -> None:
        host, port = _split_url(spec.external_url)
        while True:
            result, detail = await probes.probe(spec.probe, host, port)
            state = self.table.get(spec.name).state  # type: ignore[union-attr]
            target = {
                probes.ProbeResult.READY: State.READY,
                probes.ProbeResult.NOT_READY: State.WARMING,
                probes.ProbeResult.REFUSED: State.OFFLINE,
            }[result]
            if target is not state:
                self.table.transition(
                    spec.name, state, target, reason=Reason.PROBE,
                    message=f"external endpoint {spec.external_url}: {detail}",
                    port=port,
                )
            interval = spec.probe.ready_interval if target is State.READY else max(spec.probe.interval, 0.25)
            await asyncio.sleep(interval)


def _is_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _split_url(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return rest, 443 if url.startswith("https") else 80
    return host.strip("[]"), int(port)
