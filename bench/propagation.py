"""Propagation benchmark: slotd and the dispatcher in one process, with one clock.

slotd and the dispatcher run on one event loop, each with its own gRPC server
on loopback, joined by the real WatchSlots stream. A change is a state
transition of slot "chat" (READY -> WARMING, then WARMING -> READY) made
through SlotTable.transition, the call slotd's supervisor makes. Its
propagation time runs from time.perf_counter_ns() taken just before the
transition to the dispatcher's SourceTable listener call that carries the
change's revision.

The baseline is a unary round trip: a Resolve call to a no-op server (see
noop.py) on the same loop, over a loopback channel. Changes and round trips
alternate, so both see the same load. The slot's ready probe interval is set
to an hour in the config, so the supervisor does not undo a WARMING.

Run: python bench/propagation.py --config FILE --rounds N --changes N [--uvloop];
prints one JSON line per round.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import grpc
import noop
from common import emit, free_port, percentile, use_uvloop

from slotroute import logs, rpc
from slotroute.dispatch.app import DispatcherServer
from slotroute.dispatch.config import load_dispatcher_config
from slotroute.dispatch.service import TRANSPORT_SERVICE
from slotroute.dispatch.v1 import transport_pb2, transport_pb2_grpc
from slotroute.slot.app import Slotd
from slotroute.slot.config import load_slotd_config
from slotroute.slot.states import Reason, State

SLOT = "chat"
# Pause between samples, in seconds, drawn at random so samples do not beat with timers.
PAUSE = (0.001, 0.004)


async def wait_for(predicate, limit: float, description: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit:g} s waiting for {description}")
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> None:
    slotd_listen = f"127.0.0.1:{free_port()}"
    slotd = Slotd(load_slotd_config(args.config, listen=slotd_listen))
    await slotd.start()
    dispatcher = DispatcherServer(load_dispatcher_config(
        args.config, listen=f"127.0.0.1:{free_port()}", sources=[slotd.address]))
    await dispatcher.start()
    baseline = rpc.Service(f"127.0.0.1:{free_port()}", [TRANSPORT_SERVICE],
                           lambda server: noop.register(server, noop.default_response()))
    await baseline.start()
    channel = grpc.aio.insecure_channel(baseline.address, options=rpc.CLIENT_OPTIONS)

    try:
        table = dispatcher.tables[slotd.address]
        manager_table = slotd.manager.table
        await wait_for(lambda: table.synced and SLOT in table.view().slots
                       and table.view().slots[SLOT].state is State.READY, 30, "slot chat READY")

        arrived: dict[int, int] = {}
        waiting: dict[str, object] = {"revision": None, "event": None}

        def on_change(changed_table) -> None:
            stamp = time.perf_counter_ns()
            revision = changed_table.revision
            arrived[revision] = stamp
            if waiting["revision"] is not None and revision >= waiting["revision"]:
                waiting["event"].set()

        table.add_listener(on_change)
        stub = transport_pb2_grpc.TransportServiceStub(channel)
        request = transport_pb2.ResolveRequest(model="bench-chat")
        await stub.Resolve(request)

        for round_number in range(args.rounds):
            round_trips: list[int] = []
            delays: list[int] = []
            for index in range(args.changes):
                started = time.perf_counter_ns()
                await stub.Resolve(request)
                round_trips.append(time.perf_counter_ns() - started)
                await asyncio.sleep(random.uniform(*PAUSE))

                going_down = index % 2 == 0
                event = asyncio.Event()
                started = time.perf_counter_ns()
                if going_down:
                    status = manager_table.transition(SLOT, State.READY, State.WARMING,
                                                      reason=Reason.PROBE, message="benchmark change")
                else:
                    status = manager_table.transition(SLOT, State.WARMING, State.READY,
                                                      reason=Reason.PROBE, message="benchmark change")
                if status is None:
                    raise RuntimeError("slot chat changed state outside the benchmark")
                revision = slotd.manager.log.revision
                waiting["revision"], waiting["event"] = revision, event
                await asyncio.wait_for(event.wait(), 10)
                delays.append(arrived[revision] - started)
                waiting["revision"] = None
                await asyncio.sleep(random.uniform(*PAUSE))

            round_trips.sort()
            delays.sort()
            emit({
                "round": round_number,
                "changes": len(delays),
                "rtt_p50_us": percentile(round_trips, 0.50) / 1e3,
                "rtt_p99_us": percentile(round_trips, 0.99) / 1e3,
                "p50_us": percentile(delays, 0.50) / 1e3,
                "p99_us": percentile(delays, 0.99) / 1e3,
                "max_us": delays[-1] / 1e3,
            })
    finally:
        await channel.close()
        await baseline.stop(grace=0.5)
        await dispatcher.stop()
        await slotd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="box config written by configs.write_box")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--changes", type=int, default=200, help="changes per round (default 200)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    # Log as the services do by default, so slotd's line per state change is part of the path.
    logs.configure("info", "text")
    use_uvloop(args.uvloop)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
