"""Stage 5: MDS layout on the torus, manifold routing, losses, .trd files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coordinator.central import manifold as mf
from coordinator.central.checkpoint import load_checkpoint, save_checkpoint
from coordinator.central.manifold_stage import layout_experts, run_manifold
from coordinator.central.trd import TrdError, apply_trd, read_trd, ternary_experts, verify_trd_set
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config(
        "tiny", overrides=["train.batch_size=4", "train.seq_len=32", "train.eval_batches=1"]
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=600_000)


@pytest.fixture(scope="module")
def stage3_ckpt(cfg, tmp_path_factory):
    torch.manual_seed(0)
    dense = PerspectiveModel(cfg)
    moe = dense.to_moe(noise_std=0.01)
    path = tmp_path_factory.mktemp("ck") / "stage3.safetensors"
    save_checkpoint(path, moe, cfg, stage=3, step=0)
    return path


@pytest.fixture(scope="module")
def stage5(cfg, corpus, stage3_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("s5")
    return out, run_manifold(cfg, stage3_ckpt, out, data=corpus, steps=6, init_batches=2)


def test_smacof_recovers_a_3d_configuration():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 3))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    y, s = mf.smacof(d)
    assert s < 1e-3
    dy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    assert np.allclose(d, dy, atol=1e-2)


def test_smacof_rejects_bad_matrices():
    with pytest.raises(mf.ManifoldError):
        mf.smacof(np.array([[0.0, 1.0], [2.0, 0.0]]))
    with pytest.raises(mf.ManifoldError):
        mf.smacof(np.array([[0.0, np.nan], [np.nan, 0.0]]))


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.25])
def test_torus_positions_lie_inside_the_margin(margin):
    x = np.random.default_rng(2).normal(size=(16, 3)) * 7
    p = mf.to_torus(x, margin)
    assert p.min() >= margin - 1e-12 and p.max() <= 1 - margin + 1e-12
    with pytest.raises(mf.ManifoldError):
        mf.to_torus(x, 0.5)


def test_stage5_positions_lie_inside_the_margin(stage5, stage3_ckpt, cfg):
    _, result = stage5
    margin = result["params"]["margin"]
    model = PerspectiveModel(cfg, moe=True)
    model.load_state_dict(load_checkpoint(stage3_ckpt).model_state)
    layout = layout_experts(model, margin)
    for pos in layout["positions"].values():
        assert pos.min() >= margin - 1e-6 and pos.max() <= 1 - margin + 1e-6
        assert len({tuple(p) for p in pos.tolist()}) == cfg.moe.n_experts
    for pos in result["positions"].values():
        arr = np.array(pos)
        assert arr.shape[1] == 3 and (arr >= 0).all() and (arr < 1).all()
    col = np.array(result["column_positions"])
    assert col.min() >= margin - 1e-6 and col.max() <= 1 - margin + 1e-6


def test_torus_distance_wraps():
    a = torch.tensor([[0.05, 0.5, 0.5]])
    b = torch.tensor([[0.95, 0.5, 0.5], [0.3, 0.5, 0.5]])
    d = mf.torus_sqdist(a, b).sqrt()
    assert d[0, 0] == pytest.approx(0.1, abs=1e-6) and d[0, 1] == pytest.approx(0.25, abs=1e-6)


def test_manifold_routing_picks_the_nearest_expert_on_the_torus(stage5, cfg):
    out, _ = stage5
    ck = load_checkpoint(out / "stage5.safetensors")
    model = mf.build_manifold_model(cfg, ck.model_state).eval()
    layer = cfg.model.pdr_layers()[0]
    ffn = model.layers[layer].ffn
    h = torch.randn(200, cfg.model.d_model) * 3
    index, soft, z = ffn.router.assign(h)
    pos = ffn.router.positions.detach() % 1.0
    # brute force over the 27 periodic images
    shifts = torch.tensor([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    images = pos[None, :, None, :] + shifts[None, None].float()
    brute = (z[:, None, None, :] - images).pow(2).sum(-1).min(-1).values.argmin(-1)
    assert torch.equal(index, brute)
    assert torch.allclose(soft.sum(-1), torch.ones(200))
    # the layer output is exactly the chosen expert's output (gate value 1)
    y, stats = ffn(h[None])
    want = torch.stack([ffn.expert(int(e))(h[n]) for n, e in enumerate(index)])
    assert torch.allclose(y[0], want, atol=1e-5)
    assert torch.equal(stats["index"], index)


def test_router_gets_gradient_through_the_soft_assignment(cfg):
    moe = PerspectiveModel(cfg, moe=True).layers[0].ffn
    pos = torch.rand(cfg.moe.n_experts, 3)
    ffn = mf.ManifoldMoEFFN.from_moe(moe, pos, 0.01)
    ffn(torch.randn(1, 10, cfg.model.d_model))[0].sum().backward()
    assert ffn.router.proj.weight.grad.abs().sum() > 0
    assert ffn.router.positions.grad.abs().sum() > 0


def test_losses_behave():
    pos = torch.rand(8, 3)
    dist = torch.rand(8, 8)
    dist = (dist + dist.T) * (1 - torch.eye(8))
    assert 0 < float(mf.delta_loss(pos, dist, 0.05)) < 3
    uniform = torch.full((100, 8), 1 / 8)
    assert float(mf.balance_var_loss(uniform)) == pytest.approx(0.0, abs=1e-9)
    skew = torch.zeros(100, 8)
    skew[:, 0] = 1
    assert float(mf.balance_var_loss(skew)) > 1
    pts = torch.tensor([[[0.02, 0.5, 0.5], [0.98, 0.5, 0.5]]])
    assert float(mf.smooth_loss(pts)) == pytest.approx(0.04**2, abs=1e-6)  # wraps
    tets = mf.tetrahedra(pos)
    v0 = mf.signed_volumes(pos, tets)
    assert float(mf.fold_loss(pos, tets, v0)) == 0.0
    mirrored = pos.clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]  # reflection inverts every tetrahedron
    assert float(mf.fold_loss(mirrored, tets, v0)) > 0


def test_stage5_result_and_trd_files_apply_bit_exactly(stage5, cfg):
    out, result = stage5
    assert result["trd"]["files"] == len(cfg.model.pdr_layers()) * cfg.moe.n_experts * 3
    for loads in result["loads_after"].values():
        # Not collapsed: one expert taking every token would give max/mean = n_experts.
        assert loads["max_over_mean"] < cfg.moe.n_experts / 2
    assert np.isfinite(result["val_loss_after"])
    ck = load_checkpoint(out / "stage5.safetensors")
    assert ck.stage == 5
    model = mf.build_manifold_model(cfg, ck.model_state)
    assert verify_trd_set(model, out / "trd") == result["trd"]["files"]
    index = json.loads((out / "trd" / "index.json").read_text())
    entry = index["files"][0]
    data = (out / "trd" / entry["file"]).read_bytes()
    experts = ternary_experts(model, entry["layer"], cfg.ternary.threshold_factor)
    got = apply_trd(experts[entry["source"]], data)
    for w, (trits, scale) in got.items():
        assert np.array_equal(trits, experts[entry["target"]][w][0])
        assert scale == experts[entry["target"]][w][1]


def test_trd_rejects_corruption_and_wrong_base(stage5, cfg):
    out, _ = stage5
    index = json.loads((out / "trd" / "index.json").read_text())
    entry = index["files"][0]
    data = (out / "trd" / entry["file"]).read_bytes()
    with pytest.raises(TrdError):
        read_trd(b"XXXX" + data[4:])
    with pytest.raises(TrdError):
        read_trd(data[:20])
    model = mf.build_manifold_model(cfg, load_checkpoint(out / "stage5.safetensors").model_state)
    experts = ternary_experts(model, entry["layer"], cfg.ternary.threshold_factor)
    wrong = experts[entry["target"]]  # not the source: trit counts differ
    with pytest.raises(TrdError):
        apply_trd(wrong, data)


def test_stage5_refuses_a_dense_checkpoint_and_writes_nothing(cfg, corpus, tmp_path):
    path = tmp_path / "stage1.safetensors"
    save_checkpoint(path, PerspectiveModel(cfg), cfg, stage=1, step=0)
    with pytest.raises(mf.ManifoldError, match="stage-3 or stage-4"):
        run_manifold(cfg, path, tmp_path / "o", data=corpus, steps=1)
    assert not (tmp_path / "o").exists()
