"""The resolver: pure functions from (request, registry, source views) to a decision.

Nothing here waits, calls the network or reads a clock: `now` comes in as an
argument, so every decision can be tested from plain values. The dispatcher
service acts on the decision (respond, wait, or ask slotd to load) and then
asks again with fresher views.

Transport axis (`resolve`): tier 1 REGISTRY, tier 2 PASSTHROUGH, tier 3
PREFETCH, else NOT_FOUND. There is no default slot.
Capability axis (`route`): rank the slots that offer a capability.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Mapping, Sequence

from slotroute.dispatch.config import RegistryEntry
from slotroute.dispatch.sources import CatalogModel, SlotInfo, SourceView
from slotroute.ids import model_key
from slotroute.slot.states import LOADING_STATES, State


class Tier(enum.Enum):
    REGISTRY = "REGISTRY"
    PASSTHROUGH = "PASSTHROUGH"
    PREFETCH = "PREFETCH"


class Kind(enum.Enum):
    # Send the request to the slot now.
    ROUTED = "ROUTED"
    # The slot is loading this model: wait for READY.
    WAIT = "WAIT"
    # Ask slotd to load `load_model` into the slot, then wait.
    LOAD = "LOAD"
    # No tier matches the id, or no slot offers the capability.
    NOT_FOUND = "NOT_FOUND"
    # A source is unreachable or stale, or an external endpoint is down.
    UNAVAILABLE = "UNAVAILABLE"
    # The slot failed and slotd stopped restarting it; retrying will not help.
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: Kind
    message: str = ""
    # Canonical model id, for Resolve.
    model: str = ""
    tier: Tier | None = None
    capability: str = ""
    source: str = ""
    slot: SlotInfo | None = None
    revision: int = 0
    # For LOAD: the catalog model to load; "" loads the slot's default model.
    load_model: str = ""
    # For UNAVAILABLE and WAIT: seconds after which a retry may succeed.
    retry_after: float | None = None
    tiers_tried: tuple[str, ...] = ()
    close_matches: tuple[str, ...] = ()
    known_capabilities: tuple[str, ...] = ()


class Registry:
    """Registry entries indexed by the matching key of every id and alias."""

    def __init__(self, entries: Sequence[RegistryEntry]):
        self.entries = tuple(entries)
        self._by_key: dict[str, RegistryEntry] = {}
        for entry in self.entries:
            self._by_key[model_key(entry.id)] = entry
            for alias in entry.aliases:
                self._by_key[model_key(alias)] = entry

    def lookup(self, key: str) -> RegistryEntry | None:
        return self._by_key.get(key)

    def names(self) -> list[str]:
        return [name for entry in self.entries for name in (entry.id, *entry.aliases)]

    def __len__(self) -> int:
        return len(self.entries)


# -- transport axis --------------------------------------------------------------


def resolve(
    requested: str,
    registry: Registry,
    views: Sequence[SourceView],
    *,
    now: float,
    wall_now: float,
    staleness: float,
) -> Decision:
    """Decide where a request for model `requested` goes.

    `requested` must already be a valid id (see slotroute.ids). `now` is the
    monotonic time for staleness, `wall_now` the wall-clock time for slotd's
    retry times.
    """
    key = model_key(requested)

    # Tier 1: the registry binds the id to a slot or a capability.
    entry = registry.lookup(key)
    if entry is not None:
        if entry.capability:
            decision = route(entry.capability, entry.labels, views, now=now,
                             wall_now=wall_now, staleness=staleness)
            return dataclasses.replace(decision, model=entry.id, tier=Tier.REGISTRY,
                                       capability=entry.capability)
        return _resolve_slot_binding(entry, views, now=now, wall_now=wall_now, staleness=staleness)

    live = [view for view in views if not view.stale(now, staleness)]
    stale = [view for view in views if view.stale(now, staleness)]

    # Tier 2: a READY slot already serves exactly this id.
    serving = [
        (slot.in_flight, index, view, slot)
        for index, view in enumerate(live)
        for slot in view.slots.values()
        if slot.state is State.READY and slot.model_id and slot.model_key == key
    ]
    if serving:
        _in_flight, _index, view, slot = min(serving, key=lambda item: (item[0], item[1]))
        return _decision_for(Kind.ROUTED, view, slot, model=slot.model_id, tier=Tier.PASSTHROUGH,
                             message=f"slot {slot.name!r} serves {slot.model_id!r}")

    # Tier 3: a catalog has the model cached; load it into a compatible slot.
    notes = []
    for view in live:
        model = view.catalog.get(key)
        if model is None:
            continue
        if not model.cached:
            notes.append(f"it is in the catalog of {view.address} but its file is not in the cache")
            continue
        decision = _prefetch(view, model, key, wall_now)
        if decision is None:
            notes.append(f"it is in the catalog of {view.address} but none of its slots "
                         f"({', '.join(model.slots)}) can load it")
            continue
        return decision

    # A stale source may serve or list the model, so return UNAVAILABLE instead of a false
    # NOT_FOUND. The catalog of a source that never synced is unknown: it may list any model.
    for view in stale:
        never_synced = not view.synced
        if never_synced or key in view.catalog \
                or any(slot.model_key == key for slot in view.slots.values()):
            return Decision(
                Kind.UNAVAILABLE, model=requested, source=view.address,
                message=_stale_message(view, now),
                retry_after=1.0,
            )

    return _not_found(requested, key, registry, views, notes)


def _resolve_slot_binding(
    entry: RegistryEntry,
    views: Sequence[SourceView],
    *,
    now: float,
    wall_now: float,
    staleness: float,
) -> Decision:
    owners = [view for view in views
              if entry.slot in view.slots and (not entry.source or view.address == entry.source)]
    if not owners:
        unsynced = [view for view in views if view.stale(now, staleness)]
        if unsynced:
            return Decision(Kind.UNAVAILABLE, model=entry.id, tier=Tier.REGISTRY,
                            source=unsynced[0].address, retry_after=1.0,
                            message=f"registry binds {entry.id!r} to slot {entry.slot!r}; "
                                    + _stale_message(unsynced[0], now))
        return Decision(Kind.FAILED, model=entry.id, tier=Tier.REGISTRY,
                        message=f"registry binds {entry.id!r} to slot {entry.slot!r}, which no "
                                f"slotd reports ({', '.join(view.address for view in views)}); "
                                "fix the registry entry or the slotd config")
    view = owners[0]
    if view.stale(now, staleness):
        return Decision(Kind.UNAVAILABLE, model=entry.id, tier=Tier.REGISTRY, source=view.address,
                        retry_after=1.0, message=_stale_message(view, now))

    slot = view.slots[entry.slot]
    key = model_key(entry.id)
    common = {"model": entry.id, "tier": Tier.REGISTRY}
    if slot.external:
        return _decision_for_state(view, slot, wall_now, **common)
    if slot.model_key == key and slot.state is not State.OFFLINE:
        return _decision_for_state(view, slot, wall_now, **common)

    # The slot runs another model or none: load the bound one if slotd can.
    model = view.catalog.get(key)
    if model is not None and slot.name in model.slots:
        if not model.cached:
            return Decision(Kind.FAILED, source=view.address, slot=slot, revision=view.revision,
                            message=f"model {entry.id!r} is in the catalog of {view.address} but "
                                    "its file is missing from the cache; download it there",
                            **common)
        return _decision_for(Kind.LOAD, view, slot, load_model=model.id,
                             message=f"slot {slot.name!r} runs {slot.model_id or 'nothing'}; "
                                     f"load {model.id!r}", **common)
    if slot.default_model and model_key(slot.default_model) == key:
        return _decision_for(Kind.LOAD, view, slot, load_model="",
                             message=f"start slot {slot.name!r} with its default model", **common)
    return Decision(Kind.FAILED, source=view.address, slot=slot, revision=view.revision,
                    message=f"registry binds {entry.id!r} to slot {slot.name!r}, which runs "
                            f"{slot.model_id or 'nothing'} and cannot load {entry.id!r}: it is not "
                            f"in the catalog of {view.address} for that slot",
                    **common)


def _prefetch(view: SourceView, model: CatalogModel, key: str, wall_now: float) -> Decision | None:
    """Decide for a cached catalog model; None when no slot of this source can host it."""
    holder = _slot_holding(view, model.slots, key)
    if holder is not None:
        # A slot already runs or restarts this model: follow its state, never start it twice.
        return _decision_for_state(view, holder, wall_now, model=model.id, tier=Tier.PREFETCH,
                                   load_model=model.id)
    slot = _prefetch_slot(view, model.slots)
    if slot is None:
        return None
    return _decision_for(
        Kind.LOAD, view, slot, model=model.id, tier=Tier.PREFETCH, load_model=model.id,
        message=f"model {model.id!r} is cached on {view.address}; load it into slot {slot.name!r}",
    )


def _slot_holding(view: SourceView, allowed: Sequence[str], key: str) -> SlotInfo | None:
    """Return the allowed slot that runs, loads or restarts model `key`, if any."""
    for name in allowed:
        slot = view.slots.get(name)
        if slot is not None and not slot.external and slot.model_key == key \
                and slot.state is not State.OFFLINE:
            return slot
    return None


def _prefetch_slot(view: SourceView, allowed: Sequence[str]) -> SlotInfo | None:
    """Pick the slot to load a catalog model into: idle slots first, then the least busy.

    OFFLINE slots come first, then failed ones, then READY ones (a swap), then
    slots still starting or stopping, each group in catalog order after in-flight count.
    """
    slots = [view.slots[name] for name in allowed if name in view.slots]
    slots = [slot for slot in slots if not slot.external]
    order = {State.OFFLINE: 0, State.ERROR: 1, State.READY: 2, State.WARMING: 3,
             State.STARTING: 3, State.DRAINING: 4, State.UNLOADING: 4}
    ranked = sorted(
        enumerate(slots),
        key=lambda item: (order[item[1].state], item[1].in_flight, item[0]),
    )
    if not ranked:
        return None
    return ranked[0][1]


def _decision_for_state(view: SourceView, slot: SlotInfo, wall_now: float, **fields) -> Decision:
    """Decide for a slot that runs (or is starting) the requested model."""
    if slot.state is State.READY:
        return _decision_for(Kind.ROUTED, view, slot, **fields)
    if slot.state in LOADING_STATES:
        return _decision_for(Kind.WAIT, view, slot, retry_after=1.0,
                             message=f"slot {slot.name!r} is {slot.state.value}: {slot.message}",
                             **fields)
    if slot.external:
        return _decision_for(Kind.UNAVAILABLE, view, slot, retry_after=1.0,
                             message=f"external slot {slot.name!r} at {slot.endpoint_url} is "
                                     f"{slot.state.value}: {slot.message}", **fields)
    if slot.state is State.ERROR:
        if slot.restarts_exhausted or slot.next_retry_at is None:
            return _decision_for(Kind.FAILED, view, slot,
                                 message=f"slot {slot.name!r} is in ERROR and slotd stopped "
                                         f"restarting it: {slot.message}", **fields)
        return _decision_for(Kind.WAIT, view, slot,
                             retry_after=max(slot.next_retry_at - wall_now, 0.0),
                             message=f"slot {slot.name!r} failed and restarts in "
                                     f"{max(slot.next_retry_at - wall_now, 0.0):.1f} s: {slot.message}",
                             **fields)
    # DRAINING, UNLOADING or OFFLINE: ask slotd, which queues the load behind the stop.
    return _decision_for(Kind.LOAD, view, slot, load_model=fields.get("load_model", slot.model_id),
                         message=f"slot {slot.name!r} is {slot.state.value}; load it again",
                         **{k: v for k, v in fields.items() if k != "load_model"})


def _decision_for(kind: Kind, view: SourceView, slot: SlotInfo, **fields) -> Decision:
    return Decision(kind, source=view.address, slot=slot, revision=view.revision, **fields)


def _stale_message(view: SourceView, now: float) -> str:
    if not view.synced and view.disconnected_since is None:
        return f"slotd {view.address} has not finished its first sync; retry shortly"
    if view.disconnected_since is None:
        return f"slotd {view.address} is resyncing; retry shortly"
    return (f"slotd {view.address} is unreachable for {now - view.disconnected_since:.1f} s; "
            "its slots are not routable until it is back")


def _not_found(requested: str, key: str, registry: Registry, views: Sequence[SourceView],
               notes: Sequence[str] = ()) -> Decision:
    names = registry.names()
    for view in views:
        names.extend(model.id for model in view.catalog.values())
        names.extend(slot.model_id for slot in view.slots.values() if slot.model_id)
    by_key: dict[str, str] = {}
    for name in names:
        by_key.setdefault(model_key(name), name)
    close = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(repr(by_key[c]) for c in close)}?" if close else \
        "; add it to the registry or the slotd catalog"
    catalog = "; ".join(notes) if notes else "not in any slotd catalog"
    return Decision(
        Kind.NOT_FOUND,
        model=requested,
        message=f"no route for model {requested!r}: not in the registry, not served by a READY "
                f"slot, {catalog}{suggestion}",
        tiers_tried=(Tier.REGISTRY.value, Tier.PASSTHROUGH.value, Tier.PREFETCH.value),
        close_matches=tuple(by_key[c] for c in close),
    )


# -- capability axis -------------------------------------------------------------

# Rank groups: READY, loading, startable, going down, failed.
_GROUP_READY, _GROUP_LOADING, _GROUP_STARTABLE, _GROUP_LEAVING, _GROUP_ERROR = range(5)


@dataclasses.dataclass(frozen=True)
class Candidate:
    source: str
    slot: SlotInfo
    revision: int
    group: int
    rank: tuple[int, ...]


def candidates(
    capability: str,
    labels: Mapping[str, str],
    views: Sequence[SourceView],
    *,
    now: float,
    staleness: float,
) -> list[Candidate]:
    """Slots of live sources that offer `capability` and every label, best first.

    READY first (fewest in flight, then the slot marked default for the
    capability, then declaration order), then loading slots, then slots that
    can start their default model, then slots going down, then ERROR slots.
    """
    found = []
    for source_index, view in enumerate(views):
        if view.stale(now, staleness):
            continue
        for slot_index, slot in enumerate(view.slots.values()):
            if capability not in slot.capabilities:
                continue
            if any(slot.labels.get(name) != value for name, value in labels.items()):
                continue
            group = _group(slot)
            if group is None:
                continue
            not_default = 0 if capability in slot.default_for else 1
            in_flight = slot.in_flight if group == _GROUP_READY else 0
            rank = (group, in_flight, not_default, source_index, slot_index)
            found.append(Candidate(view.address, slot, view.revision, group, rank))
    found.sort(key=lambda candidate: candidate.rank)
    return found


def _group(slot: SlotInfo) -> int | None:
    if slot.state is State.READY:
        return _GROUP_READY
    if slot.state in LOADING_STATES:
        return _GROUP_LOADING
    if slot.state is State.OFFLINE:
        # An OFFLINE slot can start only if slotd runs it and it has a default model.
        return _GROUP_STARTABLE if slot.default_model and not slot.external else None
    if slot.state in (State.DRAINING, State.UNLOADING):
        return _GROUP_LEAVING if slot.default_model else None
    if slot.state is State.ERROR:
        return _GROUP_ERROR
    return None


def route(
    capability: str,
    labels: Mapping[str, str],
    views: Sequence[SourceView],
    *,
    now: float,
    wall_now: float,
    staleness: float,
) -> Decision:
    """Choose the slot for a kind of work."""
    offered = sorted({c for view in views for slot in view.slots.values() for c in slot.capabilities})
    if capability not in offered:
        stale = [view for view in views if view.stale(now, staleness)]
        if stale:
            return Decision(Kind.UNAVAILABLE, capability=capability, source=stale[0].address,
                            retry_after=1.0,
                            message=f"no live slot offers {capability!r}; " + _stale_message(stale[0], now))
        return Decision(
            Kind.NOT_FOUND, capability=capability, known_capabilities=tuple(offered),
            message=f"no slot offers capability {capability!r}; offered capabilities: "
                    f"{', '.join(offered) or 'none'}",
        )

    ranked = candidates(capability, labels, views, now=now, staleness=staleness)
    if not ranked:
        stale = [view for view in views if view.stale(now, staleness)]
        if stale:
            return Decision(Kind.UNAVAILABLE, capability=capability, source=stale[0].address,
                            retry_after=1.0, message=_stale_message(stale[0], now))
        with_capability = [slot.name for view in views for slot in view.slots.values()
                           if capability in slot.capabilities]
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        if labels:
            message = (f"no slot offers {capability!r} with labels {wanted}; slots offering it: "
                       f"{', '.join(with_capability)}")
        else:
            message = (f"no slot offering {capability!r} can serve now (slots: "
                       f"{', '.join(with_capability)}: offline without a default model)")
        return Decision(Kind.NOT_FOUND, capability=capability, known_capabilities=tuple(offered),
                        message=message)

    best = ranked[0]
    view = next(view for view in views if view.address == best.source)
    slot = best.slot
    if best.group == _GROUP_READY:
        return _decision_for(Kind.ROUTED, view, slot, capability=capability,
                             message=f"slot {slot.name!r} is READY")
    if best.group == _GROUP_STARTABLE or best.group == _GROUP_LEAVING:
        return _decision_for(Kind.LOAD, view, slot, capability=capability, load_model="",
                             message=f"start slot {slot.name!r} with its default model "
                                     f"{slot.default_model!r}")
    return _decision_for_state(view, slot, wall_now, capability=capability)


# -- listing ---------------------------------------------------------------------


_NOT_ROUTABLE = (Kind.NOT_FOUND, Kind.FAILED, Kind.UNAVAILABLE)


@dataclasses.dataclass(frozen=True)
class RouteListing:
    model: str
    aliases: tuple[str, ...]
    tier: Tier
    source: str
    slot: str
    state: State | None
    capability: str = ""


def list_routes(
    registry: Registry,
    views: Sequence[SourceView],
    *,
    now: float,
    wall_now: float,
    staleness: float,
    include_prefetch: bool = False,
) -> list[RouteListing]:
    """List every model id that resolves now, with its tier, slot and state."""
    listings: list[RouteListing] = []
    seen: set[str] = set()
    for entry in registry.entries:
        if entry.capability:
            decision = route(entry.capability, entry.labels, views, now=now,
                             wall_now=wall_now, staleness=staleness)
        else:
            decision = _resolve_slot_binding(entry, views, now=now, wall_now=wall_now,
                                              staleness=staleness)
        if decision.kind in _NOT_ROUTABLE or decision.slot is None:
            continue
        state = decision.slot.state
        if decision.kind is Kind.LOAD and not entry.capability:
            # The bound slot runs another model (or none): this one is not loaded.
            state = State.OFFLINE
        listings.append(RouteListing(entry.id, entry.aliases, Tier.REGISTRY, decision.source,
                                     decision.slot.name, state, entry.capability))
        seen.add(model_key(entry.id))
        seen.update(model_key(alias) for alias in entry.aliases)

    for view in views:
        if view.stale(now, staleness):
            continue
        for slot in view.slots.values():
            if slot.state is State.READY and slot.model_id and slot.model_key not in seen:
                seen.add(slot.model_key)
                listings.append(RouteListing(slot.model_id, (), Tier.PASSTHROUGH, view.address,
                                             slot.name, slot.state))
    if include_prefetch:
        for view in views:
            if view.stale(now, staleness):
                continue
            for key, model in view.catalog.items():
                if key in seen or not model.cached:
                    continue
                decision = _prefetch(view, model, key, wall_now)
                if decision is None or decision.slot is None or decision.kind in _NOT_ROUTABLE:
                    continue
                seen.add(key)
                listings.append(RouteListing(model.id, (), Tier.PREFETCH, view.address,
                                             decision.slot.name, decision.slot.state))
    return listings
