"""The dispatcher's gRPC side toward slotd: the resumable watch and the load/lease calls.

Each source gets one channel. `Subscriber.run()` keeps a WatchSlots stream
open, applies its events to the source table, and after any end of the
stream (error or clean end) resubscribes with jittered backoff, resuming
from the last applied (epoch, revision).
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc
from google.protobuf import duration_pb2

from slotroute import rpc
from slotroute.dispatch.dispatcher import LeaseInfo, LoadError
from slotroute.dispatch.sources import CatalogModel, SlotInfo, SourceTable
from slotroute.slot.states import State
from slotroute.slot.v1 import slot_pb2 as _slot_pb2
from slotroute.slot.v1 import slot_pb2_grpc as _slot_pb2_grpc

logger = logging.getLogger("slotroute.dispatch")


def slot_from_proto(message: _slot_pb2.Slot) -> SlotInfo:
    failure = message.failure
    next_retry = None
    if message.HasField("failure") and failure.HasField("next_retry_time"):
        next_retry = failure.next_retry_time.ToNanoseconds() / 1e9
    return SlotInfo(
        name=message.name,
        state=State(_slot_pb2.SlotState.Name(message.state).removeprefix("SLOT_STATE_"))
        if message.state else State.OFFLINE,
        capabilities=tuple(message.capabilities),
        default_for=tuple(message.default_for),
        labels=dict(message.labels),
        model_id=message.model_id,
        endpoint_url=message.endpoint_url,
        generation=message.generation,
        in_flight=message.in_flight,
        external=message.external,
        default_model=message.default_model,
        message=message.message,
        restarts_exhausted=failure.restarts_exhausted,
        next_retry_at=next_retry,
        device=message.device,
    )


def catalog_from_proto(models) -> list[CatalogModel]:
    return [
        CatalogModel(id=model.id, capability=model.capability, slots=tuple(model.slots),
                     cached=model.cached, memory_bytes=model.memory_bytes)
        for model in models
    ]


class Channels:
    """One channel per slotd address, shared by the watch and the load calls."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None,
                 call_credentials: grpc.CallCredentials | None = None):
        self._credentials = credentials
        self._call_credentials = call_credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> _slot_pb2_grpc.SlotServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS)
            else:
                credentials = self._credentials
                if self._call_credentials is not None:
                    credentials = grpc.composite_channel_credentials(credentials, self._call_credentials)
                channel = grpc.aio.secure_channel(address, credentials, options=rpc.CLIENT_OPTIONS)
            self._channels[address] = channel
        return _slot_pb2_grpc.SlotServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Subscriber:
    """Keeps one source table in sync with its slotd."""

    def __init__(
        self,
        table: SourceTable,
        channels: Channels,
        *,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        watch_timeout: float = 15.0,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        self.table = table
        self._channels = channels
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._watch_timeout = watch_timeout
        self._metadata = metadata
        # Counters for status output and tests.
        self.connects = 0
        self.snapshots = 0
        self.resumes = 0
        self.failures = 0
        self._resume_revision = 0

    async def run(self) -> None:
        attempt = 0
        while True:
            synced = await self._stream_once(attempt)
            self.table.on_disconnected()
            attempt = 0 if synced else attempt + 1
            delay = min(self._backoff_max, self._backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            await asyncio.sleep(delay)

    async def _stream_once(self, attempt: int) -> bool:
        """Read one stream until it ends; return whether it reached SYNCED.

        A stream that delivers no event (heartbeats included) for
        `watch_timeout` seconds counts as lost: a stopped or hung slotd keeps
        its TCP connection open, so only the missing heartbeats show it.
        """
        table = self.table
        request = _slot_pb2.WatchSlotsRequest()
        if table.ever_synced:
            request.resume_epoch = table.epoch
            request.resume_revision = table.revision
        self._resume_revision = request.resume_revision
        synced = False
        loop = asyncio.get_running_loop()
        call = self._channels.stub(table.address).WatchSlots(request, metadata=self._metadata or None)
        try:
            async with asyncio.timeout(self._watch_timeout) as timer:
                async for event in call:
                    timer.reschedule(loop.time() + self._watch_timeout)
                    if not table.connected:
                        table.on_connected()
                        self.connects += 1
                    synced = self._apply(event) or synced
            logger.info("source=%s watch stream ended by slotd; resubscribing", table.address)
        except TimeoutError:
            self.failures += 1
            logger.warning("source=%s sent no event for %.1f s (watch_timeout), so slotd is stopped or "
                           "hung; resubscribing. If that slotd is healthy, raise [dispatcher] "
                           "watch_timeout above its heartbeat_interval", table.address,
                           self._watch_timeout)
        except grpc.aio.AioRpcError as error:
            self.failures += 1
            # The first failure after a loss is a warning; repeats while slotd stays down are debug.
            level = logging.WARNING if attempt == 0 and table.ever_synced else logging.DEBUG
            # A rejected token is a config error, not slotd starting up, so report it loudly.
            if attempt == 0 and error.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                                 grpc.StatusCode.PERMISSION_DENIED):
                level = logging.ERROR
            logger.log(level, "source=%s watch stream failed: %s %s; resubscribing (attempt %d)",
                       table.address, error.code().name, error.details(), attempt + 1)
        finally:
            call.cancel()
        return synced

    def _apply(self, event: _slot_pb2.WatchSlotsResponse) -> bool:
        table = self.table
        kind = event.type
        if kind == _slot_pb2.EVENT_TYPE_HEARTBEAT:
            table.apply_heartbeat(event.revision)
            return False
        # A snapshot SYNCED with no snapshot events before it is an empty snapshot.
        if event.snapshot and not table.snapshot_pending():
            table.begin_snapshot()
        if kind == _slot_pb2.EVENT_TYPE_SLOT:
            table.apply_slot(slot_from_proto(event.slot), event.revision, event.snapshot)
        elif kind == _slot_pb2.EVENT_TYPE_SLOT_REMOVED:
            table.remove_slot(event.slot.name, event.revision)
        elif kind == _slot_pb2.EVENT_TYPE_CATALOG:
            table.apply_catalog(catalog_from_proto(event.catalog), event.revision, event.snapshot)
        elif kind == _slot_pb2.EVENT_TYPE_SYNCED:
            if event.snapshot:
                self.snapshots += 1
                logger.info("source=%s synced from a full snapshot: epoch=%s revision=%d (%s)",
                            table.address, event.epoch, event.revision,
                            _slot_pb2.SnapshotReason.Name(event.snapshot_reason).lower())
            else:
                self.resumes += 1
                logger.info("source=%s resumed: epoch=%s revision %d -> %d", table.address,
                            event.epoch, self._resume_revision, event.revision)
            table.apply_synced(event.epoch, event.revision, event.snapshot)
            return True
        return False


class SlotdBackend:
    """Load and lease calls to slotd, with errors turned into LoadError."""

    def __init__(self, channels: Channels, metadata: tuple[tuple[str, str], ...] = ()):
        self._channels = channels
        self._metadata = metadata or None

    async def load(self, source: str, slot: str, model_id: str, rpc_timeout: float) -> None:
        request = _slot_pb2.LoadModelRequest(slot=slot, model_id=model_id, wait=True)
        try:
            await self._channels.stub(source).LoadModel(request, timeout=rpc_timeout,
                                                         metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _load_error(source, error) from None

    async def acquire_lease(self, source: str, slot: str, ttl: float) -> LeaseInfo:
        request = _slot_pb2.AcquireLeaseRequest(slot=slot, holder="dispatcher")
        if ttl > 0:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl), nanos=int((ttl % 1) * 1e9)))
        try:
            lease = await self._channels.stub(source).AcquireLease(request, timeout=10,
                                                                     metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _load_error(source, error) from None
        return LeaseInfo(id=lease.id, slot=lease.slot, generation=lease.generation,
                         expires_at=lease.expire_time.ToNanoseconds() / 1e9)

    async def release_lease(self, source: str, lease_id: str) -> bool:
        try:
            answer = await self._channels.stub(source).ReleaseLease(
                _slot_pb2.ReleaseLeaseRequest(id=lease_id), timeout=10, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _load_error(source, error) from None
        return answer.released


def _load_error(source: str, error: grpc.aio.AioRpcError) -> LoadError:
    info, retry_after = rpc.error_details(error)
    return LoadError(
        error.code().name,
        f"slotd {source}: {error.details()}",
        reason=info.reason if info else "",
        retry_after=retry_after,
    )
