"""Idle timers: a READY slot without leases for `idle_timeout` seconds is unloaded.

Idle time counts from the later of the slot's first READY in this generation
and its `last_used` time (a lease taken or ended, or a LoadModel call that
found the model loaded). A timer is armed by every change of the slot and
only calls back; the manager checks again before it stops anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from slotroute.slot.config import SlotSpec
from slotroute.slot.states import State
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.timeline import Timeline


class IdleTimers:
    """One timer per READY slot with an idle timeout; `on_idle(slot)` runs when it fires."""

    def __init__(
        self,
        table: SlotTable,
        timeline: Timeline,
        spec_of: Callable[[str], SlotSpec | None],
        on_idle: Callable[[str], None],
    ):
        self._table = table
        self._timeline = timeline
        self._spec_of = spec_of
        self._on_idle = on_idle
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        table.add_listener(self._on_change)

    def due(self, status: SlotStatus) -> float | None:
        """Wall-clock time at which the slot counts as idle; None when it cannot be idle now."""
        spec = self._spec_of(status.name)
        if spec is None or spec.external or spec.idle_timeout <= 0:
            return None
        if status.state is not State.READY or status.in_flight > 0:
            return None
        ready_at = self._timeline.ready_at(status.name) or status.state_since
        return max(ready_at, status.last_used or 0.0) + spec.idle_timeout

    def refresh(self, slot: str) -> None:
        """Arm or cancel the slot's timer from its current status."""
        status = self._table.get(slot)
        if status is None:
            self._cancel(slot)
            return
        self._arm(status)

    def cancel_all(self) -> None:
        for slot in list(self._timers):
            self._cancel(slot)

    def _on_change(self, previous: SlotStatus | None, status: SlotStatus | None, revision: int) -> None:
        if status is None:
            if previous is not None:
                self._cancel(previous.name)
            return
        self._arm(status)

    def _arm(self, status: SlotStatus) -> None:
        due = self.due(status)
        current = self._timers.get(status.name)
        if current is not None and current[0] == due:
            return
        self._cancel(status.name)
        if due is None:
            return
        delay = max(due - time.time(), 0.0)
        handle = asyncio.get_running_loop().call_later(delay, self._fire, status.name)
        self._timers[status.name] = (due, handle)

    def _fire(self, slot: str) -> None:
        self._timers.pop(slot, None)
        self._on_idle(slot)

    def _cancel(self, slot: str) -> None:
        entry = self._timers.pop(slot, None)
        if entry is not None:
            entry[1].cancel()
