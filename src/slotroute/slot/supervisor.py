"""Process lifecycle of one slot: launch, probe, watch for exit, stop, restart with backoff.

A Supervisor owns at most one backend process at a time. Its states move only
through SlotTable.transition, so a task that lost a race (a probe answering
after a stop began) sees the swap fail and gives up instead of overwriting.

Invariants:
- whoever sees STARTING or WARMING may wait on `current_start()`: every caller
  joins the one start in progress, none launches a second;
- ERROR means no process runs: the child and its process group are killed
  before the slot reports ERROR;
- only `stop()` moves a slot to UNLOADING, and it holds `_lifecycle` until
  the slot is OFFLINE, so a start never overlaps a stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import os
import random
import signal
import sys
import time

from slotroute.slot import probes
from slotroute.slot.config import SlotSpec
from slotroute.slot.ports import NoFreePort, PortAllocator, port_is_free
from slotroute.slot.states import LOADING_STATES, Reason, State
from slotroute.slot.table import Failure, SlotStatus, SlotTable

logger = logging.getLogger("slotroute.slot")

_PR_SET_PDEATHSIG = 1
_PORT_FREE_TIMEOUT = 2.0
_STDERR_DRAIN_TIMEOUT = 0.5
# A slot that stayed READY this long has its restart count reset by the next crash.
_STABLE_AFTER = 60.0


@dataclasses.dataclass(frozen=True)
class Launch:
    """What to run in a slot: the catalog model and the memory reserved for it."""

    model_id: str
    model_path: str
    args: tuple[str, ...] = ()
    reserved_bytes: int = 0


class StartFailed(Exception):
    """A start that ended in ERROR or was stopped before READY."""

    def __init__(self, status: SlotStatus):
        super().__init__(status.message)
        self.status = status


def _parent_death_signal_setter():
    """Build a preexec function that makes the child get SIGKILL when slotd dies.

    The libc lookup happens here, in the parent, so that the child only makes
    one system call between fork and exec.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_parent_death_signal


def render(template: str, values: dict[str, str]) -> str:
    """Fill {port}, {model_id}, ... placeholders; the config loader checked their names."""
    return template.format_map(values)


class Supervisor:
    """Runs the backend process of one slot."""

    def __init__(
        self,
        spec: SlotSpec,
        table: SlotTable,
        ports: PortAllocator,
        *,
        stderr_tail_lines: int = 20,
        stable_after: float = _STABLE_AFTER,
    ):
        self.spec = spec
        self.name = spec.name
        self._table = table
        self._ports = ports
        self._tail_lines = stderr_tail_lines
        self._stable_after = stable_after
        self._lifecycle = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self._exit_wait: asyncio.Task[int] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stderr_pump: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[SlotStatus] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._launch: Launch | None = None
        self._stopping_generation = -1
        self._ready_since: float | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=stderr_tail_lines)

    @property
    def status(self) -> SlotStatus:
        status = self._table.get(self.name)
        assert status is not None
        return status

    @property
    def launch(self) -> Launch | None:
        return self._launch

    def current_start(self) -> asyncio.Future[SlotStatus] | None:
        """Return the start in progress, which callers may await, or None."""
        if self._ready is not None and not self._ready.done():
            return self._ready
        return None

    def retry_pending(self) -> bool:
        return self._retry_task is not None and not self._retry_task.done()

    # -- start ---------------------------------------------------------------

    async def start(self, launch: Launch, reason: Reason) -> SlotStatus:
        """Launch the backend for `launch` and return once it is READY.

        The slot must be OFFLINE or ERROR. Raises StartFailed when the start
        ends in ERROR or is stopped first.
        """
        future = await self.begin_start(launch, reason)
        return await asyncio.shield(future)

    async def begin_start(self, launch: Launch, reason: Reason) -> asyncio.Future[SlotStatus]:
        """Launch the backend and return the future that resolves at READY."""
        self._cancel_retry()
        async with self._lifecycle:
            return await self._launch_process(launch, reason)

    async def _launch_process(self, launch: Launch, reason: Reason) -> asyncio.Future[SlotStatus]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SlotStatus] = loop.create_future()
        # A joiner that gives up must not leave "exception never retrieved" noise.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._ready = future
        self._launch = launch
        previous = self.status
        restart_count = previous.failure.restart_count if previous.failure else 0

        # Validate: a port from the range, free right now.
        try:
            port = self._ports.allocate(self.name, self.spec.host)
        except NoFreePort as error:
            self._fail_before_launch(future, previous, launch, reason, str(error), restart_count)
            return future

        # Swap to STARTING with the new generation, model and endpoint.
        generation = previous.generation + 1
        values = {
            "port": str(port),
            "host": self.spec.host,
            "model_id": launch.model_id,
            "model_path": launch.model_path,
            "slot": self.name,
            "device": self.spec.device,
            "python": sys.executable,
        }
        argv = [render(part, values) for part in (*self.spec.command, *launch.args)]
        env = {**os.environ, **{key: render(value, values) for key, value in self.spec.env.items()}}
        host = f"[{self.spec.host}]" if ":" in self.spec.host else self.spec.host
        started = self._table.transition(
            self.name, (State.OFFLINE, State.ERROR), State.STARTING,
            reason=reason,
            message=f"starting {launch.model_id} on port {port}",
            model_id=launch.model_id,
            port=port,
            endpoint_url=f"http://{host}:{port}",
            pid=0,
            generation=generation,
            reserved_bytes=launch.reserved_bytes,
            failure=dataclasses.replace(previous.failure, next_retry_at=None)
            if previous.failure else None,
        )
        if started is None:
            self._ports.release(port)
            future.set_exception(StartFailed(self.status))
            return future

        # Launch without a shell, in a new process group that dies with slotd.
        self._tail = collections.deque(maxlen=self._tail_lines)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=_parent_death_signal_setter(),
            )
        except OSError as error:
            self._ports.release(port)
            message = f"cannot launch {argv[0]!r}: {error.strerror or error}; check the slot's command"
            self._fail(generation, Reason.LAUNCH_FAILED, message, None, None, restart_count)
            return future

        logger.debug("slot=%s generation=%d launched pid=%d argv=%s",
                     self.name, generation, process.pid, argv)
        self._process = process
        self._exit_wait = asyncio.create_task(process.wait())
        self._table.update(self.name, pid=process.pid)
        self._run_task = asyncio.create_task(
            self._run(process, generation, port), name=f"slot-{self.name}-{generation}"
        )
        return future

    def _fail_before_launch(
        self,
        future: asyncio.Future[SlotStatus],
        previous: SlotStatus,
        launch: Launch,
        reason: Reason,
        message: str,
        restart_count: int,
    ) -> None:
        # No process was spawned: go through STARTING so the stream shows the attempt.
        generation = previous.generation + 1
        self._table.transition(
            self.name, (State.OFFLINE, State.ERROR), State.STARTING,
            reason=reason, message=f"starting {launch.model_id}",
            model_id=launch.model_id, generation=generation,
            reserved_bytes=launch.reserved_bytes,
        )
        self._fail(generation, Reason.LAUNCH_FAILED, message, None, None, restart_count)

    async def _run(self, process: asyncio.subprocess.Process, generation: int, port: int) -> None:
        assert process.stderr is not None and process.stdout is not None
        pumps = [
            asyncio.create_task(self._pump(process.stderr, generation, keep=True)),
            asyncio.create_task(self._pump(process.stdout, generation, keep=False)),
        ]
        self._stderr_pump = pumps[0]
        try:
            if await self._await_ready(process, generation, port):
                await self._watch_ready(process, generation, port)
        finally:
            if self._exit_wait is not None and self._exit_wait.done():
                await asyncio.wait(pumps, timeout=_STDERR_DRAIN_TIMEOUT)
            for pump in pumps:
                pump.cancel()

    async def _pump(self, stream: asyncio.StreamReader, generation: int, keep: bool) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if keep:
                self._tail.append(text)
            logger.debug("slot=%s generation=%d %s: %s",
                         self.name, generation, "stderr" if keep else "stdout", text)

    async def _await_ready(self, process: asyncio.subprocess.Process, generation: int, port: int) -> bool:
        """Probe until READY; return False when the start failed or was stopped."""
        assert self._exit_wait is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.start_timeout
        detail = "no answer yet"
        while True:
            if self._exit_wait.done():
                await self._on_exit(process, generation, during_start=True)
                return False

            result, detail = await probes.probe(self.spec.probe, self.spec.host, port)
            if not self._is_current(generation) or self.status.state not in LOADING_STATES:
                return False
            if result is probes.ProbeResult.READY:
                owner = probes.listener_pid(process.pid, port)
                if owner is None:
                    result = probes.ProbeResult.NOT_READY
                    detail = (f"port {port} answered, but process {process.pid} does not listen "
                              "on it; another program holds the port")
            if result is probes.ProbeResult.READY:
                ready = self._table.transition(
                    self.name, LOADING_STATES, State.READY,
                    reason=Reason.PROBE, message=f"ready: {detail}",
                )
                if ready is not None:
                    self._ready_since = time.monotonic()
                    self._resolve(ready)
                    return True
                return False
            if result is probes.ProbeResult.NOT_READY and self.status.state is State.STARTING:
                self._table.transition(
                    self.name, State.STARTING, State.WARMING,
                    reason=Reason.PROBE, message=f"warming: {detail}",
                )

            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._kill_for_failure(process, generation)
                message = f"not ready after {self.spec.start_timeout:g} s (last probe: {detail})"
                self._fail(generation, Reason.START_TIMEOUT, message, None, None,
                           self._failures_so_far())
                return False
            await asyncio.wait([self._exit_wait], timeout=min(self.spec.probe.interval, remaining))

    async def _watch_ready(self, process: asyncio.subprocess.Process, generation: int, port: int) -> None:
        """Watch a started backend: exit at once, probe answers at the ready interval."""
        assert self._exit_wait is not None
        failures = 0
        while True:
            await asyncio.wait([self._exit_wait], timeout=self.spec.probe.ready_interval)
            if self._exit_wait.done():
                await self._on_exit(process, generation, during_start=False)
                return
            if not self._is_current(generation):
                return
            state = self.status.state
            if state not in (State.READY, State.WARMING):
                continue

            result, detail = await probes.probe(self.spec.probe, self.spec.host, port)
            if not self._is_current(generation):
                return
            if result is probes.ProbeResult.READY:
                failures = 0
                self._table.transition(self.name, State.WARMING, State.READY,
                                       reason=Reason.PROBE, message=f"ready again: {detail}")
                continue
            failures += 1
            if failures >= self.spec.probe.failure_threshold:
                self._table.transition(
                    self.name, State.READY, State.WARMING, reason=Reason.PROBE,
                    message=f"not ready: {failures} probes failed, last: {detail}",
                )

    async def _on_exit(self, process: asyncio.subprocess.Process, generation: int, during_start: bool) -> None:
        if self._stopping_generation == generation or not self._is_current(generation):
            return  # stop() owns the state of a process it is stopping.
        code = process.returncode
        assert code is not None
        # Kill what is left of the group, then let the last stderr lines arrive.
        _kill_group(process.pid, signal.SIGKILL)
        if self._stderr_pump is not None:
            await asyncio.wait([self._stderr_pump], timeout=_STDERR_DRAIN_TIMEOUT)
        if not self._is_current(generation):
            return

        exit_code = code if code >= 0 else None
        signal_number = -code if code < 0 else None
        if signal_number is not None:
            what = f"killed by {_signal_name(signal_number)}"
        else:
            what = f"exited with code {code}"
        when = "while starting" if during_start else "unexpectedly"
        message = f"backend {what} {when}"
        if self._tail:
            message += f"; last stderr line: {self._tail[-1]}"
        reason = Reason.LAUNCH_FAILED if during_start else Reason.CRASHED
        self._fail(generation, reason, message, exit_code, signal_number, self._failures_so_far())

    def _failures_so_far(self) -> int:
        status = self.status
        count = status.failure.restart_count if status.failure else 0
        if self._ready_since is not None and time.monotonic() - self._ready_since >= self._stable_after:
            count = 0
        return count

    def _fail(
        self,
        generation: int,
        reason: Reason,
        message: str,
        exit_code: int | None,
        signal_number: int | None,
        failures_before: int,
    ) -> None:
        """Move the slot to ERROR, schedule a restart if any remain, and fail the waiters."""
        status = self.status
        if status.generation != generation:
            return
        restart_count = failures_before + 1
        exhausted = restart_count > self.spec.max_restarts
        next_retry_at = None
        delay = 0.0
        if not exhausted:
            delay = min(
                self.spec.restart_backoff_max,
                self.spec.restart_backoff * 2 ** (restart_count - 1),
            ) * random.uniform(0.8, 1.2)
            next_retry_at = time.time() + delay
        else:
            message += f"; {self.spec.max_restarts} restarts spent, load the slot again to retry"

        failure = Failure(
            exit_code=exit_code,
            signal=signal_number,
            stderr_tail=tuple(self._tail),
            restart_count=restart_count,
            next_retry_at=next_retry_at,
            restarts_exhausted=exhausted,
        )
        if status.port:
            self._ports.release(status.port)
        failed = self._table.transition(
            self.name, (State.STARTING, State.WARMING, State.READY, State.DRAINING), State.ERROR,
            reason=reason, message=message, failure=failure, pid=0,
            reserved_bytes=0 if exhausted else status.reserved_bytes,
        )
        self._process = None
        self._ready_since = None
        if failed is None:
            return
        self._resolve_error(failed)
        if next_retry_at is not None and self._launch is not None:
            self._retry_task = asyncio.create_task(self._retry_later(self._launch, delay))

    async def _retry_later(self, launch: Launch, delay: float) -> None:
        await asyncio.sleep(delay)
        self._retry_task = None
        if self.status.state is not State.ERROR:
            return
        with contextlib.suppress(StartFailed):
            await self.start(launch, Reason.RESTART)

    def _cancel_retry(self) -> None:
        task = self._retry_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._retry_task = None

    # -- stop ----------------------------------------------------------------

    async def stop(self, reason: Reason, message: str) -> SlotStatus:
        """Stop the backend: SIGTERM to its group, SIGKILL after the grace period.

        Returns once the process has exited and its port is free, with the slot
        OFFLINE. A slot in ERROR goes OFFLINE and its pending restart is cancelled.
        """
        self._cancel_retry()
        async with self._lifecycle:
            status = self.status
            if status.state is State.OFFLINE:
                return status
            if status.state is State.ERROR:
                offline = self._table.transition(
                    self.name, State.ERROR, State.OFFLINE, reason=reason, message=message,
                    reserved_bytes=0, endpoint_url="", port=0, model_id="",
                )
                return offline or self.status

            # Swap to UNLOADING: from here on the run task gives up on every swap.
            generation = status.generation
            self._stopping_generation = generation
            self._table.transition(
                self.name,
                (State.STARTING, State.WARMING, State.READY, State.DRAINING),
                State.UNLOADING,
                reason=reason, message=message,
            )
            self._resolve_error(self.status)

            # Terminate the group, then wait for the port to be released.
            process = self._process
            if process is not None:
                await self._terminate(process)
            if self._run_task is not None:
                self._run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run_task
            if status.port:
                await self._wait_port_free(status.port)
                self._ports.release(status.port)

            self._process = None
            self._ready_since = None
            offline = self._table.transition(
                self.name, State.UNLOADING, State.OFFLINE, reason=reason, message=message,
                pid=0, endpoint_url="", port=0, model_id="", reserved_bytes=0,
            )
            return offline or self.status

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        assert self._exit_wait is not None
        _kill_group(process.pid, signal.SIGTERM)
        done, _ = await asyncio.wait([self._exit_wait], timeout=self.spec.stop_grace)
        if not done:
            logger.warning("slot=%s pid=%d still running %.1f s after SIGTERM; sending SIGKILL",
                           self.name, process.pid, self.spec.stop_grace)
            _kill_group(process.pid, signal.SIGKILL)
            await self._exit_wait
        # Children that outlived the group leader.
        _kill_group(process.pid, signal.SIGKILL)

    async def _kill_for_failure(self, process: asyncio.subprocess.Process, generation: int) -> None:
        self._stopping_generation = generation
        try:
            await self._terminate(process)
        finally:
            self._stopping_generation = -1

    async def _wait_port_free(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PORT_FREE_TIMEOUT
        while not port_is_free(self.spec.host, port):
            if loop.time() > deadline:
                logger.warning("slot=%s port %d still busy %.1f s after the backend exited",
                               self.name, port, _PORT_FREE_TIMEOUT)
                return
            await asyncio.sleep(0.01)

    async def kill_now(self) -> None:
        """SIGKILL the process group at once; for slotd's own emergency exit."""
        self._cancel_retry()
        if self._process is not None:
            _kill_group(self._process.pid, signal.SIGKILL)

    # -- helpers -------------------------------------------------------------

    def _is_current(self, generation: int) -> bool:
        return self.status.generation == generation and self._stopping_generation != generation

    def _resolve(self, status: SlotStatus) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(status)

    def _resolve_error(self, status: SlotStatus) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(StartFailed(status))


def _kill_group(pgid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal_number)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_name(number: int) -> str:
    """Return "SIGKILL" for 9 and so on; "signal N" for unknown numbers."""
    return _signal_name(number)
