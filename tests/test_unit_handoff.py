"""The rendezvous between a waiting ``Submit`` and the loop (coordinator/unit_handoff.py):
a batch is taken by the call or left to Flower, never both, never neither."""

from __future__ import annotations

import threading

import pytest

from coordinator.acks import AckQueue
from coordinator.db.results import RecordOutcome
from coordinator.unit_handoff import UnitHandoff
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2


def _units(uid: str = "u") -> control_pb2.ControlRequest:
    return control_pb2.ControlRequest(unit=federation_pb2.WorkUnit(unit_id=uid))


def test_a_batch_offered_after_the_wait_gave_up_is_left_to_flower() -> None:
    handoff = UnitHandoff(wait_s=0.05)
    handoff.open()
    ticket = handoff.expect(1)
    assert handoff.wait(ticket) is None  # nobody offered in time
    assert not handoff.waiting(1) and not handoff.offer(1, _units())
    assert handoff.handed == 0


def test_a_batch_offered_before_the_wait_gave_up_is_the_calls() -> None:
    handoff = UnitHandoff(wait_s=5.0)
    handoff.open()
    ticket = handoff.expect(1)
    assert handoff.offer(1, _units("a"))
    assert handoff.cancel(ticket) == _units("a")  # taken even if the call stops now
    assert handoff.handed == 1 and not handoff.offer(1, _units("b"))


def test_the_loop_wakes_the_waiting_call() -> None:
    handoff = UnitHandoff(wait_s=30.0)
    handoff.open()
    ticket = handoff.expect(1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(handoff.wait(ticket)))
    waiter.start()
    assert handoff.offer(1, None)  # nothing to lease now: the call answers at once
    waiter.join(timeout=5)
    assert not waiter.is_alive() and got == [None] and handoff.handed == 0


def test_waits_are_bounded_per_node_in_all_and_by_the_stage() -> None:
    handoff = UnitHandoff(wait_s=1.0, max_waiters=2)
    assert handoff.expect(1) is None  # no stage leases yet
    handoff.open()
    first = handoff.expect(1)
    assert first is not None and handoff.expect(1) is None  # one per node
    assert handoff.expect(2) is not None and handoff.expect(3) is None  # two in all
    handoff.close()
    assert handoff.wait(first) is None and not handoff.waiting(2)
    assert handoff.expect(4) is None


@pytest.mark.parametrize("wait_s, waiters", [(0.0, 1), (1.0, 0)])
def test_bad_bounds_are_refused(wait_s: float, waiters: int) -> None:
    with pytest.raises(ValueError, match="wait_s > 0"):
        UnitHandoff(wait_s=wait_s, max_waiters=waiters)


def test_acks_a_reply_could_not_carry_wait_for_the_next_message() -> None:
    """The loop hands a waiting ``Submit`` the node's acks; when the call gave up, they go
    back to the queue (a newer ack of the same unit, decided meanwhile, wins)."""
    queue = AckQueue()
    queue.add(7, RecordOutcome(unit_id="a", accepted=True))
    carried = control_pb2.ControlRequest()
    assert queue.attach(7, carried) == 1 and queue.nodes() == []
    queue.add(7, RecordOutcome(unit_id="a", accepted=False))  # decided again meanwhile
    queue.requeue(7, carried.acks)
    again = control_pb2.ControlRequest()
    assert queue.attach(7, again) == 1 and not again.acks[0].accepted
