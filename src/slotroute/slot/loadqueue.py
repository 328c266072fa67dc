"""The load queue of one slot: one load has the slot's turn, the others wait first in first out.

A load is a ticket. Callers that ask for the same model while its ticket is
waiting or running share that ticket instead of queueing a second one. A
ticket whose callers all gave up before its turn came leaves the queue and
its load never runs. Once a ticket holds the turn it runs to the end, even if
its callers leave, because evictions and stops already under way would
otherwise be wasted and later callers may join the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from slotroute.slot import errors

logger = logging.getLogger("slotroute.slot")


@dataclasses.dataclass(eq=False)
class Ticket:
    """One queued load, or a config reload's turn (empty `model_key`)."""

    model_key: str
    task: asyncio.Task | None = None
    # Callers waiting for the task right now.
    waiters: int = 0
    # Set by a caller that does not wait: the load runs even with no waiter.
    kept: bool = False
    # Set once the ticket has the slot's turn.
    started: bool = False


class LoadQueue:
    """Tickets of one slot in arrival order; the first one that started has the turn."""

    def __init__(self, slot: str, max_queue: int):
        self.slot = slot
        # Loads allowed to wait behind the one holding the turn.
        self.max_queue = max_queue
        # asyncio.Lock wakes its waiters in the order they called acquire().
        self._lock = asyncio.Lock()
        self._tickets: list[Ticket] = []
        # Event loop time at which the current turn began; None while idle.
        self.busy_since: float | None = None

    def __len__(self) -> int:
        return len(self._tickets)

    def find(self, model_key: str) -> Ticket | None:
        """Return the unfinished ticket loading `model_key`, if any."""
        for ticket in self._tickets:
            if ticket.model_key == model_key and ticket.task is not None and not ticket.task.done():
                return ticket
        return None

    def enter(self, model_key: str) -> Ticket:
        """Add a load ticket; raise QueueFull when `max_queue` loads already wait."""
        if len(self._tickets) >= self.max_queue + 1:
            raise errors.QueueFull(
                f"slot {self.slot!r} already has {len(self._tickets) - 1} loads queued behind "
                f"the one running (max_queue = {self.max_queue}); retry later"
            )
        ticket = Ticket(model_key)
        self._tickets.append(ticket)
        return ticket

    def enter_turn(self) -> Ticket:
        """Add a ticket that is not a load, such as a config reload; no limit applies."""
        ticket = Ticket("")
        self._tickets.append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):
            self._tickets.remove(ticket)

    @contextlib.asynccontextmanager
    async def turn(self, ticket: Ticket) -> AsyncIterator[None]:
        """Hold the slot's turn for `ticket`; a cancelled wait leaves the lock's queue."""
        await self._lock.acquire()
        loop = asyncio.get_running_loop()
        ticket.started = True
        self.busy_since = loop.time()
        try:
            yield
        finally:
            self.busy_since = None
            self._lock.release()

    async def wait(self, ticket: Ticket):
        """Wait for the ticket's load and return its result.

        When the last waiting caller is cancelled before the ticket's turn
        came, the load is cancelled with it, so it never runs later.
        """
        assert ticket.task is not None
        ticket.waiters += 1
        try:
            return await asyncio.shield(ticket.task)
        finally:
            ticket.waiters -= 1
            if ticket.waiters == 0 and not ticket.kept and not ticket.started and not ticket.task.done():
                logger.info("slot=%s queued load of %s cancelled: every caller gave up before its turn",
                            self.slot, ticket.model_key)
                ticket.task.cancel()
