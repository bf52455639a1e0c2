"""Leasing: in-flight target, expiry and re-queue, re-issue, column affinity."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from coordinator.db import (
    IllegalTransition,
    ParticipantRevoked,
    ParticipantState,
    UnitState,
    WorkUnit,
    init_db,
    leases,
    make_session_factory,
    sqlite_url,
    utcnow,
)
from coordinator.db.events import list_events
from coordinator.db.participants import (
    Capability,
    held_columns,
    revoke_participant,
    set_participant_state,
    touch_participant,
)
from coordinator.db.results import ResultPayload
from coordinator.db.stats import trained_schedule
from coordinator.federation_settings import FederationSettings
from coordinator.intake import record_result
from coordinator.leasing import assign_columns, leases_needed
from coordinator.liveness import Liveness

MAX_ATTEMPTS = FederationSettings().max_attempts


@pytest.fixture
def factory(tmp_path):
    engine = init_db(sqlite_url(tmp_path / "leasing.db"))
    yield make_session_factory(engine)
    engine.dispose()


def _join(factory, node_id, max_columns=4, tps=None):
    with factory.begin() as s:
        return touch_participant(
            s, node_id=node_id, capability=Capability(max_columns=max_columns, tokens_per_s=tps)
        )


def _lease(factory, node_id, columns=(0,), now=None, steps=5, lease_seconds=60):
    with factory.begin() as s:
        part = touch_participant(s, node_id=node_id)
        return leases.create_lease(
            s,
            participant_id=part.id,
            stage="expert_diff",
            base_version=0,
            columns=list(columns),
            docs=["d"],
            steps=steps,
            params={},
            lease_seconds=lease_seconds,
            now=now,
        ).unit_id


def _needed(factory, node_id, now=None):
    with factory.begin() as s:
        return leases_needed(s, node_id=node_id, max_in_flight=2, now=now)


def _expire(factory, now, max_attempts=MAX_ATTEMPTS):
    with factory.begin() as s:
        return leases.expire_leases(s, now=now, max_attempts=max_attempts)


def _next_queued(s, participant, now=None, lease_seconds=10):
    return leases.lease_queued(
        s,
        participant_id=participant.id,
        held_columns=held_columns(s, participant_id=participant.id),
        lease_seconds=lease_seconds,
        now=now or utcnow(),
    )


def test_leases_needed_keeps_two_in_flight(factory):
    assert _needed(factory, 5) == 0  # never seen
    _join(factory, 5)
    assert _needed(factory, 5) == 2
    first = _lease(factory, 5)
    assert _needed(factory, 5) == 1
    _lease(factory, 5)
    assert _needed(factory, 5) == 0
    with factory.begin() as s:
        assert record_result(s, unit_id=first, node_id=5, payload=ResultPayload()).accepted
    assert _needed(factory, 5) == 1
    # A lease past its deadline no longer counts as in flight.
    assert _needed(factory, 5, now=utcnow() + dt.timedelta(seconds=120)) == 2
    # Silent past the stated time, the node goes offline through the running loop's
    # liveness check, and nothing more is leased to it.
    later = lambda: utcnow() + dt.timedelta(seconds=121)  # noqa: E731
    (offline,) = Liveness(factory, silence_s=120, poll_s=0, clock=later).tick()
    with factory() as s:
        assert offline == s.scalar(select(WorkUnit.participant_id))
    assert _needed(factory, 5) == 0


def test_expiry_requeues_copy_with_next_attempt(factory):
    _join(factory, 1)
    _join(factory, 2)
    t0 = utcnow()
    unit_id = _lease(factory, 1, now=t0, lease_seconds=10)
    assert _expire(factory, t0 + dt.timedelta(seconds=5), max_attempts=2) == []
    expired = _expire(factory, t0 + dt.timedelta(seconds=11), max_attempts=2)
    assert [u.unit_id for u in expired] == [unit_id]
    with factory() as s:
        assert s.get(WorkUnit, unit_id).state == UnitState.EXPIRED
        copy = s.scalar(select(WorkUnit).where(WorkUnit.reissued_from == unit_id))
        assert (copy.state, copy.attempt, copy.participant_id) == (UnitState.QUEUED, 2, None)
        assert [e.kind for e in list_events(s, kind="lease.expired").items] == ["lease.expired"]
    # The node that let it expire does not get it back; another one does.
    with factory.begin() as s:
        p1 = touch_participant(s, node_id=1)
        assign_columns(s, participant=p1, n_columns=1)
        assert _next_queued(s, p1) is None
        p2 = touch_participant(s, node_id=2)
        assign_columns(s, participant=p2, n_columns=1)
        got = _next_queued(s, p2, now=t0 + dt.timedelta(seconds=12))
        assert got.unit_id == copy.unit_id and got.state == UnitState.LEASED
    # Second expiry reaches max_attempts: abandoned, not re-queued again.
    _expire(factory, t0 + dt.timedelta(seconds=30), max_attempts=2)
    with factory() as s:
        assert s.scalar(select(WorkUnit).where(WorkUnit.reissued_from == copy.unit_id)) is None
        assert list_events(s, kind="unit.abandoned").total == 1


def test_expired_sized_unit_keeps_its_steps(factory):
    # A unit sized for a fast node (137 steps) is the same work when a slow node redoes it.
    _join(factory, 1, tps=50_000.0)
    _join(factory, 2, tps=500.0)
    t0 = utcnow()
    unit_id = _lease(factory, 1, now=t0, steps=137, lease_seconds=10)
    _expire(factory, t0 + dt.timedelta(seconds=11))
    with factory.begin() as s:
        p2 = touch_participant(s, node_id=2)
        assign_columns(s, participant=p2, n_columns=1)
        got = _next_queued(s, p2, now=t0 + dt.timedelta(seconds=12))
        assert (got.reissued_from, got.steps, got.attempt) == (unit_id, 137, 2)


def test_a_queued_unit_of_another_stage_is_not_leased(factory):
    """A lease of the stage before that expired after it ended is re-queued, but the next
    stage does not hand it out: its update would be trained for the other stage's model."""
    _join(factory, 1)
    _join(factory, 2)
    t0 = utcnow()
    unit_id = _lease(factory, 1, now=t0, lease_seconds=10)  # stage "expert_diff"
    _expire(factory, t0 + dt.timedelta(seconds=11))
    with factory.begin() as s:
        p2 = touch_participant(s, node_id=2)
        assign_columns(s, participant=p2, n_columns=1)
        kw = dict(participant_id=p2.id, held_columns=[0], lease_seconds=10, now=utcnow())
        assert leases.lease_queued(s, stage="ternary_distill", **kw) is None
        got = leases.lease_queued(s, stage="expert_diff", **kw)
        assert got.reissued_from == unit_id


def _three_units_and_one_never_answered(factory):
    """Leased at one moment ``t0`` to one node: three units of 10 steps (returned, for the
    test to answer) and one of 50 that is never answered (no rate may count it)."""
    _join(factory, 1)
    t0 = utcnow()
    done = [_lease(factory, 1, now=t0, steps=10, lease_seconds=600) for _ in range(3)]
    _lease(factory, 1, now=t0, steps=50, lease_seconds=600)
    return t0, done


def test_step_rate_of_a_stage_counts_its_done_units_from_first_lease_to_last_answer(factory):
    """The prior of the next time-budgeted stage's schedule: steps answered per minute."""
    t0, done = _three_units_and_one_never_answered(factory)
    with factory.begin() as s:
        assert leases.stage_step_rate(s, stage="expert_diff") is None  # nothing answered
        for i, unit_id in enumerate(done):
            unit = s.get(WorkUnit, unit_id)
            unit.state, unit.finished_at = UnitState.DONE, t0 + dt.timedelta(seconds=20 * (i + 1))
    with factory.begin() as s:
        # 30 steps from the first lease (t0) to the last answer (t0 + 60 s): 30 a minute.
        assert leases.stage_step_rate(s, stage="expert_diff") == pytest.approx(30.0, rel=1e-3)
        assert leases.stage_step_rate(s, stage="ternary_distill") is None


def test_stage_rate_gives_steps_in_flight_finishing_and_the_recent_answer_rate(factory):
    """What a time-budgeted schedule extrapolates from: the steps leased or queued and not
    answered (a re-queued copy stands for its expired original; a failed unit is out), the
    steps of one unit per node holding some (the end finishes those), and the rate the
    last minute's answers came at (the start-up, slower, left out)."""
    _join(factory, 1)
    _join(factory, 2)
    t0 = utcnow()
    expired = _lease(factory, 1, now=t0, steps=7, lease_seconds=10)  # -> a queued copy
    _lease(factory, 1, now=t0, steps=5, lease_seconds=600)  # still leased
    _lease(factory, 2, now=t0, steps=4, lease_seconds=600)
    _lease(factory, 2, now=t0, steps=9, lease_seconds=600)
    failed = _lease(factory, 2, now=t0, steps=11, lease_seconds=600)
    answered = [_lease(factory, 1, now=t0, steps=10, lease_seconds=600) for _ in range(5)]
    _expire(factory, t0 + dt.timedelta(seconds=11))
    with factory.begin() as s:
        leases.fail_unit(s, unit_id=failed, reason="stage ended", requeue=False, max_attempts=3)
        assert s.get(WorkUnit, expired).state == UnitState.EXPIRED
        rate = leases.stage_rate(s, stage="expert_diff")
        assert (rate.in_flight, rate.finishing, rate.per_s) == (7 + 5 + 4 + 9 + 50, 10 + 9, None)
        # answered at 10, 100, 110, 120, 130 s: the last minute's four, 1 step a second
        for unit_id, at in zip(answered, (10, 100, 110, 120, 130), strict=True):
            unit = s.get(WorkUnit, unit_id)
            unit.state, unit.finished_at = UnitState.DONE, t0 + dt.timedelta(seconds=at)
    with factory.begin() as s:
        rate = leases.stage_rate(s, stage="expert_diff")
        assert (rate.in_flight, rate.finishing) == (7 + 5 + 4 + 9, 5 + 9)
        assert rate.per_s == pytest.approx(1.0)
        assert leases.stage_rate(s, stage="expert_diff", window_s=5).per_s == pytest.approx(1.0)
        assert leases.stage_rate(s, stage="ternary_distill") == leases.StageRate(0, 0, None)


def test_trained_schedule_gives_the_phases_accepted_units_trained_by_answer_time(factory):
    """The demo summary's ``schedule``: lr and ternary phases of the accepted results, in
    seconds from the stage's first lease to each answer (unanswered units count nowhere)."""
    _join(factory, 1)
    t0 = utcnow()
    plan = [(0.25, 3e-3, 10), (0.25, 2e-3, 20), (1.0, 1e-3, 50), (1.0, 1e-4, None)]
    with factory.begin() as s:
        part = touch_participant(s, node_id=1)
        units = [
            leases.create_lease(
                s, participant_id=part.id, stage="stage4", base_version=0, columns=[0],
                docs=["d"], steps=5, params={"ternary_fraction": f, "lr": lr},
                lease_seconds=600, now=t0,
            ).unit_id
            for f, lr, _ in plan
        ]  # fmt: skip
    with factory.begin() as s:
        assert trained_schedule(s, stage="stage4") == {}
        for unit_id, (_, _, answered) in zip(units, plan, strict=True):
            if answered is not None:
                assert record_result(s, unit_id=unit_id, node_id=1, payload=ResultPayload())
                s.get(WorkUnit, unit_id).finished_at = t0 + dt.timedelta(seconds=answered)
    with factory.begin() as s:
        assert trained_schedule(s, stage="stage4") == {
            "seconds": 50.0,
            "lr_max": 3e-3,
            "lr_last": 1e-3,
            "phases": {
                "0.25": {"units": 2, "answered_s": [10.0, 20.0]},
                "1.0": {"units": 1, "answered_s": [50.0, 50.0]},
            },
        }
        assert trained_schedule(s, stage="stage3") == {}


def test_fail_and_reissue(factory):
    _join(factory, 1)
    unit_id = _lease(factory, 1)
    with factory.begin() as s:
        copy = leases.reissue(
            s, unit_id=unit_id, reason="node went offline", max_attempts=MAX_ATTEMPTS
        )
        assert s.get(WorkUnit, unit_id).state == UnitState.FAILED
        assert copy.excluded_participants == [s.get(WorkUnit, unit_id).participant_id]
        with pytest.raises(IllegalTransition):
            leases.fail_unit(
                s, unit_id=unit_id, reason="again", requeue=True, max_attempts=MAX_ATTEMPTS
            )
        with pytest.raises(IllegalTransition, match="still queued"):
            leases.reissue(s, unit_id=copy.unit_id, reason="x", max_attempts=MAX_ATTEMPTS)
    with factory.begin() as s:  # the old holder's late answer is refused
        out = record_result(s, unit_id=unit_id, node_id=1, payload=ResultPayload())
        assert not out.accepted and out.reason == "EXPIRED_LEASE"


def test_columns_balanced_and_sticky(factory):
    assigned = {}
    for node in (1, 2):
        part = _join(factory, node, max_columns=4)
        with factory.begin() as s:
            assigned[node] = assign_columns(s, participant=part, n_columns=8)
    assert assigned[1] == [0, 1, 2, 3] and assigned[2] == [4, 5, 6, 7]
    with factory.begin() as s:  # affinity: asking again changes nothing
        for node in (1, 2):
            part = touch_participant(s, node_id=node)
            assert assign_columns(s, participant=part, n_columns=8) == assigned[node]
    # A weak machine is capped by max_columns; it replicates the least-held column.
    weak = _join(factory, 3, max_columns=1)
    with factory.begin() as s:
        assert assign_columns(s, participant=weak, n_columns=8) == [0]
    # Node 2 leaves: node 1 keeps its columns (no move) ...
    with factory.begin() as s:
        revoke_participant(s, participant_id=touch_participant(s, node_id=2).id)
        assert held_columns(s, participant_id=touch_participant(s, node_id=1).id) == [0, 1, 2, 3]
    # ... a newcomer takes its share (1/3 of 8) of the uncovered ones, then grows to
    # cover the last orphaned column on its next request.
    new = _join(factory, 4, max_columns=4)
    with factory.begin() as s:
        assert assign_columns(s, participant=new, n_columns=8) == [4, 5, 6]
    with factory.begin() as s:
        assert assign_columns(s, participant=new, n_columns=8) == [4, 5, 6, 7]


def test_more_participants_than_columns_replicates(factory):
    got = []
    for node in range(1, 6):
        part = _join(factory, node, max_columns=4)
        with factory.begin() as s:
            got.append(assign_columns(s, participant=part, n_columns=2))
    assert got[0] == [0, 1]  # alone: covers everything it may hold
    assert all(len(cols) == 1 for cols in got[1:])
    holders = [c for cols in got for c in cols]
    assert holders.count(0) >= 2 and holders.count(1) >= 2


def test_throughput_weights_column_share(factory):
    fast = _join(factory, 1, max_columns=8, tps=300.0)
    slow = _join(factory, 2, max_columns=8, tps=100.0)
    with factory.begin() as s:
        set_participant_state(s, participant_id=slow.id, state=ParticipantState.ONLINE)
        assert len(assign_columns(s, participant=fast, n_columns=8)) == 6
        assert assign_columns(s, participant=slow, n_columns=8) == [6, 7]


def test_revoked_participant_gets_nothing(factory):
    part = _join(factory, 9)
    with factory.begin() as s:
        revoke_participant(s, participant_id=part.id)
    assert _needed(factory, 9) == 0
    with factory.begin() as s, pytest.raises(ParticipantRevoked):
        touch_participant(s, node_id=9)


def test_a_copy_kept_for_its_holder_goes_to_others_after_a_lease_length(factory):
    """A lost run's units wait for their online holders one lease length, then anyone may
    redo them; a holder gone offline is not waited for."""
    _join(factory, 1)
    _join(factory, 2)
    t0 = utcnow()
    unit_id = _lease(factory, 1, now=t0, lease_seconds=10)
    with factory.begin() as s:
        leases.expire_leases(
            s, now=t0 + dt.timedelta(days=1), max_attempts=3, exclude_holders=False
        )
    with factory.begin() as s:
        p2 = touch_participant(s, node_id=2)
        assign_columns(s, participant=p2, n_columns=1)
        kw = dict(participant_id=p2.id, held_columns=[1], lease_seconds=10, allow_foreign=True)
        assert leases.lease_queued(s, now=utcnow(), **kw) is None  # kept for node 1
        later = leases.lease_queued(s, now=utcnow() + dt.timedelta(seconds=11), **kw)
        assert later.reissued_from == unit_id
    unit_id = _lease(factory, 1, columns=(0,), lease_seconds=10)
    with factory.begin() as s:
        leases.expire_leases(
            s, now=utcnow() + dt.timedelta(days=1), max_attempts=3, exclude_holders=False
        )
        set_participant_state(
            s, participant_id=touch_participant(s, node_id=1).id, state=ParticipantState.OFFLINE
        )
        got = leases.lease_queued(s, now=utcnow(), **kw)
        assert got.reissued_from == unit_id  # its holder is offline: not waited for
