#!/usr/bin/env python3
"""Cold-start overhead of a Resolve in front of a real llama.cpp llama-server.

Two measures, taken in turn so that both see the same machine load:

  direct   spawn llama-server with the agent command of examples/llama-box.toml
           and poll GET /health every 5 ms until it returns 200. The sample is
           the time from the spawn call to that response. The server then gets
           SIGTERM (SIGKILL after 5 s) before the next sample.
  resolve  with the agent slot OFFLINE, call Resolve(tiny-llama-a) on a real
           dispatcher that watches a real slotd, each in its own process. The
           sample is the time of that call, which returns once the slot is
           READY. Afterwards the slot is unloaded, and the next sample starts
           once a Resolve with no_cold_start is rejected, so the dispatcher
           has seen the slot go OFFLINE.

The overhead is median(resolve) - median(direct): the Resolve and LoadModel
calls, process launch from slotd, slotd's 10 ms probe interval against the
5 ms poll here, and the READY event's trip to the dispatcher.

Needs `make real-backend`. Run from the repository root:

    .venv/bin/python bench/llama_cold_start.py --samples 20

It prints one markdown table row on stdout (with --header, the header first)
and the single samples on stderr. Every address it uses is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import grpc
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slotroute.dispatch.v1 import route_pb2, transport_pb2, transport_pb2_grpc
from slotroute.slot import probes
from slotroute.slot.config import ProbeSpec
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "llama-box.toml"
REAL_BACKEND = REPO_ROOT / "scripts" / "real_backend.py"
SLOT = "agent"
MODEL = "tiny-llama-a"
# Poll interval of the direct measure, in seconds.
DIRECT_POLL_INTERVAL = 0.005
# Seconds one start, one stop or one service startup may take before the run fails.
STEP_TIMEOUT = 60.0
STOP_GRACE = 5.0


class BenchError(Exception):
    """A failure that ends the run with one message and exit code 1."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def built_binary() -> pathlib.Path:
    result = subprocess.run([sys.executable, str(REAL_BACKEND), "path"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"{result.stderr.strip()} (`make real-backend` builds it)")
    return pathlib.Path(result.stdout.strip())


def example_document() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def agent_argv(binary: pathlib.Path, model_path: pathlib.Path, port: int) -> list[str]:
    """Return the example's agent command, filled in as slotd would fill it."""
    agent = example_document()["slotd"]["slots"][0]
    values = {"model_path": str(model_path), "model_id": MODEL, "host": "127.0.0.1",
              "port": str(port)}
    return [str(binary), *(part.format_map(values) for part in agent["command"][1:])]


def write_config(directory: pathlib.Path, binary: pathlib.Path, models: pathlib.Path,
                 slotd_port: int, dispatcher_port: int) -> pathlib.Path:
    """Write the example config with the binary's absolute path, no preload and free ports."""
    document = example_document()
    slotd = document["slotd"]
    agent = slotd["slots"][0]
    if agent["name"] != SLOT:
        raise BenchError(f"the first slot of {EXAMPLE} is {agent['name']!r}, expected {SLOT!r}")
    agent["command"] = [str(binary), *agent["command"][1:]]
    agent["preload"] = False
    slotd.update(listen=f"127.0.0.1:{slotd_port}", cache_dir=str(models), metrics_listen="")
    document["dispatcher"].update(listen=f"127.0.0.1:{dispatcher_port}",
                                  slotd=[f"127.0.0.1:{slotd_port}"], metrics_listen="")
    path = directory / "llama-box.toml"
    path.write_text(tomli_w.dumps(document))
    return path


# -- direct ----------------------------------------------------------------------------


async def direct_sample(binary: pathlib.Path, model_path: pathlib.Path) -> float:
    """Spawn llama-server, poll /health until 200, stop it, and return the seconds to healthy."""
    port = free_port()
    argv = agent_argv(binary, model_path, port)
    spec = ProbeSpec(path="/health")
    detail = "no probe finished"
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                result, detail = await probes.probe(spec, "127.0.0.1", port)
                if result is probes.ProbeResult.READY:
                    return time.perf_counter() - started
                if process.returncode is not None:
                    raise BenchError(f"llama-server exited with code {process.returncode} "
                                     f"before /health answered 200: {' '.join(argv)}")
                await asyncio.sleep(DIRECT_POLL_INTERVAL)
    except TimeoutError:
        raise BenchError(f"timed out after {STEP_TIMEOUT:g} s waiting for llama-server's "
                         f"/health to return 200 (last probe: {detail})") from None
    finally:
        await stop_process(process)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE)
    except TimeoutError:
        process.kill()
        await process.wait()


# -- through slotd and the dispatcher ----------------------------------------------------


async def wait_serving(name: str, address: str, process: subprocess.Popen) -> None:
    """Poll gRPC health at `address` until SERVING, and raise BenchError if `process` exits first."""
    deadline = time.monotonic() + STEP_TIMEOUT
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise BenchError(f"{name} exited with code {process.returncode} before "
                                 f"serving on {address}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {STEP_TIMEOUT:g} s waiting for {name} at "
                                 f"{address} to report SERVING")
            await asyncio.sleep(0.02)


async def wait_cold(transport) -> None:
    """Wait until the dispatcher rejects a Resolve that would need a cold start."""
    request = transport_pb2.ResolveRequest(
        model=MODEL, policy=route_pb2.WaitPolicy(no_cold_start=True)
    )
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        try:
            await transport.Resolve(request, timeout=5.0)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return
            raise
        if time.monotonic() > deadline:
            raise BenchError(f"the dispatcher still routes {MODEL} {STEP_TIMEOUT:g} s after unload")
        await asyncio.sleep(0.01)


async def resolve_sample(transport, slots) -> float:
    """Time one cold Resolve, unload the slot, and return the seconds the Resolve took."""
    await wait_cold(transport)
    started = time.perf_counter()
    answer = await transport.Resolve(transport_pb2.ResolveRequest(model=MODEL),
                                     timeout=STEP_TIMEOUT)
    elapsed = time.perf_counter() - started
    await slots.UnloadModel(slot_pb2.UnloadModelRequest(slot=SLOT, force=True, wait=True),
                            timeout=STEP_TIMEOUT)
    if not answer.cold_start or answer.target.state != slot_pb2.SLOT_STATE_READY:
        raise BenchError(f"Resolve({MODEL}) was not a cold start to READY: {answer}")
    return elapsed


def start_service(command: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "slotroute", "--log-level", "warning", *command],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- run -------------------------------------------------------------------------------


async def run(samples: int, models: pathlib.Path) -> tuple[list[float], list[float]]:
    binary = built_binary()
    model_path = models / f"{MODEL}.gguf"
    if not model_path.is_file():
        raise BenchError(f"model {model_path} not found (`make real-backend` writes it)")

    with tempfile.TemporaryDirectory(prefix="slotroute-llama-bench-") as folder:
        directory = pathlib.Path(folder)
        slotd_port, dispatcher_port = free_port(), free_port()
        config = write_config(directory, binary, models, slotd_port, dispatcher_port)
        slotd_address = f"127.0.0.1:{slotd_port}"
        dispatcher_address = f"127.0.0.1:{dispatcher_port}"
        services = []
        try:
            services.append(start_service(
                ["slotd", "--config", str(config), "--listen", slotd_address],
                directory / "slotd.log"))
            await wait_serving("slotd", slotd_address, services[0])
            services.append(start_service(
                ["dispatcher", "--config", str(config), "--listen", dispatcher_address],
                directory / "dispatcher.log"))
            await wait_serving("dispatcher", dispatcher_address, services[1])

            direct: list[float] = []
            resolved: list[float] = []
            async with grpc.aio.insecure_channel(dispatcher_address) as dispatcher_channel, \
                    grpc.aio.insecure_channel(slotd_address) as slotd_channel:
                transport = transport_pb2_grpc.TransportServiceStub(dispatcher_channel)
                slots = slot_pb2_grpc.SlotServiceStub(slotd_channel)
                for index in range(samples):
                    direct.append(await direct_sample(binary, model_path))
                    resolved.append(await resolve_sample(transport, slots))
                    print(f"sample {index + 1}/{samples}: direct {direct[-1] * 1000:.1f} ms, "
                          f"resolve {resolved[-1] * 1000:.1f} ms", file=sys.stderr, flush=True)
        finally:
            for process in reversed(services):
                stop_service(process)
    return direct, resolved


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10,
                        help="samples of each measure (default: 10)")
    parser.add_argument("--models", type=pathlib.Path, default=REPO_ROOT / "build" / "llama-models",
                        help="folder with tiny-llama-a.gguf (default: build/llama-models)")
    parser.add_argument("--header", action="store_true",
                        help="print the markdown table header before the row")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        direct, resolved = asyncio.run(run(args.samples, args.models.resolve()))
    except BenchError as error:
        print(f"llama_cold_start: error: {error}", file=sys.stderr)
        return 1

    direct_ms = statistics.median(direct) * 1000
    resolve_ms = statistics.median(resolved) * 1000
    if args.header:
        print("| backend | samples | llama-server to healthy, median | cold Resolve, median "
              "| overhead |")
        print("|---|---:|---:|---:|---:|")
    print(f"| llama-server {MODEL} (CPU) | {args.samples} | {direct_ms:.1f} ms | "
          f"{resolve_ms:.1f} ms | {resolve_ms - direct_ms:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
