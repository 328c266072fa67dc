"""Leases: promises that a slot is not drained, swapped or evicted while a request runs on it.

A lease is taken on a READY slot and ends when released, when its TTL runs
out, or when the process it was taken on stops. The slot's `in_flight` is the
number of leases held. Its `last_used` is the time the last lease was taken
or ended. Eviction order and idle unloads read both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

from slotroute.slot import errors
from slotroute.slot.states import State
from slotroute.slot.table import SlotStatus, SlotTable

logger = logging.getLogger("slotroute.slot")


@dataclasses.dataclass
class LeaseRecord:
    id: str
    slot: str
    generation: int
    # Wall-clock time at which the lease ends unless released first.
    expires_at: float
    holder: str
    timer: asyncio.TimerHandle | None = None


# Bounds that keep one client from growing slotd's memory without limit.
MAX_LEASES_PER_SLOT = 4096
MAX_HOLDER_LENGTH = 128


class LeaseBook:
    """Every lease held on the slots of one slotd."""

    def __init__(self, table: SlotTable, default_ttl: float, max_ttl: float):
        self._table = table
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._leases: dict[str, LeaseRecord] = {}
        # Leases per slot, kept alongside so that taking one costs O(1).
        self._counts: dict[str, int] = {}
        table.add_listener(self._on_change)

    def acquire(self, slot: str, ttl: float, holder: str) -> LeaseRecord:
        """Take a lease on a READY slot. A `ttl` of 0 takes the default, and the maximum caps it."""
        status = self._table.get(slot)
        if status is None:
            known = ", ".join(self._table.names()) or "none"
            raise errors.SlotNotFound(f"slot {slot!r} not found; known slots: {known}")
        if status.state is not State.READY:
            raise errors.LeaseRefused(
                f"slot {slot!r} is {status.state.value}, not READY; leases are taken on READY slots"
            )
        if ttl < 0:
            raise errors.InvalidRequest(f"invalid lease ttl {ttl:g} s; pass 0 for the default or a positive duration")
        if self._counts.get(slot, 0) >= MAX_LEASES_PER_SLOT:
            raise errors.TooManyLeases(
                f"slot {slot!r} already has {MAX_LEASES_PER_SLOT} leases; release leases you no longer need"
            )
        ttl = min(ttl or self.default_ttl, self.max_ttl)
        lease = LeaseRecord(
            id=uuid.uuid4().hex, slot=slot, generation=status.generation,
            expires_at=time.time() + ttl, holder=holder[:MAX_HOLDER_LENGTH],
        )
        lease.timer = asyncio.get_running_loop().call_later(ttl, self._expire, lease.id)
        self._leases[lease.id] = lease
        self._counts[slot] = self._counts.get(slot, 0) + 1
        self._count(slot)
        logger.debug("slot=%s lease=%s taken by %s for %.1f s", slot, lease.id, holder, ttl)
        return lease

    def release(self, lease_id: str) -> bool:
        """End a lease. Returns False when it was unknown or already ended."""
        return self._drop(lease_id)

    def drop_slot(self, slot: str) -> None:
        """End every lease of a slot, as when its process stopped or the slot was removed."""
        dropped = [lease for lease in self._leases.values() if lease.slot == slot]
        for lease in dropped:
            self._drop(lease.id, publish=False)
        # One update for the whole batch, not one event per lease.
        if dropped and self._table.get(slot) is not None:
            self._count(slot)

    def clear(self) -> None:
        for lease_id in list(self._leases):
            self._drop(lease_id)

    def count(self, slot: str) -> int:
        return self._counts.get(slot, 0)

    def _expire(self, lease_id: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            logger.info("slot=%s lease=%s of %s expired after its TTL", lease.slot, lease.id, lease.holder)
        self._drop(lease_id)

    def _drop(self, lease_id: str, publish: bool = True) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        remaining = self._counts.get(lease.slot, 1) - 1
        if remaining:
            self._counts[lease.slot] = remaining
        else:
            self._counts.pop(lease.slot, None)
        if lease.timer is not None:
            lease.timer.cancel()
        if publish and self._table.get(lease.slot) is not None:
            self._count(lease.slot)
        return True

    def _count(self, slot: str) -> None:
        self._table.update(slot, in_flight=self.count(slot), last_used=time.time())

    def _on_change(self, previous: SlotStatus | None, status: SlotStatus | None, revision: int) -> None:
        # A lease belongs to one process: once it stopped, the lease protects nothing.
        # The drop runs after this publish, so listeners see the changes in order.
        if status is None or status.state in (State.OFFLINE, State.ERROR):
            current = status or previous
            name = current.name if current is not None else ""
            if any(lease.slot == name for lease in self._leases.values()):
                asyncio.get_running_loop().call_soon(self._drop_stale, name)

    def _drop_stale(self, slot: str) -> None:
        status = self._table.get(slot)
        if status is None or status.state in (State.OFFLINE, State.ERROR):
            self.drop_slot(slot)
        else:
            # The slot started again before this ran: only the old process's leases end.
            for lease in [lease for lease in self._leases.values()
                          if lease.slot == slot and lease.generation != status.generation]:
                self._drop(lease.id)
