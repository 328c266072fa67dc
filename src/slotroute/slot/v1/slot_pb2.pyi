import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_STATE_UNSPECIFIED: _ClassVar[SlotState]
    SLOT_STATE_OFFLINE: _ClassVar[SlotState]
    SLOT_STATE_STARTING: _ClassVar[SlotState]
    SLOT_STATE_WARMING: _ClassVar[SlotState]
    SLOT_STATE_READY: _ClassVar[SlotState]
    SLOT_STATE_DRAINING: _ClassVar[SlotState]
    SLOT_STATE_UNLOADING: _ClassVar[SlotState]
    SLOT_STATE_ERROR: _ClassVar[SlotState]

class TransitionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSITION_REASON_UNSPECIFIED: _ClassVar[TransitionReason]
    TRANSITION_REASON_PRELOAD: _ClassVar[TransitionReason]
    TRANSITION_REASON_REQUESTED: _ClassVar[TransitionReason]
    TRANSITION_REASON_UNLOAD_REQUESTED: _ClassVar[TransitionReason]
    TRANSITION_REASON_PROBE: _ClassVar[TransitionReason]
    TRANSITION_REASON_CRASHED: _ClassVar[TransitionReason]
    TRANSITION_REASON_START_TIMEOUT: _ClassVar[TransitionReason]
    TRANSITION_REASON_RESTART: _ClassVar[TransitionReason]
    TRANSITION_REASON_IDLE: _ClassVar[TransitionReason]
    TRANSITION_REASON_EVICTED: _ClassVar[TransitionReason]
    TRANSITION_REASON_CONFIG_RELOAD: _ClassVar[TransitionReason]
    TRANSITION_REASON_SHUTDOWN: _ClassVar[TransitionReason]
    TRANSITION_REASON_LAUNCH_FAILED: _ClassVar[TransitionReason]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_SLOT: _ClassVar[EventType]
    EVENT_TYPE_SLOT_REMOVED: _ClassVar[EventType]
    EVENT_TYPE_CATALOG: _ClassVar[EventType]
    EVENT_TYPE_SYNCED: _ClassVar[EventType]
    EVENT_TYPE_HEARTBEAT: _ClassVar[EventType]

class SnapshotReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_REASON_UNSPECIFIED: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_NEW_SUBSCRIBER: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_EPOCH_CHANGED: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_HISTORY_GONE: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_REVISION_AHEAD: _ClassVar[SnapshotReason]
SLOT_STATE_UNSPECIFIED: SlotState
SLOT_STATE_OFFLINE: SlotState
SLOT_STATE_STARTING: SlotState
SLOT_STATE_WARMING: SlotState
SLOT_STATE_READY: SlotState
SLOT_STATE_DRAINING: SlotState
SLOT_STATE_UNLOADING: SlotState
SLOT_STATE_ERROR: SlotState
TRANSITION_REASON_UNSPECIFIED: TransitionReason
TRANSITION_REASON_PRELOAD: TransitionReason
TRANSITION_REASON_REQUESTED: TransitionReason
TRANSITION_REASON_UNLOAD_REQUESTED: TransitionReason
TRANSITION_REASON_PROBE: TransitionReason
TRANSITION_REASON_CRASHED: TransitionReason
TRANSITION_REASON_START_TIMEOUT: TransitionReason
TRANSITION_REASON_RESTART: TransitionReason
TRANSITION_REASON_IDLE: TransitionReason
TRANSITION_REASON_EVICTED: TransitionReason
TRANSITION_REASON_CONFIG_RELOAD: TransitionReason
TRANSITION_REASON_SHUTDOWN: TransitionReason
TRANSITION_REASON_LAUNCH_FAILED: TransitionReason
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_SLOT: EventType
EVENT_TYPE_SLOT_REMOVED: EventType
EVENT_TYPE_CATALOG: EventType
EVENT_TYPE_SYNCED: EventType
EVENT_TYPE_HEARTBEAT: EventType
SNAPSHOT_REASON_UNSPECIFIED: SnapshotReason
SNAPSHOT_REASON_NEW_SUBSCRIBER: SnapshotReason
SNAPSHOT_REASON_EPOCH_CHANGED: SnapshotReason
SNAPSHOT_REASON_HISTORY_GONE: SnapshotReason
SNAPSHOT_REASON_REVISION_AHEAD: SnapshotReason

class Failure(_message.Message):
    __slots__ = ("exit_code", "signal", "signal_name", "stderr_tail", "restart_count", "next_retry_time", "restarts_exhausted")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_NAME_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEXT_RETRY_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    signal_name: str
    stderr_tail: _containers.RepeatedScalarFieldContainer[str]
    restart_count: int
    next_retry_time: _timestamp_pb2.Timestamp
    restarts_exhausted: bool
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., signal_name: _Optional[str] = ..., stderr_tail: _Optional[_Iterable[str]] = ..., restart_count: _Optional[int] = ..., next_retry_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts_exhausted: _Optional[bool] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("name", "device", "capabilities", "default_for", "labels", "state", "model_id", "endpoint_url", "port", "pid", "generation", "state_since", "message", "reason", "failure", "external", "in_flight", "last_used_time", "reserved_bytes", "default_model", "pinned", "priority")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    default_for: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    state: SlotState
    model_id: str
    endpoint_url: str
    port: int
    pid: int
    generation: int
    state_since: _timestamp_pb2.Timestamp
    message: str
    reason: TransitionReason
    failure: Failure
    external: bool
    in_flight: int
    last_used_time: _timestamp_pb2.Timestamp
    reserved_bytes: int
    default_model: str
    pinned: bool
    priority: int
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., default_for: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[SlotState, str]] = ..., model_id: _Optional[str] = ..., endpoint_url: _Optional[str] = ..., port: _Optional[int] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., state_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., reason: _Optional[_Union[TransitionReason, str]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., external: _Optional[bool] = ..., in_flight: _Optional[int] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reserved_bytes: _Optional[int] = ..., default_model: _Optional[str] = ..., pinned: _Optional[bool] = ..., priority: _Optional[int] = ...) -> None: ...

class ListSlotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSlotsResponse(_message.Message):
    __slots__ = ("slots", "revision", "epoch")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    revision: int
    epoch: str
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., revision: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class GetSlotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchSlotsRequest(_message.Message):
    __slots__ = ("resume_epoch", "resume_revision")
    RESUME_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_REVISION_FIELD_NUMBER: _ClassVar[int]
    resume_epoch: str
    resume_revision: int
    def __init__(self, resume_epoch: _Optional[str] = ..., resume_revision: _Optional[int] = ...) -> None: ...

class WatchSlotsResponse(_message.Message):
    __slots__ = ("type", "epoch", "revision", "slot", "catalog", "snapshot", "snapshot_reason")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REASON_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    epoch: str
    revision: int
    slot: Slot
    catalog: _containers.RepeatedCompositeFieldContainer[Model]
    snapshot: bool
    snapshot_reason: SnapshotReason
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., epoch: _Optional[str] = ..., revision: _Optional[int] = ..., slot: _Optional[_Union[Slot, _Mapping]] = ..., catalog: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., snapshot: _Optional[bool] = ..., snapshot_reason: _Optional[_Union[SnapshotReason, str]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "capability", "slots", "memory_bytes", "cached", "file_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    capability: str
    slots: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    cached: bool
    file_bytes: int
    def __init__(self, id: _Optional[str] = ..., capability: _Optional[str] = ..., slots: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("slot", "model_id", "wait")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    slot: str
    model_id: str
    wait: bool
    def __init__(self, slot: _Optional[str] = ..., model_id: _Optional[str] = ..., wait: _Optional[bool] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("slot", "joined", "evicted")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    slot: Slot
    joined: bool
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slot: _Optional[_Union[Slot, _Mapping]] = ..., joined: _Optional[bool] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("slot", "force", "wait")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    slot: str
    force: bool
    wait: bool
    def __init__(self, slot: _Optional[str] = ..., force: _Optional[bool] = ..., wait: _Optional[bool] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("slot",)
    SLOT_FIELD_NUMBER: _ClassVar[int]
    slot: Slot
    def __init__(self, slot: _Optional[_Union[Slot, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("slot", "ttl", "holder")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    slot: str
    ttl: _duration_pb2.Duration
    holder: str
    def __init__(self, slot: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., holder: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("id", "slot", "expire_time", "generation")
    ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    slot: str
    expire_time: _timestamp_pb2.Timestamp
    generation: int
    def __init__(self, id: _Optional[str] = ..., slot: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadConfigResponse(_message.Message):
    __slots__ = ("added", "removed", "restarted", "unchanged")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    restarted: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., restarted: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ...) -> None: ...
