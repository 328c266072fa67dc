"""SlotManager: loads, swaps, unloads and leases across all slots of one slotd.

Lock order, where more than one is held: a slot's queue lock, then a device's
admission lock, then a supervisor's lifecycle lock. Evicting another slot
takes only that slot's lifecycle lock, never its queue lock, so two loads
that evict each other's slots cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid

from slotroute.configfile import format_size
from slotroute.ids import InvalidModelId, check_model_id
from slotroute.slot import errors, probes
from slotroute.slot.config import ModelSpec, SlotdConfig, SlotSpec, estimate_memory
from slotroute.slot.memory import Ledger
from slotroute.slot.ports import PortAllocator
from slotroute.slot.states import LOADING_STATES, Reason, State
from slotroute.slot.supervisor import Launch, StartFailed, Supervisor
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.watch import RevisionLog

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


@dataclasses.dataclass
class LeaseRecord:
    id: str
    slot: str
    generation: int
    expires_at: float
    holder: str
    timer: asyncio.TimerHandle | None = None


class SlotManager:
    """The core of slotd; the gRPC service is a thin adapter over it."""

    def __init__(self, config: SlotdConfig, log: RevisionLog | None = None):
        self.config = config
        self.log = log or RevisionLog(config.history_size, config.max_pending_events)
        self.table = SlotTable(self.log)
        self.ports = PortAllocator(*config.port_range, reserved=config.reserved_ports)
        self.ledger = Ledger(config.devices, self.table)
        self._supervisors: dict[str, Supervisor] = {}
        self._queue_locks: dict[str, asyncio.Lock] = {}
        self._queue_lengths: dict[str, int] = {}
        self._device_locks: dict[str, asyncio.Lock] = {}
        self._leases: dict[str, LeaseRecord] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._external_tasks: dict[str, asyncio.Task[None]] = {}
        self._shutting_down = False

    # -- startup and shutdown -------------------------------------------------

    async def start(self) -> None:
        """Publish the slots and catalog, start external probes and preload slots."""
        self.table.set_catalog(self.catalog())
        for spec in self.config.slots:
            self._add_slot(spec)
        for spec in self.config.slots:
            if spec.preload and not spec.external:
                self._spawn(self._preload(spec.name))

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
        self._queue_locks[spec.name] = asyncio.Lock()
        self._queue_lengths[spec.name] = 0
        self._device_locks.setdefault(spec.device, asyncio.Lock())
        if spec.external:
            self._external_tasks[spec.name] = asyncio.create_task(self._probe_external(spec))

    async def _preload(self, slot: str) -> None:
        with contextlib.suppress(errors.SlotError, StartFailed):
            await self.load(slot, "", reason=Reason.PRELOAD)

    async def shutdown(self) -> None:
        """Stop every backend in parallel; return when all have exited."""
        self._shutting_down = True
        for task in [*self._background, *self._external_tasks.values()]:
            task.cancel()
        for lease in list(self._leases.values()):
            self._drop_lease(lease.id)
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

    # -- load ----------------------------------------------------------------

    async def load(
        self,
        slot: str,
        model_id: str,
        *,
        wait: bool = True,
        reason: Reason = Reason.REQUESTED,
    ) -> LoadOutcome:
        """Load a catalog model into a slot, joining a start of the same model in progress.

        A load of another model queues behind the slot's current work, first in
        first out; at most `max_queue` loads wait per slot.
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

        if self._queue_lengths[slot] >= spec.max_queue + 1:
            raise errors.QueueFull(
                f"slot {slot!r} already has {self._queue_lengths[slot] - 1} loads queued "
                f"(max_queue = {spec.max_queue}); retry later"
            )
        self._queue_lengths[slot] += 1
        task = self._spawn(self._load_in_turn(supervisor, model, reason))
        if not wait:
            return LoadOutcome(self.table.get(slot), joined=False)  # type: ignore[arg-type]
        return await asyncio.shield(task)  # type: ignore[return-value]

    def _join(self, supervisor: Supervisor, model: ModelSpec) -> asyncio.Future[SlotStatus] | SlotStatus | None:
        status = supervisor.status
        if status.model_id != model.id:
            return None
        if status.state is State.READY:
            return status
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

    async def _load_in_turn(self, supervisor: Supervisor, model: ModelSpec, reason: Reason) -> LoadOutcome:
        slot = supervisor.name
        try:
            async with self._queue_locks[slot]:
                if self._shutting_down:
                    raise errors.ShuttingDown("slotd is shutting down")
                # The queue ahead of us may have loaded this very model.
                joined = self._join(supervisor, model)
                if joined is not None:
                    return await self._finish_join(supervisor, joined, wait=True)

                evicted = await self._admit(supervisor, model)
                try:
                    if supervisor.status.state is not State.OFFLINE:
                        await self._drain_and_stop(
                            supervisor, Reason.REQUESTED,
                            f"swapping {supervisor.status.model_id or 'nothing'} for {model.id}",
                        )
                    launch = Launch(
                        model_id=model.id,
                        model_path=str(self.config.model_file(model)),
                        args=model.args,
                        reserved_bytes=self._need(model),
                    )
                    future = await supervisor.begin_start(launch, reason)
                finally:
                    self.ledger.clear_pending(slot)
                status = await asyncio.shield(future)
                return LoadOutcome(status, joined=False, evicted=evicted)
        finally:
            self._queue_lengths[slot] -= 1

    def _need(self, model: ModelSpec) -> int:
        path = self.config.model_file(model)
        try:
            file_bytes = path.stat().st_size
        except OSError:
            file_bytes = 0
        return estimate_memory(model, file_bytes)

    async def _admit(self, supervisor: Supervisor, model: ModelSpec) -> tuple[str, ...]:
        """Reserve memory for the model on the slot's device, evicting idle slots if needed."""
        spec = supervisor.spec
        device = spec.device
        need = self._need(model)
        async with self._device_locks[device]:
            own = supervisor.status.reserved_bytes
            free = self.ledger.free(device) + own
            evicted: list[str] = []
            if need > free:
                victims = self._eviction_order(spec)
                reclaimable = sum(self.table.get(name).reserved_bytes for name in victims)  # type: ignore[union-attr]
                if need > free + reclaimable:
                    pinned = [s.name for s in self.table.all() if s.device == device and s.pinned]
                    raise errors.InsufficientMemory(
                        f"model {model.id!r} needs {format_size(need)} on device {device!r}, "
                        f"but only {format_size(max(free, 0))} is free and "
                        f"{format_size(reclaimable)} can be evicted "
                        f"(total {format_size(self.ledger.total(device))}; pinned slots: "
                        f"{', '.join(pinned) or 'none'}); free memory or declare a smaller model"
                    )
                for name in victims:
                    if need <= free:
                        break
                    victim = self._supervisors[name]
                    released = victim.status.reserved_bytes
                    await victim.stop(Reason.EVICTED, f"evicted to make room for {model.id}")
                    free += released
                    evicted.append(name)
            self.ledger.reserve_pending(spec.name, device, max(need - own, 0))
            return tuple(evicted)

    def _eviction_order(self, spec: SlotSpec) -> list[str]:
        """Slots on the same device that may be evicted now: lowest priority, then least recently used."""
        now = time.time()
        candidates = []
        for status in self.table.all():
            other = self._supervisors[status.name].spec
            if status.name == spec.name or status.device != spec.device or other.external:
                continue
            if status.reserved_bytes == 0 or status.pinned or status.in_flight > 0:
                continue
            if status.state not in (State.READY, State.WARMING, State.ERROR):
                continue
            if status.state is not State.ERROR and now - status.state_since < other.min_residency:
                continue
            last_used = status.last_used or status.state_since
            candidates.append((status.priority, last_used, status.name))
        return [name for _priority, _used, name in sorted(candidates)]

    async def _drain_and_stop(self, supervisor: Supervisor, reason: Reason, message: str) -> SlotStatus:
        status = supervisor.status
        if status.state is State.READY and status.in_flight > 0:
            self.table.transition(
                status.name, State.READY, State.DRAINING, reason=reason,
                message=f"draining {status.in_flight} leases: {message}",
            )
            with contextlib.suppress(TimeoutError):
                await self.table.wait_until(
                    status.name, lambda s: s is None or s.in_flight == 0,
                    timeout=supervisor.spec.drain_timeout,
                )
        return await supervisor.stop(reason, message)

    def _supervisor(self, slot: str) -> Supervisor:
        supervisor = self._supervisors.get(slot)
        if supervisor is None:
            known = ", ".join(self._supervisors) or "none"
            raise errors.SlotNotFound(f"slot {slot!r} not found; known slots: {known}")
        return supervisor

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

    # -- leases --------------------------------------------------------------

    def acquire_lease(self, slot: str, ttl: float, holder: str) -> LeaseRecord:
        status = self.slot(slot)
        if status.state is not State.READY:
            raise errors.LeaseRefused(
                f"slot {slot!r} is {status.state.value}, not READY; leases are taken on READY slots"
            )
        ttl = min(ttl or self.config.lease_ttl, self.config.lease_ttl_max)
        loop = asyncio.get_running_loop()
        lease = LeaseRecord(
            id=uuid.uuid4().hex, slot=slot, generation=status.generation,
            expires_at=time.time() + ttl, holder=holder,
        )
        lease.timer = loop.call_later(ttl, self._drop_lease, lease.id)
        self._leases[lease.id] = lease
        self._count_leases(slot)
        return lease

    def release_lease(self, lease_id: str) -> bool:
        return self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: str) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer is not None:
            lease.timer.cancel()
        if self.table.get(lease.slot) is not None:
            self._count_leases(lease.slot)
        return True

    def _count_leases(self, slot: str) -> None:
        count = sum(1 for lease in self._leases.values() if lease.slot == slot)
        self.table.update(slot, in_flight=count, last_used=time.time())

    # -- config reload -------------------------------------------------------

    async def reload(self, config: SlotdConfig) -> dict[str, list[str]]:
        """Apply a new config: restart only changed slots, drain and stop removed ones.

        The new config was validated whole before this is called. Slots whose
        definition is unchanged keep running untouched.
        """
        old_specs = {spec.name: spec for spec in self.config.slots}
        new_specs = {spec.name: spec for spec in config.slots}
        removed = [name for name in old_specs if name not in new_specs]
        added = [name for name in new_specs if name not in old_specs]
        changed = [name for name in new_specs
                   if name in old_specs and new_specs[name] != old_specs[name]]
        unchanged = [name for name in new_specs
                     if name in old_specs and new_specs[name] == old_specs[name]]

        self.config = config
        self.ledger = Ledger(config.devices, self.table)
        for device in config.devices:
            self._device_locks.setdefault(device.name, asyncio.Lock())
        self.ports.low, self.ports.high = config.port_range

        # Stop removed and changed slots; remember what the changed ones ran.
        running: dict[str, str] = {}
        for name in removed + changed:
            supervisor = self._supervisors[name]
            status = supervisor.status
            if status.state not in (State.OFFLINE, State.ERROR) and status.model_id:
                running[name] = status.model_id
            await self._retire(name)
            if name in removed:
                self.table.remove(name)

        self.table.set_catalog(self.catalog())
        for name in changed:
            self._replace_slot(new_specs[name])
        for name in added:
            self._add_slot(new_specs[name])

        # Start what ran before, or what the new definition preloads.
        for name in changed + added:
            spec = new_specs[name]
            if spec.external:
                continue
            model = running.get(name, "")
            if model and self.config.model(model) is None:
                model = ""
            if model or spec.preload:
                self._spawn(self._reload_start(name, model))
        return {"added": added, "removed": removed, "restarted": changed, "unchanged": unchanged}

    async def _retire(self, name: str) -> None:
        supervisor = self._supervisors[name]
        task = self._external_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        if not supervisor.spec.external:
            await self._drain_and_stop(supervisor, Reason.CONFIG_RELOAD, "config changed")
        for lease in [lease for lease in self._leases.values() if lease.slot == name]:
            self._drop_lease(lease.id)

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
        if spec.external:
            self._external_tasks[spec.name] = asyncio.create_task(self._probe_external(spec))

    async def _reload_start(self, name: str, model: str) -> None:
        with contextlib.suppress(errors.SlotError, StartFailed):
            await self.load(name, model, reason=Reason.CONFIG_RELOAD)

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


def _split_url(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return rest, 443 if url.startswith("https") else 80
    return host.strip("[]"), int(port)
