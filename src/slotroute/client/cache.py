"""SlotCache: a local copy of one slotd's slots, kept current by its WatchSlots stream.

The cache looks up "which endpoint runs model X right now" without a network
call, for clients that send many requests. It contains only what slotd runs: it
does not read the dispatcher's registry (aliases, capability bindings) and
never starts a backend. For those, call DispatcherClient.resolve.

The stream is the same resumable subscription the dispatcher uses: after a
lost connection it resubscribes with backoff and resumes from the last
applied revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import grpc

from slotroute.dispatch.sources import SlotInfo, SourceTable, SourceView
from slotroute.dispatch.upstream import Channels, Subscriber
from slotroute.ids import model_key
from slotroute.slot.states import State


class SlotCache:
    """The slots of one slotd, updated from its WatchSlots stream.

        async with SlotCache("127.0.0.1:50051") as cache:
            await cache.wait_synced(timeout=5)
            url = cache.endpoint_for("qwen3-4b")   # None unless a READY slot runs it

    Methods must be called on the event loop that started the cache.
    """

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        staleness: float = 10.0,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        watch_timeout: float = 15.0,
    ):
        """Set up the cache; `start()` or `async with` begins following the stream.

        Times are in seconds. `staleness`: how long endpoint_for keeps returning
        URLs after the stream is lost. `backoff` and `backoff_max`: the delays
        before resubscribing. `watch_timeout`: how long the stream may stay
        silent before it counts as lost; it must exceed slotd's heartbeat_interval.
        """
        self.address = address
        self.staleness = staleness
        self._table = SourceTable(address)
        self._channels = Channels(credentials)
        self._subscriber = Subscriber(self._table, self._channels, backoff=backoff,
                                      backoff_max=backoff_max, watch_timeout=watch_timeout,
                                      metadata=metadata)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SlotCache:
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def start(self) -> None:
        """Start following slotd's stream in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._subscriber.run(), name=f"slot-cache-{self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._channels.close()

    async def wait_synced(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the cache contains a full snapshot; raise TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not self._table.synced:
                await self._table.changed()

    async def changed(self) -> None:
        """Wait for the next change of the cached slots or of the connection."""
        await self._table.changed()

    @property
    def fresh(self) -> bool:
        """Whether the cache is synced and has not lost the stream for longer than `staleness`."""
        return not self.view().stale(time.monotonic(), self.staleness)

    def view(self) -> SourceView:
        """Return an immutable snapshot: slots, catalog, epoch and revision."""
        return self._table.view()

    @property
    def slots(self) -> Mapping[str, SlotInfo]:
        """The slots by name, in slotd's declaration order."""
        return self.view().slots

    def endpoint_for(self, model: str) -> str | None:
        """Return the endpoint URL of a READY slot running `model`, or None.

        Model ids match as everywhere in slotroute: case and surrounding
        whitespace are ignored. Among several READY slots the one with the
        fewest leases in flight wins, then declaration order. Returns None
        while the cache is not fresh, because its slots may have changed.
        """
        if not self.fresh:
            return None
        key = model_key(model)
        serving = [
            (slot.in_flight, index, slot)
            for index, slot in enumerate(self.slots.values())
            if slot.state is State.READY and slot.model_id and slot.model_key == key
        ]
        if not serving:
            return None
        _in_flight, _index, slot = min(serving, key=lambda item: (item[0], item[1]))
        return slot.endpoint_url
