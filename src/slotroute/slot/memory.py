"""The per-device memory ledger: total, reserved by slots, held by other processes, free.

Reservations live on the slot statuses (`reserved_bytes`) plus the pending
reservations of loads that passed admission and have not started yet, so the
table stays the one source of truth.
"""

from __future__ import annotations

import glob
import pathlib

import psutil

from slotroute.slot.config import DeviceSpec
from slotroute.slot.table import SlotTable


def detect_total(device: DeviceSpec) -> int:
    """Read a device's total memory from the machine; raise RuntimeError if unknown."""
    if device.kind == "cpu":
        return psutil.virtual_memory().total
    if device.kind == "amd":
        totals = [int(pathlib.Path(path).read_text()) for path in
                  glob.glob("/sys/class/drm/card*/device/mem_info_vram_total")]
        if totals:
            return max(totals)
        raise RuntimeError(f"device {device.name!r}: no AMD GPU memory found in sysfs; declare 'memory'")
    if device.kind == "nvidia":
        try:
            import pynvml  # optional: nvidia-ml-py
        except ImportError:
            raise RuntimeError(
                f"device {device.name!r}: memory = 'auto' on NVIDIA needs the nvidia-ml-py package; "
                "install it or declare 'memory'"
            ) from None
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    raise RuntimeError(f"device {device.name!r}: cannot detect memory of kind {device.kind!r}; declare 'memory'")


class Ledger:
    """Accounts device memory for admission decisions."""

    def __init__(self, devices: tuple[DeviceSpec, ...], table: SlotTable):
        self._table = table
        self._devices = {device.name: device for device in devices}
        self._totals: dict[str, int] = {}
        for device in devices:
            self._totals[device.name] = (
                device.memory_bytes if device.memory_bytes is not None else detect_total(device)
            )
        self._pending: dict[str, tuple[str, int]] = {}

    def devices(self) -> list[str]:
        return list(self._devices)

    def total(self, device: str) -> int:
        return self._totals[device]

    def reserved(self, device: str) -> int:
        on_slots = sum(status.reserved_bytes for status in self._table.all() if status.device == device)
        pending = sum(size for dev, size in self._pending.values() if dev == device)
        return on_slots + pending

    def held_by_others(self, device: str) -> int:
        """Memory used by processes slotd does not account, for devices declared 'auto'.

        NOTE: only the cpu kind is measured (used RAM minus what slots reserved,
        never below zero); for GPUs this is 0 until a per-process reading exists.
        """
        spec = self._devices[device]
        if spec.memory_bytes is not None or spec.kind != "cpu":
            return 0
        memory = psutil.virtual_memory()
        used = memory.total - memory.available
        return max(0, used - self.reserved(device))

    def free(self, device: str) -> int:
        return self.total(device) - self.reserved(device) - self.held_by_others(device)

    def reserve_pending(self, slot: str, device: str, size: int) -> None:
        self._pending[slot] = (device, size)

    def clear_pending(self, slot: str) -> None:
        self._pending.pop(slot, None)
