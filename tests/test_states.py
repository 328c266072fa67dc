"""The slot transition table, move by move, and the compare-and-swap that applies it."""

import itertools

import pytest

from slotroute.slot.states import TRANSITIONS, IllegalTransition, Reason, State, is_legal
from slotroute.slot.table import SlotStatus, SlotTable
from slotroute.slot.watch import RevisionLog

LEGAL = {
    (State.OFFLINE, State.STARTING),
    (State.OFFLINE, State.WARMING),
    (State.OFFLINE, State.READY),
    (State.STARTING, State.WARMING),
    (State.STARTING, State.READY),
    (State.STARTING, State.UNLOADING),
    (State.STARTING, State.ERROR),
    (State.WARMING, State.READY),
    (State.WARMING, State.UNLOADING),
    (State.WARMING, State.ERROR),
    (State.WARMING, State.OFFLINE),
    (State.READY, State.WARMING),
    (State.READY, State.DRAINING),
    (State.READY, State.UNLOADING),
    (State.READY, State.ERROR),
    (State.READY, State.OFFLINE),
    (State.DRAINING, State.UNLOADING),
    (State.DRAINING, State.ERROR),
    (State.UNLOADING, State.OFFLINE),
    (State.ERROR, State.STARTING),
    (State.ERROR, State.OFFLINE),
}
ALL_MOVES = list(itertools.product(State, State))


def test_table_covers_every_state():
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("source", "target"), ALL_MOVES, ids=lambda s: s.value)
def test_transition_table_move(source, target):
    assert is_legal(source, target) is ((source, target) in LEGAL)


@pytest.mark.parametrize(("source", "target"), ALL_MOVES, ids=lambda s: s.value)
async def test_compare_and_swap_applies_table(source, target):
    log = RevisionLog()
    table = SlotTable(log)
    table.add(SlotStatus(name="s", device="d", capabilities=("chat",), state=source))
    revision = log.revision

    if (source, target) in LEGAL:
        updated = table.transition("s", source, target, reason=Reason.REQUESTED, message="go")
        assert updated is not None
        assert updated.state is target
        assert table.get("s").state is target
        assert log.revision == revision + 1
    else:
        with pytest.raises(IllegalTransition) as raised:
            table.transition("s", source, target, reason=Reason.REQUESTED)
        assert str(raised.value) == f"slot 's': illegal transition {source.value} -> {target.value}"
        assert table.get("s").state is source
        assert log.revision == revision


async def test_compare_and_swap_loses_race():
    log = RevisionLog()
    table = SlotTable(log)
    table.add(SlotStatus(name="s", device="d", capabilities=("chat",), state=State.READY))

    assert table.transition("s", State.STARTING, State.WARMING, reason=Reason.PROBE) is None
    assert table.get("s").state is State.READY
    assert log.revision == 1
