"""The per-device memory ledger: total, reserved by slots, held by other processes, free.

A slot's reservation is the larger of two values: `reserved_bytes` on its
status (the model it runs or starts) and the pending reservation of a load
that passed admission and has not started yet. Taking the larger value counts
a swap once. While the old model still runs, the new one already has its
place, and nothing else can take that place between the stop and the start.
The table stays the one source of truth for what runs.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

import psutil

from slotroute.configfile import ConfigError
from slotroute.slot.config import DeviceSpec, SlotdConfig
from slotroute.slot.table import SlotTable

logger = logging.getLogger("slotroute.slot")

# sysfs directory of GPUs. AMD cards expose mem_info_vram_total and mem_info_vram_used in it.
DRM_ROOT = pathlib.Path("/sys/class/drm")


class MemoryUnknown(ValueError):
    """A device declared `memory = "auto"` whose memory cannot be read on this machine."""

    def __init__(self, device: str, problem: str):
        super().__init__(f"device {device!r}: {problem}")
        self.device = device
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class DeviceReading:
    """Memory of one device as the machine reports it, in bytes."""

    total: int
    # In use by every process, slotd's backends included.
    used: int


def read_device(device: DeviceSpec, drm_root: pathlib.Path = DRM_ROOT) -> DeviceReading:
    """Read a device's total and used memory. Raises MemoryUnknown when the machine cannot tell."""
    if device.kind == "cpu":
        memory = psutil.virtual_memory()
        return DeviceReading(total=memory.total, used=memory.total - memory.available)
    if device.kind == "amd":
        return _read_amd(device, drm_root)
    if device.kind == "nvidia":
        return _read_nvidia(device)
    raise MemoryUnknown(device.name, f"cannot read the memory of kind {device.kind!r}; declare 'memory'")


def _read_amd(device: DeviceSpec, drm_root: pathlib.Path) -> DeviceReading:
    # Cards in number order (card0, card1, ...). Render nodes and connectors have no VRAM files.
    cards = sorted(
        (path.parent for path in drm_root.glob("card*/device/mem_info_vram_total")),
        key=lambda path: int(re.sub(r"\D", "", path.parent.name) or 0),
    )
    if device.index >= len(cards):
        raise MemoryUnknown(
            device.name,
            f"AMD GPU index {device.index} not found; {len(cards)} cards with "
            f"mem_info_vram_total under {drm_root}; fix 'index' or declare 'memory'",
        )
    card = cards[device.index]
    try:
        total = int((card / "mem_info_vram_total").read_text())
        used = int((card / "mem_info_vram_used").read_text())
    except (OSError, ValueError) as error:
        raise MemoryUnknown(device.name, f"cannot read VRAM of {card}: {error}; declare 'memory'") from None
    return DeviceReading(total=total, used=used)


def _read_nvidia(device: DeviceSpec) -> DeviceReading:
    try:
        import pynvml  # optional: the nvidia-ml-py package
    except ImportError:
        raise MemoryUnknown(
            device.name,
            "memory = 'auto' on NVIDIA needs the nvidia-ml-py package; install it or declare 'memory'",
        ) from None
    try:
        # nvmlInit counts references, so calling it once per reading is safe.
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError as error:
        raise MemoryUnknown(
            device.name, f"NVML failed for GPU index {device.index}: {error}; fix 'index' or declare 'memory'",
        ) from None
    return DeviceReading(total=int(info.total), used=int(info.used))


class Ledger:
    """Accounts device memory for admission decisions.

    Only devices declared `memory = "auto"` are read from the machine; for
    them the ledger also subtracts memory that other processes hold. A
    declared size is taken as the whole budget of slotd's backends.
    """

    def __init__(self, devices: tuple[DeviceSpec, ...], table: SlotTable,
                 totals: dict[str, int] | None = None):
        """`totals` from measure_totals; without it, "auto" devices are read here."""
        self._table = table
        self._pending: dict[str, tuple[str, int]] = {}
        self._devices: dict[str, DeviceSpec] = {}
        self._totals: dict[str, int] = {}
        # "auto" devices whose last reading failed, so the failure is logged once.
        self._unreadable: set[str] = set()
        self.set_devices(devices, totals if totals is not None else read_totals(devices))

    def set_devices(self, devices: tuple[DeviceSpec, ...], totals: dict[str, int]) -> None:
        """Replace the device list and totals (from measure_totals), keeping pending reservations."""
        self._devices = {device.name: device for device in devices}
        self._totals = dict(totals)

    def devices(self) -> list[str]:
        return list(self._devices)

    def total(self, device: str) -> int:
        return self._totals[device]

    def slot_reserved(self, slot: str) -> int:
        status = self._table.get(slot)
        on_status = status.reserved_bytes if status is not None else 0
        _device, pending = self._pending.get(slot, ("", 0))
        return max(on_status, pending)

    def reserved(self, device: str, excluding: str | None = None) -> int:
        """Return the memory reserved on `device` by every slot, or every slot but `excluding`."""
        names = {status.name for status in self._table.all() if status.device == device}
        names.update(slot for slot, (dev, _size) in self._pending.items() if dev == device)
        names.discard(excluding)  # type: ignore[arg-type]
        return sum(self.slot_reserved(name) for name in names)

    def held_by_others(self, device: str) -> int:
        """Return the memory of an "auto" device that processes use outside slot reservations.

        For cpu devices that is the used RAM minus, for each slot, the smaller of
        its reservation and the resident memory of its process tree, so a backend
        still loading is not counted twice. GPUs have no per-process reading
        here, so for them it is the used memory minus every reservation.
        """
        spec = self._devices[device]
        if spec.memory_bytes is not None:
            return 0
        try:
            reading = read_device(spec)
        except MemoryUnknown as error:
            # Read at startup but not now (a driver reset, say): admit on the total alone.
            if device not in self._unreadable:
                logger.warning("%s; counting no memory of other processes until it can be read", error)
                self._unreadable.add(device)
            return 0
        self._unreadable.discard(device)
        if spec.kind != "cpu":
            return max(0, reading.used - self.reserved(device))
        accounted = 0
        for status in self._table.all():
            if status.device == device and status.pid:
                accounted += min(self.slot_reserved(status.name), _tree_rss(status.pid))
        return max(0, reading.used - accounted)

    def free(self, device: str, excluding: str | None = None) -> int:
        """Return the memory left for a new reservation, as if `excluding` held none."""
        return self.total(device) - self.reserved(device, excluding) - self.held_by_others(device)

    def pending(self, slot: str) -> int:
        """Bytes admitted for a load of the slot that has not started yet."""
        return self._pending.get(slot, ("", 0))[1]

    def reserve_pending(self, slot: str, device: str, size: int) -> None:
        self._pending[slot] = (device, size)

    def clear_pending(self, slot: str) -> None:
        self._pending.pop(slot, None)


def measure_totals(config: SlotdConfig) -> dict[str, int]:
    """Return each device's total memory: declared, or read from the machine for "auto".

    Raises ConfigError naming the device entry when an "auto" device cannot be read.
    """
    try:
        return read_totals(config.devices)
    except MemoryUnknown as error:
        raise ConfigError(config.path, f"[[slotd.devices]] name = {error.device!r}", "memory",
                          error.problem) from None


def read_totals(devices: tuple[DeviceSpec, ...]) -> dict[str, int]:
    """Return each device's total memory; raise MemoryUnknown for an unreadable "auto" device."""
    return {
        device.name: device.memory_bytes if device.memory_bytes is not None else read_device(device).total
        for device in devices
    }


def _tree_rss(pid: int) -> int:
    """Return the resident memory of a process and its descendants in bytes, or 0 once it is gone."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in tree:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total
