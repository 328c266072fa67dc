"""The dispatcher's copy of each slotd's state, fed by its WatchSlots stream.

A SourceTable applies events in order. A full snapshot is collected apart and
replaces the table wholesale when SYNCED arrives, so slots missing from it
disappear. Readers take `view()`, an immutable snapshot that is rebuilt only
after a change; the resolver works on views and never on the live table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from slotroute.ids import model_key
from slotroute.slot.states import State


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    """The dispatcher's copy of one slot's state."""

    name: str
    state: State
    capabilities: tuple[str, ...] = ()
    default_for: tuple[str, ...] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    model_id: str = ""
    endpoint_url: str = ""
    generation: int = 0
    in_flight: int = 0
    external: bool = False
    default_model: str = ""
    message: str = ""
    restarts_exhausted: bool = False
    # Wall-clock time of slotd's next automatic restart, if one is scheduled.
    next_retry_at: float | None = None
    device: str = ""

    # Computed once per SlotInfo: the resolver compares it on every Resolve. The dataclass
    # is frozen, and cached_property stores the value in the instance __dict__ directly.
    @functools.cached_property
    def model_key(self) -> str:
        return model_key(self.model_id)


@dataclasses.dataclass(frozen=True)
class CatalogModel:
    id: str
    capability: str
    slots: tuple[str, ...]
    cached: bool
    memory_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class SourceView:
    """An immutable snapshot of one source, consistent at `revision`."""

    address: str
    epoch: str
    revision: int
    synced: bool
    connected: bool
    # Monotonic time the stream was lost; None while connected.
    disconnected_since: float | None
    # Slots in slotd's declaration order.
    slots: Mapping[str, SlotInfo]
    # Catalog keyed by model_key(id).
    catalog: Mapping[str, CatalogModel]

    def stale(self, now: float, staleness: float) -> bool:
        """Return whether this source's slots must not be routed to."""
        if not self.synced:
            return True
        return self.disconnected_since is not None and now - self.disconnected_since > staleness


class SourceTable:
    """The live table of one slotd source. Methods run on the event loop thread."""

    def __init__(self, address: str):
        self.address = address
        self.epoch = ""
        self.revision = 0
        self.synced = False
        self.ever_synced = False
        self.connected = False
        self.disconnected_since: float | None = time.monotonic()
        self.last_event_at: float | None = None
        self.heartbeat_revision = 0
        self._slots: dict[str, SlotInfo] = {}
        self._catalog: dict[str, CatalogModel] = {}
        self._pending_slots: dict[str, SlotInfo] | None = None
        self._pending_catalog: dict[str, CatalogModel] | None = None
        self._view: SourceView | None = None
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[SourceTable], None]] = []

    def add_listener(self, listener: Callable[[SourceTable], None]) -> None:
        self._listeners.append(listener)

    # -- stream events --------------------------------------------------------

    def on_connected(self) -> None:
        self.connected = True
        self._touch()

    def on_disconnected(self) -> None:
        # The staleness clock starts at the first loss after a SYNCED and runs on
        # through reconnects that end before the next SYNCED, so a slotd that
        # accepts streams and drops them early still becomes stale.
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        self.connected = False
        self._pending_slots = None
        self._pending_catalog = None
        self._changed_now()

    def snapshot_pending(self) -> bool:
        return self._pending_slots is not None

    def begin_snapshot(self) -> None:
        # The epoch changes only at SYNCED: a stream lost mid-snapshot must resume
        # from the (epoch, revision) pair of the table that is still in place.
        self._pending_slots = {}
        self._pending_catalog = {}

    def apply_slot(self, slot: SlotInfo, revision: int, snapshot: bool) -> None:
        self._touch()
        if snapshot and self._pending_slots is not None:
            self._pending_slots[slot.name] = slot
            return
        self._slots[slot.name] = slot
        self.revision = revision
        self._changed_now()

    def remove_slot(self, name: str, revision: int) -> None:
        self._touch()
        self._slots.pop(name, None)
        self.revision = revision
        self._changed_now()

    def apply_catalog(self, models: Iterable[CatalogModel], revision: int, snapshot: bool) -> None:
        self._touch()
        catalog = {model_key(model.id): model for model in models}
        if snapshot and self._pending_catalog is not None:
            self._pending_catalog = catalog
            return
        self._catalog = catalog
        self.revision = revision
        self._changed_now()

    def apply_synced(self, epoch: str, revision: int, snapshot: bool) -> None:
        self._touch()
        if snapshot and self._pending_slots is not None:
            self._slots = self._pending_slots
            self._catalog = self._pending_catalog or {}
        self._pending_slots = None
        self._pending_catalog = None
        self.epoch = epoch
        self.revision = revision
        self.heartbeat_revision = revision
        self.synced = True
        self.ever_synced = True
        self.disconnected_since = None
        self._changed_now()

    def apply_heartbeat(self, revision: int) -> None:
        self._touch()
        self.heartbeat_revision = revision

    def _touch(self) -> None:
        self.last_event_at = time.monotonic()

    def _changed_now(self) -> None:
        self._view = None
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._listeners:
            listener(self)

    # -- reading -------------------------------------------------------------

    def view(self) -> SourceView:
        if self._view is None:
            self._view = SourceView(
                address=self.address,
                epoch=self.epoch,
                revision=self.revision,
                synced=self.synced,
                connected=self.connected,
                disconnected_since=self.disconnected_since,
                slots=MappingProxyType(dict(self._slots)),
                catalog=MappingProxyType(dict(self._catalog)),
            )
        return self._view

    async def changed(self) -> None:
        """Wait for the next change of this table."""
        await self._changed.wait()
