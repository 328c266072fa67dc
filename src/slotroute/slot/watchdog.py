"""The stall watchdog: reports slotd stalled while a load step runs past its bound.

Every step of a load has a bound of its own (start_timeout, stop_grace,
drain_timeout). A step that runs longer than its bound plus a margin points
to a bug, or to a backend that blocks in a way slotd cannot end. The watchdog
polls a check function, logs each change of the problem list, and calls
`on_change(stalled)` so that slotd can set its gRPC health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from slotroute.slot.admission import Admission
from slotroute.slot.config import SlotdConfig, SlotSpec
from slotroute.slot.loadqueue import LoadQueue
from slotroute.slot.states import LOADING_STATES, State
from slotroute.slot.supervisor import Supervisor
from slotroute.slot.table import SlotTable
from slotroute.slot.timeline import Timeline

logger = logging.getLogger("slotroute.slot")


class Watchdog:
    """Polls `check()` every `interval` seconds. `check` returns one line per stalled step."""

    def __init__(self, interval: float, check: Callable[[], list[str]]):
        self.interval = interval
        self._check = check
        self.problems: list[str] = []
        self.on_change: Callable[[bool], Awaitable[None]] | None = None

    @property
    def stalled(self) -> bool:
        return bool(self.problems)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_now()

    async def check_now(self) -> None:
        """Run the check once. Logs each new problem list and calls `on_change` when the flag flips."""
        problems = self._check()
        was_stalled = self.stalled
        if problems != self.problems:
            if problems:
                logger.error("slotd stalled, health NOT_SERVING: %s", "; ".join(problems))
            else:
                logger.info("slotd no longer stalled, health SERVING")
        self.problems = problems
        if self.stalled != was_stalled and self.on_change is not None:
            await self.on_change(self.stalled)


class LoadPathBounds:
    """The watchdog's check: lists each load step that runs past its bound plus `stall_margin`."""

    def __init__(
        self,
        table: SlotTable,
        timeline: Timeline,
        supervisors: Mapping[str, Supervisor],
        queues: Mapping[str, LoadQueue],
        admission: Admission,
        config: Callable[[], SlotdConfig],
    ):
        self.table = table
        self.timeline = timeline
        self._supervisors = supervisors
        self._queues = queues
        self.admission = admission
        self._config = config

    @property
    def config(self) -> SlotdConfig:
        return self._config()

    def __call__(self) -> list[str]:
        """Describe each load step that runs past its bound plus `stall_margin`.

        A start may take start_timeout + stop_grace, a drain drain_timeout and
        a stop stop_grace. A queue turn may take the steps of a whole swap (see
        _turn_bound), and a device lock one round of evictions.
        """
        margin = self.config.stall_margin
        now = time.time()
        loop_now = asyncio.get_running_loop().time()
        problems = []
        for name, supervisor in self._supervisors.items():
            spec = supervisor.spec
            status = self.table.get(name)
            if spec.external or status is None:
                continue
            if status.state in LOADING_STATES and supervisor.current_start() is not None:
                since = self.timeline.started_at(name) or status.state_since
                bound = spec.start_timeout + spec.stop_grace
                step = f"start of {status.model_id}"
            elif status.state is State.DRAINING:
                since, bound, step = status.state_since, spec.drain_timeout, "drain"
            elif status.state is State.UNLOADING:
                since, bound, step = status.state_since, spec.stop_grace, "stop"
            else:
                since = None
            if since is not None and now - since > bound + margin:
                problems.append(f"slot {name}: {step} began {time.strftime('%H:%M:%S', time.localtime(since))} "
                                f"and is past its bound of {bound:g} s + stall_margin {margin:g} s")

            busy_since = self._queues[name].busy_since
            turn_bound = self._turn_bound(spec)
            if busy_since is not None and loop_now - busy_since > turn_bound + margin:
                problems.append(f"slot {name}: load queue turn held past its bound of {turn_bound:g} s "
                                f"+ stall_margin {margin:g} s")

        for device, since in self.admission.lock_held_since.items():
            bound = self._eviction_bound(device)
            if loop_now - since > bound + margin:
                problems.append(f"device {device}: admission lock held past its bound of {bound:g} s "
                                f"+ stall_margin {margin:g} s")
        return problems

    def _eviction_bound(self, device: str) -> float:
        """Return the seconds one round of evictions on a device may take: the slowest drain and stop."""
        bounds = [spec.drain_timeout + spec.stop_grace for spec in self.config.slots
                  if spec.device == device and not spec.external]
        return max(bounds, default=0.0)

    def _turn_bound(self, spec: SlotSpec) -> float:
        """Return the seconds a queue turn may take: wait for and run admission, swap out, start.

        An upper estimate: a load that waits behind several admissions on its
        device can take longer without being stuck.
        """
        swap_out = spec.drain_timeout + spec.stop_grace
        start = spec.start_timeout + spec.stop_grace
        return 2 * self._eviction_bound(spec.device) + swap_out + start
