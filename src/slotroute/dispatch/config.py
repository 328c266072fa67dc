"""The dispatcher's config: slotd sources, waiting limits and the model registry, from TOML.

The dispatcher reads `[dispatcher]` and its array `[[dispatcher.models]]`.
When the same file also holds a `[slotd]` section, registry bindings are
checked against its slots and capabilities at load time.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from slotroute.configfile import ConfigError, Fields, load_toml
from slotroute.ids import InvalidModelId, check_model_id, model_key
from slotroute.netaddr import parse_listen

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


def load_dispatcher_config(
    path: str | pathlib.Path,
    listen: str | None = None,
    sources: tuple[str, ...] | list[str] | None = None,
) -> DispatcherConfig:
    """Load and validate the `[dispatcher]` section; `listen` and `sources` override it."""
    path = pathlib.Path(path)
    document = load_toml(path)
    if "dispatcher" not in document:
        raise ConfigError(path, "[dispatcher]", None, "section missing; add a [dispatcher] table")
    section = Fields(path, "dispatcher", document["dispatcher"])

    listen = listen or section.string("listen", "127.0.0.1:50052")
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

    slot_names, slot_capabilities = _slotd_facts(document)
    extra = section.string_list("capabilities", ())
    capabilities = tuple(dict.fromkeys((*STANDARD_CAPABILITIES, *slot_capabilities, *extra)))

    entries = tuple(
        _entry(fields, index, slot_names, capabilities, chosen)
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
    )
    section.finish()
    return config


def _slotd_listen(document: dict[str, Any]) -> str | None:
    slotd = document.get("slotd")
    if isinstance(slotd, dict) and isinstance(slotd.get("listen"), str):
        return slotd["listen"]
    return None


def _slotd_facts(document: dict[str, Any]) -> tuple[set[str] | None, list[str]]:
    """Slot names and capabilities from a [slotd] section in the same file, if any."""
    slotd = document.get("slotd")
    if not isinstance(slotd, dict) or not isinstance(slotd.get("slots"), list):
        return None, []
    names: set[str] = set()
    capabilities: list[str] = []
    for slot in slotd["slots"]:
        if isinstance(slot, dict):
            if isinstance(slot.get("name"), str):
                names.add(slot["name"])
            for capability in slot.get("capabilities") or ():
                if isinstance(capability, str):
                    capabilities.append(capability)
    return names, capabilities


def _entry(
    fields: Fields,
    index: int,
    slot_names: set[str] | None,
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
    if slot and slot_names is not None and slot not in slot_names:
        known = ", ".join(sorted(slot_names)) or "none declared"
        raise fields.error("slot", f"unknown slot {slot!r}; slots in [slotd]: {known}")
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


def _model_id(fields: Fields, field: str, value: str) -> str:
    try:
        return check_model_id(value)
    except InvalidModelId as error:
        raise fields.error(field, str(error)) from None


def _check_names(entries: tuple[RegistryEntry, ...], path: pathlib.Path) -> None:
    """Every id and alias must be unique under the id rule (case and whitespace ignored)."""
    owners: dict[str, tuple[str, str]] = {}
    for entry in entries:
        names = [("id", entry.id)] + [(f"aliases[{i}]", alias) for i, alias in enumerate(entry.aliases)]
        for field, name in names:
            key = model_key(name)
            if key in owners:
                other_entry, other_name = owners[key]
                what = "an id" if other_entry == entry.id else f"entry {other_entry!r}"
                raise ConfigError(
                    path, f"[[dispatcher.models]] id = {entry.id!r}", field,
                    f"{name!r} is already used by {what} as {other_name!r} (ids and aliases "
                    "ignore case and surrounding whitespace); remove or rename one",
                )
            owners[key] = (entry.id, name)
