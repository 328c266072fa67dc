"""The resolver as pure functions: tier order, Route ranking and staleness, from plain values."""

from __future__ import annotations

from types import MappingProxyType

from slotroute.dispatch.config import RegistryEntry
from slotroute.dispatch.resolver import (
    Kind,
    Registry,
    Tier,
    candidates,
    list_routes,
    resolve,
    route,
)
from slotroute.dispatch.sources import CatalogModel, SlotInfo, SourceView
from slotroute.ids import model_key
from slotroute.slot.states import State

NOW = 1000.0
WALL_NOW = 1_700_000_000.0
STALENESS = 5.0


def info(name: str, state: State = State.OFFLINE, capability: str = "chat", *, model: str = "",
         **fields) -> SlotInfo:
    return SlotInfo(name=name, state=state, capabilities=fields.pop("capabilities", (capability,)),
                    model_id=model, endpoint_url=f"http://127.0.0.1:1/{name}", **fields)


def view(*slots: SlotInfo, catalog: tuple[CatalogModel, ...] = (), address: str = "s1:1",
         synced: bool = True, disconnected_since: float | None = None) -> SourceView:
    return SourceView(
        address=address, epoch="e1", revision=7, synced=synced, connected=disconnected_since is None,
        disconnected_since=disconnected_since,
        slots=MappingProxyType({slot.name: slot for slot in slots}),
        catalog=MappingProxyType({model_key(model.id): model for model in catalog}),
    )


def cached(model_id: str, *slots: str, present: bool = True) -> CatalogModel:
    return CatalogModel(id=model_id, capability="chat", slots=slots, cached=present)


def decide(requested: str, views, entries=()):
    return resolve(requested, Registry(entries), views, now=NOW, wall_now=WALL_NOW, staleness=STALENESS)


def decide_route(capability: str, views, labels=None):
    return route(capability, labels or {}, views, now=NOW, wall_now=WALL_NOW, staleness=STALENESS)


def ranked_names(capability: str, views, labels=None) -> list[str]:
    found = candidates(capability, labels or {}, views, now=NOW, staleness=STALENESS)
    return [candidate.slot.name for candidate in found]


# -- tier order -------------------------------------------------------------------------


def test_registry_tier_beats_passthrough():
    entries = [RegistryEntry(id="m1", slot="b")]
    source = view(info("a", State.READY, model="m1"), info("b", State.READY, model="m1"))

    decision = decide("m1", [source], entries)

    assert decision.kind is Kind.ROUTED
    assert decision.tier is Tier.REGISTRY
    assert decision.slot.name == "b"


def test_passthrough_tier_beats_prefetch():
    source = view(info("a", State.OFFLINE), info("b", State.READY, model="m1"),
                  catalog=(cached("m1", "a", "b"),))

    decision = decide("m1", [source])

    assert decision.kind is Kind.ROUTED
    assert decision.tier is Tier.PASSTHROUGH
    assert decision.slot.name == "b"
    assert decision.model == "m1"


def test_passthrough_prefers_fewest_in_flight():
    source = view(info("a", State.READY, model="m1", in_flight=2),
                  info("b", State.READY, model="m1", in_flight=1))

    decision = decide("m1", [source])

    assert decision.slot.name == "b"


def test_prefetch_loads_into_offline_slot():
    source = view(info("a", State.READY, model="other"), info("b", State.OFFLINE),
                  catalog=(cached("Org/M2:q4", "a", "b"),))

    decision = decide("org/m2:Q4", [source])

    assert decision.kind is Kind.LOAD
    assert decision.tier is Tier.PREFETCH
    assert decision.slot.name == "b"
    assert decision.load_model == "Org/M2:q4"
    assert decision.model == "Org/M2:q4"
    assert decision.source == "s1:1"
    assert decision.revision == 7


def test_prefetch_waits_for_slot_loading_it():
    source = view(info("a", State.OFFLINE), info("b", State.WARMING, model="m2"),
                  catalog=(cached("m2", "a", "b"),))

    decision = decide("m2", [source])

    assert decision.kind is Kind.WAIT
    assert decision.tier is Tier.PREFETCH
    assert decision.slot.name == "b"


def test_prefetch_waits_for_slot_restart():
    crashed = info("a", State.ERROR, model="m2", next_retry_at=WALL_NOW + 2.5)
    source = view(crashed, info("b", State.OFFLINE), catalog=(cached("m2", "a", "b"),))

    decision = decide("m2", [source])

    assert decision.kind is Kind.WAIT
    assert decision.slot.name == "a"
    assert decision.retry_after == 2.5


def test_prefetch_failed_slot_gives_failed():
    crashed = info("a", State.ERROR, model="m2", restarts_exhausted=True, message="exited 1")
    source = view(crashed, catalog=(cached("m2", "a"),))

    decision = decide("m2", [source])

    assert decision.kind is Kind.FAILED
    assert decision.slot.name == "a"
    assert "stopped restarting" in decision.message


def test_uncached_model_is_not_found():
    source = view(info("a"), catalog=(cached("m3", "a", present=False),))

    decision = decide("m3", [source])

    assert decision.kind is Kind.NOT_FOUND
    assert "in the catalog of s1:1 but its file is not in the cache" in decision.message


def test_unknown_model_lists_tiers_and_matches():
    entries = [RegistryEntry(id="hermes-4-14b", aliases=("hermes",), slot="a")]
    source = view(info("a", State.READY, model="hermes-4-14b"), catalog=(cached("qwen3-4b", "a"),))

    decision = decide("hermes-4-13b", [source], entries)

    assert decision.kind is Kind.NOT_FOUND
    assert decision.tiers_tried == ("REGISTRY", "PASSTHROUGH", "PREFETCH")
    assert decision.close_matches == ("hermes-4-14b", "hermes")
    assert decision.model == "hermes-4-13b"


def test_alias_gives_canonical_decision():
    entries = [RegistryEntry(id="Kokoro", aliases=("tts-1", "tts-1-hd"), capability="tts")]
    source = view(info("tts", State.READY, "tts", model="kokoro-v1"))

    by_alias = decide("  TTS-1 ", [source], entries)
    by_id = decide("kokoro", [source], entries)

    assert by_alias == by_id
    assert by_alias.model == "Kokoro"
    assert by_alias.capability == "tts"
    assert by_alias.slot.name == "tts"


def test_slot_binding_loads_bound_model():
    entries = [RegistryEntry(id="m2", slot="a")]
    source = view(info("a", State.READY, model="m1"), catalog=(cached("m1", "a"), cached("m2", "a")))

    decision = decide("m2", [source], entries)

    assert decision.kind is Kind.LOAD
    assert decision.tier is Tier.REGISTRY
    assert decision.load_model == "m2"


def test_slot_binding_to_failed_slot():
    entries = [RegistryEntry(id="m1", slot="a")]
    source = view(info("a", State.ERROR, model="m1", restarts_exhausted=True),
                  catalog=(cached("m1", "a"),))

    decision = decide("m1", [source], entries)

    assert decision.kind is Kind.FAILED
    assert decision.tier is Tier.REGISTRY


# -- staleness --------------------------------------------------------------------------


def test_source_within_staleness_still_routes():
    source = view(info("a", State.READY, model="m1"), disconnected_since=NOW - STALENESS + 0.1)

    decision = decide("m1", [source])

    assert decision.kind is Kind.ROUTED


def test_stale_source_gives_unavailable():
    source = view(info("a", State.READY, model="m1"), disconnected_since=NOW - STALENESS - 0.1)

    decision = decide("m1", [source])

    assert decision.kind is Kind.UNAVAILABLE
    assert decision.source == "s1:1"
    assert "slotd s1:1 is unreachable for 5.1 s" in decision.message


def test_stale_registry_slot_gives_unavailable():
    entries = [RegistryEntry(id="m1", slot="a")]
    source = view(info("a", State.READY, model="m1"), disconnected_since=NOW - 60)

    decision = decide("m1", [source], entries)

    assert decision.kind is Kind.UNAVAILABLE
    assert decision.source == "s1:1"


def test_unsynced_source_gives_unavailable():
    source = view(synced=False, disconnected_since=NOW - 1)
    entries = [RegistryEntry(id="m1", slot="a")]

    decision = decide("m1", [source], entries)

    assert decision.kind is Kind.UNAVAILABLE
    assert decision.source == "s1:1"


def test_unknown_model_while_source_unsynced():
    synced = view(info("a", State.READY, model="m1"), address="s1:1")
    unsynced = view(address="s2:2", synced=False, disconnected_since=NOW - 1)

    decision = decide("m9", [synced, unsynced])

    assert decision.kind is Kind.UNAVAILABLE
    assert decision.source == "s2:2"
    assert decision.message == "slotd s2:2 is unreachable for 1.0 s; its slots are not routable until it is back"


def test_route_skips_stale_source():
    stale = view(info("a", State.READY), address="s1:1", disconnected_since=NOW - 60)
    live = view(info("b", State.OFFLINE, default_model="m"), address="s2:2")

    decision = decide_route("chat", [stale, live])

    assert decision.kind is Kind.LOAD
    assert decision.source == "s2:2"
    assert decision.slot.name == "b"


# -- Route ranking ----------------------------------------------------------------------


def test_route_ready_fewest_in_flight_first():
    source = view(info("a", State.READY, in_flight=3, default_for=("chat",)),
                  info("b", State.READY, in_flight=1), info("c", State.READY, in_flight=2))

    assert ranked_names("chat", [source]) == ["b", "c", "a"]


def test_route_ready_default_before_order():
    source = view(info("a", State.READY), info("b", State.READY, default_for=("chat",)),
                  info("c", State.READY))

    assert ranked_names("chat", [source]) == ["b", "a", "c"]


def test_route_groups_ready_loading_startable_error():
    source = view(
        info("err", State.ERROR, default_model="m"),
        info("off", State.OFFLINE, default_model="m", default_for=("chat",)),
        info("warm", State.WARMING, model="m"),
        info("ready", State.READY, in_flight=5),
        info("bare", State.OFFLINE),
    )

    assert ranked_names("chat", [source]) == ["ready", "warm", "off", "err"]


def test_route_declaration_order_across_sources():
    first = view(info("x", State.READY), address="s1:1")
    second = view(info("a", State.READY), address="s2:2")

    assert ranked_names("chat", [first, second]) == ["x", "a"]
    assert decide_route("chat", [first, second]).source == "s1:1"


def test_route_error_only_when_alone():
    failed = info("err", State.ERROR, restarts_exhausted=True, message="exit 1")

    alone = decide_route("chat", [view(failed)])
    with_other = decide_route("chat", [view(failed, info("off", default_model="m"))])

    assert alone.kind is Kind.FAILED
    assert alone.slot.name == "err"
    assert with_other.kind is Kind.LOAD
    assert with_other.slot.name == "off"
    assert with_other.load_model == ""


def test_route_requires_every_label():
    source = view(info("big", State.READY, labels={"size": "large", "gpu": "0"}),
                  info("small", State.OFFLINE, default_model="q", labels={"size": "small", "gpu": "0"}))

    assert ranked_names("chat", [source], {"size": "small", "gpu": "0"}) == ["small"]
    assert ranked_names("chat", [source], {"gpu": "0"}) == ["big", "small"]
    assert ranked_names("chat", [source], {"size": "medium"}) == []


def test_route_unknown_capability_names_known():
    source = view(info("a", State.READY, "chat"), info("e", State.READY, "embed"))

    decision = decide_route("speak", [source])

    assert decision.kind is Kind.NOT_FOUND
    assert decision.known_capabilities == ("chat", "embed")
    assert "offered capabilities: chat, embed" in decision.message


def test_route_labels_unmatched_not_found():
    source = view(info("a", State.READY, labels={"size": "large"}))

    decision = decide_route("chat", [source], {"size": "small"})

    assert decision.kind is Kind.NOT_FOUND
    assert decision.message == "no slot offers 'chat' with labels size=small; slots offering it: a"


# -- listing ----------------------------------------------------------------------------


def test_list_routes_every_tier():
    entries = [RegistryEntry(id="kokoro", aliases=("tts-1",), capability="tts"),
               RegistryEntry(id="gone", slot="missing")]
    source = view(info("tts", State.OFFLINE, "tts", default_model="kokoro"),
                  info("a", State.READY, model="m1"), info("b", State.OFFLINE),
                  catalog=(cached("m1", "a"), cached("m2", "b"), cached("m3", "b", present=False)))

    without = list_routes(Registry(entries), [source], now=NOW, wall_now=WALL_NOW, staleness=STALENESS)
    with_prefetch = list_routes(Registry(entries), [source], now=NOW, wall_now=WALL_NOW,
                                staleness=STALENESS, include_prefetch=True)

    assert [(item.model, item.tier, item.slot) for item in without] == [
        ("kokoro", Tier.REGISTRY, "tts"), ("m1", Tier.PASSTHROUGH, "a"),
    ]
    assert without[0].aliases == ("tts-1",)
    assert [(item.model, item.tier, item.slot) for item in with_prefetch] == [
        ("kokoro", Tier.REGISTRY, "tts"), ("m1", Tier.PASSTHROUGH, "a"), ("m2", Tier.PREFETCH, "b"),
    ]


def test_list_routes_unloaded_binding_offline():
    entries = [RegistryEntry(id="m2", slot="a")]
    source = view(info("a", State.READY, model="m1"),
                  catalog=(cached("m1", "a"), cached("m2", "a")))

    listed = list_routes(Registry(entries), [source], now=NOW, wall_now=WALL_NOW, staleness=STALENESS)

    assert [(item.model, item.slot, item.state) for item in listed] == [
        ("m2", "a", State.OFFLINE), ("m1", "a", State.READY),
    ]
