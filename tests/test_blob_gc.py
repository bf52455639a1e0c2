"""Blob garbage collection of the coordinator: what a participant or a restart may still need
stays, everything else goes."""

from __future__ import annotations

import os
import time

import torch

from coordinator.blob_gc import collect_blobs, oldest_needed_checkpoint
from coordinator.db import init_db, make_session_factory, sqlite_url
from coordinator.db.leases import create_lease
from coordinator.db.participants import Capability, touch_participant
from coordinator.db.results import ResultPayload, mark_applied
from coordinator.db.versions import publish_version
from coordinator.federation_settings import FederationSettings
from coordinator.intake import record_result
from coordinator.publishing import CoordinatorState
from shared_model.blobs import BlobStore
from shared_model.config_loading import load_config
from shared_model.federated.replica import Replica
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import control_pb2

SETTINGS = FederationSettings(checkpoint_every=3, max_staleness=4)


def _publish(state: CoordinatorState) -> None:
    for master in [*state.columns.masters.values(), state.shared.master]:
        for v in master.values():
            v.add_(0.01 * torch.randn_like(v))
    state.columns.mark_dirty(state.columns.masters)
    state.publish()


def _result(factory, node_id: int, upload: str) -> str:
    with factory.begin() as s:
        part = touch_participant(s, node_id=node_id, capability=Capability(max_columns=1))
        unit = create_lease(
            s, participant_id=part.id, stage="stage3", base_version=0, columns=[0],
            docs=["0:1"], steps=1, params={}, lease_seconds=60,
        )  # fmt: skip
        payload = ResultPayload(tokens=1, blob_ids={"columns": {"0": upload}, "shared": upload})
        record_result(s, unit_id=unit.unit_id, node_id=node_id, payload=payload)
        return unit.unit_id


def _age(store: BlobStore, seconds: float) -> None:
    """Make every stored blob look last used ``seconds`` ago."""
    then = time.time() - seconds
    for cid in store.iter_ids():
        os.utime(store.blob_path(cid), (then, then))


def _sync(state: CoordinatorState, base: int) -> int:
    """Sync a fresh replica to ``base`` from the store alone (what a participant does)."""
    fetch = lambda ref: state.store.get(ref.content_id)  # noqa: E731
    ckpt_ref, chain = state.publisher.chain_for(base)
    replica = Replica()
    replica.sync(
        control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref)),
        [control_pb2.VersionManifest.FromString(fetch(r)) for r in chain],
        [0, 1],
        fetch,
    )
    return replica.version


def test_oldest_needed_checkpoint():
    assert oldest_needed_checkpoint([0, 3, 6, 9], version=11, max_staleness=4) == 6
    assert oldest_needed_checkpoint([0, 3, 6, 9], version=10, max_staleness=4) == 6
    assert oldest_needed_checkpoint([0, 3], version=2, max_staleness=4) == 0
    assert oldest_needed_checkpoint([6, 9], version=8, max_staleness=4) == 6


def test_gc_deletes_unreferenced_blobs_and_keeps_what_anyone_may_need(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    store = BlobStore(tmp_path / "blobs")
    state = CoordinatorState(cfg, PerspectiveModel(cfg, moe=True), store, SETTINGS)
    factory = make_session_factory(init_db(sqlite_url(tmp_path / "db.sqlite")))
    shard = store.put_bytes(b"a training shard")
    applied, pending = store.put_bytes(b"applied result"), store.put_bytes(b"pending result")
    applied_unit = _result(factory, 1, applied)
    _result(factory, 2, pending)
    with factory.begin() as s:
        publish_version(s, parent=None, checksum="v0")
        mark_applied(s, unit_ids=[applied_unit], version=0)
    for version in range(1, 13):
        _publish(state)
        if version == 5:
            teacher = state.publisher.teacher_checkpoint()  # stage 4's frozen teacher, pinned
    assert state.version == 12 and sorted(state.publisher.checkpoints) == [0, 3, 6, 9, 12]
    state.save(tmp_path / "state.safetensors")
    early = {state.publisher.manifests[v].content_id for v in (1, 2, 3)} | {
        state.publisher.checkpoints[0].content_id
    }
    _age(store, 7200.0)
    in_transit = store.put_bytes(b"an upload whose reply has not arrived")

    def collect():
        return collect_blobs(
            state,
            factory,
            max_staleness=SETTINGS.max_staleness,
            min_age_s=3600.0,
            pinned=[shard],
            pinned_checkpoints=[teacher],
        )

    report = collect()
    assert applied in report.removed and report.freed_bytes > 0
    for kept in (in_transit, shard, pending, teacher.content_id, *early):
        assert store.has(kept)
    # The state forgot versions no base within max_staleness needs: the newest checkpoint at
    # or before 12 - 4 = 8 is 6, so checkpoints from 6 on and manifests after 6 remain.
    assert sorted(state.publisher.checkpoints) == [6, 9, 12] and sorted(
        state.publisher.manifests
    ) == list(range(7, 13))
    for base in range(12 - SETTINGS.max_staleness, 13):
        assert _sync(state, base) == base
    # The file saved before the collection still loads (a restart needs what it names) ...
    restarted = CoordinatorState(cfg, PerspectiveModel(cfg, moe=True), store, SETTINGS)
    restarted.load(tmp_path / "state.safetensors")
    assert restarted.version == 12 and _sync(restarted, 1) == 1
    # ... and once the next save no longer names the forgotten versions, their blobs go.
    for _ in range(3):
        _publish(state)
    state.save(tmp_path / "state.safetensors")
    _age(store, 7200.0)
    report = collect()
    assert set(early) <= set(report.removed)
    assert all(store.has(c) for c in (shard, pending, teacher.content_id))
    for base in range(15 - SETTINGS.max_staleness, 16):
        assert _sync(state, base) == base
