"""slotroute.slot.v1.SlotService: the gRPC adapter over SlotManager.

Handlers translate requests into core calls and core errors into status codes
with google.rpc.ErrorInfo (domain "slotroute.slot.v1"). They hold no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from slotroute import rpc
from slotroute.slot import errors
from slotroute.slot.manager import CatalogEntry, SlotManager
from slotroute.slot.states import Reason, State
from slotroute.slot.supervisor import StartFailed, signal_name
from slotroute.slot.table import SlotStatus
from slotroute.slot.v1 import slot_pb2 as _slot_pb2
from slotroute.slot.v1 import slot_pb2_grpc as _slot_pb2_grpc
from slotroute.slot.watch import Event, EventKind, SnapshotReason

logger = logging.getLogger("slotroute.slot")

DOMAIN = "slotroute.slot.v1"
SERVICE_NAME = _slot_pb2.DESCRIPTOR.services_by_name["SlotService"].full_name


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def slot_to_proto(status: SlotStatus) -> _slot_pb2.Slot:
    message = _slot_pb2.Slot(
        name=status.name,
        device=status.device,
        capabilities=status.capabilities,
        default_for=status.default_for,
        labels=status.labels,
        state=_slot_pb2.SlotState.Value(f"SLOT_STATE_{status.state.value}"),
        model_id=status.model_id,
        endpoint_url=status.endpoint_url,
        port=status.port,
        pid=status.pid,
        generation=status.generation,
        state_since=_timestamp(status.state_since),
        message=status.message,
        reason=_slot_pb2.TransitionReason.Value(f"TRANSITION_REASON_{status.reason.value}"),
        external=status.external,
        in_flight=status.in_flight,
        last_used_time=_timestamp(status.last_used),
        reserved_bytes=status.reserved_bytes,
        default_model=status.default_model,
        pinned=status.pinned,
        priority=status.priority,
    )
    failure = status.failure
    if failure is not None:
        message.failure.CopyFrom(_slot_pb2.Failure(
            exit_code=failure.exit_code,
            signal=failure.signal,
            signal_name=signal_name(failure.signal) if failure.signal else "",
            stderr_tail=failure.stderr_tail,
            restart_count=failure.restart_count,
            next_retry_time=_timestamp(failure.next_retry_at),
            restarts_exhausted=failure.restarts_exhausted,
        ))
    return message


def catalog_to_proto(entries: tuple[CatalogEntry, ...] | list[CatalogEntry]) -> list[_slot_pb2.Model]:
    return [
        _slot_pb2.Model(
            id=entry.id,
            capability=entry.capability,
            slots=entry.slots,
            memory_bytes=entry.memory_bytes,
            cached=entry.cached,
            file_bytes=entry.file_bytes,
        )
        for entry in entries
    ]


# Live event messages kept for sharing between WatchSlots streams.
_LIVE_MESSAGES = 256

_SNAPSHOT_REASONS = {
    None: _slot_pb2.SNAPSHOT_REASON_UNSPECIFIED,
    SnapshotReason.NEW_SUBSCRIBER: _slot_pb2.SNAPSHOT_REASON_NEW_SUBSCRIBER,
    SnapshotReason.EPOCH_CHANGED: _slot_pb2.SNAPSHOT_REASON_EPOCH_CHANGED,
    SnapshotReason.HISTORY_GONE: _slot_pb2.SNAPSHOT_REASON_HISTORY_GONE,
    SnapshotReason.REVISION_AHEAD: _slot_pb2.SNAPSHOT_REASON_REVISION_AHEAD,
}


def event_to_proto(
    event: Event, epoch: str, reason: SnapshotReason | None = None
) -> _slot_pb2.WatchSlotsResponse:
    response = _slot_pb2.WatchSlotsResponse(
        epoch=epoch,
        revision=event.revision,
        snapshot=reason is not None,
        snapshot_reason=_SNAPSHOT_REASONS[reason],
    )
    if event.kind is EventKind.CATALOG:
        response.type = _slot_pb2.EVENT_TYPE_CATALOG
        response.catalog.extend(catalog_to_proto(event.payload))
    elif event.kind is EventKind.SLOT_REMOVED:
        response.type = _slot_pb2.EVENT_TYPE_SLOT_REMOVED
        response.slot.name = event.key
    else:
        response.type = _slot_pb2.EVENT_TYPE_SLOT
        response.slot.CopyFrom(slot_to_proto(event.payload))
    return response


def status_for(error: Exception) -> grpc.Status:
    """Translate a core error into a gRPC status with ErrorInfo."""
    message = str(error)

    def build(code: grpc.StatusCode, reason: str, **extra) -> grpc.Status:
        return rpc.rich_status(code, message, domain=DOMAIN, reason=reason, **extra)

    if isinstance(error, errors.SlotNotFound):
        return build(grpc.StatusCode.NOT_FOUND, "SLOT_NOT_FOUND")
    if isinstance(error, errors.ModelNotFound):
        return build(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    if isinstance(error, errors.ModelNotAllowed):
        return build(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_ALLOWED")
    if isinstance(error, errors.ModelFileMissing):
        return build(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_FILE_MISSING")
    if isinstance(error, errors.QueueFull):
        return build(grpc.StatusCode.RESOURCE_EXHAUSTED, "LOAD_QUEUE_FULL", retry_delay=1.0)
    if isinstance(error, errors.InsufficientMemory):
        return build(grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_MEMORY")
    if isinstance(error, errors.DeviceBusy):
        return build(grpc.StatusCode.RESOURCE_EXHAUSTED, "EXCLUSIVE_GROUP_BUSY")
    if isinstance(error, errors.RetryLater):
        return build(grpc.StatusCode.UNAVAILABLE, "BACKOFF", retry_delay=error.delay)
    if isinstance(error, errors.ShuttingDown):
        return build(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", retry_delay=1.0)
    if isinstance(error, errors.TooManyLeases):
        return build(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_LEASES")
    if isinstance(error, errors.InvalidRequest):
        return build(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    if isinstance(error, errors.LeaseRefused):
        return build(grpc.StatusCode.FAILED_PRECONDITION, "SLOT_NOT_READY")
    if isinstance(error, StartFailed):
        status = error.status
        failure = status.failure
        metadata = {"slot": status.name, "model": status.model_id, "state": status.state.value}
        if failure is not None and failure.exit_code is not None:
            metadata["exit_code"] = str(failure.exit_code)
        if failure is not None and failure.signal is not None:
            metadata["signal"] = signal_name(failure.signal)
        if status.state is State.ERROR:
            if failure is not None and failure.restarts_exhausted:
                return rpc.rich_status(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"slot {status.name!r}: {status.message}",
                                       domain=DOMAIN, reason="START_FAILED", metadata=metadata)
            delay = None
            if failure is not None and failure.next_retry_at is not None:
                delay = max(failure.next_retry_at - time.time(), 0.0)
            return rpc.rich_status(grpc.StatusCode.UNAVAILABLE,
                                   f"slot {status.name!r}: {status.message}",
                                   domain=DOMAIN, reason="START_FAILED", metadata=metadata,
                                   retry_delay=delay)
        return rpc.rich_status(grpc.StatusCode.ABORTED,
                               f"slot {status.name!r}: the start was stopped ({status.message})",
                               domain=DOMAIN, reason="START_ABORTED", metadata=metadata)
    raise error


class SlotService(_slot_pb2_grpc.SlotServiceServicer):
    """Thin adapter: every handler is a core call plus status translation."""

    def __init__(self, manager: SlotManager, *, heartbeat_interval: float, reload=None):
        self._manager = manager
        self._heartbeat = heartbeat_interval
        self._reload = reload
        self._closing = asyncio.Event()
        # Messages of recent live events by revision, built once and sent by every stream.
        self._live_messages: dict[int, _slot_pb2.WatchSlotsResponse] = {}

    def close_streams(self) -> None:
        """End every WatchSlots stream, as slotd does on shutdown."""
        self._closing.set()
        self._manager.log.close_all()

    async def ListSlots(self, request, context):
        log = self._manager.log
        return _slot_pb2.ListSlotsResponse(
            slots=[slot_to_proto(status) for status in self._manager.table.all()],
            revision=log.revision,
            epoch=log.epoch,
        )

    async def GetSlot(self, request, context):
        try:
            return slot_to_proto(self._manager.slot(request.name))
        except errors.SlotError as error:
            await rpc.abort(context, status_for(error))

    async def ListModels(self, request, context):
        return _slot_pb2.ListModelsResponse(models=catalog_to_proto(self._manager.catalog()))

    async def WatchSlots(self, request, context) -> AsyncIterator[_slot_pb2.WatchSlotsResponse]:
        manager = self._manager
        log = manager.log
        subscription, opening = log.subscribe(
            manager.table.snapshot_items, request.resume_epoch, request.resume_revision
        )
        try:
            for event in opening.events:
                yield event_to_proto(event, log.epoch, opening.snapshot_reason)
            yield _slot_pb2.WatchSlotsResponse(
                type=_slot_pb2.EVENT_TYPE_SYNCED,
                epoch=log.epoch,
                revision=opening.revision,
                snapshot=opening.snapshot_reason is not None,
                snapshot_reason=_SNAPSHOT_REASONS[opening.snapshot_reason],
            )
            while not self._closing.is_set():
                event = await subscription.next(timeout=self._heartbeat)
                if subscription.closed:
                    return
                if event is None:
                    yield _slot_pb2.WatchSlotsResponse(
                        type=_slot_pb2.EVENT_TYPE_HEARTBEAT, epoch=log.epoch, revision=log.revision
                    )
                    continue
                yield self._live_message(event, log.epoch)
        finally:
            # Released here so that a cancelled stream frees its queue at once.
            subscription.close()

    def _live_message(self, event: Event, epoch: str) -> _slot_pb2.WatchSlotsResponse:
        """Return the message of a live event, shared by every stream that sends it.

        Streams never change a message they send, so one object serves them all. The
        cache keeps the last _LIVE_MESSAGES revisions; a stream further behind builds its own.
        """
        message = self._live_messages.get(event.revision)
        if message is None:
            message = event_to_proto(event, epoch)
            self._live_messages[event.revision] = message
            if len(self._live_messages) > _LIVE_MESSAGES:
                del self._live_messages[next(iter(self._live_messages))]
        return message

    async def LoadModel(self, request, context):
        try:
            outcome = await self._manager.load(request.slot, request.model_id, wait=request.wait)
        except (errors.SlotError, StartFailed) as error:
            await rpc.abort(context, status_for(error))
        return _slot_pb2.LoadModelResponse(
            slot=slot_to_proto(outcome.status), joined=outcome.joined, evicted=outcome.evicted
        )

    async def UnloadModel(self, request, context):
        try:
            status = await self._manager.unload(request.slot, force=request.force, wait=request.wait)
        except errors.SlotError as error:
            await rpc.abort(context, status_for(error))
        return _slot_pb2.UnloadModelResponse(slot=slot_to_proto(status))

    async def AcquireLease(self, request, context):
        ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
        try:
            lease = self._manager.acquire_lease(request.slot, ttl, request.holder or context.peer())
        except errors.SlotError as error:
            await rpc.abort(context, status_for(error))
        return _slot_pb2.Lease(
            id=lease.id, slot=lease.slot, generation=lease.generation,
            expire_time=_timestamp(lease.expires_at),
        )

    async def ReleaseLease(self, request, context):
        return _slot_pb2.ReleaseLeaseResponse(released=self._manager.release_lease(request.id))

    async def ReloadConfig(self, request, context):
        if self._reload is None:
            await rpc.abort(context, rpc.rich_status(
                grpc.StatusCode.UNIMPLEMENTED, "this slotd was started without a config file to reload",
                domain=DOMAIN, reason="RELOAD_UNAVAILABLE"))
        try:
            result = await self._reload()
        except ValueError as error:
            await rpc.abort(context, rpc.rich_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config rejected, the running config stays: {error}",
                domain=DOMAIN, reason="INVALID_CONFIG"))
        return _slot_pb2.ReloadConfigResponse(**result)


def describe_change(previous: SlotStatus | None, status: SlotStatus | None, revision: int) -> None:
    """Log one line per slot change: lifecycle at info, crashes at warning."""
    if status is None:
        logger.info("slot=%s removed revision=%d", previous.name if previous else "?", revision)
        return
    if previous is not None and previous.state is status.state:
        return
    level = logging.INFO
    if status.state is State.ERROR:
        level = logging.WARNING
    elif status.reason is Reason.PROBE and status.state is State.WARMING and previous \
            and previous.state is State.STARTING:
        level = logging.DEBUG
    logger.log(
        level,
        "slot=%s %s -> %s model=%s generation=%d pid=%d revision=%d reason=%s message=%r",
        status.name,
        previous.state.value if previous else "-",
        status.state.value,
        status.model_id or "-",
        status.generation,
        status.pid,
        revision,
        status.reason.value.lower(),
        status.message,
        # The same facts as fields, for JSON log lines.
        extra={"slot": status.name, "state": status.state.value, "model": status.model_id,
               "revision": revision, "reason": status.reason.value.lower()},
    )


async def cancel_quietly(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
