from slotroute.slot.v1 import slot_pb2 as _slot_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_REGISTRY: _ClassVar[Tier]
    TIER_PASSTHROUGH: _ClassVar[Tier]
    TIER_PREFETCH: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_REGISTRY: Tier
TIER_PASSTHROUGH: Tier
TIER_PREFETCH: Tier

class WaitPolicy(_message.Message):
    __slots__ = ("no_wait", "no_cold_start", "lease", "lease_ttl_seconds")
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    NO_COLD_START_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    no_wait: bool
    no_cold_start: bool
    lease: bool
    lease_ttl_seconds: int
    def __init__(self, no_wait: _Optional[bool] = ..., no_cold_start: _Optional[bool] = ..., lease: _Optional[bool] = ..., lease_ttl_seconds: _Optional[int] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("source", "slot", "endpoint_url", "state", "revision", "model_id", "lease")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    source: str
    slot: str
    endpoint_url: str
    state: _slot_pb2.SlotState
    revision: int
    model_id: str
    lease: _slot_pb2.Lease
    def __init__(self, source: _Optional[str] = ..., slot: _Optional[str] = ..., endpoint_url: _Optional[str] = ..., state: _Optional[_Union[_slot_pb2.SlotState, str]] = ..., revision: _Optional[int] = ..., model_id: _Optional[str] = ..., lease: _Optional[_Union[_slot_pb2.Lease, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("source", "lease_id")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    source: str
    lease_id: str
    def __init__(self, source: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
