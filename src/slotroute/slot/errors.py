"""Errors of slotd's core. The gRPC adapter maps each class to one status code."""

from __future__ import annotations


class SlotError(Exception):
    """Base class; the message names the value and what to do."""


class SlotNotFound(SlotError):
    pass


class ModelNotFound(SlotError):
    pass


class ModelNotAllowed(SlotError):
    """The model exists but may not run in that slot, or the slot cannot load models."""


class ModelFileMissing(SlotError):
    pass


class QueueFull(SlotError):
    pass


class InsufficientMemory(SlotError):
    """The model does not fit on its device, even after evicting every slot that may go."""


class DeviceBusy(SlotError):
    """A slot of another exclusive group runs on the device and may not be stopped now."""


class RetryLater(SlotError):
    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


class ShuttingDown(SlotError):
    pass


class LeaseRefused(SlotError):
    """The slot cannot take a lease now (not READY)."""


class InvalidRequest(SlotError):
    """A request field with a value slotd cannot use."""


class TooManyLeases(SlotError):
    pass
