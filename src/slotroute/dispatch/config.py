"""The dispatcher's config: slotd sources, waiting limits and the model registry, from TOML.

The dispatcher reads `[dispatcher]` and its array `[[dispatcher.models]]`.
When the same file also contains a `[slotd]` section, registry bindings are
checked against its slots and capabilities at load time.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from slotroute.configfile import ConfigError, Fields, check_sections, load_toml
from slotroute.ids import InvalidModelId, check_model_id, model_key
from slotroute.netaddr import parse_listen
from slotroute.opsconfig import (
    DISPATCHER_METRICS_LISTEN,
    ClientTls,
    ServerOps,
    TokenSource,
    read_client_tls,
    read_server_ops,
    read_token_source,
)

STANDARD_CAPABILITIES = ("chat", "embed", "rerank", "stt", "tts", "image", "vision")


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A model id with its aliases, bound to a slot or to a capability."""

    id: str
    aliases: tuple[str, ...] = ()
    # Exactly one of slot and capability is set.
    slot: str = ""
    capability: str = ""
    # For slot bindings with several sources: the slotd address that owns the slot.
    source: str = ""
    # For capability bindings: labels the chosen slot must carry.
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    # Declaration order, for listings.
    order: int = 0


@dataclasses.dataclass(frozen=True)
class DispatcherConfig:
    path: pathlib.Path | None
    listen: str
    sources: tuple[str, ...]
    entries: tuple[RegistryEntry, ...]
    capabilities: tuple[str, ...] = STANDARD_CAPABILITIES
    # Seconds a source may stay disconnected before its slots become unroutable.
    staleness: float = 10.0
    # Upper bound in seconds on how long one Resolve or Route waits for a load.
    max_wait: float = 120.0
    reconnect_backoff: float = 0.2
    reconnect_backoff_max: float = 5.0
    # Seconds a Resolve without its own deadline may wait (bounded by max_wait).
    default_wait: float = 60.0
    # Seconds a watch stream may go without any event (heartbeats included)
    # before it counts as lost; must exceed slotd's heartbeat_interval.
    watch_timeout: float = 15.0
    # Metrics endpoint, TLS, token and bind settings (see slotroute.opsconfig).
    ops: ServerOps = ServerOps()
    # TLS and bearer token for the dispatcher's own calls to slotd.
    slotd_tls: ClientTls | None = None
    slotd_token: TokenSource | None = None


def load_dispatcher_config(
    path: str | pathlib.Path,
    listen: str | None = None,
    sources: tuple[str, ...] | list[str] | None = None,
) -> DispatcherConfig:
    """Load and validate the `[dispatcher]` section; `listen` and `sources` override it."""
    path = pathlib.Path(path)
    document = load_toml(path)
    check_sections(path, document)
    if "dispatcher" not in document:
        raise ConfigError(path, "[dispatcher]", None, "section missing; add a [dispatcher] table")
    section = Fields(path, "dispatcher", document["dispatcher"])

    # Read the configured address even when overridden, so finish() does not report it unknown.
    configured_listen = section.string("listen", "127.0.0.1:50052")
    listen = listen or configured_listen
    try:
        parse_listen(listen)
    except ValueError as error:
        raise section.error("listen", str(error)) from None

    configured = section.string_list("slotd", ())
    chosen = tuple(sources) if sources else configured
    if not chosen:
        chosen = (_slotd_listen(document) or "127.0.0.1:50051",)
    for index, address in enumerate(chosen):
        try:
            parse_listen(address)
        except ValueError as error:
            raise section.error(f"slotd[{index}]", str(error)) from None

    facts = _slotd_facts(document)
    extra = section.string_list("capabilities", ())
    slot_capabilities = facts.capabilities if facts else []
    capabilities = tuple(dict.fromkeys((*STANDARD_CAPABILITIES, *slot_capabilities, *extra)))

    entries = tuple(
        _entry(fields, index, facts, capabilities, chosen)
        for index, fields in enumerate(section.tables("models", "id"))
    )
    _check_names(entries, path)

    config = DispatcherConfig(
        path=path,
        listen=listen,
        sources=chosen,
        entries=entries,
        capabilities=capabilities,
        staleness=section.seconds("staleness", 10.0, minimum=0.01),
        max_wait=section.seconds("max_wait", 120.0, minimum=0.01),
        reconnect_backoff=section.seconds("reconnect_backoff", 0.2, minimum=0.001),
        reconnect_backoff_max=section.seconds("reconnect_backoff_max", 5.0, minimum=0.001),
        default_wait=section.seconds("default_wait", 60.0, minimum=0.01),
        watch_timeout=section.seconds("watch_timeout", 15.0, minimum=0.01),
        ops=read_server_ops(section, metrics_default=DISPATCHER_METRICS_LISTEN),
        slotd_tls=read_client_tls(section.table_of("slotd_tls")),
        slotd_token=read_token_source(section, "slotd_token_file", "slotd_token_env"),
    )
    _check_watch_timeout(config, document, section)
    section.finish()
    return config


def _check_watch_timeout(config: DispatcherConfig, document: dict[str, Any], section: Fields) -> None:
    """Reject a watch_timeout that would drop idle streams of the [slotd] in the same file.

    slotd sends a heartbeat every heartbeat_interval seconds (default 5) on an
    idle stream. Without a [slotd] section the interval is unknown here.
    """
    slotd = document.get("slotd")
    if not isinstance(slotd, dict):
        return
    heartbeat = slotd.get("heartbeat_interval", 5.0)
    if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool):
        return
    if config.watch_timeout <= 2 * heartbeat:
        raise section.error(
            "watch_timeout",
            f"{config.watch_timeout:g} s is not more than twice [slotd] heartbeat_interval "
            f"({heartbeat:g} s), so idle watch streams would be dropped; raise it above "
            f"{2 * heartbeat:g} s",
        )


def _slotd_listen(document: dict[str, Any]) -> str | None:
    slotd = document.get("slotd")
    if isinstance(slotd, dict) and isinstance(slotd.get("listen"), str):
        return slotd["listen"]
    return None


@dataclasses.dataclass(frozen=True)
class _SlotdFacts:
    """Slots, catalog and capabilities of a [slotd] section in the same file, to check bindings."""

    # Slot name -> whether the slot is external (models are not loaded by slotd).
    slots: dict[str, bool]
    # Slot name -> matching keys of the catalog models that slot may load, its default included.
    loadable: dict[str, set[str]]
    capabilities: list[str]


def _slotd_facts(document: dict[str, Any]) -> _SlotdFacts | None:
    """Read slots, capabilities and catalog from a [slotd] section in the same file, if any."""
    slotd = document.get("slotd")
    if not isinstance(slotd, dict) or not isinstance(slotd.get("slots"), list):
        return None
    facts = _SlotdFacts(slots={}, loadable={}, capabilities=[])
    for slot in slotd["slots"]:
        if not isinstance(slot, dict) or not isinstance(slot.get("name"), str):
            continue
        facts.slots[slot["name"]] = bool(slot.get("external_url"))
        facts.loadable[slot["name"]] = set()
        if isinstance(slot.get("default_model"), str):
            facts.loadable[slot["name"]].add(model_key(slot["default_model"]))
        for capability in slot.get("capabilities") or ():
            if isinstance(capability, str):
                facts.capabilities.append(capability)
    for model in slotd.get("models") or ():
        if not isinstance(model, dict) or not isinstance(model.get("id"), str):
            continue
        for name in model.get("slots") or ():
            if isinstance(name, str) and name in facts.loadable:
                facts.loadable[name].add(model_key(model["id"]))
    return facts


def _entry(
    fields: Fields,
    index: int,
    facts: _SlotdFacts | None,
    capabilities: tuple[str, ...],
    sources: tuple[str, ...],
) -> RegistryEntry:
    model_id = _model_id(fields, "id", fields.string("id"))
    aliases = tuple(
        _model_id(fields, f"aliases[{number}]", alias)
        for number, alias in enumerate(fields.string_list("aliases", ()))
    )

    slot = fields.string("slot", "")
    capability = fields.string("capability", "")
    if bool(slot) == bool(capability):
        raise fields.error(
            "slot", "set exactly one of 'slot' (a named slot) and 'capability' (any slot doing that work)"
        )
    if slot and facts is not None:
        _check_slot_binding(fields, model_id, slot, facts)
    if capability and capability not in capabilities:
        raise fields.error(
            "capability",
            f"unknown capability {capability!r}; known: {', '.join(capabilities)} "
            "(add others to [dispatcher] capabilities)",
        )

    source = fields.string("source", "")
    if source and source not in sources:
        raise fields.error("source", f"unknown source {source!r}; configured slotd: {', '.join(sources)}")

    entry = RegistryEntry(
        id=model_id,
        aliases=aliases,
        slot=slot,
        capability=capability,
        source=source,
        labels=fields.string_map("labels", {}),
        order=index,
    )
    if entry.labels and not capability:
        raise fields.error("labels", "labels apply to capability bindings only")
    fields.finish()
    return entry


def _check_slot_binding(fields: Fields, model_id: str, slot: str, facts: _SlotdFacts) -> None:
    """The slot must exist and, unless external, be able to load the model under its id."""
    if slot not in facts.slots:
        known = ", ".join(sorted(facts.slots)) or "none declared"
        raise fields.error("slot", f"unknown slot {slot!r}; slots in [slotd]: {known}")
    if facts.slots[slot] or model_key(model_id) in facts.loadable[slot]:
        return
    raise fields.error(
        "id",
        f"slot {slot!r} cannot load a model with id {model_id!r}: no [[slotd.models]] entry "
        "with that id lists the slot; use the catalog id as 'id' and put "
        f"{model_id!r} in 'aliases', or bind the id to a capability",
    )


def _model_id(fields: Fields, field: str, value: str) -> str:
    try:
        return check_model_id(value)
    except InvalidModelId as error:
        raise fields.error(field, str(error)) from None


def _check_names(entries: tuple[RegistryEntry, ...], path: pathlib.Path) -> None:
    """Every id and alias must be unique under the id rule (case and whitespace ignored)."""
    owners: dict[str, tuple[RegistryEntry, str, str]] = {}
    for entry in entries:
        names = [("id", entry.id)] + [(f"aliases[{i}]", alias) for i, alias in enumerate(entry.aliases)]
        for field, name in names:
            key = model_key(name)
            if key in owners:
                other, other_field, other_name = owners[key]
                where = "this entry" if other is entry else f"entry #{other.order + 1} ({other.id!r})"
                raise ConfigError(
                    path, f"[[dispatcher.models]] id = {entry.id!r}", field,
                    f"{name!r} is already used by {where} as its {other_field} {other_name!r}; "
                    "ids and aliases match ignoring case and surrounding whitespace, so remove "
                    "or rename one",
                )
            owners[key] = (entry, field, name)
