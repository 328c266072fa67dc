"""The difference between the running config and a new one: which slots a reload touches."""

from __future__ import annotations

import dataclasses

from slotroute.slot.config import ModelSpec, SlotdConfig, SlotSpec
from slotroute.slot.table import SlotTable


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """Slot names by what a reload does to them, each list in config order."""

    added: list[str]
    removed: list[str]
    # Definition changed, or the catalog entry of the model the slot runs did.
    changed: list[str]
    unchanged: list[str]


def plan_reload(old: SlotdConfig, new: SlotdConfig, table: SlotTable) -> ReloadPlan:
    """Compare two configs. `table` provides the model each slot runs now."""
    old_specs = {spec.name: spec for spec in old.slots}
    new_specs = {spec.name: spec for spec in new.slots}
    removed = [name for name in old_specs if name not in new_specs]
    added = [name for name in new_specs if name not in old_specs]
    changed = [name for name in new_specs
               if name in old_specs and _slot_changed(name, old_specs[name], new_specs[name], old, new, table)]
    unchanged = [name for name in new_specs
                 if name in old_specs and name not in changed]
    return ReloadPlan(added=added, removed=removed, changed=changed, unchanged=unchanged)


def _slot_changed(name: str, old: SlotSpec, new: SlotSpec, old_config: SlotdConfig,
                  new_config: SlotdConfig, table: SlotTable) -> bool:
    if old != new:
        return True
    status = table.get(name)
    model_id = status.model_id if status is not None else ""
    if old.external or not model_id:
        return False
    return _launch_fields(old_config.model(model_id), name) != _launch_fields(new_config.model(model_id), name)


def _launch_fields(model: ModelSpec | None, slot: str) -> tuple | None:
    """Return the parts of a catalog entry that change how a slot runs the model."""
    if model is None or slot not in model.slots:
        return None
    return model.path, model.memory_bytes, model.args
