"""Process lifecycle of one slot: launch, probe, watch for exit, stop, restart with backoff.

A Supervisor owns at most one backend process at a time. Its states move only
through SlotTable.transition, so a task that lost a race (a probe response arriving
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
import dataclasses
import errno
import logging
import os
import random
import shutil
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
# Seconds to wait for the members of a process group to die after SIGKILL.
_GROUP_EXIT_TIMEOUT = 1.0
# Bytes read from a backend's stdout or stderr pipe at a time.
_READ_CHUNK_BYTES = 64 * 1024
# Maximum length in bytes of a line kept from a backend's output. The rest of a longer
# line is dropped.
MAX_LINE_BYTES = 4096
# A slot that stayed READY this long has its restart count reset by the next crash.
_STABLE_AFTER = 60.0


@dataclasses.dataclass(frozen=True)
class Launch:
    """The catalog model to run in a slot and the memory reserved for it."""

    model_id: str
    model_path: str
    args: tuple[str, ...] = ()
    reserved_bytes: int = 0


class StartFailed(Exception):
    """A start that ended in ERROR or was stopped before READY."""

    def __init__(self, status: SlotStatus):
        super().__init__(status.message)
        self.status = status


# Program that `python -I -S -c` runs as `SHIM SLOTD_PID ARGV...`. It sets the Linux
# parent-death signal (prctl PR_SET_PDEATHSIG, kept across execve) so that the kernel
# sends it SIGKILL when slotd dies, then it becomes ARGV. It replaces a subprocess
# preexec_fn, because Python code between fork and exec crashes children: with a busy
# grpc.aio server in the parent, 12 of 60 children got SIGSEGV (grpcio 1.85.3, CPython
# 3.11.7, one measured run).
_PARENT_DEATH_SHIM = f"""\
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
try:
    ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    os.execvp(argv[0], argv)
except OSError as error:
    sys.stderr.write(f"error: cannot launch {{argv[0]!r}}: {{error.strerror or error}}\\n")
    sys.exit(127)
"""


class _ExitWatchingProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Subprocess stream protocol whose `exited` future resolves when the child is reaped.

    In CPython 3.11, Process.wait() returns only after the child exited and its
    stdout and stderr pipes closed. A grandchild that inherited the pipes would
    hide the exit, so the supervisor waits on `exited` instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(limit=_READ_CHUNK_BYTES, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        self._subprocess: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport) -> None:
        self._subprocess = transport
        super().connection_made(transport)

    def process_exited(self) -> None:
        assert self._subprocess is not None
        code = self._subprocess.get_returncode()
        super().process_exited()
        if not self.exited.done() and code is not None:
            self.exited.set_result(code)


async def _spawn(
    argv: list[str], env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, asyncio.Future[int]]:
    """Start argv without a shell, in a new process group that dies with slotd.

    Returns the process and a future that resolves to its return code as soon
    as it exits (negative for a signal). Raises OSError when argv[0] is not an
    executable file on the PATH of `env`.
    """
    if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
        raise OSError(errno.ENOENT, "not found, or not an executable file, on PATH")
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _ExitWatchingProtocol(loop),
        sys.executable, "-I", "-S", "-c", _PARENT_DEATH_SHIM, str(os.getpid()), *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    return asyncio.subprocess.Process(transport, protocol, loop), protocol.exited


class LineSplitter:
    """Split a backend's output bytes into text lines for the log and the stderr tail.

    Lines end at "\\n" or "\\r\\n". Text before a "\\r" inside a line is dropped,
    because a terminal overwrites it, so a progress bar leaves only its last
    state. A line longer than `max_bytes` is cut there, marked " [line cut]",
    and the rest of it is dropped, so a backend that never ends a line costs at
    most `max_bytes` of memory here.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES):
        self._max_bytes = max_bytes
        self._partial = bytearray()
        self._cut = False

    def feed(self, data: bytes) -> list[str]:
        """Add bytes and return the lines they complete."""
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._append(data[start:end])
            lines.append(self._take())
            start = end + 1
        self._append(data[start:])
        return lines

    def finish(self) -> list[str]:
        """Return the last line when the output ended without a newline."""
        if not self._partial and not self._cut:
            return []
        return [self._take()]

    def _append(self, piece: bytes) -> None:
        if self._cut:
            return
        self._partial += piece
        if len(self._partial) <= self._max_bytes:
            return
        visible = _overwrite(self._partial)
        # Keep a final "\r", because the text that follows it still overwrites the line.
        ends_in_return = self._partial.endswith(b"\r")
        if len(visible) > self._max_bytes:
            visible = visible[:self._max_bytes]
            ends_in_return = False
            self._cut = True
        self._partial[:] = visible + (b"\r" if ends_in_return else b"")

    def _take(self) -> str:
        text = _overwrite(self._partial).decode("utf-8", "replace").rstrip()
        if self._cut:
            text += " [line cut]"
        self._partial.clear()
        self._cut = False
        return text


def _overwrite(line: bytes | bytearray) -> bytes:
    """Return what a terminal shows of `line`: the text after its last inner "\\r"."""
    return bytes(line).rstrip(b"\r").rpartition(b"\r")[2]


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
        self._exit_wait: asyncio.Future[int] | None = None
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
        # A failure before the new process writes must not show the old process's stderr.
        self._tail = collections.deque(maxlen=self._tail_lines)
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
        advertised = self.spec.advertise_host or self.spec.host
        host = f"[{advertised}]" if ":" in advertised else advertised
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
            self._ports.release(port, self.name)
            future.set_exception(StartFailed(self.status))
            return future

        # Launch without a shell, in a new process group that dies with slotd.
        try:
            process, exited = await _spawn(argv, env)
        except OSError as error:
            self._ports.release(port, self.name)
            message = f"cannot launch {argv[0]!r}: {error.strerror or error}; check the slot's command"
            self._fail(generation, Reason.LAUNCH_FAILED, message, None, None, restart_count)
            return future

        logger.debug("slot=%s generation=%d launched pid=%d argv=%s",
                     self.name, generation, process.pid, argv)
        self._process = process
        self._exit_wait = exited
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
            port=0, endpoint_url="", pid=0,
        )
        self._fail(generation, Reason.LAUNCH_FAILED, message, None, None, restart_count)

    async def _run(self, process: asyncio.subprocess.Process, generation: int, port: int) -> None:
        assert process.stderr is not None and process.stdout is not None
        pumps = [
            asyncio.create_task(self._pump(process.stderr, generation, "stderr", self._tail)),
            asyncio.create_task(self._pump(process.stdout, generation, "stdout", None)),
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

    async def _pump(
        self,
        stream: asyncio.StreamReader,
        generation: int,
        stream_name: str,
        tail: collections.deque[str] | None,
    ) -> None:
        """Read a pipe to its end, logging each line and keeping it in `tail` if given.

        The pipe is read even when its lines are not kept, because a backend
        blocks once the pipe buffer is full.
        """
        splitter = LineSplitter()
        while True:
            chunk = await stream.read(_READ_CHUNK_BYTES)
            lines = splitter.feed(chunk) if chunk else splitter.finish()
            for text in lines:
                if tail is not None:
                    tail.append(text)
                logger.debug("slot=%s generation=%d %s: %s",
                             self.name, generation, stream_name, text)
            if not chunk:
                return

    async def _await_ready(self, process: asyncio.subprocess.Process, generation: int, port: int) -> bool:
        """Probe until READY; return False when the start failed or was stopped."""
        assert self._exit_wait is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.start_timeout
        detail = "no answer yet"
        owned = False
        while True:
            if self._exit_wait.done():
                await self._on_exit(process, generation, during_start=True)
                return False

            result, detail = await probes.probe(self.spec.probe, self.spec.host, port)
            if not self._is_current(generation) or self.status.state not in LOADING_STATES:
                return False
            # A response counts only once the backend's own process tree listens on the port.
            if result is not probes.ProbeResult.REFUSED and not owned:
                # psutil walks the process tree and socket tables for 10-100 ms:
                # run it in a thread so other slots and streams keep moving.
                owner = await asyncio.to_thread(probes.listener_pid, process.pid, port)
                if not self._is_current(generation) or self.status.state not in LOADING_STATES:
                    return False
                owned = owner is not None
                if not owned:
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
                if self._exit_wait.done():
                    continue  # The exit explains the failure better, and the loop start reports it.
                await self._kill_for_failure(process, generation)
                message = f"not ready after {self.spec.start_timeout:g} s (last probe: {detail})"
                self._fail(generation, Reason.START_TIMEOUT, message, None, None,
                           self._failures_so_far())
                return False
            await asyncio.wait([self._exit_wait], timeout=min(self.spec.probe.interval, remaining))

    async def _watch_ready(self, process: asyncio.subprocess.Process, generation: int, port: int) -> None:
        """Watch a started backend: its exit at once, probe results at the ready interval."""
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
        """Report an exit that no stop requested.

        Each generation's run task calls this at most once, then returns.
        """
        if not self._is_current(generation):
            return  # stop() owns the state of a process it is stopping.
        assert self._exit_wait is not None
        code = self._exit_wait.result()
        # Kill what is left of the group, then let the last stderr lines arrive.
        _kill_group(process.pid, signal.SIGKILL)
        await _wait_group_gone(process.pid, _GROUP_EXIT_TIMEOUT)
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
            # Jitter (±20 %) spreads restarts of slots that failed together;
            # the maximum applies after it, so no delay exceeds restart_backoff_max.
            delay = min(
                self.spec.restart_backoff_max,
                self.spec.restart_backoff * 2 ** (restart_count - 1) * random.uniform(0.8, 1.2),
            )
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
        failed = self._table.transition(
            self.name, (State.STARTING, State.WARMING, State.READY, State.DRAINING), State.ERROR,
            reason=reason, message=message, failure=failure, pid=0,
            reserved_bytes=0 if exhausted else status.reserved_bytes,
        )
        if failed is None:
            return  # A stop began meanwhile, and it releases the port itself.
        if status.port:
            self._ports.release(status.port, self.name)
        self._process = None
        self._ready_since = None
        self._resolve_error(failed)
        if next_retry_at is not None and self._launch is not None:
            self._retry_task = asyncio.create_task(self._retry_later(self._launch, delay))

    async def _retry_later(self, launch: Launch, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._lifecycle:
            # Check under the lock, because a stop or a load may have run since the failure.
            if self.status.state is not State.ERROR:
                return
            # From here on a stop must wait for the launch instead of cancelling it.
            self._retry_task = None
            await self._launch_process(launch, Reason.RESTART)

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
                self._ports.release(status.port, self.name)

            self._process = None
            self._ready_since = None
            offline = self._table.transition(
                self.name, State.UNLOADING, State.OFFLINE, reason=reason, message=message,
                pid=0, endpoint_url="", port=0, model_id="", reserved_bytes=0,
            )
            return offline or self.status

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the process group; SIGKILL what is left of it after the grace period."""
        assert self._exit_wait is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.stop_grace
        _kill_group(process.pid, signal.SIGTERM)
        await asyncio.wait([self._exit_wait], timeout=self.spec.stop_grace)
        # The leader's children get the rest of the grace period.
        group_gone = self._exit_wait.done() and await _wait_group_gone(
            process.pid, max(deadline - loop.time(), 0.0)
        )
        if not group_gone:
            logger.warning("slot=%s process group %d still running %.1f s after SIGTERM; "
                           "sending SIGKILL", self.name, process.pid, self.spec.stop_grace)
            _kill_group(process.pid, signal.SIGKILL)
            await self._exit_wait
            await _wait_group_gone(process.pid, _GROUP_EXIT_TIMEOUT)

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


def _group_members(pgid: int) -> list[int]:
    """Return the pids of the live processes in process group `pgid`, not counting zombies.

    Reads /proc (Linux). Without /proc it returns [] once no process of the
    group exists, and [pgid] while any does.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    try:
        names = os.listdir("/proc")
    except OSError:
        return [pgid]
    members = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # After the command name in brackets: state, parent pid, process group.
        fields = stat.rpartition(b")")[2].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


async def _wait_group_gone(pgid: int, max_wait: float) -> bool:
    """Wait up to `max_wait` seconds until process group `pgid` has no live process.

    Returns False when some process of the group still lives at the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    while _group_members(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_name(number: int) -> str:
    """Return "SIGKILL" for 9 and so on; "signal N" for unknown numbers."""
    return _signal_name(number)
