"""Run the slotroute benchmarks on this machine and write the results to BENCHMARKS.md.

Every server and client runs as its own process on loopback:
  resolve      Resolve throughput and latency on the warm path (tiers REGISTRY
               and PASSTHROUGH) against a no-op server under the same load
  propagation  time from a slot change in slotd to the dispatcher's table,
               against one unary round trip
  fanout       1,000 WatchSlots subscribers and 1,000 changes: delivery,
               order, slotd's memory and the time per change
  coldstart    Resolve of a cold model minus the backend's own start time
  registry     a dispatcher with 100,000 registry entries against one with 10

Usage: python bench/run.py [--quick] [--uvloop] [--only NAME,...] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from common import BENCH_DIR, REPO_ROOT, child_env, free_port, wait_serving
from configs import write_box
from report import environment, write_report

MEASURES = ("resolve", "propagation", "fanout", "coldstart", "registry")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run; `full()` and `quick()` are the two presets."""

    rounds: int
    warmup: float
    duration: float
    concurrency: int
    propagation_rounds: int
    propagation_changes: int
    fanout_rounds: int
    fanout_subscribers: int
    fanout_changes: int
    fanout_processes: int
    fanout_channels: int
    cold_rounds: int
    cold_samples: int
    direct_samples: int
    registry_size: int
    start_rounds: int

    @classmethod
    def full(cls) -> Settings:
        return cls(rounds=10, warmup=0.3, duration=1.0, concurrency=16,
                   propagation_rounds=5, propagation_changes=500,
                   fanout_rounds=3, fanout_subscribers=1000, fanout_changes=1000,
                   fanout_processes=2, fanout_channels=8,
                   cold_rounds=3, cold_samples=8, direct_samples=5,
                   registry_size=100_000, start_rounds=3)

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=5, warmup=0.3, duration=1.0, concurrency=16,
                   propagation_rounds=3, propagation_changes=200,
                   fanout_rounds=1, fanout_subscribers=1000, fanout_changes=1000,
                   fanout_processes=2, fanout_channels=8,
                   cold_rounds=3, cold_samples=4, direct_samples=3,
                   registry_size=100_000, start_rounds=1)


class Processes:
    """Child processes of the run: started with their logs in `log_dir`, stopped by SIGTERM."""

    def __init__(self, log_dir: pathlib.Path, uvloop: bool):
        self.log_dir = log_dir
        self.uvloop = uvloop
        self.running: list[subprocess.Popen] = []

    def python(self, script: str, *args: str) -> list[str]:
        """Return the command line of a bench script, with --uvloop when the run uses it."""
        command = [sys.executable, str(BENCH_DIR / script)]
        if self.uvloop:
            command.append("--uvloop")
        return [*command, *args]

    def slotroute(self, *args: str) -> list[str]:
        """Return the command line of `slotroute`, as `python -m slotroute` or on uvloop."""
        if self.uvloop:
            return [sys.executable, str(BENCH_DIR / "serve.py"), *args]
        return [sys.executable, "-m", "slotroute", *args]

    def start(self, name: str, argv: Sequence[str], *, capture: bool = False) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            list(argv), cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else log, stderr=log,
        )
        process.log = log  # type: ignore[attr-defined]
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 15.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.log.close()  # type: ignore[attr-defined]
        if process.stdout is not None:
            process.stdout.close()
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)

    def run_json(self, name: str, argv: Sequence[str], timeout: float) -> dict[str, Any]:
        """Run a client process to its end and return the last JSON line it printed."""
        process = self.start(name, argv, capture=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            raise RuntimeError(f"{name} did not finish within {timeout:g} s; "
                               f"see {self.log_dir}/{name}.log") from None
        self.stop(process)
        lines = [line for line in output.decode().splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"{name} failed with exit code {process.returncode}; "
                               f"see {self.log_dir}/{name}.log")
        return json.loads(lines[-1])


@dataclasses.dataclass
class Box:
    """A running slotd and dispatcher of the benchmark box."""

    config: pathlib.Path
    slotd_address: str
    dispatcher_address: str
    slotd: subprocess.Popen
    dispatcher: subprocess.Popen


def start_box(processes: Processes, directory: pathlib.Path, name: str, **config: Any) -> Box:
    """Write a box config, start its slotd and dispatcher, and wait until both warm models route."""
    slotd_address = f"127.0.0.1:{free_port()}"
    dispatcher_address = f"127.0.0.1:{free_port()}"
    path = write_box(directory, slotd_listen=slotd_address, dispatcher_listen=dispatcher_address,
                     name=f"{name}.toml", **config)
    slotd = processes.start(f"{name}-slotd", processes.slotroute("slotd", "--config", str(path)))
    wait_serving(slotd_address, 30, slotd)
    dispatcher = processes.start(f"{name}-dispatcher",
                                 processes.slotroute("dispatcher", "--config", str(path)))
    wait_serving(dispatcher_address, 30, dispatcher)
    for model in ("bench-chat", "bench-pass"):
        resolve_once(dispatcher_address, model)
    return Box(path, slotd_address, dispatcher_address, slotd, dispatcher)


def resolve_once(address: str, model: str):
    """Call Resolve once and return the response, waiting for a preload to finish."""
    import grpc

    from slotroute.dispatch.v1 import transport_pb2, transport_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = transport_pb2_grpc.TransportServiceStub(channel)
        return stub.Resolve(transport_pb2.ResolveRequest(model=model), timeout=60)


def rss_bytes(process: subprocess.Popen) -> int:
    return psutil.Process(process.pid).memory_info().rss


# -- measures -------------------------------------------------------------------


def unary_rounds(processes: Processes, settings: Settings, targets: dict[str, tuple[str, int, str]],
                 label: str) -> dict[str, list[dict[str, Any]]]:
    """Run one unary client process that measures every target once per round.

    `targets` maps a name to (address, server process id, comma-separated models).
    The client keeps one channel per target and rotates the order each round, so
    all targets run under the same machine load within a few seconds.
    """
    specs = [{"name": name, "address": address, "pid": pid, "models": models.split(",")}
             for name, (address, pid, models) in targets.items()]
    argv = processes.python(
        "client.py", "unary", "--targets", json.dumps(specs), "--rounds", str(settings.rounds),
        "--concurrency", str(settings.concurrency), "--warmup", str(settings.warmup),
        "--duration", str(settings.duration))
    window = settings.warmup + settings.duration
    client = processes.start(f"{label}-client", argv, capture=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    try:
        for _ in range(settings.rounds * len(targets)):
            result = read_json_line(client, timeout=window + 60)
            if result["errors"]:
                raise RuntimeError(f"{label} {result['name']}: {result['errors']} calls failed, "
                                   f"first: {result['first_error']}")
            results[result["name"]].append(result)
            progress(f"  {label} round {result['round'] + 1}/{settings.rounds} {result['name']}: "
                     f"{result['throughput']:.0f} calls/s, p50 {result['p50_us']:.0f} us, "
                     f"p99 {result['p99_us']:.0f} us, server CPU "
                     f"{result['server_cpu_us_per_call']:.0f} us per call")
        read_json_line(client, timeout=30)
    finally:
        processes.stop(client)
    return results


def measure_resolve(processes: Processes, settings: Settings, box: Box) -> dict[str, Any]:
    from slotroute.dispatch.v1 import route_pb2

    registry = resolve_once(box.dispatcher_address, "bench-chat")
    passthrough = resolve_once(box.dispatcher_address, "bench-pass")
    if registry.tier != route_pb2.TIER_REGISTRY or passthrough.tier != route_pb2.TIER_PASSTHROUGH:
        raise RuntimeError(f"unexpected tiers: bench-chat {registry.tier}, bench-pass {passthrough.tier}")

    # The no-op server returns the dispatcher's own REGISTRY response, so both send the same bytes.
    noop_address = f"127.0.0.1:{free_port()}"
    noop = processes.start("noop", processes.python(
        "noop.py", "--listen", noop_address, "--response-hex", registry.SerializeToString().hex()))
    # For the report's breakdown only: the same dispatcher without its line per Resolve.
    quiet_config = write_box(box.config.parent / "quiet", slotd_listen=box.slotd_address,
                             dispatcher_listen="127.0.0.1:0", name="quiet.toml")
    quiet_address = f"127.0.0.1:{free_port()}"
    quiet = processes.start("resolve-quiet-dispatcher", processes.slotroute(
        "--log-level", "warning", "dispatcher", "--config", str(quiet_config), "--listen", quiet_address))
    try:
        wait_serving(noop_address, 30, noop)
        wait_serving(quiet_address, 30, quiet)
        runs = unary_rounds(processes, settings, {
            "noop": (noop_address, noop.pid, "bench-chat"),
            "registry": (box.dispatcher_address, box.dispatcher.pid, "bench-chat"),
            "passthrough": (box.dispatcher_address, box.dispatcher.pid, "bench-pass"),
            "registry_quiet": (quiet_address, quiet.pid, "bench-chat"),
        }, "resolve")
    finally:
        processes.stop(noop)
        processes.stop(quiet)
    return {"runs": runs, "concurrency": settings.concurrency, "duration": settings.duration}


def measure_propagation(processes: Processes, settings: Settings, directory: pathlib.Path) -> dict[str, Any]:
    config = write_box(directory, slotd_listen="127.0.0.1:0", dispatcher_listen="127.0.0.1:0",
                       ready_interval=3600.0, name="propagation.toml")
    process = processes.start("propagation", processes.python(
        "propagation.py", "--config", str(config), "--rounds", str(settings.propagation_rounds),
        "--changes", str(settings.propagation_changes)), capture=True)
    rounds = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(b"{"):
                result = json.loads(line)
                rounds.append(result)
                progress(f"  propagation round {result['round'] + 1}/{settings.propagation_rounds}: "
                         f"p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us, "
                         f"round trip p50 {result['rtt_p50_us']:.0f} us")
        process.wait(60)
    finally:
        processes.stop(process)
    if process.returncode != 0 or len(rounds) != settings.propagation_rounds:
        raise RuntimeError(f"propagation failed with exit code {process.returncode}; "
                           f"see {processes.log_dir}/propagation.log")
    return {"rounds": rounds, "changes": settings.propagation_changes}


async def make_changes(address: str, count: int, concurrency: int = 4) -> int:
    """Make `count` changes of slot "chat": AcquireLease, then ReleaseLease, each one change.

    Returns time.monotonic_ns() taken before the first call.
    """
    import grpc
    from google.protobuf import duration_pb2

    from slotroute import rpc
    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS) as channel:
        stub = slot_pb2_grpc.SlotServiceStub(channel)
        acquire = slot_pb2.AcquireLeaseRequest(slot="chat", holder="benchmark",
                                               ttl=duration_pb2.Duration(seconds=3600))
        lease_ids: list[str] = []

        async def acquire_some(number: int) -> None:
            for _ in range(number):
                lease = await stub.AcquireLease(acquire, timeout=120)
                lease_ids.append(lease.id)

        async def release_some(ids: list[str]) -> None:
            for lease_id in ids:
                await stub.ReleaseLease(slot_pb2.ReleaseLeaseRequest(id=lease_id), timeout=120)

        acquires = count // 2
        shares = [acquires // concurrency + (1 if index < acquires % concurrency else 0)
                  for index in range(concurrency)]
        started = time.monotonic_ns()
        await asyncio.gather(*(acquire_some(share) for share in shares))
        await asyncio.gather(*(release_some(lease_ids[index::concurrency])
                               for index in range(concurrency)))
        return started


def slotd_revision(address: str) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return slot_pb2_grpc.SlotServiceStub(channel).ListSlots(slot_pb2.ListSlotsRequest(), timeout=30).revision


def measure_fanout(processes: Processes, settings: Settings, directory: pathlib.Path) -> dict[str, Any]:
    if settings.fanout_changes % 2:
        raise ValueError("fan-out changes must be even: each lease makes two")
    rounds = []
    for round_number in range(settings.fanout_rounds):
        # A new slotd per round, so every round's memory starts from the same state.
        slotd_address = f"127.0.0.1:{free_port()}"
        config = write_box(directory, slotd_listen=slotd_address, dispatcher_listen="127.0.0.1:0",
                           heartbeat_interval=60.0, ready_interval=3600.0,
                           name=f"fanout-{round_number}.toml")
        slotd = processes.start(f"fanout-slotd-{round_number}",
                                processes.slotroute("slotd", "--config", str(config)))
        try:
            wait_serving(slotd_address, 30, slotd)
            # Leases need a READY slot: wait for the preload of slot "chat".
            wait_until(lambda address=slotd_address: slot_state(address, "chat") == "READY",
                       30, "slot chat READY")
            result = fanout_round(processes, settings, slotd, slotd_address, round_number)
        finally:
            processes.stop(slotd)
        rounds.append(result)
        progress(f"  fanout round {round_number + 1}/{settings.fanout_rounds}: "
                 f"{result['complete']}/{result['subscribers']} complete, "
                 f"{result['violations']} out of order, "
                 f"{result['per_change_ms']:.1f} ms per change")
    return {"rounds": rounds, "subscribers": settings.fanout_subscribers,
            "changes": settings.fanout_changes, "processes": settings.fanout_processes,
            "channels": settings.fanout_channels}


def fanout_round(processes: Processes, settings: Settings, slotd: subprocess.Popen,
                 address: str, round_number: int) -> dict[str, Any]:
    rss_before = rss_bytes(slotd)
    per_process = settings.fanout_subscribers // settings.fanout_processes
    timeout = 600.0
    clients = [
        processes.start(f"fanout-client-{round_number}-{number}", processes.python(
            "client.py", "watch", "--target", address, "--streams", str(per_process),
            "--channels", str(settings.fanout_channels), "--changes", str(settings.fanout_changes),
            "--timeout", str(timeout)), capture=True)
        for number in range(settings.fanout_processes)
    ]
    try:
        for client in clients:
            line = read_json_line(client, timeout)
            if line.get("synced") != per_process:
                raise RuntimeError(f"watch client reported {line}; expected {per_process} "
                                   f"streams at SYNCED; see {processes.log_dir}")
        rss_subscribed = rss_bytes(slotd)
        revision_before = slotd_revision(address)
        cpu_before = sum(psutil.Process(slotd.pid).cpu_times()[:2])
        started = asyncio.run(make_changes(address, settings.fanout_changes))
        results = [read_json_line(client, timeout) for client in clients]
        cpu = sum(psutil.Process(slotd.pid).cpu_times()[:2]) - cpu_before
        published = slotd_revision(address) - revision_before
        rss_delivered = rss_bytes(slotd)
    finally:
        for client in clients:
            processes.stop(client)
    time.sleep(0.5)
    complete = sum(result["complete"] for result in results)
    last = max(result["last_ns"] for result in results)
    elapsed = (last - started) / 1e9 if complete == settings.fanout_subscribers else float("nan")
    return {
        "subscribers": settings.fanout_subscribers,
        "published": published,
        "complete": complete,
        "violations": sum(result["violations"] for result in results),
        "received": sum(result["received"] for result in results),
        "elapsed_s": elapsed,
        "per_change_ms": elapsed / settings.fanout_changes * 1e3,
        "slotd_cpu_us_per_message": cpu / max(sum(result["received"] for result in results), 1) * 1e6,
        "rss_before": rss_before,
        "rss_subscribed": rss_subscribed,
        "rss_delivered": rss_delivered,
        "rss_closed": rss_bytes(slotd),
    }


def read_json_line(process: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Read the next JSON line a client prints; raise when it exits or `timeout` passes."""
    import selectors

    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no output from {process.args!r} within {timeout:g} s")
            if not selector.select(remaining):
                continue
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{process.args!r} exited with code {process.wait()} early")
            if line.startswith(b"{"):
                return json.loads(line)


def slot_state(address: str, slot: str) -> str:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        status = slot_pb2_grpc.SlotServiceStub(channel).GetSlot(slot_pb2.GetSlotRequest(name=slot), timeout=10)
    return slot_pb2.SlotState.Name(status.state).removeprefix("SLOT_STATE_")


def wait_until(predicate: Callable[[], bool], timeout: float, description: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(0.05)


def measure_coldstart(processes: Processes, settings: Settings, box: Box) -> dict[str, Any]:
    rounds = []
    for round_number in range(settings.cold_rounds):
        result = processes.run_json(f"coldstart-{round_number}", processes.python(
            "coldstart.py", "--dispatcher", box.dispatcher_address, "--slotd", box.slotd_address,
            "--cache", str(box.config.parent / "models"), "--samples", str(settings.cold_samples),
            "--direct-samples", str(settings.direct_samples)), timeout=300)
        rounds.append(result)
        overheads = sorted(result["overhead_ms"])
        progress(f"  coldstart round {round_number + 1}/{settings.cold_rounds}: overhead "
                 f"{overheads[len(overheads) // 2]:.1f} ms median, {overheads[-1]:.1f} ms max")
    return {"rounds": rounds}


def start_dispatcher(processes: Processes, name: str, config: pathlib.Path) -> tuple[subprocess.Popen, str, float]:
    """Start a dispatcher; return it, its address and the seconds from spawn to SERVING."""
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    process = processes.start(name, processes.slotroute("dispatcher", "--config", str(config),
                                                        "--listen", address))
    wait_serving(address, 120, process)
    return process, address, time.monotonic() - started


def measure_registry(processes: Processes, settings: Settings, box: Box,
                     directory: pathlib.Path) -> dict[str, Any]:
    sizes = {"small": 10, "large": settings.registry_size}
    configs = {}
    for name, size in sizes.items():
        configs[name] = write_box(directory, slotd_listen=box.slotd_address,
                                  dispatcher_listen="127.0.0.1:0", registry_size=size,
                                  name=f"registry-{size}.toml")
    starts: dict[str, list[dict[str, float]]] = {name: [] for name in sizes}
    running: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for round_number in range(settings.start_rounds):
            for name in (("small", "large") if round_number % 2 == 0 else ("large", "small")):
                if name in running:
                    processes.stop(running.pop(name)[0])
                process, address, seconds = start_dispatcher(
                    processes, f"registry-{name}-{round_number}", configs[name])
                running[name] = (process, address)
                starts[name].append({"seconds": seconds, "rss": rss_bytes(process)})
                progress(f"  registry start {round_number + 1}/{settings.start_rounds} "
                         f"{sizes[name]} entries: {seconds:.2f} s to SERVING, "
                         f"{rss_bytes(process) / 2**20:.0f} MiB")
        # Models present in both registries: the slot-bound "bench-chat" and capability-bound fillers.
        models = ",".join(["bench-chat"] + [f"scale-{number:06d}" for number in range(8)])
        for name, (_process, address) in running.items():
            response = resolve_once(address, "scale-000007")
            if not response.target.endpoint_url:
                raise RuntimeError(f"{name} registry did not route scale-000007: {response}")
        runs = unary_rounds(processes, settings, {
            name: (address, process.pid, models) for name, (process, address) in running.items()
        }, "registry")
    finally:
        for process, _address in running.values():
            processes.stop(process)
    return {"sizes": sizes, "starts": starts, "runs": runs}


# -- driver ---------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs")
    parser.add_argument("--uvloop", action="store_true",
                        help="run every server and client process on uvloop's event loop")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated measures to run (default: {','.join(MEASURES)})")
    parser.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"),
                        help="Markdown file whose generated section is replaced (default: BENCHMARKS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with configs and logs")
    parser.add_argument("--results", default="",
                        help="also write the raw results of this run to this JSON file")
    parser.add_argument("--from-results", default="", metavar="FILE",
                        help="measure nothing: write the report from a JSON file saved by --results")
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads(pathlib.Path(args.from_results).read_text(encoding="utf-8"))
        write_report(pathlib.Path(args.output), saved["results"], saved["meta"])
        progress(f"wrote {args.output} from {args.from_results}")
        return 0
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(MEASURES))
    if unknown:
        parser.error(f"unknown measure {', '.join(unknown)}; choose from {', '.join(MEASURES)}")

    settings = Settings.quick() if args.quick else Settings.full()
    directory = pathlib.Path(tempfile.mkdtemp(prefix="slotroute-bench-"))
    processes = Processes(directory, args.uvloop)
    results: dict[str, Any] = {}
    started = time.monotonic()
    load_before = os.getloadavg()
    progress(f"benchmark files and logs in {directory}")
    try:
        needs_box = {"resolve", "coldstart", "registry"} & set(only)
        box = start_box(processes, directory / "box", "box") if needs_box else None
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "resolve": lambda: measure_resolve(processes, settings, box),
            "propagation": lambda: measure_propagation(processes, settings, directory / "propagation"),
            "fanout": lambda: measure_fanout(processes, settings, directory / "fanout"),
            "coldstart": lambda: measure_coldstart(processes, settings, box),
            "registry": lambda: measure_registry(processes, settings, box, directory / "registry"),
        }
        for name in MEASURES:
            if name in only:
                progress(f"{name}:")
                step_started = time.monotonic()
                results[name] = steps[name]()
                results[name]["wall_seconds"] = time.monotonic() - step_started
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    meta = {
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": time.monotonic() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "uvloop": args.uvloop,
        "environment": environment(args.uvloop),
        "settings": dataclasses.asdict(settings),
        "quick": args.quick,
    }
    if args.results:
        pathlib.Path(args.results).write_text(json.dumps({"results": results, "meta": meta}, indent=1),
                                              encoding="utf-8")
    output = pathlib.Path(args.output)
    write_report(output, results, meta)
    progress(f"wrote {output} in {meta['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
