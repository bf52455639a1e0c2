"""A unit re-queued through no fault of its holder goes back to that holder.

A lost Flower run (``attach``/``recover`` expire every open lease) or a node that missed
its heartbeats (Flower's "node unavailable") re-queues units whose holder is still there.
Given to another node, each costs a download of its columns (in stage 4 also of their
teacher); kept for the holder, it costs nothing. A lease its holder let run out is still
given to someone else (``test_leasing.py::test_expiry_requeues_copy_with_next_attempt``).

Real pieces: the coordinator's :class:`~coordinator.federation.FederationLoop` (its
Flower reply path and lease expiry), its :class:`~coordinator.leasing.UnitFactory`, and
SQLite; the leases are asked for as the loop's step asks (``UnitFactory.lease``).
"""

from __future__ import annotations

import datetime as dt

from coordinator.db import participants as db_participants
from coordinator.db.leases import get_unit
from coordinator.db.models import WorkUnit
from coordinator.db.types import utcnow
from coordinator.flower.driver import Reply
from tests import test_federation_intake as intake_tests
from tests.test_federation_intake import NODE, make_loop
from tests.test_hostile_participant import OTHER, lease

corpus = intake_tests.corpus


def _lease_unit(loop, node: int) -> tuple[str, str | None, list[int]] | None:
    """What the loop's step leases to ``node`` now (a queued copy first, else a new unit):
    ``(unit_id, reissued_from, columns)``."""
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(s, node_id=node)
        unit = loop.units.lease(s, p, loop.state)
        return None if unit is None else (unit.unit_id, unit.reissued_from, list(unit.columns))


def _copy_of(loop, unit_id: str) -> str:
    with loop.factory() as s:
        return s.query(WorkUnit).filter_by(reissued_from=unit_id).one().unit_id


def test_the_units_of_a_lost_flower_run_wait_for_their_holders(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    mine, theirs = lease(loop, NODE).unit, lease(loop, OTHER).unit
    assert set(mine.columns).isdisjoint(theirs.columns)
    before = utcnow()
    loop._expire_leases(utcnow() + dt.timedelta(days=365), hold_back=False)  # attach()
    with loop.factory() as s:  # ended now, not at the far cutoff that expired them all
        ended = s.get(WorkUnit, mine.unit_id).finished_at
        assert before <= ended.replace(tzinfo=before.tzinfo) <= utcnow(), ended
    # The other node takes its own copy back, then a new unit: not NODE's columns.
    first, second = _lease_unit(loop, OTHER), _lease_unit(loop, OTHER)
    assert first[1] == theirs.unit_id and first[2] == list(theirs.columns)
    assert second[1] is None and set(second[2]).isdisjoint(mine.columns)
    got = _lease_unit(loop, NODE)
    assert got[0] == _copy_of(loop, mine.unit_id) and got[2] == list(mine.columns)


def test_a_node_back_from_missed_heartbeats_gets_its_units_back(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    mine = lease(loop, NODE).unit
    lease(loop, OTHER)
    loop._message_units["m-lost"] = [mine.unit_id]
    gone = Reply("m-lost", NODE, "train.unit", None, 5, "Node Unavailable", 0.0)
    loop._handle_reply(gone)  # Flower: the node missed its heartbeats
    copy_id = _copy_of(loop, mine.unit_id)
    with loop.factory() as s:
        assert get_unit(s, unit_id=mine.unit_id).state == "failed"
        assert NODE not in [p.node_id for p in _excluded(s, get_unit(s, unit_id=copy_id))]
    with loop.factory.begin() as s:  # it answers again: online
        db_participants.touch_participant(s, node_id=NODE)
    assert _lease_unit(loop, OTHER)[1] is None  # a new unit of its own columns
    assert _lease_unit(loop, NODE)[0] == copy_id


def test_a_failed_unit_is_not_given_back_to_the_node_that_failed_it(tmp_path, corpus):
    """An error of the participant's own (Flower code 2: its handler raised) still
    excludes it: the unit goes to another node, which downloads its columns."""
    loop, _ = make_loop(tmp_path, corpus)
    mine = lease(loop, NODE).unit
    loop._message_units["m-err"] = [mine.unit_id]
    loop._handle_reply(Reply("m-err", NODE, "train.unit", None, 2, "handler raised", 0.0))
    copy = _copy_of(loop, mine.unit_id)
    assert _lease_unit(loop, NODE)[0] != copy
    assert _lease_unit(loop, OTHER)[0] == copy


def _excluded(session, unit: WorkUnit):
    ids = unit.excluded_participants or []
    return [db_participants.get_participant(session, participant_id=i) for i in ids]
