"""Federation loop without the transport: leases, real unit training, intake, replay.

The participant side is the real :class:`UnitTrainer`; only the two network hops (Flower
for control messages, gRPC for blobs) are replaced by direct calls on the coordinator's
own blob store — so everything that decides what is accepted, applied and published is
exercised here, quickly. The real transports are covered by test_federation_flower.py.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.blob_uploads import UploadLedger
from coordinator.db import init_db, make_session_factory
from coordinator.db import leases as db_leases
from coordinator.db import participants as db_participants
from coordinator.db.leases import get_unit
from coordinator.db.models import Result
from coordinator.federation import END_GRACE_S, FederationLoop
from coordinator.federation_settings import FederationSettings
from coordinator.leasing import UnitFactory
from coordinator.publishing import CoordinatorState
from coordinator.result_inbox import ResultInbox
from coordinator.routing.assignment import initial_assignment
from participant.unit_trainer import BlobIO, UnitTrainer
from shared_model.blobs import BlobStore
from shared_model.blobs.store import sha256_hex
from shared_model.codec.container import BASE, parse_container
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.federated.updates import make_bundle
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

NODE = 1 << 63 | 12345  # Flower node ids use the full unsigned 64-bit range


@pytest.fixture(scope="module")
def corpus():
    cfg = load_config("tiny")
    return prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=3_000_000)


def make_loop(tmp_path, corpus, state_seed=0, **settings):
    torch.manual_seed(state_seed)
    cfg = load_config("tiny", overrides=["train.batch_size=4", "train.seq_len=32"])
    factory = make_session_factory(init_db(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    store = BlobStore(tmp_path / "blobs")
    model = PerspectiveModel(cfg, moe=True)
    train, val = corpus.dataset("train"), corpus.dataset("val")
    # buffer 2 and DiLoCo's outer lr 0.7 / momentum 0.9: what these tests were written against
    fed = FederationSettings(stage=3, eval_batches=1, steps_per_unit=3, buffer_size=2,
                             outer_lr=0.7, outer_momentum=0.9, **settings)  # fmt: skip
    state = CoordinatorState(cfg, model, store, fed)
    assignment = initial_assignment(model, train, cfg.moe.n_experts)
    settings = FederationSettings(stage=3, eval_batches=1, steps_per_unit=3, **settings)
    units = UnitFactory(
        cfg=cfg, stage=3, steps_per_unit=3, docs_per_unit=8, assignment=assignment,
        shards=[tensor_pb2.BlobRef(content_id=store.put_file(corpus.root / "shards" / f"{c}.shard"))
                for c in corpus.shard_ids("train")],
        eot_id=corpus.eot_id, blob_address="in-process", token_key=b"k" * 32,
        lease_seconds=settings.lease_seconds,  # as the coordinator builds it
        column_codec=settings.column_codec, shared_codec=settings.shared_codec,
        shared_threshold=settings.shared_threshold, schedule_steps=1000,
    )  # fmt: skip
    loop = FederationLoop(state, fed, factory, None, units, val, assignment, lambda s: 0.0)
    with factory.begin() as s:
        from coordinator.db import versions

        versions.publish_version(s, parent=None, checksum="v0", metrics={})
    return loop, train


def lease_and_train(loop, train, tmp_path, node: int = NODE):
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(
            s, node_id=node, capability=db_participants.Capability(max_columns=2)
        )
        unit = loop.units.lease(s, p, loop.state)
        req = loop.units.request(unit, loop.state, node)
    trainer = UnitTrainer(loop.state.cfg, train, tmp_path / "participant")
    return req, trainer.run(req, local_io(loop.state.store, req.unit.unit_id))


def published_by(loop):
    """What the coordinator's blob service lets a unit's token read for this in-process
    loop (``Coordinator.is_published``): its published chain and the training shards."""
    shards = {ref.content_id for ref in loop.units.shards}
    return lambda cid: cid in shards or cid in loop.state.publisher.kinds


def upload_as(store, data: bytes, lease: str) -> str:
    """Store ``data`` as the blob service's ``Put`` does for a token of ``lease``: the
    blob, and (if it is new) the record that this lease uploaded it."""
    new = not store.has(sha256_hex(data))
    cid = store.put_bytes(data)
    if new:
        UploadLedger.for_store(store).record(cid, lease)
    return cid


def local_io(store, lease: str) -> BlobIO:
    """A participant's blob I/O on the coordinator's own store (no gRPC hop), uploading
    under ``lease`` (see :func:`upload_as`)."""
    return BlobIO(
        fetch=lambda ref: store.get(ref.content_id),
        upload=lambda data: tensor_pb2.BlobRef(
            content_id=upload_as(store, data, lease), size=len(data)
        ),
    )


def masters_snapshot(state):
    return {k: v.clone() for k, v in state.shared.master.items()}


def test_accept_apply_publish_and_duplicate(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus)
    _, r1 = lease_and_train(loop, train, tmp_path)
    assert loop.receive(NODE, r1).accepted
    _, r2 = lease_and_train(loop, train, tmp_path)
    assert loop.receive(NODE, r2).accepted
    assert loop.state.version == 1  # buffer_size=2 results -> one outer step -> version 1
    before = masters_snapshot(loop.state)
    again = loop.receive(NODE, r2)
    assert again.duplicate and again.accepted
    assert all(torch.equal(before[k], v) for k, v in loop.state.shared.master.items())
    with loop.factory() as s:
        rows = s.query(Result).all()
    assert len(rows) == 2 and {r.applied_in_version for r in rows} == {1}


def test_a_submitted_result_brings_its_nodes_speed(tmp_path, corpus):
    """The capability a node sends with ``Submit`` (most units no longer come with a Flower
    reply, which carried it) is stored when the loop takes the result in: the first, and
    then a speed 10 % off the stored one, not every remeasurement."""
    loop, train = make_loop(tmp_path, corpus)
    loop.inbox = ResultInbox()
    _, result = lease_and_train(loop, train, tmp_path)

    def submit(speed: float) -> float | None:
        cap = control_pb2.NodeCapability(max_columns=2, threads=1, tokens_per_s=speed)
        loop.inbox.put(NODE, result, cap)  # the same result again: a duplicate, acked
        loop._take_replies(0.0)
        with loop.factory() as s:
            return db_participants.find_participant(s, node_id=NODE).tokens_per_s

    assert submit(1000.0) == 1000.0
    with loop.factory() as s:
        assert s.query(Result).filter_by(unit_id=result.unit_id).one().state == "accepted"
    assert submit(1080.0) == 1000.0  # within 10 %: no transaction for it
    assert submit(1500.0) == 1500.0


def _assert_unhashed(store, refs) -> None:
    """Every tensor of every bundle in ``refs`` is framed without a digest (and there are
    tensors to check)."""
    for ref in refs:
        bundle = control_pb2.TensorBundle.FromString(store.get(ref.content_id))
        assert bundle.tensors, ref.content_id
        for t in bundle.tensors:
            item = parse_container(t.payload)
            assert item.size == BASE.size + len(item.header) + len(item.payload)


def test_bundles_up_and_down_carry_unhashed_containers(tmp_path, corpus):
    """The participant's uploads and the coordinator's versions frame each tensor without
    the container's own sha256 (the blob's content id already covers it: 32 bytes a
    tensor saved on the wire), and what they carry is applied as before."""
    loop, train = make_loop(tmp_path, corpus)
    for _ in range(2):
        _, result = lease_and_train(loop, train, tmp_path)
        assert loop.receive(NODE, result).accepted
        up = [d.delta for d in result.column_deltas] + [result.shared_update.blob]
        _assert_unhashed(loop.state.store, up)
    assert loop.state.version == 1
    manifest = control_pb2.VersionManifest.FromString(
        loop.state.store.get(loop.state.publisher.manifests[1].content_id)
    )
    _assert_unhashed(loop.state.store, [manifest.shared, *manifest.columns.values()])


def test_a_column_with_less_than_a_sequence_of_documents_trains_nothing(tmp_path, corpus):
    """A unit whose documents for one column are shorter than a sequence trains its other
    columns (that column's delta is zero) and is accepted; with no column long enough the
    participant refuses the unit and says why (the benchmark's 1-participant `small` run
    had crashed on such a unit)."""
    from participant.unit_trainer import UnitError
    from shared_model.federated.updates import read_bundle

    loop, train = make_loop(tmp_path, corpus)
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(
            s, node_id=NODE, capability=db_participants.Capability(max_columns=2)
        )
        req = loop.units.request(loop.units.lease(s, p, loop.state), loop.state, NODE)
    short = next(int(d) for d in train.doc_ids if train.subset([int(d)]).n_tokens <= req.seq_len)
    first = req.unit.documents[0].column
    kept = [r for r in req.unit.documents if r.column != first]
    del req.unit.documents[:]
    req.unit.documents.add(column=first, doc=short)
    req.unit.documents.extend(kept)
    trainer = UnitTrainer(loop.state.cfg, train, tmp_path / "participant")
    result = trainer.run(req, local_io(loop.state.store, req.unit.unit_id))
    deltas = {d.column: d.delta for d in result.column_deltas}
    for column, ref in deltas.items():
        shapes = {k: tuple(v.shape) for k, v in loop.state.columns.published(column).items()}
        _, decoded = read_bundle(loop.state.store.get(ref.content_id), kind="column",
                                 expected=shapes)  # fmt: skip
        moved = any(bool(t.abs().sum() > 0) for t in decoded.values())
        assert moved == (column != first), column
    assert loop.receive(NODE, result).accepted
    del req.unit.documents[:]
    req.unit.documents.add(column=first, doc=short)
    with pytest.raises(UnitError, match="no column with a sequence's worth"):
        trainer.run(req, local_io(loop.state.store, req.unit.unit_id))


def test_rejections_store_reason_and_change_nothing(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus)
    req, good = lease_and_train(loop, train, tmp_path)
    before = masters_snapshot(loop.state)
    cases = {}
    unknown = type(good)()
    unknown.CopyFrom(good)
    unknown.unit_id = "no-such-unit"
    cases["UNKNOWN_LEASE"] = unknown
    # Wrong shapes: a shared bundle whose first tensor has the wrong shape.
    name = sorted(loop.state.shared.master)[0]
    bad_bundle = make_bundle("shared", -1, 0, {name: b"\x00"}, {name: (1, 2, 3)}, named=True)
    wrong = type(good)()
    wrong.CopyFrom(good)
    wrong.shared_update.blob.content_id = upload_as(loop.state.store, bad_bundle, good.unit_id)
    outcome = loop.receive(NODE, wrong)
    assert not outcome.accepted and outcome.reason == "BAD_SHAPE", outcome
    assert loop.receive(NODE, cases["UNKNOWN_LEASE"]).reason == "UNKNOWN_LEASE"
    assert all(torch.equal(before[k], v) for k, v in loop.state.shared.master.items())
    with loop.factory() as s:
        row = s.query(Result).filter_by(unit_id=good.unit_id).one()
    assert row.state == "rejected" and row.reject_reason == "BAD_SHAPE"


def test_corrupt_blob_is_rejected_as_bad_checksum(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus)
    _, result = lease_and_train(loop, train, tmp_path)
    path = loop.state.store.path(result.shared_update.blob.content_id)
    path.write_bytes(b"corrupted" + path.read_bytes()[9:])
    outcome = loop.receive(NODE, result)
    assert outcome.reason == "BAD_CHECKSUM"


def test_replay_rebuilds_identical_versions(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus)
    for _ in range(4):
        _, r = lease_and_train(loop, train, tmp_path)
        assert loop.receive(NODE, r).accepted
    assert loop.state.version == 2
    manifests = {v: ref.content_id for v, ref in loop.state.publisher.manifests.items()}
    # A "restarted" coordinator: fresh state at version 0, same DB and store.
    restarted, _ = make_loop(tmp_path / "restart", corpus)
    restarted.factory, restarted.state.store = loop.factory, loop.state.store
    restarted.intake.session_factory = loop.factory
    assert restarted.recover() == 4
    assert {v: r.content_id for v, r in restarted.state.publisher.manifests.items()} == manifests
    # The stage's token budget continues where it was (a restart does not extend it).
    assert restarted.stats.tokens == loop.stats.tokens > 0
    assert restarted.stats.accepted == loop.stats.accepted == 4
    for k, v in loop.state.shared.master.items():
        assert torch.equal(restarted.state.shared.master[k], v)


def report(loop, node_id, tokens_per_s):
    """The participant's capability as the loop stores it from a reply."""
    with loop.factory.begin() as s:
        db_participants.touch_participant(
            s,
            node_id=node_id,
            capability=db_participants.Capability(max_columns=2, tokens_per_s=tokens_per_s),
        )


def test_units_are_sized_from_reported_throughput(tmp_path, corpus):
    # batch 4 x seq 32 = 128 tokens per step; a 2 s unit at 640 tokens/s is 10 steps.
    loop, train = make_loop(tmp_path, corpus, unit_seconds=2.0, max_steps_per_unit=200)
    slow, fast = NODE, NODE + 1
    report(loop, slow, None)
    _, before = loop.lease_request(slow)
    assert before.unit.steps == 3  # nothing measured yet: steps_per_unit
    report(loop, slow, 640.0)
    report(loop, fast, 6400.0)
    _, slow_req = loop.lease_request(slow)
    _, fast_req = loop.lease_request(fast)
    assert (slow_req.unit.steps, fast_req.unit.steps) == (10, 100)
    assert slow_req.unit.shared_sync_every == 10  # H is the unit's own
    assert slow_req.budget_tokens == 10 * 128
    # The participant trains exactly the unit's steps.
    io = local_io(loop.state.store, slow_req.unit.unit_id)
    result = UnitTrainer(loop.state.cfg, train, tmp_path / "slow").run(slow_req, io)
    assert result.tokens == 10 * 128
    assert loop.receive(slow, result).accepted


def test_requeued_unit_keeps_its_steps(tmp_path, corpus):
    loop, _ = make_loop(tmp_path, corpus, unit_seconds=2.0, max_steps_per_unit=200)
    fast, slow = NODE, NODE + 1
    report(loop, fast, 6400.0)
    report(loop, slow, 640.0)
    unit_id, req = loop.lease_request(fast)
    assert req.unit.steps == 100
    with loop.factory.begin() as s:
        db_leases.fail_unit(
            s,
            unit_id=unit_id,
            reason="participant crashed",
            requeue=True,
            max_attempts=loop.settings.max_attempts,
        )
    copy_id, copy = loop.lease_request(slow)
    assert copy_id != unit_id and copy.unit.steps == 100  # not re-sized for the slow node
    assert list(copy.unit.documents) == list(req.unit.documents)
    with loop.factory() as s:
        assert get_unit(s, unit_id=copy_id).reissued_from == unit_id


def test_the_end_of_a_stage_waits_for_the_training_each_node_has_left(tmp_path, corpus):
    """``collect`` waits twice the training each asked node still holds at its reported
    speed, plus the grace (the slowest node sets it); with the queue dropped, only the
    unit in progress; a node asked with no lease (a message pending) gets the grace."""
    loop, _ = make_loop(tmp_path, corpus, unit_seconds=2.0, max_steps_per_unit=200)
    slow, idle = NODE, NODE + 1
    report(loop, slow, 640.0)  # 128 tokens a step: 5 steps a second, units of 10 steps
    loop.lease_request(slow)
    loop.lease_request(slow)
    loop.nodes.listed([slow, idle])  # as the SuperLink lists them
    held = loop._steps_held()
    assert held == {slow: [10, 10]}
    asked = {**held, idle: []}
    assert loop._end_wait_s({idle: []}, drop=True) == END_GRACE_S
    assert loop._end_wait_s(asked, drop=True) == pytest.approx(2 * 2.0 + END_GRACE_S)
    assert loop._end_wait_s(asked, drop=False) == pytest.approx(2 * 4.0 + END_GRACE_S)
    # A node with no speed yet (no unit finished since it started) counts as the slowest
    # known (after a flwr stop one such node held a 1.25-minute demo's stage end 2 min).
    new = NODE + 2
    report(loop, new, None)
    assert loop._end_wait_s({**asked, new: [10]}, drop=True) == pytest.approx(2 * 2.0 + END_GRACE_S)
    budget = loop.sizing.lease_fraction * loop.sizing.lease_seconds / loop.sizing.max_in_flight
    assert loop._end_wait_s({new: [10]}, drop=True) == pytest.approx(2 * budget + END_GRACE_S)


def test_request_carries_the_participants_credit(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus)
    req, result = lease_and_train(loop, train, tmp_path)
    assert req.credit_tokens == 0
    assert loop.receive(NODE, result).accepted
    _, after = loop.lease_request(NODE)
    assert after.credit_tokens == result.tokens == 3 * 4 * 32


def test_unit_lr_is_the_central_schedule_at_the_units_token_position(tmp_path, corpus):
    """A unit's lr is what the central trainer uses at the inner step where the units
    leased before it end (warm-up and cosine in optimiser steps), a re-queued copy keeps
    its lr, and a restarted coordinator continues the schedule from the database."""
    from shared_model.schedule import lr_at

    loop, _ = make_loop(tmp_path, corpus)
    optim, total = loop.state.cfg.optim, loop.units.schedule_steps

    def lease(lp, node=NODE):
        with lp.factory.begin() as s:
            p = db_participants.touch_participant(
                s, node_id=node, capability=db_participants.Capability(max_columns=2)
            )
            unit = lp.units.lease(s, p, lp.state)
            return unit.unit_id, unit.steps, lp.units.request(unit, lp.state, node).unit.lr

    position = 0
    for _ in range(3):
        unit_id, steps, lr = lease(loop)
        assert lr == pytest.approx(lr_at(position, optim, total), rel=1e-6)
        position += steps
    assert lr_at(0, optim, total) < lr  # still warming up: the lr moved with the steps
    with loop.factory.begin() as s:
        db_leases.fail_unit(
            s, unit_id=unit_id, reason="x", requeue=True, max_attempts=loop.settings.max_attempts
        )
    _, _, copy_lr = lease(loop, NODE + 1)
    assert copy_lr == lr  # the re-queued copy keeps its place in the schedule
    restarted, _ = make_loop(tmp_path / "restart", corpus)
    restarted.factory = loop.factory
    _, _, after = lease(restarted)
    assert after == pytest.approx(lr_at(position, optim, total), rel=1e-6)


def test_a_unit_trains_its_columns_at_the_expert_lr_scale_it_is_sent(tmp_path, corpus):
    """The coordinator's ``optim.expert_lr_scale`` travels with every unit, and the
    participant's columns take exactly that share of their step (an AdamW step is linear in
    the lr) while the shared layers take the same step; 0 (an older coordinator) is 1."""
    from dataclasses import replace

    loop, train = make_loop(tmp_path, corpus)
    cfg = loop.units.cfg
    loop.units.cfg = replace(cfg, optim=replace(cfg.optim, expert_lr_scale=0.5))
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(
            s, node_id=NODE, capability=db_participants.Capability(max_columns=2)
        )
        req = loop.units.request(loop.units.lease(s, p, loop.state), loop.state, NODE)
    assert req.unit.expert_lr_scale == 0.5
    req.unit.steps = 1
    steps = {}
    for scale in (1.0, 0.5, 0.0):
        req.unit.expert_lr_scale = scale
        trainer = UnitTrainer(loop.state.cfg, train, tmp_path / f"node{scale}")
        trainer.run(req, local_io(loop.state.store, req.unit.unit_id))
        base, trained = trainer.replica, trainer.model.state_dict()
        columns = {
            f"{c}/{k}": v - base.columns[c][k]
            for c, state in trainer.local.columns.items()
            for k, v in state.items()
        }
        shared = {k: trained[k] - v for k, v in base.shared.items()}
        steps[scale] = columns, shared
    (full_cols, full_shared), (half_cols, half_shared) = steps[1.0], steps[0.5]
    assert full_cols and all(d.abs().max() > 0 for d in full_cols.values())
    for k, d in full_cols.items():
        torch.testing.assert_close(half_cols[k], 0.5 * d, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(half_shared[k], d) for k, d in full_shared.items())
    unset_cols, unset_shared = steps[0.0]
    assert all(torch.equal(unset_cols[k], d) for k, d in full_cols.items())
    assert all(torch.equal(unset_shared[k], d) for k, d in full_shared.items())


def test_inflated_token_claims_are_refused_and_credit_untouched(tmp_path, corpus):
    """Credit and stage budgets count tokens: a claim above the unit's steps is refused
    (even 2^64 - 1, which no database column holds) and nothing is applied or credited."""
    loop, train = make_loop(tmp_path, corpus)
    _, result = lease_and_train(loop, train, tmp_path)
    before = masters_snapshot(loop.state)
    result.tokens = 2**64 - 1
    outcome = loop.receive(NODE, result)
    assert not outcome.accepted and outcome.reason == "MALFORMED", outcome
    assert all(torch.equal(before[k], v) for k, v in loop.state.shared.master.items())
    with loop.factory() as s:
        assert db_participants.find_participant(s, node_id=NODE).credit == 0
    assert loop.totals().tokens == 0


def test_a_node_cannot_fail_another_nodes_lease(tmp_path, corpus):
    """``failed_units`` in a reply only fail the sender's own leases."""
    from coordinator.flower.driver import Reply

    loop, train = make_loop(tmp_path, corpus)
    req, _ = lease_and_train(loop, train, tmp_path)  # leased to NODE
    other = NODE + 7
    with loop.factory.begin() as s:
        db_participants.touch_participant(
            s, node_id=other, capability=db_participants.Capability(max_columns=2)
        )
    body = control_pb2.ControlReply(failed_units=[req.unit.unit_id], failure_reasons=["mine!"])
    reply = Reply("m1", other, "train.unit", body.SerializeToString(), None, None, 0.0)
    loop._handle_reply(reply)
    with loop.factory() as s:
        assert get_unit(s, unit_id=req.unit.unit_id).state == "leased"
    own = Reply("m2", NODE, "train.unit", body.SerializeToString(), None, None, 0.0)
    loop._handle_reply(own)
    with loop.factory() as s:
        assert get_unit(s, unit_id=req.unit.unit_id).state == "failed"


def _inf_scale_bundle(store, bundle_id: str, lease: str) -> str:
    """The bundle with its first tensor's ternary scale patched to +inf, re-checksummed
    (what a hostile participant can send: the container is internally consistent)."""
    import struct

    from shared_model.codec import decode_ternary
    from shared_model.codec.container import Reader, pack_container, read_shape

    bundle = control_pb2.TensorBundle.FromString(store.get(bundle_id))
    tensor = bundle.tensors[0]
    container = parse_container(tensor.payload)
    header = bytearray(container.header)
    # Walk the header with the codec's own reader to where the f32 scale starts.
    rd = Reader(memoryview(bytes(header)), "ternary header")
    (name_len,) = rd.unpack("H")
    rd.take(name_len + 1)  # the name and the dtype code
    read_shape(rd)
    scale_at = rd.pos
    assert struct.unpack_from("<f", header, scale_at)[0] == decode_ternary(tensor.payload)[1]
    struct.pack_into("<f", header, scale_at, float("inf"))
    tensor.payload = pack_container(container.codec, bytes(header), bytes(container.payload))
    return upload_as(store, bundle.SerializeToString(), lease)


@pytest.mark.parametrize(
    "case", ["norm", "inf_scale", "missing", "malformed", "stale", "stale_replay"]
)
def test_payload_rejections_through_the_loop(tmp_path, corpus, case):
    """Every payload check, through ``FederationLoop.receive``: refused with its stored
    reason, nothing applied, nothing credited. A replayed upload is named a replay even
    when it also comes too late (provenance is checked before staleness)."""
    stale = {"max_staleness": 1}
    settings = {"norm": {"max_update_norm": 1e-9}, "stale": stale, "stale_replay": stale}
    loop, train = make_loop(tmp_path, corpus, **settings.get(case, {}))
    _, result = lease_and_train(loop, train, tmp_path)
    store = loop.state.store
    if case.startswith("stale"):  # two versions pass while the result travels
        for _ in range(4):
            _, other = lease_and_train(loop, train, tmp_path / "other")
            assert loop.receive(NODE, other).accepted
        assert loop.state.version == 2
        if case == "stale_replay":  # and it carries an accepted result's shared blob
            result.shared_update.CopyFrom(other.shared_update)
    elif case == "inf_scale":
        result.shared_update.blob.content_id = _inf_scale_bundle(
            store, result.shared_update.blob.content_id, result.unit_id
        )
    elif case == "missing":
        result.shared_update.blob.content_id = "0" * 64
    elif case == "malformed":
        result.shared_update.blob.content_id = upload_as(
            store, b"\x08\x01 not a bundle", result.unit_id
        )
    before, credit_before = masters_snapshot(loop.state), loop.totals().tokens
    outcome = loop.receive(NODE, result)
    want = {"norm": "NORM_OUT_OF_BOUNDS", "inf_scale": "MALFORMED", "missing": "MISSING_BLOB",
            "malformed": "MALFORMED", "stale": "STALE_BASE",
            "stale_replay": "FOREIGN_BLOB"}[case]  # fmt: skip
    assert not outcome.accepted and outcome.reason == want, outcome
    assert all(torch.equal(before[k], v) for k, v in loop.state.shared.master.items())
    assert loop.totals().tokens == credit_before
    with loop.factory() as s:
        row = s.query(Result).filter_by(unit_id=result.unit_id).one()
    assert row.state == "rejected" and row.reject_reason == want and row.reject_detail
    if case == "inf_scale":
        assert "not finite" in row.reject_detail
