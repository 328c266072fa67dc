from slotroute.dispatch.v1 import route_pb2 as _route_pb2
from slotroute.slot.v1 import slot_pb2 as _slot_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteRequest(_message.Message):
    __slots__ = ("capability", "labels", "policy")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    capability: str
    labels: _containers.ScalarMap[str, str]
    policy: _route_pb2.WaitPolicy
    def __init__(self, capability: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., policy: _Optional[_Union[_route_pb2.WaitPolicy, _Mapping]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("capability", "target", "cold_start")
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    capability: str
    target: _route_pb2.Target
    cold_start: bool
    def __init__(self, capability: _Optional[str] = ..., target: _Optional[_Union[_route_pb2.Target, _Mapping]] = ..., cold_start: _Optional[bool] = ...) -> None: ...

class ListCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapabilitySlot(_message.Message):
    __slots__ = ("source", "slot")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    source: str
    slot: _slot_pb2.Slot
    def __init__(self, source: _Optional[str] = ..., slot: _Optional[_Union[_slot_pb2.Slot, _Mapping]] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("name", "slots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    slots: _containers.RepeatedCompositeFieldContainer[CapabilitySlot]
    def __init__(self, name: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[CapabilitySlot, _Mapping]]] = ...) -> None: ...

class ListCapabilitiesResponse(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedCompositeFieldContainer[Capability]
    def __init__(self, capabilities: _Optional[_Iterable[_Union[Capability, _Mapping]]] = ...) -> None: ...
