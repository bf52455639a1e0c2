"""Stopping a participant: the unit in progress finishes, its result survives the restart.

Real pieces: the coordinator's loop leases real units (``make_loop``), the participant
runtime fetches and uploads over a real :class:`BlobServer` on 127.0.0.1, trains with the
real trainer, and the coordinator's intake accepts the result delivered after a restart.
"""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.blob_server import BlobServer
from coordinator.db import participants as db_participants
from participant.outbox import ResultOutbox
from participant.runtime import ParticipantRuntime
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2
from tests.conftest import wait_for
from tests.test_federation_intake import NODE, make_loop, published_by

COLLECT = control_pb2.ControlRequest(collect=True).SerializeToString()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_stop_finishes_the_unit_drops_the_queue_and_the_restart_delivers(tmp_path) -> None:
    corpus = prepare_corpus("stdlib", load_config("tiny").model.vocab_size, max_bytes=3_000_000)
    loop, _ = make_loop(tmp_path, corpus)
    with loop.factory.begin() as s:
        cap = db_participants.Capability(max_columns=2)
        participant = db_participants.touch_participant(s, node_id=NODE, capability=cap)
        units = [loop.units.lease(s, participant, loop.state) for _ in "ab"]
        requests = [loop.units.request(u, loop.state, NODE) for u in units]
    state = tmp_path / "participant"
    with BlobServer(loop.state.store, b"k" * 32, published=published_by(loop)) as server:
        for req in requests:
            req.blob_address = server.address
        # A bandwidth cap keeps unit a busy (fetching its checkpoint) for seconds, so unit b
        # is still queued when the stop comes, however fast this machine is.
        runtime = ParticipantRuntime(loop.state.cfg, state, bandwidth_mbps=8)
        first = control_pb2.ControlReply.FromString(
            runtime.handle("train.unit", requests[0].SerializeToString())
        )
        assert not first.results  # pipelined: unit a has only started
        # Unit b is queued behind a (its handler waits until b starts, which never happens).
        threading.Thread(
            target=runtime.handle,
            args=("train.unit", requests[1].SerializeToString()),
            daemon=True,
        ).start()
        # Stop only once b is really queued behind a (otherwise "b dropped" proves nothing).
        wait_for(lambda: runtime._queue.qsize() == 1, 30, "unit b to be queued")
        assert units[0].unit_id in runtime._started and units[1].unit_id not in runtime._started
        t_stop = time.monotonic()
        assert runtime.shutdown(grace_s=240), "the unit in progress should finish in time"
        print(f"\nunit a finished {time.monotonic() - t_stop:.1f} s after the stop")
        outbox = ResultOutbox(state / "outbox")
        (kept,) = outbox.pending()
        assert kept.unit_id == units[0].unit_id
        assert units[1].unit_id not in runtime._started  # dropped, never trained

        restarted = ParticipantRuntime(loop.state.cfg, state)
        try:
            reply = control_pb2.ControlReply.FromString(restarted.handle("query.collect", COLLECT))
            (delivered,) = reply.results
            assert delivered.unit_id == units[0].unit_id and delivered.tokens > 0
            loop.acks.add(NODE, loop.receive(NODE, delivered))
            assert outbox.pending() != []  # carried, but kept until the coordinator acks it
            acked = control_pb2.ControlRequest(collect=True)
            assert loop.acks.attach(NODE, acked) == 1
            restarted.handle("query.collect", acked.SerializeToString())
        finally:
            restarted.shutdown()
    assert outbox.pending() == []  # acknowledged: never sent again
    (ack,) = outbox.acks()
    assert ack["unit_id"] == units[0].unit_id and ack["accepted"]


def test_outbox_round_trip_and_damaged_files_set_aside(tmp_path) -> None:
    outbox = ResultOutbox(tmp_path / "outbox")
    outbox.put(federation_pb2.WorkResult(unit_id="u-1", tokens=128))
    (tmp_path / "outbox" / "u-2.result").write_bytes(b"\xff\xff not a protobuf")
    assert [r.unit_id for r in outbox.pending()] == ["u-1"]
    assert (tmp_path / "outbox" / "u-2.damaged").exists()
    assert outbox.acknowledged(federation_pb2.WorkAck(unit_id="u-1", accepted=True))
    assert not outbox.acknowledged(federation_pb2.WorkAck(unit_id="u-1", accepted=True))
    assert outbox.pending() == [] and [a["unit_id"] for a in outbox.acks()] == ["u-1"]
    with pytest.raises(ValueError, match="cannot name a file"):
        outbox.put(federation_pb2.WorkResult(unit_id="../escape"))
