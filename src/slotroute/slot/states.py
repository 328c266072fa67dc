"""Slot lifecycle states and the table of legal moves between them."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Lifecycle state of a slot; the values match the wire enum's suffixes."""

    OFFLINE = "OFFLINE"
    STARTING = "STARTING"
    WARMING = "WARMING"
    READY = "READY"
    DRAINING = "DRAINING"
    UNLOADING = "UNLOADING"
    ERROR = "ERROR"


class Reason(enum.Enum):
    """Reason for a slot's last state change; the values match the wire enum's suffixes."""

    UNSPECIFIED = "UNSPECIFIED"
    PRELOAD = "PRELOAD"
    REQUESTED = "REQUESTED"
    UNLOAD_REQUESTED = "UNLOAD_REQUESTED"
    PROBE = "PROBE"
    CRASHED = "CRASHED"
    START_TIMEOUT = "START_TIMEOUT"
    RESTART = "RESTART"
    IDLE = "IDLE"
    EVICTED = "EVICTED"
    CONFIG_RELOAD = "CONFIG_RELOAD"
    SHUTDOWN = "SHUTDOWN"
    LAUNCH_FAILED = "LAUNCH_FAILED"


# Legal moves. A process slot goes OFFLINE -> STARTING -> WARMING -> READY and
# back through DRAINING and UNLOADING. STARTING may skip WARMING when the probe
# has no "not ready" result (a TCP probe). ERROR always means no process runs:
# the supervisor kills the child before it reports ERROR, so ERROR leads only to
# a new start or to OFFLINE.
#
# External slots have no process. Their probe moves them between OFFLINE (not
# reachable), WARMING and READY directly; these are the OFFLINE -> WARMING,
# OFFLINE -> READY, WARMING -> OFFLINE and READY -> OFFLINE entries.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.OFFLINE: frozenset({State.STARTING, State.WARMING, State.READY}),
    State.STARTING: frozenset({State.WARMING, State.READY, State.UNLOADING, State.ERROR}),
    State.WARMING: frozenset({State.READY, State.UNLOADING, State.ERROR, State.OFFLINE}),
    State.READY: frozenset(
        {State.WARMING, State.DRAINING, State.UNLOADING, State.ERROR, State.OFFLINE}
    ),
    State.DRAINING: frozenset({State.UNLOADING, State.ERROR}),
    State.UNLOADING: frozenset({State.OFFLINE}),
    State.ERROR: frozenset({State.STARTING, State.OFFLINE}),
}

# States in which a backend process may be running.
PROCESS_STATES = frozenset(
    {State.STARTING, State.WARMING, State.READY, State.DRAINING, State.UNLOADING}
)

# States in which a start is under way and a caller may wait for READY.
LOADING_STATES = frozenset({State.STARTING, State.WARMING})


def is_legal(source: State, target: State) -> bool:
    """Return whether a slot may move from `source` to `target`."""
    return target in TRANSITIONS[source]


class IllegalTransition(Exception):
    """A move that the transition table does not allow."""

    def __init__(self, slot: str, source: State, target: State):
        super().__init__(
            f"slot {slot!r}: illegal transition {source.value} -> {target.value}"
        )
        self.slot = slot
        self.source = source
        self.target = target
