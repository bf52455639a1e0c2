"""Acknowledged delivery (issue 16): no result a participant delivered is lost silently.

Real pieces: the coordinator's :class:`~coordinator.federation.FederationLoop` (its Flower
reply path ``_handle_reply`` and its ack queue), real SQLite and blob store, and the real
:class:`~participant.runtime.ParticipantRuntime` with its on-disk outbox. The results are
hand-written by :func:`tests.test_hostile_participant.forge` (valid updates, uploaded
under their lease), so no unit is trained here. The kill -9 run over a real Flower network
is ``tests/test_federation_flower.py::test_coordinator_sigkill_and_restart_loses_nothing``.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from dataclasses import replace

import pytest

from coordinator.db.leases import get_unit
from coordinator.db.models import Result, WorkUnit
from coordinator.db.types import utcnow
from coordinator.federation import FederationLoop
from coordinator.result_inbox import ResultInbox
from participant.outbox import ResultOutbox
from participant.runtime import ParticipantRuntime
from shared_model.config_loading import load_config
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2
from tests import test_federation_intake as intake_tests
from tests.test_federation_intake import NODE, make_loop
from tests.test_hostile_participant import forge, reply

corpus = intake_tests.corpus


def acks_for(loop, node: int) -> list[federation_pb2.WorkAck]:
    """The acks the next message to ``node`` carries."""
    request = control_pb2.ControlRequest(collect=True)
    loop.acks.attach(node, request)
    return list(request.acks)


def test_a_result_is_acked_after_commit_and_a_resend_is_already_accepted(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    result = forge(loop, NODE)
    body = control_pb2.ControlReply(results=[result])
    loop._handle_reply(reply(NODE, body))
    version = loop.state.version
    (ack,) = acks_for(loop, NODE)
    assert (ack.unit_id, ack.accepted, ack.reason_code) == (result.unit_id, True, "")
    with loop.factory() as s:  # acked only once the decision is in the database
        assert s.query(Result).filter_by(unit_id=result.unit_id).one().state == "accepted"
    # The node did not get the ack (the message was lost) and sends the result again.
    loop._handle_reply(reply(NODE, body))
    (again,) = acks_for(loop, NODE)
    assert again.accepted and again.reason_code == ""  # "already accepted", no refusal
    assert loop.state.version == version and loop._applied == [result.unit_id]  # once
    with loop.factory() as s:
        assert s.query(Result).filter_by(unit_id=result.unit_id).count() == 1
    assert acks_for(loop, NODE) == []  # each ack travels once


def test_a_refused_result_is_acked_with_its_reason(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    stray = federation_pb2.WorkResult(unit_id="never-leased", base_version=0)
    loop._handle_reply(reply(NODE, control_pb2.ControlReply(results=[stray])))
    (ack,) = acks_for(loop, NODE)
    assert not ack.accepted and ack.reason_code == "UNKNOWN_LEASE" and "never-leased" in ack.detail


def test_a_lease_expired_while_the_coordinator_was_down_is_still_judged(tmp_path, corpus):
    """A restart expires every open lease (their Flower run died); the result arriving on
    the new run is judged on its base, accepted, and the queued copy is withdrawn."""
    loop, _ = make_loop(tmp_path, corpus)
    late, on_old_base = forge(loop, NODE), forge(loop, NODE)
    loop._expire_leases(utcnow() + dt.timedelta(days=365))  # what recover() does
    loop._handle_reply(reply(NODE, control_pb2.ControlReply(results=[late])))
    (ack,) = acks_for(loop, NODE)
    assert ack.accepted, ack
    with loop.factory() as s:
        assert get_unit(s, unit_id=late.unit_id).state == "done"
        (copy,) = s.query(WorkUnit).filter_by(reissued_from=late.unit_id).all()
        assert copy.state == "failed" and "answered late" in copy.state_reason
    # A late result that claims another base than its lease's stays refused.
    on_old_base.base_version += 1
    loop._handle_reply(reply(NODE, control_pb2.ControlReply(results=[on_old_base])))
    (refused,) = acks_for(loop, NODE)
    assert not refused.accepted and refused.reason_code == "EXPIRED_LEASE"


def test_the_participant_resends_until_acked_and_records_the_decision(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    state = tmp_path / "participant"
    kept = federation_pb2.WorkResult(unit_id="u-kept", tokens=7)
    ResultOutbox(state / "outbox").put(kept)  # finished before a restart, never acked
    runtime = ParticipantRuntime(loop.state.cfg, state)

    def collect(acks=()) -> list[str]:
        request = control_pb2.ControlRequest(collect=True, acks=list(acks))
        body = control_pb2.ControlReply.FromString(
            runtime.handle("query.collect", request.SerializeToString())
        )
        return [r.unit_id for r in body.results]

    try:
        assert collect() == ["u-kept"]
        assert collect() == []  # sent in the reply just before: its ack is on the way
        assert collect() == ["u-kept"]  # no ack came: sent again
        refused = federation_pb2.WorkAck(
            unit_id="u-kept", accepted=False, reason_code="UNKNOWN_LEASE", detail="no lease"
        )
        assert collect([refused]) == []
        assert collect() == []
    finally:
        runtime.shutdown()
    outbox = ResultOutbox(state / "outbox")
    assert outbox.pending() == []
    assert [(a["unit_id"], a["accepted"], a["reason"]) for a in outbox.acks()] == [
        ("u-kept", False, "UNKNOWN_LEASE")
    ]


def test_a_submitted_result_is_judged_once_and_acked_with_the_next_message(tmp_path, corpus):
    """A result a node submitted through the blob service (the coordinator's inbox) goes
    through the same intake as a replied one: applied once even when the call was retried,
    and acked with the node's next message."""
    loop, _ = make_loop(tmp_path, corpus)
    loop.inbox = ResultInbox()
    result = forge(loop, NODE)
    loop.inbox.put(NODE, result)
    loop.inbox.put(NODE, result)  # a Submit retried after a lost answer
    loop._take_replies(0.0)
    (ack,) = acks_for(loop, NODE)  # one ack per unit, however often it came
    assert (ack.unit_id, ack.accepted, ack.reason_code) == (result.unit_id, True, "")
    assert loop._applied == [result.unit_id] and len(loop.inbox) == 0
    with loop.factory() as s:
        assert s.query(Result).filter_by(unit_id=result.unit_id).one().state == "accepted"


def test_a_step_takes_in_a_slice_of_the_submitted_results_and_collect_all(tmp_path, corpus):
    """A step takes submitted results in for about ``intake_s`` (at least one) and leaves
    the rest, in order, for the next step, so the loop leases between intakes; the end of
    a stage (``intake_s=None``) takes in every one."""
    loop, _ = make_loop(tmp_path, corpus)
    loop.inbox = ResultInbox()
    results = [forge(loop, NODE) for _ in range(3)]
    for result in results:
        loop.inbox.put(NODE, result)
    loop._take_replies(0.0, intake_s=0.0)
    assert [a.unit_id for a in acks_for(loop, NODE)] == [results[0].unit_id]
    assert len(loop.inbox) == 0 and len(loop._submitted) == 2  # drained, not taken in
    loop._take_replies(0.0, intake_s=None)
    assert [a.unit_id for a in acks_for(loop, NODE)] == [r.unit_id for r in results[1:]]
    assert not loop._submitted


@pytest.mark.parametrize("hold", ["_node_gone", "_hold_back"])
def test_a_result_submitted_before_a_hold_began_does_not_lift_it(tmp_path, corpus, hold):
    """A node killed right after a Submit: Flower's error for it (node gone), or its
    leases' expiry, holds it back before its result is drained. That result is still
    judged, but it does not lift the hold (it shows the node was alive before, not now);
    one submitted after does."""
    loop, _ = make_loop(tmp_path, corpus)
    loop.inbox = ResultInbox()
    before, after = forge(loop, NODE), forge(loop, NODE)
    loop.inbox.put(NODE, before)
    getattr(loop, hold)(NODE)
    loop._take_replies(0.0)
    assert loop.nodes.cooling(NODE, time.monotonic())  # still held back: no lease for it
    assert [a.unit_id for a in acks_for(loop, NODE)] == [before.unit_id]  # judged all the same
    loop.inbox.put(NODE, after)
    loop._take_replies(0.0)
    assert not loop.nodes.cooling(NODE, time.monotonic())


def _dead_address() -> str:
    """A port nobody listens on: a unit sent there keeps retrying its first fetch (~3 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _unit(address: str, uid: str, submit: bool) -> bytes:
    work = federation_pb2.WorkUnit(unit_id=uid, columns=[0], steps=1, shard_ids=["a" * 64])
    request = control_pb2.ControlRequest(unit=work, blob_address=address, submit_results=submit)
    return request.SerializeToString()


def test_a_batch_whose_results_are_submitted_is_answered_while_another_unit_trains(tmp_path):
    """With ``submit_results`` the handler answers a unit as soon as it is queued, not when
    the trainer starts it, so the SuperNode can fetch the next message meanwhile; a
    batch's further units (``more_units``) are queued behind it."""
    dead = _dead_address()
    runtime = ParticipantRuntime(load_config("tiny"), tmp_path / "participant")
    try:
        runtime.handle("train.unit", _unit(dead, "busy", submit=False))  # answered once started
        batch = control_pb2.ControlRequest.FromString(_unit(dead, "queued", submit=True))
        batch.more_units.append(control_pb2.ControlRequest.FromString(_unit(dead, "next", True)))
        reply = control_pb2.ControlReply.FromString(
            runtime.handle("train.unit", batch.SerializeToString())
        )
        with runtime._cond:  # the first still fetches its shard: the batch only waits
            assert runtime._busy and not {"queued", "next"} & runtime._started
        assert reply.queued_units == 2 and reply.submits_results
    finally:
        runtime.shutdown(grace_s=30)


def test_a_result_of_the_stage_before_is_refused_and_acked(tmp_path, corpus):
    """A stage-3 result that reaches the coordinator once stage 4 runs (re-sent with a
    reply until acked) is refused, not applied to the stage-4 model, and acked so the node
    forgets it."""
    stage3, _ = make_loop(tmp_path, corpus)
    late = forge(stage3, NODE)
    stage4 = FederationLoop(
        stage3.state, replace(stage3.settings, stage=4), stage3.factory, None, stage3.units,
        stage3.val, stage3.assignment, lambda s: 0.0,
    )  # fmt: skip
    version = stage4.state.version
    stage4._handle_reply(reply(NODE, control_pb2.ControlReply(results=[late])))
    (ack,) = acks_for(stage4, NODE)
    assert not ack.accepted and ack.reason_code == "EXPIRED_LEASE"
    assert "stage3 unit answered while stage4 runs" in ack.detail
    assert stage4._applied == [] and stage4.state.version == version


def test_a_collect_at_the_end_of_a_stage_drops_the_queued_units(tmp_path):
    """``collect`` with ``drop_queued`` (the stage's time is up): the units still queued
    are reported failed ("stage ended") instead of being trained before the next stage's,
    and the answer comes once the unit in progress is done."""
    dead = _dead_address()
    runtime = ParticipantRuntime(load_config("tiny"), tmp_path / "participant")
    try:
        runtime.handle("train.unit", _unit(dead, "busy", submit=False))
        batch = control_pb2.ControlRequest.FromString(_unit(dead, "queued", submit=True))
        batch.more_units.append(control_pb2.ControlRequest.FromString(_unit(dead, "next", True)))
        runtime.handle("train.unit", batch.SerializeToString())
        ask = control_pb2.ControlRequest(collect=True, drop_queued=True)
        reply = control_pb2.ControlReply.FromString(
            runtime.handle("query.collect", ask.SerializeToString())
        )
        failed = dict(zip(reply.failed_units, reply.failure_reasons, strict=True))
        assert "stage ended" in failed["queued"] and "stage ended" in failed["next"]
        assert "busy" in failed and "stage ended" not in failed["busy"]  # it ran, and failed
        assert reply.queued_units == 0 and not runtime._busy
    finally:
        runtime.shutdown(grace_s=30)
