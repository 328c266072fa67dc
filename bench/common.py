"""Helpers shared by the benchmark orchestrator and its client processes.

Everything here talks to loopback addresses only.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values sorted in ascending order."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Return min, median and max of one measure over its rounds."""
    if not values:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def use_uvloop(enabled: bool) -> None:
    """Install uvloop's event loop policy when `enabled`; asyncio.run then uses uvloop."""
    if not enabled:
        return
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def emit(message: dict) -> None:
    """Write one JSON line to stdout, the channel from a child process to the orchestrator."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def child_env() -> dict[str, str]:
    """Return the environment for child processes, with the source tree importable."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT / "src"), str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_serving(address: str, timeout: float, process: subprocess.Popen | None = None) -> float:
    """Poll the gRPC health service at `address` until SERVING; return the seconds waited.

    Raises RuntimeError when `process` exits first and TimeoutError after `timeout` seconds.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    deadline = started + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process {process.args!r} exited with code {process.returncode} "
                                   f"before {address} served")
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING within {timeout:g} s")
            time.sleep(0.02)
