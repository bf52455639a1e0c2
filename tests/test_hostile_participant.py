"""A hostile participant cannot crash, stall, poison or cheat the coordinator (issue 16).

The hostile node here is built outside the project's participant: it leases units through
the real :class:`~coordinator.leasing.UnitFactory`, writes its own bundles and codec
containers, uploads them the way the blob service's ``Put`` records them
(:func:`tests.test_federation_intake.upload_as`) and hands replies to the real
:class:`~coordinator.federation.FederationLoop` (``_handle_reply``, the Flower reply path,
and ``receive``) with the real SQLite database and blob store. For each attack: refused
with a stored reason, nothing applied or credited, the loop goes on, and the memory
bombs stay far below 1 GB.
"""

from __future__ import annotations

import math
import resource
import struct
import time
import tracemalloc

import numpy as np
import psutil
import pytest
import torch

from coordinator.blob_uploads import UploadLedger
from coordinator.db import participants as db_participants
from coordinator.db.leases import get_unit
from coordinator.db.models import Event, Participant, Result, WorkUnit
from coordinator.flower.driver import Reply
from shared_model.codec.container import (
    CODEC_SPARSE_2BIT,
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    pack_container,
    write_shape,
)
from shared_model.codec.entropy import zstd_compress
from shared_model.federated.updates import encode_bundle, make_bundle
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2
from tests import test_db
from tests import test_federation_intake as intake_tests
from tests.test_federation_intake import NODE, make_loop, upload_as

corpus = intake_tests.corpus  # the shared fixtures: the corpus, a throw-away PostgreSQL
pg_url = test_db.pg_url

OTHER = NODE + 99
_seed = iter(range(1, 1 << 30))


def lease(loop, node: int) -> control_pb2.ControlRequest:
    """Lease one unit to ``node`` (registered with two columns) and return its request."""
    with loop.factory.begin() as s:
        cap = db_participants.Capability(max_columns=2)
        p = db_participants.touch_participant(s, node_id=node, capability=cap)
        unit = loop.units.lease(s, p, loop.state)
        return loop.units.request(unit, loop.state, node)


def forge(
    loop, node: int, *, shared: bytes | None = None, column_codec: str | None = None
) -> federation_pb2.WorkResult:
    """A valid result for a fresh lease of ``node``, written by hand (small random updates,
    so no two leases upload the same bytes); ``shared`` replaces the shared bundle and
    ``column_codec`` the codec the unit asked for."""
    req = lease(loop, node)
    unit, store = req.unit, loop.state.store
    gen = torch.Generator().manual_seed(next(_seed))
    result = federation_pb2.WorkResult(
        unit_id=unit.unit_id, base_version=unit.base_version, tokens=req.budget_tokens
    )
    for column in unit.columns:
        master = loop.state.columns.masters[column]
        upd = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in master.items()}
        bundle, _ = encode_bundle(
            upd, column_codec or req.column_codec, kind="column", column=column,
            base_version=unit.base_version,
        )  # fmt: skip
        delta = result.column_deltas.add(column=column)
        delta.delta.content_id = upload_as(store, bundle, unit.unit_id)
    if shared is None:
        master = loop.state.shared.master
        upd = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in master.items()}
        shared, _ = encode_bundle(
            upd, "ternary", kind="shared", column=-1, base_version=unit.base_version
        )
    result.shared_update.blob.content_id = upload_as(store, shared, unit.unit_id)
    return result


def reply(node: int, body: control_pb2.ControlReply) -> Reply:
    """A Flower reply of ``node`` carrying ``body``."""
    return Reply(f"m{next(_seed)}", node, "train.unit", body.SerializeToString(), None, None, 0.0)


def snapshot(loop):
    return {k: v.clone() for k, v in loop.state.shared.master.items()}


def unchanged(loop, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in loop.state.shared.master.items())


def stored(loop, unit_id: str) -> Result:
    with loop.factory() as s:
        return s.query(Result).filter_by(unit_id=unit_id).one()


def events(loop, kind: str) -> list[str]:
    with loop.factory() as s:
        return [e.message for e in s.query(Event).filter_by(kind=kind)]


def credit(loop, node: int) -> int:
    with loop.factory() as s:
        return db_participants.find_participant(s, node_id=node).credit


# --- poisoned fields --------------------------------------------------------------------


@pytest.mark.parametrize("rate", [math.inf, math.nan, -5.0, 1e300])
def test_a_poisoned_speed_is_refused_and_leasing_goes_on(tmp_path, corpus, rate):
    """``tokens_per_s`` inf/NaN/negative/absurd: refused with a logged reason, the node
    keeps its last speed, and the next lease is sized without dividing by zero."""
    loop, _ = make_loop(tmp_path, corpus, unit_seconds=2.0)
    honest = control_pb2.ControlReply(capability=control_pb2.NodeCapability(
        max_columns=2, tokens_per_s=640.0, device="cpu"))  # fmt: skip
    loop._handle_reply(reply(NODE, honest))
    bad = control_pb2.ControlReply(capability=control_pb2.NodeCapability(
        max_columns=2, tokens_per_s=rate, device="x" * 10_000))  # fmt: skip
    loop._handle_reply(reply(NODE, bad))
    assert any("tokens_per_s" in m for m in events(loop, "reply.field_refused"))
    with loop.factory() as s:
        assert db_participants.find_participant(s, node_id=NODE).tokens_per_s == 640.0
    _, req = loop.lease_request(NODE)
    assert req.unit.steps == 10  # 2 s at 640 tokens/s, 128 tokens per step


def test_a_nonsense_speed_already_stored_does_not_stop_leasing(tmp_path, corpus):
    """A database written before replies were checked (inf stored on SQLite) no longer
    puts the coordinator in a crash loop: the unit gets the default size."""
    loop, _ = make_loop(tmp_path, corpus, unit_seconds=2.0)
    lease(loop, NODE)
    for rate in (math.inf, math.nan, 1e308):
        with loop.factory.begin() as s:
            s.query(Participant).update({"tokens_per_s": rate})
        _, req = loop.lease_request(NODE)
        assert req.unit.steps >= 1


def test_long_device_names_and_traffic_claims_fit_their_columns(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    body = control_pb2.ControlReply(
        capability=control_pb2.NodeCapability(
            max_columns=2**32 - 1, threads=2**32 - 1, tokens_per_s=100.0, device="é" * 5000
        ),
        bytes_down=100,
    )
    loop._handle_reply(reply(NODE, body))
    with loop.factory() as s:
        row = db_participants.find_participant(s, node_id=NODE)
        assert len(row.device) <= 64 and row.max_columns <= 1 << 16 and row.bytes_down == 100
    loop._handle_reply(reply(NODE, control_pb2.ControlReply(bytes_down=2**64 - 1)))
    assert any("bytes_down" in m for m in events(loop, "reply.field_refused"))
    with loop.factory() as s:
        assert db_participants.find_participant(s, node_id=NODE).bytes_down == 100


def test_nan_losses_and_timings_are_stored_as_unknown(tmp_path, corpus):
    """NaN/inf train loss and timings (which JSON and PostgreSQL refuse) are stored as
    unknown; the payload itself is judged as usual."""
    loop, _ = make_loop(tmp_path, corpus)
    result = forge(loop, NODE)
    result.train_loss, result.val_loss = math.nan, math.inf
    result.timings.train_s, result.timings.total_s, result.timings.sync_s = math.nan, -1.0, 2.5
    assert loop.receive(NODE, result).accepted
    row = stored(loop, result.unit_id)
    assert row.train_loss is None and row.val_loss is None
    assert row.timings == {
        "sync_s": 2.5, "encode_s": 0.0, "upload_s": 0.0, "score_s": 0.0, "sync_fetches": 0,
        "sync_versions": 0, "eager_results": 0,
    }  # fmt: skip
    assert loop._train_loss == []  # no NaN reaches a version's metrics


def test_absurd_ids_and_references_are_refused_with_reasons(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    result = forge(loop, NODE)
    long_id = federation_pb2.WorkResult()
    long_id.CopyFrom(result)
    long_id.unit_id = "u" * 100_000
    outcome = loop.receive(NODE, long_id)
    assert outcome.reason == "UNKNOWN_LEASE" and len(outcome.unit_id) <= 36
    many = federation_pb2.WorkResult()
    many.CopyFrom(result)
    for c in range(5000):
        many.column_deltas.add(column=c).delta.content_id = "0" * 64
    outcome = loop.receive(NODE, many)
    assert outcome.reason == "MALFORMED" and "column deltas" in outcome.detail
    bad_ref = forge(loop, NODE)
    bad_ref.shared_update.blob.content_id = "../../etc/passwd"
    assert loop.receive(NODE, bad_ref).reason == "MALFORMED"
    assert stored(loop, result.unit_id).blob_ids == {"columns": {}, "shared": ""}


def test_inflated_token_claims_are_refused_and_the_totals_still_add_up(tmp_path, corpus):
    """Results claiming 2^64 - 1 tokens are refused and credit nothing; the stage totals
    summed over their stored rows still fit the database's integers (SQLite's SUM over
    claims clipped at 2^63 - 1 overflowed and stopped serve)."""
    loop, _ = make_loop(tmp_path, corpus)
    honest = forge(loop, NODE)
    assert loop.receive(NODE, honest).accepted
    earned = credit(loop, NODE)
    for _ in range(3):
        inflated = forge(loop, NODE)
        inflated.tokens = 2**64 - 1
        outcome = loop.receive(NODE, inflated)
        assert outcome.reason == "MALFORMED" and "tokens" in outcome.detail, outcome
    totals = loop.totals()
    assert (totals.accepted, totals.rejected, totals.tokens) == (1, 3, honest.tokens)
    assert credit(loop, NODE) == earned


def test_failure_reports_are_bounded_and_only_for_own_leases(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    mine = lease(loop, NODE).unit.unit_id
    theirs = lease(loop, OTHER).unit.unit_id
    ids = [theirs, "x" * 10_000, *[f"junk-{i}" for i in range(300)], mine]
    body = control_pb2.ControlReply(failed_units=ids, failure_reasons=["r" * 100_000] * len(ids))
    loop._handle_reply(reply(NODE, body))
    with loop.factory() as s:
        assert get_unit(s, unit_id=theirs).state == "leased"
        assert get_unit(s, unit_id=mine).state == "leased"  # beyond the per-reply bound
    assert events(loop, "reply.truncated")
    own = control_pb2.ControlReply(failed_units=[mine], failure_reasons=["r" * 100_000])
    loop._handle_reply(reply(NODE, own))
    with loop.factory() as s:
        unit = get_unit(s, unit_id=mine)
        assert unit.state == "failed" and len(unit.state_reason) <= 500


# --- cheap checks first, and no replays -------------------------------------------------


def test_naming_another_nodes_lease_costs_nothing(tmp_path, corpus):
    """20 copies of another node's live lease in one reply: refused (WRONG_NODE) before
    any blob is read, nothing stored, the holder's lease untouched."""
    loop, _ = make_loop(tmp_path, corpus)
    victim = forge(loop, OTHER)
    body = control_pb2.ControlReply(results=[victim] * 20)
    start = time.process_time()  # CPU time, not wall-clock: load-proof
    loop._handle_reply(reply(NODE, body))
    assert time.process_time() - start < 5.0  # 14 s when blobs were decoded first
    with loop.factory() as s:
        assert s.query(Result).count() == 0
        assert get_unit(s, unit_id=victim.unit_id).state == "leased"
    assert len([m for m in events(loop, "result.refused") if "WRONG_NODE" in m]) == 20
    assert loop.receive(OTHER, victim).accepted  # the real holder's answer still counts


def test_columns_in_another_codec_than_the_unit_asked_for_are_refused(tmp_path, corpus):
    """A unit names its column codec (stage 4's all-ternary units: trits); columns coded
    otherwise are refused before they are decoded, and nothing is applied."""
    loop, _ = make_loop(tmp_path, corpus)
    before = {k: v.clone() for k, v in loop.state.shared.master.items()}
    result = forge(loop, NODE, column_codec="ternary")  # the unit asked for sparse
    outcome = loop.receive(NODE, result)
    assert not outcome.accepted
    row = stored(loop, result.unit_id)
    assert row.reject_reason == "MALFORMED" and "not the sparse codec" in row.reject_detail
    assert unchanged(loop, before) and loop._applied == []


def test_replayed_and_borrowed_blobs_are_refused(tmp_path, corpus):
    """An accepted result's blobs re-sent under a new lease, and another node's uploaded
    blobs, are FOREIGN_BLOB: nothing applied, nothing credited."""
    loop, _ = make_loop(tmp_path, corpus)
    first = forge(loop, NODE)
    assert loop.receive(NODE, first).accepted
    earned = credit(loop, NODE)
    replay = forge(loop, NODE)
    replay.shared_update.CopyFrom(first.shared_update)
    del replay.column_deltas[:]
    replay.column_deltas.extend(first.column_deltas)
    before = snapshot(loop)
    outcome = loop.receive(NODE, replay)
    assert outcome.reason == "FOREIGN_BLOB" and first.unit_id in outcome.detail
    theirs = forge(loop, OTHER)
    borrow = forge(loop, NODE)
    borrow.shared_update.CopyFrom(theirs.shared_update)
    outcome = loop.receive(NODE, borrow)
    assert outcome.reason == "FOREIGN_BLOB" and theirs.unit_id in outcome.detail
    published = forge(loop, NODE)
    published.shared_update.blob.content_id = loop.state.store.put_bytes(b"coordinator's own")
    assert loop.receive(NODE, published).reason == "FOREIGN_BLOB"
    assert unchanged(loop, before) and credit(loop, NODE) == earned
    assert stored(loop, replay.unit_id).reject_reason == "FOREIGN_BLOB"


# --- memory and CPU bombs ---------------------------------------------------------------


def _sparse_bomb(_n: int) -> bytes:
    """105 bytes claiming 2^31 elements in chunks of one (16 GiB of chunk tables)."""
    header = struct.pack("<H", 0) + write_shape((1 << 31,)) + struct.pack("<II", 1, 1)
    return pack_container(CODEC_SPARSE_2BIT, header, struct.pack("<Q", 0))


def _zstd_bomb(_n: int) -> bytes:
    """A small zstd frame of 2^26 packed bytes: 2^28 trits, 1 GiB as float32."""
    n = 5 << 26
    header = struct.pack("<HB", 0, 0) + write_shape((n,)) + struct.pack("<f3Q", 0.5, 0, n, 0)
    return pack_container(CODEC_TRITS_ZSTD, header, zstd_compress(bytes([121]) * (n // 5)))


def _rans_bomb(_n: int) -> bytes:
    """~150 bytes of rANS with near-degenerate counts claiming 2^31 - 5 trits."""
    n = (1 << 31) - 5
    header = struct.pack("<HB", 0, 0) + write_shape((n,)) + struct.pack("<f3Q", 0.5, 1, n - 2, 1)
    return pack_container(CODEC_TRITS_ANS, header, np.arange(24, dtype="<u4").tobytes())


def _dense_sparse(n: int) -> bytes:
    """A sparse container of the right size keeping every element (the most work a
    container of the expected size can ask for), with lying indices."""
    header = struct.pack("<H", 0) + write_shape((n,)) + struct.pack("<II", 1, 1)
    payload = zstd_compress(np.zeros(n, "<u2").tobytes())
    scales = np.ones(2 * n, "<f4").tobytes()
    body = struct.pack("<Q", len(payload)) + payload + scales + bytes(-(-2 * n // 8))
    return pack_container(CODEC_SPARSE_2BIT, header, body)


@pytest.mark.parametrize(
    "bomb, reason",
    [
        (_sparse_bomb, "BAD_SHAPE"),
        (_zstd_bomb, "BAD_SHAPE"),
        (_rans_bomb, "BAD_SHAPE"),
        (_dense_sparse, "MALFORMED"),
    ],
)
def test_decoder_bombs_are_refused_cheaply(tmp_path, corpus, bomb, reason):
    """Containers that claim far more than the tensor they stand for are refused before
    anything is allocated; the coordinator's peak memory stays < 1 GB (measured: traced
    allocations during the receive, and the process's peak RSS)."""
    loop, _ = make_loop(tmp_path, corpus)
    name, master = max(loop.state.shared.master.items(), key=lambda kv: kv[1].numel())
    payload = bomb(master.numel())
    shared = make_bundle("shared", -1, 0, {name: payload}, {name: tuple(master.shape)}, named=True)
    result = forge(loop, NODE, shared=shared)
    before = snapshot(loop)
    # ru_maxrss is the process's lifetime peak (earlier tests of a whole suite may have
    # raised it): the decode may not lift it more than 1 GiB above the RSS of now.
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = psutil.Process().memory_info().rss >> 10  # KiB
    tracemalloc.start()
    start = time.process_time()  # CPU time, not wall-clock: load-proof
    outcome = loop.receive(NODE, result)
    elapsed = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert outcome.reason == reason, outcome
    assert elapsed < 5.0 and peak < 64 << 20, (elapsed, peak)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert peak_after <= max(peak_before, rss_now + (1 << 20)), (peak_before, rss_now, peak_after)
    assert unchanged(loop, before) and credit(loop, NODE) == 0
    assert stored(loop, result.unit_id).reject_detail


# --- the loop goes on -------------------------------------------------------------------


def test_an_unexpected_error_is_stored_as_a_refusal_and_the_loop_goes_on(tmp_path, corpus):
    """A fault no check foresaw (here: the upload record of a blob is unreadable, a
    directory in its place) becomes a stored MALFORMED refusal with the error as its
    reason; the reply's other results are still judged."""
    loop, _ = make_loop(tmp_path, corpus)
    broken, good = forge(loop, NODE), forge(loop, NODE)
    record = UploadLedger.for_store(loop.state.store).root / broken.shared_update.blob.content_id
    record.unlink()
    record.mkdir()
    loop._handle_reply(reply(NODE, control_pb2.ControlReply(results=[broken, good])))
    row = stored(loop, broken.unit_id)
    assert row.reject_reason == "MALFORMED" and "IsADirectoryError" in row.reject_detail
    assert stored(loop, good.unit_id).state == "accepted"


def test_garbage_replies_never_raise(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus)
    for payload in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b""):
        loop._handle_reply(Reply("g", NODE, "train.unit", payload, None, None, 0.0))
    result = forge(loop, NODE)
    assert loop.receive(NODE, result).accepted


# --- PostgreSQL: what SQLite lets through, PostgreSQL refuses (DataError) ----------------


def test_poisoned_fields_fit_postgres_columns(pg_url):
    """A NaN loss/timing (JSON has no NaN), a 5000-character device (VARCHAR(64)), 2^32-1
    columns (INTEGER), a 2^64-1 token claim and base version (BIGINT), a 100 000-character
    unit id (VARCHAR(36)): made to fit at the edge, stored on PostgreSQL without error."""
    from coordinator import reply_fields
    from coordinator.db import init_db, make_session_factory
    from coordinator.db.leases import create_lease
    from coordinator.db.versions import publish_version
    from coordinator.intake import payload_of, record_result

    factory = make_session_factory(init_db(pg_url))
    cap = reply_fields.capability(
        control_pb2.NodeCapability(
            max_columns=2**32 - 1, threads=2**32 - 1, device="é" * 5000, tokens_per_s=1e9
        )
    )
    poisoned = federation_pb2.WorkResult(
        tokens=2**64 - 1, base_version=2**64 - 1, train_loss=math.nan, val_loss=math.inf
    )
    poisoned.timings.train_s, poisoned.timings.total_s = math.nan, math.inf
    with factory.begin() as s:
        publish_version(s, parent=None, checksum="v0", metrics={})
        row = db_participants.touch_participant(s, node_id=NODE, capability=cap)
        db_participants.add_traffic(
            s, participant_id=row.id, bytes_down=reply_fields.bytes_down(1 << 40)
        )
        unit = create_lease(s, participant_id=row.id, stage="stage3", base_version=0,
                            columns=[0], docs=[], steps=1, params={}, lease_seconds=60)  # fmt: skip
        poisoned.unit_id = unit.unit_id
        outcome = record_result(s, unit_id=unit.unit_id, node_id=NODE,
                                payload=payload_of(poisoned, 0))  # fmt: skip
        assert outcome.reason == "BASE_MISMATCH"  # judged, and stored with its reason
        poisoned.unit_id = "u" * 100_000
        outcome = record_result(s, unit_id=poisoned.unit_id, node_id=NODE,
                                payload=payload_of(poisoned, 0))  # fmt: skip
        assert outcome.reason == "UNKNOWN_LEASE"
    with factory() as s:
        row = db_participants.find_participant(s, node_id=NODE)
        assert len(row.device) == 64 and row.max_columns == 1 << 16
        stored_row = s.query(Result).one()
        assert stored_row.train_loss is None and stored_row.timings.get("train_s") is None


# --- enrolment bypass -------------------------------------------------------------------


def test_an_enrolled_network_takes_no_unknown_node(tmp_path, corpus):
    """With SuperNode auth (``serve`` with TLS sets ``enrolled_only``), a node the SuperLink
    lists but no enrolled participant owns (a key added with ``flwr supernode register``)
    gets no participant row, no units and no say: its reports and results change nothing."""
    from coordinator.db.errors import ParticipantUnknown

    loop, _ = make_loop(tmp_path, corpus)
    loop.enrolled_only = True
    stranger = NODE + 4242
    with pytest.raises(ParticipantUnknown, match="no enrolled participant"):
        loop._lease_for(stranger)
    body = control_pb2.ControlReply(
        capability=control_pb2.NodeCapability(max_columns=2, tokens_per_s=500.0),
        results=[federation_pb2.WorkResult(unit_id="made-up", base_version=0)],
    )
    loop._handle_reply(reply(stranger, body))
    with loop.factory() as s:
        assert s.query(Participant).count() == 0
        assert s.query(Result).count() == 0
        assert s.query(WorkUnit).count() == 0  # nothing leased
