"""Tests of the training losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from shared_model.config_loading import load_config
from shared_model.losses import (
    LossError,
    RankSum,
    balance_loss,
    diversity_loss,
    kd_loss,
    lm_loss,
)
from shared_model.model import PerspectiveModel
from shared_model.stage_loss import Distillation, stage_loss

torch.set_num_threads(1)


def test_lm_loss_matches_cross_entropy():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    assert torch.allclose(lm_loss(logits, targets), ref)
    with pytest.raises(LossError):
        lm_loss(logits, targets[:, :4])


def test_balance_loss_uniform_is_one_and_skew_is_larger():
    e, n = 8, 800
    uniform = balance_loss(torch.full((n, e), 1 / e), torch.arange(n) % e, e)
    assert uniform.item() == pytest.approx(1.0)
    probs = torch.softmax(torch.randn(n, e) + torch.tensor([3.0] + [0.0] * 7), -1)
    skewed = balance_loss(probs, probs.argmax(-1), e)
    assert skewed.item() > 1.5
    with pytest.raises(LossError):
        balance_loss(probs, probs.argmax(-1), e + 1)


def test_balance_loss_has_router_gradient():
    logits = torch.randn(64, 4, requires_grad=True)
    probs = torch.softmax(logits, -1)
    balance_loss(probs, probs.argmax(-1), 4).backward()
    assert logits.grad.abs().sum() > 0


def test_diversity_loss_equals_naive_pairwise():
    experts = [torch.randn(6, 7) for _ in range(5)]
    n = len(experts)
    naive = sum(
        F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        for a, b in itertools.permutations(experts, 2)
    )
    expected = naive / n**2  # mean similarity: minimising it diversifies
    assert diversity_loss(experts).item() == pytest.approx(expected.item(), abs=1e-6)
    stacked = torch.stack([w.flatten() for w in experts])
    assert diversity_loss(stacked).item() == pytest.approx(expected.item(), abs=1e-6)
    same = [experts[0]] * 4  # identical experts: every cosine is 1
    assert diversity_loss(same).item() == pytest.approx(12 / 16, abs=1e-6)


def test_kd_loss_direction_and_weights():
    s = torch.randn(3, 4, 9, requires_grad=True)
    t = torch.randn(3, 4, 9)
    y = torch.randint(0, 9, (3, 4))
    assert torch.allclose(kd_loss(s, t, y, 0.0), lm_loss(s, y))
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl_st = (log_s.exp() * (log_s - log_t)).sum(-1).mean()  # KL(p_student || p_teacher)
    assert torch.allclose(kd_loss(s, t, y, 1.0), kl_st, atol=1e-6)
    mixed = kd_loss(s, t, y, 0.5)
    assert torch.allclose(mixed, 0.5 * lm_loss(s, y) + 0.5 * kl_st, atol=1e-6)
    assert kd_loss(t, t, y, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(LossError):
        kd_loss(s, t, y, 1.5)


def _other_rank(other: torch.Tensor) -> RankSum:
    """Rank 0 of two, the other rank's contribution given (the all-reduce, simulated)."""
    return RankSum(lambda t: t + other, 2)


def test_diversity_over_ranks_equals_all_experts():
    experts = torch.randn(6, 20)
    mine, theirs = experts[:3], experts[3:]
    other = F.normalize(theirs, dim=1).sum(0)
    split = diversity_loss(mine, _other_rank(other))
    assert split.item() == pytest.approx(diversity_loss(experts).item(), abs=1e-6)
    assert torch.equal(diversity_loss(experts, RankSum(lambda t: t, 1)), diversity_loss(experts))


def test_balance_over_ranks_equals_global_batch():
    probs = torch.softmax(torch.randn(16, 4), -1)
    index = probs.argmax(-1)
    counts = torch.bincount(index[8:], minlength=4).float()
    # The simulated all-reduce adds the other rank's counts, then its mean probabilities.
    others = iter([counts, probs[8:].mean(0)])
    ranks = RankSum(lambda t: t + next(others), 2)
    split = balance_loss(probs[:8], index[:8], 4, ranks)
    assert split.item() == pytest.approx(balance_loss(probs, index, 4).item(), abs=1e-6)


def test_stage_loss_terms():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = PerspectiveModel(cfg, moe=True)
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    inp, tgt = x[:, :-1], x[:, 1:]
    loss, parts = stage_loss(model, inp, tgt)
    assert set(parts) == {"lm", "loss"} and torch.equal(loss, model(inp, targets=tgt).loss)
    loss, parts = stage_loss(model, inp, tgt, regularise=True)
    a, b = cfg.moe.balance_alpha, cfg.moe.diversity_beta
    expected = parts["lm"] + a * parts["balance"] + b * parts["diversity"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    cols = torch.tensor([0, 1])  # column mode (federated), stage 4 distillation
    teacher = PerspectiveModel(cfg, moe=True).requires_grad_(False)
    loss, parts = stage_loss(model, inp, tgt, columns=cols, distill=Distillation(teacher, 0.3))
    ref = kd_loss(model(inp, columns=cols).logits, teacher(inp, columns=cols).logits, tgt, 0.3)
    assert set(parts) == {"loss"} and torch.allclose(loss, ref)
