"""The slot table: the current status of every slot, changed only through compare-and-swap.

Each status is an immutable value. A change replaces it, publishes the new
value to the revision log and wakes the tasks waiting on that slot, in one
step on the event loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from slotroute.slot.states import IllegalTransition, Reason, State, is_legal
from slotroute.slot.watch import EventKind, RevisionLog


@dataclasses.dataclass(frozen=True)
class Failure:
    """The last failure of a slot's backend."""

    exit_code: int | None = None
    signal: int | None = None
    stderr_tail: tuple[str, ...] = ()
    restart_count: int = 0
    # Wall-clock time of the next automatic start; None when none is scheduled.
    next_retry_at: float | None = None
    restarts_exhausted: bool = False


@dataclasses.dataclass(frozen=True)
class SlotStatus:
    """The public state of one slot at one revision."""

    name: str
    device: str
    capabilities: tuple[str, ...]
    default_for: tuple[str, ...] = ()
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    external: bool = False
    default_model: str = ""
    pinned: bool = False
    priority: int = 0
    state: State = State.OFFLINE
    model_id: str = ""
    endpoint_url: str = ""
    port: int = 0
    pid: int = 0
    generation: int = 0
    state_since: float = dataclasses.field(default_factory=time.time)
    message: str = ""
    reason: Reason = Reason.UNSPECIFIED
    failure: Failure | None = None
    in_flight: int = 0
    last_used: float | None = None
    reserved_bytes: int = 0


# Called with (previous status, new status, revision) after every change.
ChangeListener = Callable[[SlotStatus | None, SlotStatus | None, int], None]


class SlotTable:
    """Current slot statuses; every move goes through `transition`."""

    def __init__(self, log: RevisionLog):
        self.log = log
        self._slots: dict[str, SlotStatus] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._listeners: list[ChangeListener] = []
        self._catalog: tuple[Any, ...] = ()

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def names(self) -> list[str]:
        return list(self._slots)

    def get(self, name: str) -> SlotStatus | None:
        return self._slots.get(name)

    def all(self) -> list[SlotStatus]:
        return list(self._slots.values())

    @property
    def catalog(self) -> tuple[Any, ...]:
        return self._catalog

    def snapshot_items(self) -> Iterable[tuple[EventKind, str, Any]]:
        """Yield the current state as revision-log items: the catalog, then each slot."""
        yield EventKind.CATALOG, "", self._catalog
        for status in self._slots.values():
            yield EventKind.SLOT, status.name, status

    def set_catalog(self, catalog: Iterable[Any]) -> None:
        self._catalog = tuple(catalog)
        self.log.publish(EventKind.CATALOG, "", self._catalog)

    def add(self, status: SlotStatus) -> None:
        self._slots[status.name] = status
        self._changed[status.name] = asyncio.Event()
        self._publish(None, status)

    def remove(self, name: str) -> None:
        previous = self._slots.pop(name)
        event = self.log.publish(EventKind.SLOT_REMOVED, name, previous)
        self._changed.pop(name).set()
        for listener in self._listeners:
            listener(previous, None, event.revision)

    def transition(
        self,
        name: str,
        expected: State | Collection[State],
        target: State,
        *,
        reason: Reason,
        message: str = "",
        **changes: Any,
    ) -> SlotStatus | None:
        """Move a slot to `target` if its state is one of `expected`.

        Returns the new status, or None when the slot is in another state (the
        swap lost a race and the caller should re-read). Raises IllegalTransition
        when the table forbids the move.
        """
        current = self._slots[name]
        allowed = (expected,) if isinstance(expected, State) else expected
        if current.state not in allowed:
            return None
        if not is_legal(current.state, target):
            raise IllegalTransition(name, current.state, target)

        updated = dataclasses.replace(
            current,
            state=target,
            state_since=time.time(),
            reason=reason,
            message=message,
            **changes,
        )
        self._slots[name] = updated
        self._publish(current, updated)
        return updated

    def update(self, name: str, **changes: Any) -> SlotStatus:
        """Change fields other than the state, publishing the new status."""
        if "state" in changes:
            raise ValueError("use transition() to change a slot's state")
        current = self._slots[name]
        updated = dataclasses.replace(current, **changes)
        if updated == current:
            return current
        self._slots[name] = updated
        self._publish(current, updated)
        return updated

    def _publish(self, previous: SlotStatus | None, status: SlotStatus) -> None:
        event = self.log.publish(EventKind.SLOT, status.name, status)

        # Wake every waiter, then give the next ones a fresh event.
        changed = self._changed[status.name]
        changed.set()
        self._changed[status.name] = asyncio.Event()
        for listener in self._listeners:
            listener(previous, status, event.revision)

    async def wait_until(
        self,
        name: str,
        predicate: Callable[[SlotStatus | None], bool],
        timeout: float | None = None,
    ) -> SlotStatus | None:
        """Wait until `predicate(status)` holds; raise TimeoutError after `timeout` seconds.

        The predicate receives None once the slot is removed.
        """
        async with asyncio.timeout(timeout):
            while True:
                status = self._slots.get(name)
                if predicate(status) or status is None:
                    return status
                await self._changed[name].wait()
