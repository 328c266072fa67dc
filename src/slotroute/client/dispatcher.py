"""DispatcherClient: Resolve and Route with deadlines, over one channel."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grpc

from slotroute import rpc
from slotroute.dispatch.v1 import (
    capability_pb2,
    capability_pb2_grpc,
    route_pb2,
    transport_pb2,
    transport_pb2_grpc,
)


@dataclasses.dataclass(frozen=True)
class Target:
    """The endpoint to send a request to: the result of Resolve or Route."""

    endpoint_url: str
    slot: str
    source: str
    model: str
    tier: str
    state: str
    revision: int
    cold_start: bool
    lease_id: str = ""


class DispatcherClient:
    """Async client of the dispatcher's TransportService and CapabilityService."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=rpc.CLIENT_OPTIONS)
        self._metadata = metadata or None
        self.transport = transport_pb2_grpc.TransportServiceStub(self._channel)
        self.capability = capability_pb2_grpc.CapabilityServiceStub(self._channel)

    async def __aenter__(self) -> DispatcherClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def resolve(
        self,
        model: str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - the gRPC deadline of the call
        no_wait: bool = False,
        no_cold_start: bool = False,
        lease: bool = False,
        lease_ttl: int = 0,
    ) -> Target:
        """Return the endpoint for a model id; raise grpc.aio.AioRpcError on any miss."""
        request = transport_pb2.ResolveRequest(
            model=model,
            policy=route_pb2.WaitPolicy(no_wait=no_wait, no_cold_start=no_cold_start,
                                        lease=lease, lease_ttl_seconds=lease_ttl),
        )
        answer = await self.transport.Resolve(request, timeout=timeout, metadata=self._metadata)
        return _target(answer.target, answer.model, route_pb2.Tier.Name(answer.tier), answer.cold_start)

    async def route(
        self,
        capability: str,
        labels: Mapping[str, str] | None = None,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - the gRPC deadline of the call
        no_wait: bool = False,
        no_cold_start: bool = False,
        lease: bool = False,
        lease_ttl: int = 0,
    ) -> Target:
        """Return the best slot for a capability; raise grpc.aio.AioRpcError if none."""
        request = capability_pb2.RouteRequest(
            capability=capability,
            labels=dict(labels or {}),
            policy=route_pb2.WaitPolicy(no_wait=no_wait, no_cold_start=no_cold_start,
                                        lease=lease, lease_ttl_seconds=lease_ttl),
        )
        answer = await self.capability.Route(request, timeout=timeout, metadata=self._metadata)
        return _target(answer.target, answer.target.model_id, "CAPABILITY", answer.cold_start)

    async def release(self, target: Target) -> bool:
        """Release the lease of a target taken with lease=True."""
        if not target.lease_id:
            return False
        answer = await self.transport.ReleaseLease(
            route_pb2.ReleaseLeaseRequest(source=target.source, lease_id=target.lease_id),
            timeout=10, metadata=self._metadata,
        )
        return answer.released


def _target(target: route_pb2.Target, model: str, tier: str, cold_start: bool) -> Target:
    from slotroute.slot.v1 import slot_pb2

    return Target(
        endpoint_url=target.endpoint_url,
        slot=target.slot,
        source=target.source,
        model=model,
        tier=tier.removeprefix("TIER_"),
        state=slot_pb2.SlotState.Name(target.state).removeprefix("SLOT_STATE_"),
        revision=target.revision,
        cold_start=cold_start,
        lease_id=target.lease.id,
    )
