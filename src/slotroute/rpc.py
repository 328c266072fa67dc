"""gRPC plumbing shared by both services: rich errors, keepalive, health, reflection, servers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from slotroute.netaddr import format_address, parse_listen

logger = logging.getLogger("slotroute.rpc")

# Clients ping every 30 s on idle connections. Servers accept pings every
# 10 s or slower, so a client never collects `too_many_pings` strikes.
CLIENT_KEEPALIVE_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.so_reuseport", 0),
]

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def rich_status(
    code: grpc.StatusCode,
    message: str,
    *,
    domain: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    retry_delay: float | None = None,
) -> grpc.Status:
    """Build a status with google.rpc.ErrorInfo and, when given, RetryInfo details."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {})
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(retry_delay, 0.0) * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


class RpcAbort(Exception):
    """Raised by core-to-status translation; the servicer aborts with `status`."""

    def __init__(self, status: grpc.Status):
        super().__init__(status.details)
        self.status = status


async def abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


def error_details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo | None, float | None]:
    """Extract ErrorInfo and the RetryInfo delay in seconds from a failed call."""
    info = None
    retry_delay = None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    return info, retry_delay


class Service:
    """A grpc.aio server with health and reflection, bound to one address."""

    def __init__(
        self,
        listen: str,
        service_names: Iterable[str],
        register: Callable[[grpc.aio.Server], None],
        *,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ):
        self.service_names = list(service_names)
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        host, _port = parse_listen(listen)
        try:
            if credentials is None:
                bound = self.server.add_insecure_port(listen)
            else:
                bound = self.server.add_secure_port(listen, credentials)
        except RuntimeError:
            # grpcio raises RuntimeError("Failed to bind ...") instead of returning 0.
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {listen}: address in use or not available")
        self.port = bound
        self.address = format_address(host, bound)

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[int]],
) -> int:
    """Run `main(stop_event)`; SIGTERM and SIGINT set the event. Return its exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    try:
        return await main(stop)
    finally:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
