"""Readiness probes: HTTP status (and body), TCP connect, and gRPC health."""

from __future__ import annotations

import asyncio
import enum

import psutil

from slotroute.slot.config import ProbeSpec

# Bytes of an HTTP response read to look for `body_contains`.
_MAX_BODY = 64 * 1024


class ProbeResult(enum.Enum):
    # Nothing accepts connections on the port.
    REFUSED = "refused"
    # Something responds that it is not ready (HTTP 503 "Loading model").
    NOT_READY = "not ready"
    READY = "ready"


async def probe(spec: ProbeSpec, host: str, port: int) -> tuple[ProbeResult, str]:
    """Run one probe; return its result and a short detail for messages and logs."""
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "tcp":
                return await _probe_tcp(host, port)
            if spec.kind == "grpc":
                return await _probe_grpc(spec, host, port)
            return await _probe_http(spec, host, port)
    except TimeoutError:
        return ProbeResult.NOT_READY, f"probe timed out after {spec.timeout} s"
    except OSError as error:
        return ProbeResult.REFUSED, error.strerror or str(error)
    except ValueError:
        # StreamReader.readline() raises ValueError for a line over its 64 KiB limit.
        return ProbeResult.NOT_READY, "not an HTTP answer: no line end in the first 64 KiB"


async def _probe_tcp(host: str, port: int) -> tuple[ProbeResult, str]:
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    await _closed(writer)
    return ProbeResult.READY, "port accepts connections"


async def _probe_http(spec: ProbeSpec, host: str, port: int) -> tuple[ProbeResult, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = (
            f"GET {spec.path} HTTP/1.1\r\nHost: {authority}\r\n"
            "User-Agent: slotroute-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            return ProbeResult.NOT_READY, "connection closed before an HTTP answer"
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return ProbeResult.NOT_READY, f"not an HTTP answer: {status_line[:60]!r}"
        status = int(parts[1])
        if status != 200:
            return ProbeResult.NOT_READY, f"GET {spec.path} answered {status}"
        if not spec.body_contains:
            return ProbeResult.READY, f"GET {spec.path} answered 200"

        body = await reader.read(_MAX_BODY)
        while len(body) < _MAX_BODY:
            chunk = await reader.read(_MAX_BODY - len(body))
            if not chunk:
                break
            body += chunk
        if spec.body_contains.encode() in body:
            return ProbeResult.READY, f"GET {spec.path} answered 200 with {spec.body_contains!r}"
        return ProbeResult.NOT_READY, f"GET {spec.path} answered 200 without {spec.body_contains!r}"
    finally:
        writer.close()
        await _closed(writer)


async def _probe_grpc(spec: ProbeSpec, host: str, port: int) -> tuple[ProbeResult, str]:
    # Imported here so that the core modules load without grpc.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=spec.service))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return ProbeResult.REFUSED, error.details() or "unavailable"
            return ProbeResult.NOT_READY, f"health check failed: {error.code().name}"
    if answer.status == health_pb2.HealthCheckResponse.SERVING:
        return ProbeResult.READY, "gRPC health SERVING"
    return ProbeResult.NOT_READY, f"gRPC health {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"


async def _closed(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.wait_closed()
    except OSError:
        pass


def listener_pid(pid: int, port: int) -> int | None:
    """Return the pid of the process in `pid`'s tree that listens on `port`, if any.

    Used to report READY only for an answer from the process slotd started,
    not from another program that happens to hold the port.

    NOTE: a backend whose listening socket belongs to a process outside its
    tree, such as a container runtime's port proxy, never passes this check.
    """
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    for process in tree:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
                return process.pid
    return None
