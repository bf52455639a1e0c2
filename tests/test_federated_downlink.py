"""What participants download: deltas from the version they hold, never a checkpoint again.

The real loop (leasing, intake, publishing) and the participants' own unit trainers run in
this process (:class:`benchmarks.federation_replay.ReplayDriver` takes Flower's place), so
every byte a participant fetches is counted by what it is: a join (the first checkpoint),
a checkpoint reload, a version delta, stage 4's teacher.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

from benchmarks.federation_replay import ReplayDriver
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db import leases as db_leases
from coordinator.db import participants as db_participants
from coordinator.db import results as db_results
from coordinator.db.stats import result_staleness
from coordinator.federation_settings import FederationSettings
from participant.runtime import ParticipantRuntime
from shared_model.wire.perspective.v1 import control_pb2
from tests.conftest import wait_for


@pytest.fixture
def coordinator(tiny_moe_seed, tmp_path):
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    yield coord, ckpt
    coord.shutdown()


def _settings(stage: int) -> FederationSettings:
    # A checkpoint every 2 versions: participants hold versions older than the newest
    # checkpoint all the time, the case that used to reload a whole FP32 checkpoint.
    return FederationSettings(
        stage=stage, steps_per_unit=3, buffer_size=2, checkpoint_every=2, eval_every=1000,
        max_in_flight=2,
    )  # fmt: skip


def _run(coord, driver, stage: int, units: int, **changes) -> None:
    settings = replace(_settings(stage), **changes)
    tokens = units * settings.steps_per_unit * coord.cfg.train.batch_size * coord.cfg.train.seq_len
    loop = coord.federated_stage(driver, StageBudget(tokens=tokens), settings)
    loop.run(lambda: False)


def _prepared(coord, ckpt, tmp_path, **changes) -> ReplayDriver:
    """Stage 3 prepared from the seed, and two in-process participants (speeds 1.0, 1.3)."""
    coord.prepare(ckpt, replace(_settings(3), **changes))
    return ReplayDriver(
        coord.cfg, coord.store, coord.corpus.dataset("train"), tmp_path / "nodes", [1.0, 1.3],
        publisher=coord.state.publisher,
    )  # fmt: skip


def test_participants_sync_through_deltas_and_build_the_teacher_locally(coordinator, tmp_path):
    coord, ckpt = coordinator
    driver = _prepared(coord, ckpt, tmp_path)
    _run(coord, driver, 3, units=12)
    stage3 = driver.traffic()
    assert coord.state.version >= 5 and len(coord.state.publisher.checkpoints) >= 3
    # Each participant downloaded one checkpoint (its join) and deltas after that.
    assert stage3.get("checkpoint", 0) == 0
    assert stage3["join"] > 0 and stage3["delta"] > 0
    _run(coord, driver, 4, units=6)
    stage4 = driver.traffic()
    assert stage4.get("teacher", 0) == 0  # rebuilt from the replica, digest-checked
    assert stage4.get("checkpoint", 0) == 0 and stage4["join"] == stage3["join"]
    assert coord.loop.totals().accepted == 6 and coord.loop.totals().rejected == 0


def test_a_unit_trains_from_the_newest_version_when_it_starts(coordinator, tmp_path):
    """Leased at version v, started after v + 2 were published: trains from v + 2."""
    coord, ckpt = coordinator
    settings = _settings(3)
    coord.prepare(ckpt, settings)
    driver = ReplayDriver(
        coord.cfg, coord.store, coord.corpus.dataset("train"), tmp_path / "nodes", [1.0],
        publisher=coord.state.publisher,
    )  # fmt: skip
    loop = coord.federated_stage(driver, StageBudget(tokens=10**6), settings)
    with coord.session_factory.begin() as s:
        db_participants.touch_participant(s, node_id=1)
    unit_id, request = loop.lease_request(1)
    leased_at = request.unit.base_version
    loop.publish()
    loop.publish()
    driver.push(1, request.SerializeToString(), "train.unit", 60)
    (reply,) = driver.wait_any(0)
    (result,) = control_pb2.ControlReply.FromString(reply.payload).results
    assert result.base_version == leased_at + 2
    outcome = loop.receive(1, result)
    assert outcome.accepted
    with coord.session_factory() as s:
        assert db_leases.find_unit(s, unit_id=unit_id).base_version == leased_at + 2
        assert db_results.find_result(s, unit_id=unit_id).base_version == leased_at + 2


@pytest.mark.parametrize("latency", [0.0, 2.0])
def test_a_result_in_transit_is_not_in_the_base_of_its_nodes_next_unit(
    coordinator, tmp_path, latency
):
    """One participant, a version per result, two units in flight. A result that reaches
    the coordinator the moment its unit ends makes the version the node's next unit
    starts from (nothing is stale); one that travels while the next unit trains (as over
    Flower, where the next unit starts while the last result is encoded and sent; a unit
    here trains 3 virtual seconds) leaves that unit one version behind
    (``result_staleness`` counts it)."""
    coord, ckpt = coordinator
    settings = replace(_settings(3), buffer_size=1)
    coord.prepare(ckpt, settings)
    driver = ReplayDriver(
        coord.cfg, coord.store, coord.corpus.dataset("train"), tmp_path / "nodes", [1.0],
        latency=latency, publisher=coord.state.publisher,
    )  # fmt: skip
    tokens = 6 * settings.steps_per_unit * coord.cfg.train.batch_size * coord.cfg.train.seq_len
    coord.federated_stage(driver, StageBudget(tokens=tokens), settings).run(lambda: False)
    with coord.session_factory() as s:
        staleness = result_staleness(s, stage="stage3")
    if latency == 0:
        assert staleness == {"mean": 0.0, "share": {"0": 1.0}, "eager": 0.0}
    else:  # units that started while their predecessor's result travelled
        assert set(staleness["share"]) == {"0", "1"} and staleness["mean"] > 0.5, staleness


def _lease(coord, node_id: int) -> control_pb2.ControlRequest:
    loop = coord.loop
    with loop.factory.begin() as s:
        cap = db_participants.Capability(max_columns=2)
        p = db_participants.touch_participant(s, node_id=node_id, capability=cap)
        return loop.units.request(loop.units.lease(s, p, loop.state), loop.state, node_id)


def test_unit_tokens_read_what_was_published_never_anothers_upload(coordinator, tmp_path):
    """A unit's capability token reads the published chain, the training shards and
    the checkpoints over the real blob service, and nothing another participant uploaded
    (issue 16: tokens read only what units need), nor through the REST API. A restart's
    restored chain is still readable."""
    import httpx

    from shared_model.blobs.client import BlobClient
    from shared_model.blobs.errors import ScopeDenied

    coord, ckpt = coordinator
    driver = _prepared(coord, ckpt, tmp_path)
    loop = coord.federated_stage(driver, StageBudget(minutes=30), _settings(3))
    loop.run(lambda: coord.state.version >= 3)  # a chain with a checkpoint after v0
    mine, theirs = _lease(coord, 1), _lease(coord, 2)
    published = [mine.checkpoint, *mine.versions]
    assert len(published) >= 2
    with (
        BlobClient(mine.blob_address, token=mine.unit.capability_token) as me,
        BlobClient(theirs.blob_address, token=theirs.unit.capability_token) as other,
    ):
        manifest = control_pb2.CheckpointManifest.FromString(
            me.get_bytes(mine.checkpoint.content_id)
        )
        for ref in (*published, manifest.shared, *manifest.columns.values()):
            assert me.get_bytes(ref.content_id)
        for cid in mine.unit.shard_ids:
            assert me.get_bytes(cid)
        upload = me.put(b"node 1's pseudo-gradient")
        assert me.stat(upload).exists  # the uploader may ask whether it is stored
        with pytest.raises(ScopeDenied):
            other.get_bytes(upload)
    # The REST API's blob route serves the same: published blobs, not uploads.
    api = coord.start_api()
    assert httpx.get(f"{api}/api/v1/blobs/{mine.checkpoint.content_id}").status_code == 200
    assert httpx.get(f"{api}/api/v1/blobs/{upload}").status_code == 404
    # What a restarted coordinator restores from its state file is published again.
    publisher = coord.state.publisher
    meta = publisher.metadata()
    publisher.kinds.clear()
    publisher.restore(meta)
    assert all(coord.is_published(ref.content_id) for ref in published)
    assert not coord.is_published(upload)


def _checkpoint_manifest(coord, ref) -> control_pb2.CheckpointManifest:
    return control_pb2.CheckpointManifest.FromString(coord.store.get(ref.content_id))


def _versions_after(coord, boundary: int) -> list[control_pb2.VersionManifest]:
    publisher = coord.state.publisher
    return [
        control_pb2.VersionManifest.FromString(coord.store.get(publisher.manifests[v].content_id))
        for v in range(boundary + 1, publisher.version + 1)
    ]


def _check_trit_flips(bundle_bytes: bytes, before: dict, after: dict) -> None:
    """Every tensor of a column bundle is a trit-flip delta from ``ternarize(before)`` to
    ``after``'s trits, and re-encodes to the same bytes."""
    from shared_model.codec import apply_delta, encode_delta
    from shared_model.codec.container import CODEC_DELTA, parse_container
    from shared_model.ternary import ternary_round

    bundle = control_pb2.TensorBundle.FromString(bundle_bytes)
    for name, t in zip(sorted(before), bundle.tensors, strict=True):
        assert parse_container(t.payload).codec == CODEC_DELTA
        old, old_scale = ternary_round(before[name])
        new, new_scale = apply_delta(old.numpy().reshape(-1), t.payload)
        again = encode_delta(old.numpy().reshape(-1), new, old_scale, new_scale, hashed=False)
        assert again == t.payload  # bit-exact round trip
        trits, scale = ternary_round(after[name])
        assert torch.equal(trits.reshape(-1), torch.from_numpy(new)), name
        assert abs(scale - new_scale) <= 1e-6 * new_scale, name


def test_stage4_columns_travel_as_trit_flips_that_replay_to_the_published_digests(
    coordinator, tmp_path
):
    """Once stage 4's experts are all ternary (units at fraction 1), its columns go both
    ways as trit-flip deltas (codec 3): each re-encodes to the same bytes from the trits it
    decodes to; a replica that syncs the stage's chain from the boundary checkpoint reaches
    every published digest, with ternary columns equal to the coordinator's; the FP latent
    stays with the participant that trains it. Before that, columns travel as FP updates."""
    from coordinator.db.models import Result, WorkUnit
    from shared_model.codec.container import CODEC_DELTA, CODEC_SPARSE_2BIT, parse_container
    from shared_model.federated.replica import Replica
    from shared_model.ternary import is_ternary

    coord, ckpt = coordinator
    driver = _prepared(coord, ckpt, tmp_path)
    _run(coord, driver, 3, units=4)
    boundary = coord.state.version
    start_ref, to_boundary = coord.state.publisher.chain_for(boundary)
    _run(coord, driver, 4, units=12)
    assert coord.loop.totals().accepted == 12 and coord.loop.totals().rejected == 0
    # Up: units at fraction 1 (and only they) asked for trits and sent trit flips.
    with coord.session_factory() as s:
        rows = s.query(WorkUnit, Result).join(Result, WorkUnit.unit_id == Result.unit_id)
        units = [(u.params, r.blob_ids) for u, r in rows.filter(WorkUnit.stage == "stage4")]
    ternary = [ids for params, ids in units if params["ternary_fraction"] == 1.0]
    assert 0 < len(ternary) < len(units)
    for params, ids in units:
        trits = params["ternary_fraction"] == 1.0
        assert params["column_codec"] == ("trits" if trits else "sparse")
        for cid in ids["columns"].values():
            bundle = control_pb2.TensorBundle.FromString(coord.store.get(cid))
            codecs = {parse_container(t.payload).codec for t in bundle.tensors}
            assert codecs == {CODEC_DELTA if trits else CODEC_SPARSE_2BIT}
    # Down: the version chain, replayed from the boundary with every tensor checked.
    fetch = lambda ref: coord.store.get(ref.content_id)  # noqa: E731
    replica, columns = Replica(), sorted(coord.state.columns.masters)
    start = control_pb2.CheckpointManifest.FromString(fetch(start_ref))
    chain = [control_pb2.VersionManifest.FromString(fetch(r)) for r in to_boundary]
    replica.sync(start, chain, columns, fetch)
    assert replica.version == boundary
    trit_versions = []
    for manifest in _versions_after(coord, boundary):
        before = {c: {k: v.clone() for k, v in s.items()} for c, s in replica.columns.items()}
        replica.apply(manifest, fetch)  # every tensor's digest checked
        bundles = {c: fetch(ref) for c, ref in manifest.columns.items()}
        first = control_pb2.TensorBundle.FromString(next(iter(bundles.values())))
        if parse_container(first.tensors[0].payload).codec != CODEC_DELTA:
            assert not trit_versions, "columns went back to FP updates"
            continue
        trit_versions.append(manifest.version)
        for c, data in bundles.items():
            _check_trit_flips(data, before[c], replica.columns[c])
        if len(trit_versions) == 1:  # the switch: every column published as its trits
            assert sorted(bundles) == columns
    assert len(trit_versions) >= 2, trit_versions
    assert replica.version == coord.state.version
    for c in columns:
        published = coord.state.columns.published(c)
        assert all(torch.equal(replica.columns[c][k], v) for k, v in published.items())
        assert all(is_ternary(v) for v in published.values())
    # The FP latents the trits came from stay with their owners.
    latents = [s for node in driver.nodes.values() for s in node.trainer.local.columns.values()]
    assert latents and not any(is_ternary(v) for s in latents for v in s.values())


def test_versions_published_while_a_unit_trains_are_prefetched_for_the_next_sync(
    coordinator, tmp_path
):
    """The participant runtime fetches the versions published while its unit trains, over
    the real blob service, and applies them to a view of its replica: the next unit adopts
    it, starts from the newest version and its sync fetches nothing over the network
    (``Timings.sync_fetches``)."""
    coord, ckpt = coordinator
    driver = _prepared(coord, ckpt, tmp_path)
    loop = coord.federated_stage(driver, StageBudget(minutes=30), _settings(3))
    first = _lease(coord, 1)
    first.unit.steps = 40  # long enough to publish while it trains
    runtime = ParticipantRuntime(coord.cfg, tmp_path / "participant")
    try:
        runtime.handle("train.unit", first.SerializeToString())
        wait_for(
            lambda: runtime.trainer and runtime.trainer.replica.version is not None,
            60, "the first unit's sync", every=0.01,
        )  # fmt: skip
        synced = runtime.trainer.replica.version
        loop.publish()
        loop.publish()
        second = _lease(coord, 1)
        runtime.handle("train.unit", second.SerializeToString())
        ask = control_pb2.ControlRequest(collect=True)
        reply = control_pb2.ControlReply.FromString(
            runtime.handle("query.collect", ask.SerializeToString())
        )
        results = {r.unit_id: r for r in reply.results}
        # while `first` trained: the two versions' blobs fetched, and applied to a view
        assert runtime.prefetcher.fetched > 0 and runtime.prefetcher.applied >= 2
    finally:
        runtime.shutdown(grace_s=30)
    assert results[first.unit.unit_id].timings.sync_fetches > 0  # its join: a checkpoint
    after = results[second.unit.unit_id]
    assert after.base_version == synced + 2
    assert after.timings.sync_fetches == 0, "the sync fetched what was published meanwhile"
    assert after.timings.sync_versions == 0, "the sync applied what was published meanwhile"


def _zero_fraction(coord, blob_ids: list[str]) -> float:
    """The share of zero trits over every tensor of these shared bundles."""
    from shared_model.codec import decode_ternary

    zeros = total = 0
    for cid in blob_ids:
        for t in control_pb2.TensorBundle.FromString(coord.store.get(cid)).tensors:
            trits, _, _ = decode_ternary(t.payload)
            zeros, total = zeros + int((trits == 0).sum()), total + trits.size
    return zeros / total


def _shared_zero_fractions(coord, ckpt, tmp_path, threshold: float) -> tuple[float, float]:
    """Stage 3 over 4 units at ``shared_threshold``: zero trits in the participants' shared
    uploads and in the published versions' shared bundles."""
    from dataclasses import replace

    from coordinator.db.models import Result

    settings = replace(_settings(3), shared_threshold=threshold)
    coord.prepare(ckpt, settings)
    driver = ReplayDriver(
        coord.cfg, coord.store, coord.corpus.dataset("train"), tmp_path / "nodes", [1.0, 1.3],
        publisher=coord.state.publisher,
    )  # fmt: skip
    tokens = 4 * settings.steps_per_unit * coord.cfg.train.batch_size * coord.cfg.train.seq_len
    loop = coord.federated_stage(driver, StageBudget(tokens=tokens), settings)
    loop.run(lambda: False)
    assert loop.totals().accepted == 4 and coord.state.version >= 2
    with coord.session_factory() as s:
        uploads = [r.blob_ids["shared"] for r in s.query(Result)]
    versions = [m.shared.content_id for m in _versions_after(coord, 0)]
    return _zero_fraction(coord, uploads), _zero_fraction(coord, versions)


def test_the_shared_threshold_setting_thins_the_shared_trits_both_ways(
    coordinator, tiny_moe_seed, tmp_path
):
    """``shared_threshold`` (the ternary shared codec's tau / mean|v|) reaches what the
    participants upload, through each unit's request, and what the coordinator publishes:
    at 1.6 most trits are zero; at 0.7 (TWN's factor) about half are."""
    coord, ckpt = coordinator
    other = Coordinator(coord.cfg, tmp_path / "coordinator-2", coord.corpus)
    other.start()
    try:
        up_low, down_low = _shared_zero_fractions(other, ckpt, tmp_path / "low", 0.7)
    finally:
        other.shutdown()
    up_high, down_high = _shared_zero_fractions(coord, ckpt, tmp_path / "high", 1.6)
    assert up_high > up_low + 0.15 and down_high > down_low + 0.15
    assert up_high > 0.65 and down_high > 0.65


def test_a_node_joining_in_stage_4_downloads_the_experts_as_trits_and_follows_the_chain(
    coordinator, tmp_path
):
    """Stage 4's checkpoints carry its ternary experts as trits (about 1.6 bits per
    parameter, not FP32): a node joining mid-stage syncs from one the way a participant
    does (:meth:`Replica.sync`), ends bit-identical to the published state
    (every tensor's digest checked on the way), and follows the chain published after it.
    The boundary checkpoint, whose experts are still FP, stays FP32."""
    from shared_model.federated.replica import Replica

    coord, ckpt = coordinator
    every = {"checkpoint_every": 1}  # every version has a checkpoint
    driver = _prepared(coord, ckpt, tmp_path, **every)
    _run(coord, driver, 3, units=4, **every)
    boundary = coord.state.publisher.checkpoints[coord.state.version]  # the version's own
    _run(coord, driver, 4, units=12, **every)
    publisher, columns = coord.state.publisher, sorted(coord.state.columns.masters)
    read = partial(_checkpoint_manifest, coord)
    ternary = [v for v, r in sorted(publisher.checkpoints.items()) if read(r).ternary_columns]
    manifest = read(publisher.checkpoints[ternary[0]])
    assert sorted(manifest.ternary_columns) == columns and not read(boundary).ternary_columns
    fetched: dict[str, int] = {}

    def fetch(ref):
        data = coord.store.get(ref.content_id)
        fetched[ref.content_id] = len(data)
        return data

    chain = [publisher.manifests[v] for v in range(ternary[0] + 1, publisher.version + 1)]
    versions = [control_pb2.VersionManifest.FromString(fetch(ref)) for ref in chain]
    replica = Replica()
    assert replica.sync(manifest, versions, columns, fetch) == len(versions) > 0
    for c in columns:
        published = coord.state.columns.published(c)
        assert all(torch.equal(replica.columns[c][k], v) for k, v in published.items())
    params = sum(v.numel() for c in columns for v in coord.state.columns.published(c).values())
    trit_bits = 8 * sum(fetched[manifest.columns[c].content_id] for c in columns) / params
    fp_bits = 8 * sum(r.size for r in read(boundary).columns.values()) / params
    assert trit_bits < 2.5 and fp_bits > 32, (trit_bits, fp_bits)
    # A replica that holds the checkpoint's version knows it holds its (ternary) parts.
    held = Replica()
    held.load_checkpoint(manifest, columns, fetch)
    assert held.copy_if_checkpoint(manifest, columns) is not None


def test_a_node_that_comes_online_in_stage_4_joins_from_trits_and_its_results_count(
    coordinator, tmp_path
):
    """A third participant comes online once stage 4 publishes checkpoints of ternary
    experts. Its first unit syncs from one, the way every participant joins: its columns
    arrive as trits (the shared layers and the FP teacher in FP32), the chain's digests hold
    on that replica, and the results it trains from it are accepted."""
    every = {"checkpoint_every": 1}
    coord, ckpt = coordinator
    driver = _prepared(coord, ckpt, tmp_path, **every)
    _run(coord, driver, 3, units=4, **every)
    settings = replace(_settings(4), max_in_flight=1, **every)  # units left to lease late
    tokens = 30 * settings.steps_per_unit * coord.cfg.train.batch_size * coord.cfg.train.seq_len
    loop = coord.federated_stage(driver, StageBudget(tokens=tokens), settings)
    publisher, late = coord.state.publisher, []
    read = partial(_checkpoint_manifest, coord)

    def join_once_ternary() -> bool:
        newest = publisher.checkpoints.get(publisher.version)
        if not late and newest is not None and read(newest).ternary_columns:
            late.append(driver.add_node(1.0))
        return False

    loop.run(join_once_ternary)
    assert late, "stage 4 never published a checkpoint of ternary experts"
    node = driver.nodes[late[0]]
    assert node.train_time > 0 and loop.totals().rejected == 0
    columns = sorted(node.trainer.replica.columns)
    shared_fp32 = read(publisher.checkpoints[publisher.version]).shared.size
    column_fp32 = 4 * sum(v.numel() for v in coord.state.columns.published(columns[0]).values())
    column_bytes = node.bytes["join"] - shared_fp32
    assert 0 < column_bytes < len(columns) * column_fp32 / 8, (column_bytes, columns)
    # Its replica never held the boundary, so it fetched the teacher: bf16 parts, about
    # half of the FP32 the join's shared part is, and kept them in bf16.
    teacher = read(publisher.teacher)
    assert teacher.bf16_parts and node.bytes.get("checkpoint", 0) == 0
    parts = [teacher.shared, *(teacher.columns[c] for c in columns)]
    assert node.bytes["teacher"] == sum(p.size for p in parts)
    assert teacher.shared.size < 0.51 * shared_fp32
    assert {t.dtype for t in node.trainer.teacher_replica.shared.values()} == {torch.bfloat16}


def test_a_coordinator_restarted_in_stage_4_keeps_distilling_from_the_boundary(
    tiny_moe_seed, tmp_path
):
    """Stage 4's teacher is the published state at the stage boundary. A coordinator
    restarted mid-stage (its state reloaded as ``serve`` does) leases units with that same
    teacher, not a checkpoint of its partly trained student."""
    cfg, corpus, ckpt = tiny_moe_seed
    every = {"checkpoint_every": 1}  # the state is saved at every version
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        driver = _prepared(coord, ckpt, tmp_path, **every)
        _run(coord, driver, 3, units=4, **every)
        boundary = coord.state.version
        _run(coord, driver, 4, units=6, **every)
        teacher = coord.state.publisher.teacher.content_id
    finally:
        coord.shutdown()
    again = Coordinator(cfg, tmp_path / "coordinator", corpus)
    again.start()
    try:
        settings = replace(_settings(4), **every)
        again.prepare(ckpt, settings)
        assert again.state.version > boundary  # the student, partly trained
        loop = again.federated_stage(None, StageBudget(tokens=10**6), settings)
        with again.session_factory.begin() as s:
            db_participants.touch_participant(s, node_id=1)
        _, request = loop.lease_request(1)
        assert request.teacher.content_id == teacher
        manifest = control_pb2.CheckpointManifest.FromString(again.store.get(teacher))
        assert manifest.version == boundary and not manifest.ternary_columns
    finally:
        again.shutdown()
