"""When each slot's current process started and when it first became READY.

A slot's `state_since` moves at every state change, including a READY slot
that drops to WARMING on failed probes and comes back. Residency, idle time
and the watchdog's bounds count from the start or the first READY of the
current generation instead, which this table listener records.
"""

from __future__ import annotations

from slotroute.slot.states import State
from slotroute.slot.table import SlotStatus, SlotTable


class Timeline:
    """Start and first-READY times (wall clock) of each slot's current generation."""

    def __init__(self, table: SlotTable):
        self._table = table
        self._started: dict[str, tuple[int, float]] = {}
        self._ready: dict[str, tuple[int, float]] = {}
        table.add_listener(self._on_change)

    def started_at(self, slot: str) -> float | None:
        return self._current(self._started, slot)

    def ready_at(self, slot: str) -> float | None:
        return self._current(self._ready, slot)

    def _current(self, times: dict[str, tuple[int, float]], slot: str) -> float | None:
        status = self._table.get(slot)
        entry = times.get(slot)
        if status is None or entry is None or entry[0] != status.generation:
            return None
        return entry[1]

    def _on_change(self, previous: SlotStatus | None, status: SlotStatus | None, revision: int) -> None:
        if status is None:
            if previous is not None:
                self._started.pop(previous.name, None)
                self._ready.pop(previous.name, None)
            return
        generation = status.generation
        if status.state is State.STARTING and self._started.get(status.name, (None,))[0] != generation:
            self._started[status.name] = (generation, status.state_since)
        if status.state is State.READY and self._ready.get(status.name, (None,))[0] != generation:
            self._ready[status.name] = (generation, status.state_since)
