"""Load generator processes for the benchmarks. Each mode prints JSON lines to stdout.

Modes:
  unary  Resolve calls at a fixed concurrency against several servers in turn,
         in short windows whose order rotates each round; prints the throughput,
         the latency percentiles and the server's CPU time per call of each window.
  watch  many WatchSlots streams over a few channels; prints "synced" once every
         stream reached SYNCED, then checks that each stream receives the given
         number of changes with contiguous revisions and prints the result.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time

import grpc
import psutil
from common import emit, percentile, use_uvloop

from slotroute import rpc
from slotroute.dispatch.v1 import transport_pb2, transport_pb2_grpc
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

# Deadline of one Resolve call in the unary mode, in seconds.
CALL_TIMEOUT = 10.0


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@dataclasses.dataclass
class Target:
    """One server of the unary mode, with its own channel and the requests it receives in turn."""

    name: str
    address: str
    pid: int
    requests: list[transport_pb2.ResolveRequest]
    channel: grpc.aio.Channel | None = None


async def measure_window(target: Target, args: argparse.Namespace) -> dict:
    """Keep `concurrency` calls in flight for warmup + duration seconds; measure the last part."""
    assert target.channel is not None
    stub = transport_pb2_grpc.TransportServiceStub(target.channel)
    server = psutil.Process(target.pid) if target.pid else None
    me = psutil.Process()
    latencies: list[int] = []
    errors: list[str] = []
    window = {"start": 0, "end": 0}
    stopping = False

    async def worker(offset: int) -> None:
        index = offset
        while not stopping:
            request = target.requests[index % len(target.requests)]
            index += 1
            started = time.perf_counter_ns()
            try:
                await stub.Resolve(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                errors.append(f"{error.code().name}: {error.details()}")
                continue
            finished = time.perf_counter_ns()
            if window["start"] and started >= window["start"] and (
                    not window["end"] or finished <= window["end"]):
                latencies.append(finished - started)

    workers = [asyncio.create_task(worker(number)) for number in range(args.concurrency)]
    await asyncio.sleep(args.warmup)

    server_cpu = _cpu_seconds(server) if server else 0.0
    client_cpu = _cpu_seconds(me)
    window["start"] = time.perf_counter_ns()
    await asyncio.sleep(args.duration)
    window["end"] = time.perf_counter_ns()
    server_cpu = (_cpu_seconds(server) - server_cpu) if server else 0.0
    client_cpu = _cpu_seconds(me) - client_cpu

    stopping = True
    await asyncio.gather(*workers)

    seconds = (window["end"] - window["start"]) / 1e9
    latencies.sort()
    calls = len(latencies)
    return {
        "calls": calls,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "seconds": seconds,
        "throughput": calls / seconds,
        "p50_us": percentile(latencies, 0.50) / 1e3,
        "p99_us": percentile(latencies, 0.99) / 1e3,
        "server_cpu_us_per_call": server_cpu / calls * 1e6 if calls else float("nan"),
        "server_cpu_share": server_cpu / seconds,
        "client_cpu_share": client_cpu / seconds,
    }


async def run_unary(args: argparse.Namespace) -> dict:
    """Measure each target once per round, rotating the order, and print one line per window."""
    targets = [
        Target(spec["name"], spec["address"], spec.get("pid", 0),
               [transport_pb2.ResolveRequest(model=model) for model in spec["models"]])
        for spec in json.loads(args.targets)
    ]
    try:
        for target in targets:
            target.channel = grpc.aio.insecure_channel(target.address, options=rpc.CLIENT_OPTIONS)
            await asyncio.wait_for(target.channel.channel_ready(), 10)
        for round_number in range(args.rounds):
            shift = round_number % len(targets)
            for target in targets[shift:] + targets[:shift]:
                result = await measure_window(target, args)
                emit({"round": round_number, "name": target.name, **result})
    finally:
        for target in targets:
            if target.channel is not None:
                await target.channel.close()
    return {"done": True}


async def run_watch(args: argparse.Namespace) -> dict:
    options = [*rpc.CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)]
    stubs = [slot_pb2_grpc.SlotServiceStub(channel) for channel in channels]
    synced = 0
    all_synced = asyncio.Event()
    results: list[dict] = []

    async def stream(number: int) -> None:
        nonlocal synced
        call = stubs[number % len(stubs)].WatchSlots(slot_pb2.WatchSlotsRequest())
        result = {"received": 0, "violations": 0, "first_ns": 0, "last_ns": 0}
        results.append(result)
        last_revision = -1
        try:
            async for event in call:
                if event.type == slot_pb2.EVENT_TYPE_HEARTBEAT:
                    continue
                if last_revision < 0:
                    if event.type == slot_pb2.EVENT_TYPE_SYNCED:
                        last_revision = event.revision
                        synced += 1
                        if synced == args.streams:
                            all_synced.set()
                    continue
                now = time.monotonic_ns()
                if event.revision != last_revision + 1:
                    result["violations"] += 1
                last_revision = event.revision
                result["received"] += 1
                if result["received"] == 1:
                    result["first_ns"] = now
                if result["received"] == args.changes:
                    result["last_ns"] = now
                    return
        finally:
            call.cancel()

    tasks = [asyncio.create_task(stream(number)) for number in range(args.streams)]
    try:
        await asyncio.wait_for(all_synced.wait(), args.timeout)
        emit({"synced": synced})
        done, _pending = await asyncio.wait(tasks, timeout=args.timeout)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()

    complete = [result for result in results if result["received"] == args.changes]
    return {
        "streams": args.streams,
        "complete": len(complete),
        "violations": sum(result["violations"] for result in results),
        "received": sum(result["received"] for result in results),
        "first_ns": min((result["first_ns"] for result in results if result["first_ns"]), default=0),
        "last_ns": max((result["last_ns"] for result in complete), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    modes = parser.add_subparsers(dest="mode", required=True)

    unary = modes.add_parser("unary", help="Resolve calls at a fixed concurrency, target by target")
    unary.add_argument("--targets", required=True,
                       help='JSON list of {"name", "address", "pid", "models"}; pid is the server '
                            "process whose CPU time to report, models the ids called in turn")
    unary.add_argument("--rounds", type=int, default=5, help="windows per target (default 5)")
    unary.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    unary.add_argument("--warmup", type=float, default=0.3,
                       help="seconds of each window before measuring (default 0.3)")
    unary.add_argument("--duration", type=float, default=1.0, help="seconds measured per window (default 1)")

    watch = modes.add_parser("watch", help="WatchSlots streams that check every change")
    watch.add_argument("--target", required=True, help="HOST:PORT of slotd")
    watch.add_argument("--streams", type=int, required=True, help="number of WatchSlots streams")
    watch.add_argument("--channels", type=int, default=4, help="channels the streams share (default 4)")
    watch.add_argument("--changes", type=int, required=True, help="changes each stream must receive")
    watch.add_argument("--timeout", type=float, default=120.0, help="seconds per phase (default 120)")

    args = parser.parse_args()
    use_uvloop(args.uvloop)
    runner = run_unary if args.mode == "unary" else run_watch
    emit(asyncio.run(runner(args)))


if __name__ == "__main__":
    main()
