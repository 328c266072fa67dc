from slotroute.dispatch.v1 import route_pb2 as _route_pb2
from slotroute.slot.v1 import slot_pb2 as _slot_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResolveRequest(_message.Message):
    __slots__ = ("model", "policy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: _route_pb2.WaitPolicy
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[_Union[_route_pb2.WaitPolicy, _Mapping]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("model", "tier", "target", "capability", "cold_start")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: _route_pb2.Tier
    target: _route_pb2.Target
    capability: str
    cold_start: bool
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[_Union[_route_pb2.Tier, str]] = ..., target: _Optional[_Union[_route_pb2.Target, _Mapping]] = ..., capability: _Optional[str] = ..., cold_start: _Optional[bool] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ("include_prefetch",)
    INCLUDE_PREFETCH_FIELD_NUMBER: _ClassVar[int]
    include_prefetch: bool
    def __init__(self, include_prefetch: _Optional[bool] = ...) -> None: ...

class RouteEntry(_message.Message):
    __slots__ = ("model", "aliases", "tier", "source", "slot", "state", "capability")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    tier: _route_pb2.Tier
    source: str
    slot: str
    state: _slot_pb2.SlotState
    capability: str
    def __init__(self, model: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., tier: _Optional[_Union[_route_pb2.Tier, str]] = ..., source: _Optional[str] = ..., slot: _Optional[str] = ..., state: _Optional[_Union[_slot_pb2.SlotState, str]] = ..., capability: _Optional[str] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[RouteEntry]
    def __init__(self, routes: _Optional[_Iterable[_Union[RouteEntry, _Mapping]]] = ...) -> None: ...
