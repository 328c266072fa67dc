"""Memory admission: a load reserves its model's memory on the device before it starts.

Admission runs under the device's lock, so two loads on one device never both
count the same free memory: the first one's reservation is pending in the
ledger before the second one looks. When the model does not fit, idle slots
on the device are evicted, in this order:

1. slots already on their way down (DRAINING or UNLOADING for an unload, an
   idle timeout or a reload), which cost nothing to wait for;
2. then lower priority first, then slots without leases, then least recently
   used.

Never evicted: pinned slots, slots loading a model, slots that became READY
less than their `min_residency` ago, and external slots. A slot with leases
may be evicted, but it drains first (see SlotManager._drain_and_stop).

Exclusive groups: loading a slot whose `exclusive_group` is set first stops
the running slots of the device whose group is set and differs, under the
same rules. A group slot that may not be stopped makes the load fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from slotroute.configfile import format_size
from slotroute.slot import errors
from slotroute.slot.memory import Ledger
from slotroute.slot.states import LOADING_STATES, State
from slotroute.slot.supervisor import Supervisor
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.timeline import Timeline

# States whose process is on its way down: waiting frees the memory unless a
# swap reserved it again (a pending reservation).
_STOPPING = (State.DRAINING, State.UNLOADING)


class Admission:
    """Admits loads on devices; `evict(slot, model_id)` stops one victim for `model_id`."""

    def __init__(
        self,
        table: SlotTable,
        ledger: Ledger,
        supervisors: Mapping[str, Supervisor],
        timeline: Timeline,
        evict: Callable[[str, str], Awaitable[None]],
    ):
        self._table = table
        self.ledger = ledger
        self._supervisors = supervisors
        self._timeline = timeline
        self._evict = evict
        self._locks: dict[str, asyncio.Lock] = {}
        # Event loop time at which each device's lock was taken; for the watchdog.
        self.lock_held_since: dict[str, float] = {}

    # -- checks before queueing ---------------------------------------------

    def precheck(self, supervisor: Supervisor, model_id: str, need: int) -> None:
        """Fail at once a load that cannot fit while the pinned slots of its device run."""
        spec = supervisor.spec
        for status in self._device_slots(spec.device, exclude=spec.name):
            other = self._supervisors[status.name].spec
            if other.external or not self._group_conflict(spec.exclusive_group, other.exclusive_group):
                continue
            if status.pinned and self._occupies(status):
                raise errors.DeviceBusy(
                    f"cannot load {model_id!r} into slot {spec.name!r}: pinned slot {status.name!r} "
                    f"of exclusive group {other.exclusive_group!r} runs on device {spec.device!r}, "
                    f"and group {spec.exclusive_group!r} may not run beside it; unpin or unload it"
                )
        # At most everything but the pinned slots' memory can be made free.
        others = self._device_slots(spec.device, exclude=spec.name)
        evictable = sum(self.ledger.slot_reserved(status.name) for status in others if not status.pinned)
        free = self.ledger.free(spec.device, excluding=spec.name)
        if need > free + evictable:
            raise errors.InsufficientMemory(self._explain(supervisor, model_id, need, evictable))

    # -- admission ------------------------------------------------------------

    async def admit(self, supervisor: Supervisor, model_id: str, need: int) -> tuple[str, ...]:
        """Reserve `need` bytes for the slot, evicting as needed, and return the evicted slots.

        Raises InsufficientMemory when the model does not fit even after every
        eviction allowed, and DeviceBusy when a slot of another exclusive group
        may not be stopped. The reservation stays pending in the ledger until
        the caller clears it, once the start has set `reserved_bytes`.
        """
        spec = supervisor.spec
        device = spec.device
        lock = self._locks.setdefault(device, asyncio.Lock())
        async with lock:
            self.lock_held_since[device] = asyncio.get_running_loop().time()
            try:
                victims = self._choose_victims(supervisor, model_id, need)
                if victims:
                    await asyncio.gather(*(self._evict(name, model_id) for name in victims))

                # Measured again: a victim may have stopped late, or another process grown.
                free = self.ledger.free(device, excluding=spec.name)
                if need > free:
                    raise errors.InsufficientMemory(self._explain(supervisor, model_id, need, evictable=0))
                self.ledger.reserve_pending(spec.name, device, need)
                return tuple(victims)
            finally:
                self.lock_held_since.pop(device, None)

    def _choose_victims(self, supervisor: Supervisor, model_id: str, need: int) -> list[str]:
        spec = supervisor.spec
        victims = self._group_victims(supervisor, model_id)
        free = self.ledger.free(spec.device, excluding=spec.name)
        free += sum(self.ledger.slot_reserved(name) for name in victims)
        if need <= free:
            return victims

        candidates = [name for name in self.eviction_order(supervisor) if name not in victims]
        evictable = sum(self.ledger.slot_reserved(name) for name in candidates)
        if need > free + evictable:
            raise errors.InsufficientMemory(
                self._explain(supervisor, model_id, need, evictable=evictable)
            )
        for name in candidates:
            if need <= free:
                break
            victims.append(name)
            free += self.ledger.slot_reserved(name)
        return victims

    def eviction_order(self, supervisor: Supervisor) -> list[str]:
        """Return the slots of the same device that may be evicted now, first to go first."""
        spec = supervisor.spec
        now = time.time()
        keyed = []
        for status in self._device_slots(spec.device, exclude=spec.name):
            if self.ledger.slot_reserved(status.name) == 0 or status.pinned:
                continue
            kind = self._evictable(status, now)
            if kind is None:
                continue
            if kind == "stopping":
                keyed.append(((0,), status.name))
                continue
            in_use = status.in_flight > 0
            last_used = status.last_used or self._timeline.ready_at(status.name) or status.state_since
            keyed.append(((1, status.priority, in_use, last_used), status.name))
        return [name for _key, name in sorted(keyed)]

    def _evictable(self, status: SlotStatus, now: float) -> str | None:
        """Return "stop", "stopping" (already going down) or None when the slot must stay."""
        supervisor = self._supervisors[status.name]
        if supervisor.spec.external:
            return None
        if status.state in _STOPPING:
            return None if self.ledger.pending(status.name) else "stopping"
        if status.state is State.ERROR:
            return "stop"
        if status.state in LOADING_STATES and supervisor.current_start() is not None:
            return None
        if status.state not in (State.READY, State.WARMING):
            return None
        ready_at = self._timeline.ready_at(status.name) or status.state_since
        if now - ready_at < supervisor.spec.min_residency:
            return None
        return "stop"

    def _group_victims(self, supervisor: Supervisor, model_id: str) -> list[str]:
        """Return the running slots of other exclusive groups on the device; raise DeviceBusy if one must stay."""
        spec = supervisor.spec
        if not spec.exclusive_group:
            return []
        now = time.time()
        victims = []
        for status in self._device_slots(spec.device, exclude=spec.name):
            other = self._supervisors[status.name].spec
            # slotd cannot stop an external endpoint, so its group does not count.
            if other.external or not self._group_conflict(spec.exclusive_group, other.exclusive_group):
                continue
            if not self._occupies(status):
                continue
            kind = None if status.pinned else self._evictable(status, now)
            if kind is None:
                raise errors.DeviceBusy(
                    f"cannot load {model_id!r} into slot {spec.name!r} (exclusive group "
                    f"{spec.exclusive_group!r}): slot {status.name!r} of group {other.exclusive_group!r} "
                    f"is {status.state.value} on device {spec.device!r} and may not be stopped now "
                    f"({self._why_kept(status, now)}); retry later or unload it"
                )
            victims.append(status.name)
        return victims

    @staticmethod
    def _group_conflict(group: str, other: str) -> bool:
        return bool(group) and bool(other) and group != other

    def _occupies(self, status: SlotStatus) -> bool:
        """Return whether the slot runs a process, has reserved memory, or is about to start."""
        if self.ledger.pending(status.name):
            return True
        if status.state is State.OFFLINE:
            return False
        if status.state is State.ERROR:
            return self._supervisors[status.name].retry_pending()
        return True

    def _why_kept(self, status: SlotStatus, now: float) -> str:
        spec = self._supervisors[status.name].spec
        if status.pinned:
            return "pinned"
        if self.ledger.pending(status.name) or status.state in LOADING_STATES:
            return "loading a model"
        if status.state in _STOPPING:
            return "being swapped to another model"
        ready_at = self._timeline.ready_at(status.name) or status.state_since
        return f"READY for {now - ready_at:.1f} s of its min_residency {spec.min_residency:g} s"

    def _explain(self, supervisor: Supervisor, model_id: str, need: int, evictable: int) -> str:
        spec = supervisor.spec
        device = spec.device
        free = max(self.ledger.free(device, excluding=spec.name), 0)
        held = self.ledger.held_by_others(device)
        now = time.time()
        pinned = []
        kept = []
        for status in self._device_slots(device, exclude=spec.name):
            size = self.ledger.slot_reserved(status.name)
            if status.pinned:
                pinned.append(f"{status.name} ({format_size(size)})")
            elif size and self._evictable(status, now) is None:
                kept.append(f"{status.name} ({self._why_kept(status, now)})")
        return (
            f"model {model_id!r} needs {format_size(need)} on device {device!r}, but only "
            f"{format_size(free)} is free and evicting frees at most {format_size(evictable)} more "
            f"(total {format_size(self.ledger.total(device))}, held by other processes "
            f"{format_size(held)}; pinned slots: {', '.join(pinned) or 'none'}; "
            f"slots that may not be evicted now: {', '.join(kept) or 'none'}); "
            "unload or unpin a slot, or declare a smaller model"
        )

    def _device_slots(self, device: str, exclude: str) -> list[SlotStatus]:
        return [status for status in self._table.all()
                if status.device == device and status.name != exclude and status.name in self._supervisors]
