"""Tests of ternary quantisation, progressive masks and the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from shared_model.config_loading import load_config
from shared_model.model import PerspectiveModel
from shared_model.ternary import (
    TernaryError,
    dequantize,
    export_ternary,
    progressive_mask,
    ternary_round,
    ternary_ste,
)

torch.set_num_threads(1)


def test_gaussian_zero_fraction_and_scale():
    w = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    trits, scale = ternary_round(w)
    assert trits.dtype == torch.int8
    assert set(trits.unique().tolist()) == {-1, 0, 1}
    zeros = (trits == 0).float().mean().item()
    assert 0.38 <= zeros <= 0.46
    # least-squares optimal scale for fixed trits: <w, t> / <t, t>
    t = trits.float()
    assert scale == pytest.approx((w * t).sum().item() / (t * t).sum().item(), rel=1e-5)
    for s in (scale * 0.9, scale * 1.1):
        assert ((w - s * t) ** 2).sum() > ((w - scale * t) ** 2).sum()
    assert torch.equal(dequantize(trits, scale), t * scale)


def test_round_rejects_bad_input():
    with pytest.raises(TernaryError):
        ternary_round(torch.tensor([]))
    with pytest.raises(TernaryError):
        ternary_round(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TernaryError):
        dequantize(torch.tensor([0, 2], dtype=torch.int8), 1.0)
    trits, scale = ternary_round(torch.zeros(4))  # all-zero tensor: all-zero trits, scale 0
    assert scale == 0.0 and not trits.any()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 1.0])
def test_progressive_mask_exact_coverage(fraction):
    w = torch.randn(37, 101, generator=torch.Generator().manual_seed(1))
    mask = progressive_mask(w, fraction)
    assert mask.shape == w.shape
    assert int(mask.sum()) == round(fraction * w.numel())
    if fraction < 1:  # selected entries are the largest in magnitude
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_ste_forward_quantised_backward_identity():
    w = torch.randn(64, 48, requires_grad=True)
    trits, scale = ternary_round(w)
    q = ternary_ste(w, 1.0)
    assert torch.allclose(q, dequantize(trits, scale), atol=1e-7)
    upstream = torch.randn_like(w)
    (q * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_ste_progressive_keeps_small_weights_full_precision():
    w = torch.randn(50, 40, requires_grad=True)
    q = ternary_ste(w, 0.5)
    mask = progressive_mask(w, 0.5)
    assert torch.equal(q[~mask], w[~mask])
    trits, scale = ternary_round(w)
    assert torch.allclose(q[mask], dequantize(trits, scale)[mask])
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    with pytest.raises(TernaryError):
        ternary_ste(w, 1.5)


def test_export_ternary_covers_expert_weights():
    cfg = load_config("tiny")
    model = PerspectiveModel(cfg, moe=True)
    exported = export_ternary(model)
    m = cfg.model
    assert len(exported) == m.n_pdr_layers * cfg.moe.n_experts * 3
    name = "layers.0.ffn.experts.3.w2.weight"
    trits, scale = exported[name]
    assert trits.shape == (m.d_model, m.ffn_hidden) and scale > 0
    assert not any("router" in k or "experts" not in k for k in exported)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_stacked_ste_equals_per_tensor(fraction):
    from shared_model.ternary import ternary_ste_stacked

    ws = [torch.randn(30, 20, requires_grad=True) * s for s in (0.5, 1.0, 2.0)]
    stacked = ternary_ste_stacked(ws, fraction)
    for w, q in zip(ws, stacked, strict=True):
        assert torch.allclose(q, ternary_ste(w, fraction), atol=1e-6)
    sum(q.sum() for q in stacked).backward()
