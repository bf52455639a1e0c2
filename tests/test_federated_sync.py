"""Coordinator publishing and participant replica sync: bit-identical, verified, resumable."""

import pytest
import torch

from coordinator.federation_settings import FederationSettings
from coordinator.publishing import CoordinatorState
from shared_model.blobs import BlobStore
from shared_model.config_loading import load_config
from shared_model.federated.replica import Replica, SyncError
from shared_model.federated.updates import decode_update, encode_update, tensor_digest
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import control_pb2

# What these tests were written against (the state's former own defaults, now explicit).
OLD_STATE_KNOBS = FederationSettings(
    checkpoint_every=3, buffer_size=3, outer_lr=0.7, outer_momentum=0.9
)


@pytest.fixture
def state(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = PerspectiveModel(cfg, moe=True)
    return CoordinatorState(cfg, model, BlobStore(tmp_path / "blobs"), OLD_STATE_KNOBS)


def fetcher(store):
    return lambda ref: store.get(ref.content_id)


@pytest.mark.parametrize("codec", ["ternary", "sparse"])
def test_encode_update_decoded_matches_receiver(codec):
    t = torch.randn(33, 17)
    payload, decoded = encode_update(t, codec, "w")
    assert torch.equal(decode_update(payload, t.shape), decoded)


def _perturb(state, scale=0.01):
    for master in state.columns.masters.values():
        for v in master.values():
            v.add_(scale * torch.randn_like(v))
    for v in state.shared.master.values():
        v.add_(scale * torch.randn_like(v))
    state.columns.mark_dirty(state.columns.masters)


def test_replica_follows_chain_bit_identically(state):
    fetch = fetcher(state.store)
    replica = Replica()
    for _ in range(5):
        _perturb(state)
        state.publish()
    ckpt_ref, chain_refs = state.publisher.chain_for(state.version)
    ckpt = control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref))
    chain = [control_pb2.VersionManifest.FromString(fetch(r)) for r in chain_refs]
    replica.sync(ckpt, chain, [0, 3], fetch)
    assert replica.version == 5
    for name, t in state.shared.published.items():
        assert tensor_digest(replica.shared[name]) == tensor_digest(t)
    for col in (0, 3):
        for name, t in state.columns.published(col).items():
            assert torch.equal(replica.columns[col][name], t)
    # Version 6 is a checkpoint (every 3): the replica at 5 loads it; at 7 it applies one.
    for expected_applied, expected_version in ((0, 6), (1, 7)):
        _perturb(state)
        state.publish()
        ckpt_ref, chain_refs = state.publisher.chain_for(state.version)
        chain = [control_pb2.VersionManifest.FromString(fetch(r)) for r in chain_refs]
        applied = replica.sync(
            control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref)), chain, [0, 3], fetch
        )
        assert (applied, replica.version) == (expected_applied, expected_version)
    assert torch.equal(
        replica.columns[3]["layers.0.ffn.experts.3.w1.weight"],
        state.columns.published(3)["layers.0.ffn.experts.3.w1.weight"],
    )


def test_a_replica_view_advances_and_the_replica_it_came_from_stays(state):
    """A view (what a participant's prefetch thread advances while a unit trains from the
    replica) reaches the published state; the replica keeps its version and tensors."""
    fetch = fetcher(state.store)
    replica = Replica()
    ckpt_ref, _ = state.publisher.chain_for(0)
    replica.load_checkpoint(control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref)), [1], fetch)
    before = {k: v.clone() for k, v in {**replica.shared, **replica.columns[1]}.items()}
    view = replica.view()
    for _ in range(2):
        _perturb(state)
        state.publish()
    ckpt_ref, chain_refs = state.publisher.chain_for(state.version, 0)
    chain = [control_pb2.VersionManifest.FromString(fetch(r)) for r in chain_refs]
    ckpt = control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref))
    assert view.sync(ckpt, chain, [1], fetch) == 2
    for name, t in state.shared.published.items():
        assert torch.equal(view.shared[name], t)
    assert replica.version == 0
    after = {**replica.shared, **replica.columns[1]}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], view.shared[k]) for k in replica.shared)


def _wrong_digest(tensor) -> None:
    tensor.sha256 = "0" * 64


def _garbage_payload(tensor) -> None:
    tensor.payload = b"\xff" * 16  # not a container the codec reads


@pytest.mark.parametrize(
    ("damage", "error"),
    [(_wrong_digest, "^shared: .* checksum"), (_garbage_payload, "^shared: not a codec")],
)
def test_replica_refuses_a_damaged_version_naming_the_part(state, damage, error):
    """A version whose shared bundle does not reproduce the published digest, or holds a
    payload the codec cannot read, is refused as a SyncError naming the part (the second was
    a bare CodecError), and the replica is left as it was."""
    fetch = fetcher(state.store)
    _perturb(state)
    state.publish()
    ckpt_ref, chain_refs = state.publisher.chain_for(1)
    manifest = control_pb2.VersionManifest.FromString(fetch(chain_refs[0]))
    bundle = control_pb2.TensorBundle.FromString(fetch(manifest.shared))
    damage(bundle.tensors[0])
    manifest.shared.content_id = state.store.put_bytes(bundle.SerializeToString())
    replica = Replica()
    replica.load_checkpoint(control_pb2.CheckpointManifest.FromString(fetch(ckpt_ref)), [0], fetch)
    before = {k: v.clone() for k, v in replica.shared.items()}
    with pytest.raises(SyncError, match=error):
        replica.apply(manifest, fetch)
    assert replica.version == 0
    assert all(torch.equal(before[k], replica.shared[k]) for k in before)


def test_state_save_load_roundtrip(state, tmp_path):
    _perturb(state)
    state.publish()
    state.save(tmp_path / "state.safetensors")
    cfg = load_config("tiny")
    other = CoordinatorState(cfg, PerspectiveModel(cfg, moe=True), state.store, OLD_STATE_KNOBS)
    other.load(tmp_path / "state.safetensors")
    assert other.version == state.version
    for name, t in state.shared.master.items():
        assert torch.equal(other.shared.master[name], t)
    ours, theirs = state.publisher.chain_for(1)[1][0], other.publisher.chain_for(1)[1][0]
    assert theirs.content_id == ours.content_id


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_state_with_malformed_update_bounds_is_refused(state, tmp_path, bad):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "state.safetensors"
    state.save(path, bounds={"stage": 3, "peak_lr": 1e-3, "history": {}})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "update_bounds": bad})
    cfg = load_config("tiny")
    other = CoordinatorState(cfg, PerspectiveModel(cfg, moe=True), state.store, OLD_STATE_KNOBS)
    with pytest.raises(ValueError, match="'update_bounds' metadata is .*restore the state file"):
        other.load(path)


def test_diversity_step_pushes_the_column_masters_apart(tmp_path):
    """``diversity_lr > 0``: publishing first steps every expert weight of every column down
    the gradient of the diversity term (the masters' mean pairwise cosine falls)."""
    from shared_model.model import expert_param_names

    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = PerspectiveModel(cfg, moe=True)
    settings = FederationSettings(diversity_lr=1.0)
    state = CoordinatorState(cfg, model, BlobStore(tmp_path / "blobs"), settings)
    columns = sorted(state.columns.masters)

    def mean_cos(i: int) -> float:
        flat = torch.stack(
            [state.columns.masters[c][expert_param_names(cfg, c)[i]].flatten() for c in columns]
        )
        unit = torch.nn.functional.normalize(flat, dim=1)
        sims = unit @ unit.T
        n = len(columns)
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))

    n_weights = len(expert_param_names(cfg, 0))
    before = [mean_cos(i) for i in range(n_weights)]
    assert state.publish() == 1
    after = [mean_cos(i) for i in range(n_weights)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
