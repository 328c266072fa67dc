"""The revision log: numbered events, a bounded history for resuming, and subscribers.

Every change gets the next revision. The log keeps the last `history_size`
events so that a subscriber can resume from a revision it already applied.
Each subscriber has its own queue. A subscriber that falls more than
`max_pending` events behind has its queue coalesced to the latest event per
slot: memory stays bounded by max(max_pending, number of slots), revisions
stay increasing, intermediate states are skipped, and the last event for
each slot is its current state. Publishing never waits for a subscriber.

All methods run on the event loop thread, so no lock is needed: publish()
appends and wakes subscribers without awaiting.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import uuid
from collections.abc import Callable, Iterable
from typing import Any


class EventKind(enum.Enum):
    SLOT = "SLOT"
    SLOT_REMOVED = "SLOT_REMOVED"
    CATALOG = "CATALOG"


class SnapshotReason(enum.Enum):
    NEW_SUBSCRIBER = "NEW_SUBSCRIBER"
    EPOCH_CHANGED = "EPOCH_CHANGED"
    HISTORY_GONE = "HISTORY_GONE"
    REVISION_AHEAD = "REVISION_AHEAD"


@dataclasses.dataclass(frozen=True)
class Event:
    """One published change. `payload` is a SlotStatus, or a catalog tuple for CATALOG."""

    kind: EventKind
    revision: int
    key: str
    payload: Any


@dataclasses.dataclass(frozen=True)
class Opening:
    """The events a new subscriber receives before live ones: a snapshot or the missed history."""

    events: list[Event]
    # Set when `events` is a full snapshot; None when it is the missed history.
    snapshot_reason: SnapshotReason | None
    revision: int


class Subscription:
    """One subscriber's queue. Cancel-safe: close() may be called any number of times."""

    def __init__(self, log: RevisionLog, max_pending: int):
        self._log = log
        self._max_pending = max_pending
        self._queue: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self.coalesced = 0
        self.closed = False

    def push(self, event: Event) -> None:
        self._queue.append(event)
        if len(self._queue) > self._max_pending:
            self._coalesce()
        self._wakeup.set()

    def _coalesce(self) -> None:
        latest: dict[str, Event] = {}
        for event in self._queue:
            latest.pop(event.key, None)
            latest[event.key] = event
        self.coalesced += len(self._queue) - len(latest)
        self._log.coalesced_total += len(self._queue) - len(latest)
        self._queue = collections.deque(latest.values())

    def pending(self) -> int:
        return len(self._queue)

    async def next(self, timeout: float | None) -> Event | None:
        """Return the next event, or None when `timeout` seconds pass without one."""
        while not self._queue:
            if self.closed:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return None
        return self._queue.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log._subscribers.discard(self)
            self._wakeup.set()


class RevisionLog:
    """Assigns revisions, keeps a bounded history and fans events out to subscribers."""

    def __init__(self, history_size: int = 4096, max_pending: int = 1024, epoch: str | None = None):
        self.epoch = epoch or uuid.uuid4().hex
        self.revision = 0
        self.coalesced_total = 0
        self.published_total = 0
        self._history: collections.deque[Event] = collections.deque(maxlen=history_size)
        self._subscribers: set[Subscription] = set()
        self._max_pending = max_pending

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: EventKind, key: str, payload: Any) -> Event:
        self.revision += 1
        event = Event(kind, self.revision, key, payload)
        self._history.append(event)
        self.published_total += 1

        # Copy the set: a subscriber may close while it is being fed.
        for subscription in list(self._subscribers):
            subscription.push(event)
        return event

    def subscribe(
        self,
        snapshot: Callable[[], Iterable[tuple[EventKind, str, Any]]],
        resume_epoch: str = "",
        resume_revision: int = 0,
    ) -> tuple[Subscription, Opening]:
        """Register a subscriber and return it with what it must receive first.

        Registration and the opening are taken in one step, so no event falls
        between them. `snapshot` yields (kind, key, payload) for the current state.
        """
        subscription = Subscription(self, self._max_pending)
        self._subscribers.add(subscription)

        reason = self._snapshot_reason(resume_epoch, resume_revision)
        if reason is None:
            missed = [event for event in self._history if event.revision > resume_revision]
            return subscription, Opening(missed, None, self.revision)

        events = [Event(kind, self.revision, key, payload) for kind, key, payload in snapshot()]
        return subscription, Opening(events, reason, self.revision)

    def _snapshot_reason(self, resume_epoch: str, resume_revision: int) -> SnapshotReason | None:
        if not resume_epoch:
            return SnapshotReason.NEW_SUBSCRIBER
        if resume_epoch != self.epoch:
            return SnapshotReason.EPOCH_CHANGED
        if resume_revision > self.revision:
            return SnapshotReason.REVISION_AHEAD
        if resume_revision == self.revision:
            return None
        oldest = self._history[0].revision if self._history else self.revision + 1
        if resume_revision + 1 < oldest:
            return SnapshotReason.HISTORY_GONE
        return None

    def close_all(self) -> None:
        for subscription in list(self._subscribers):
            subscription.close()
