"""Cold-start benchmark client: Resolve of a model whose slot is OFFLINE.

Each sample:
  1. waits until the dispatcher reports the slot as not routable (a Resolve
     with no_cold_start returns UNAVAILABLE), so the call below must load;
  2. times Resolve(model) in this process with time.perf_counter_ns();
  3. reads, from its own WatchSlots stream on slotd, the state_since times
     of the new generation's STARTING and READY events (slotd's wall clock);
  4. unloads the slot with UnloadModel(force=True, wait=True).

Overhead = Resolve latency - (READY.state_since - STARTING.state_since).
STARTING is published before the backend process is spawned and READY when
the first health probe gets status 200, so the subtracted span is the backend's
own start (process launch, bind, load delay) plus the wait until the next
probe. The rest is the routing path: the Resolve call, the decision, the
LoadModel call, slotd's admission, the READY event's trip to the dispatcher
and the response.

For scale, the backend's time to healthy is also measured without slotd:
the same command is spawned from here and probed with slotd's own probe
function at slotd's default probe interval.

Run: python bench/coldstart.py --dispatcher ADDR --slotd ADDR --cache DIR --samples N
prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc
from common import emit, free_port, percentile, use_uvloop
from configs import COLD_LOAD_DELAY, standin_command

from slotroute import rpc
from slotroute.dispatch.v1 import route_pb2, transport_pb2, transport_pb2_grpc
from slotroute.slot import probes
from slotroute.slot.config import ProbeSpec
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

SLOT = "cold"
# Models resolved in turn, with the tier each must report.
MODELS = (("bench-cold", route_pb2.TIER_REGISTRY), ("bench-prefetch", route_pb2.TIER_PREFETCH))


class SlotHistory:
    """state_since (ns, slotd's wall clock) per generation and state of one slot, from WatchSlots."""

    def __init__(self) -> None:
        self.by_generation: dict[int, dict[int, int]] = {}
        self.changed = asyncio.Event()

    async def follow(self, stub: slot_pb2_grpc.SlotServiceStub) -> None:
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        try:
            async for event in call:
                if event.type != slot_pb2.EVENT_TYPE_SLOT or event.slot.name != SLOT:
                    continue
                states = self.by_generation.setdefault(event.slot.generation, {})
                states.setdefault(event.slot.state, event.slot.state_since.ToNanoseconds())
                self.changed.set()
                self.changed = asyncio.Event()
        finally:
            call.cancel()

    async def start_span(self, generation: int, limit: float) -> int:
        """Return READY.state_since - STARTING.state_since of `generation`, in ns.

        Raises TimeoutError when both events have not arrived within `limit` seconds.
        """
        async with asyncio.timeout(limit):
            while True:
                states = self.by_generation.get(generation, {})
                if slot_pb2.SLOT_STATE_READY in states and slot_pb2.SLOT_STATE_STARTING in states:
                    return states[slot_pb2.SLOT_STATE_READY] - states[slot_pb2.SLOT_STATE_STARTING]
                await self.changed.wait()


async def wait_not_routable(transport, model: str, limit: float) -> None:
    request = transport_pb2.ResolveRequest(model=model, policy=route_pb2.WaitPolicy(no_cold_start=True))
    deadline = time.monotonic() + limit
    while True:
        try:
            await transport.Resolve(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return
            raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dispatcher still routes {model!r} {limit:g} s after the unload")
        await asyncio.sleep(0.01)


async def measure_routed(args: argparse.Namespace) -> dict:
    latencies: list[int] = []
    spans: list[int] = []
    overheads: list[int] = []
    async with grpc.aio.insecure_channel(args.dispatcher, options=rpc.CLIENT_OPTIONS) as dispatch_channel, \
            grpc.aio.insecure_channel(args.slotd, options=rpc.CLIENT_OPTIONS) as slot_channel:
        transport = transport_pb2_grpc.TransportServiceStub(dispatch_channel)
        slots = slot_pb2_grpc.SlotServiceStub(slot_channel)
        history = SlotHistory()
        follower = asyncio.create_task(history.follow(slots))
        try:
            for index in range(args.samples):
                model, tier = MODELS[index % len(MODELS)]
                await wait_not_routable(transport, model, 10)

                started = time.perf_counter_ns()
                response = await transport.Resolve(transport_pb2.ResolveRequest(model=model), timeout=30)
                latency = time.perf_counter_ns() - started
                if not response.cold_start or response.tier != tier:
                    raise RuntimeError(f"Resolve({model!r}) did not cold-start at the expected tier: "
                                       f"{response}")

                current = await slots.GetSlot(slot_pb2.GetSlotRequest(name=SLOT))
                span = await history.start_span(current.generation, 10)
                latencies.append(latency)
                spans.append(span)
                overheads.append(latency - span)
                await slots.UnloadModel(slot_pb2.UnloadModelRequest(slot=SLOT, force=True, wait=True))
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    return {"latency_ns": latencies, "span_ns": spans, "overhead_ns": overheads}


async def measure_direct(args: argparse.Namespace) -> list[int]:
    """Spawn the cold slot's backend command directly and time it to its first 200 on /health."""
    spec = ProbeSpec()
    times: list[int] = []
    for _ in range(args.direct_samples):
        port = free_port()
        values = {"python": sys.executable, "host": "127.0.0.1", "port": str(port),
                  "model_id": "bench-cold", "model_path": f"{args.cache}/bench-cold.bin"}
        argv = [part.format_map(values) for part in standin_command("rerank", COLD_LOAD_DELAY)]
        started = time.perf_counter_ns()
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                result, _detail = await probes.probe(spec, "127.0.0.1", port)
                if result is probes.ProbeResult.READY:
                    times.append(time.perf_counter_ns() - started)
                    break
                if process.returncode is not None or time.perf_counter_ns() - started > 30e9:
                    raise RuntimeError(f"direct backend {argv!r} did not become healthy")
                await asyncio.sleep(spec.interval)
        finally:
            process.terminate()
            await process.wait()
    return times


async def run(args: argparse.Namespace) -> dict:
    routed = await measure_routed(args)
    direct = sorted(await measure_direct(args))
    result = {name: [value / 1e6 for value in values] for name, values in routed.items()}
    result = {name.replace("_ns", "_ms"): values for name, values in result.items()}
    result["direct_ms"] = [value / 1e6 for value in direct]
    result["direct_p50_ms"] = percentile(direct, 0.5) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    parser.add_argument("--slotd", required=True, help="HOST:PORT of slotd")
    parser.add_argument("--cache", required=True, help="model cache directory of the box")
    parser.add_argument("--samples", type=int, default=10, help="cold starts through the dispatcher")
    parser.add_argument("--direct-samples", type=int, default=5, help="direct backend starts")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    use_uvloop(args.uvloop)
    emit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
