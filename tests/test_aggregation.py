"""Aggregation strategies: staleness, column pull, DiLoCo outer step, robust means, diversity."""

import math

import pytest
import torch

from coordinator.aggregation import (
    ColumnAggregator,
    OuterOptimizer,
    SharedAggregator,
    apply_diversity,
    centered_clip,
    staleness_weight,
    trimmed_mean,
)
from coordinator.aggregation.columns import StaleResultError


def test_staleness_weight():
    assert staleness_weight(0, grace=0) == 1.0
    assert staleness_weight(3, grace=0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        staleness_weight(-1, grace=0)
    # staleness_grace: the versions a pipelined result misses by design are not discounted
    assert staleness_weight(1, grace=1) == 1.0
    assert staleness_weight(4, grace=1) == pytest.approx(0.5)


def test_the_staleness_grace_reaches_both_aggregators():
    from coordinator.aggregation import OuterOptimizer, SharedAggregator

    cols = ColumnAggregator({0: {"w": torch.zeros(4)}}, 0, max_staleness=8, staleness_grace=1)
    assert cols.apply(0, {"w": torch.ones(4)}, base_version=0, current_version=1) == 1.0
    shared = SharedAggregator(
        {"w": torch.zeros(4)}, buffer_size=1, outer=OuterOptimizer(1.0, 0.0), trim=0,
        staleness_grace=1,
    )  # fmt: skip
    assert shared.add({"w": torch.ones(4)}, base_version=0, current_version=1)
    assert torch.allclose(shared.master["w"], -torch.ones(4))  # the whole step: w = 1


def test_column_pull_is_not_counted_twice():
    agg = ColumnAggregator({0: {"w": torch.zeros(4)}}, 0, max_staleness=8, staleness_grace=0)
    # Two pipelined results from the same owner, both based on version 0: the second
    # describes the owner's cumulative copy, so the master must end at it, not at 2x.
    agg.apply(0, {"w": torch.ones(4)}, base_version=0, current_version=0)
    agg.advance(0, 1, {"w": agg.masters[0]["w"].clone()})  # published exactly
    agg.apply(0, {"w": torch.full((4,), 2.0)}, base_version=0, current_version=0)
    assert torch.allclose(agg.masters[0]["w"], torch.full((4,), 2.0))


def test_column_staleness_weight_and_limit():
    agg = ColumnAggregator({0: {"w": torch.zeros(2)}}, 0, max_staleness=4, staleness_grace=0)
    w = agg.apply(0, {"w": torch.ones(2)}, base_version=0, current_version=3)
    assert w == pytest.approx(0.5)
    assert torch.allclose(agg.masters[0]["w"], torch.full((2,), 0.5))
    with pytest.raises(StaleResultError):
        agg.apply(0, {"w": torch.ones(2)}, base_version=0, current_version=5)


def test_outer_nesterov_matches_formula():
    p = {"w": torch.tensor([1.0])}
    opt = OuterOptimizer(lr=0.5, momentum=0.9)
    opt.step(p, {"w": torch.tensor([1.0])})
    # buf = g = 1; update = g + 0.9 * buf = 1.9; p = 1 - 0.5 * 1.9
    assert p["w"].item() == pytest.approx(1 - 0.95)


def test_shared_aggregator_steps_every_buffer_size():
    agg = SharedAggregator(
        {"w": torch.zeros(2)}, buffer_size=2, outer=OuterOptimizer(1.0, 0.0), trim=0,
        staleness_grace=0,
    )  # fmt: skip
    assert agg.add({"w": torch.ones(2)}, 0, 0) is False
    assert agg.add({"w": torch.ones(2)}, 0, 0) is True
    assert torch.allclose(agg.master["w"], -torch.ones(2))


def test_trimmed_mean_resists_outlier():
    stack = torch.tensor([[1.0], [1.1], [0.9], [1000.0], [1.0]])
    out = trimmed_mean(stack, torch.ones(5), trim=1)
    assert out.item() == pytest.approx(1.0, abs=0.1)


def test_centered_clip_resists_outlier():
    stack = torch.tensor([[1.0, 1.0], [1.1, 0.9], [-1000.0, 1000.0]])
    out = centered_clip(stack, torch.ones(3), tau=1.0)
    assert out.norm().item() < 3.0


def test_diversity_step_decreases_cosine_and_matches_naive():
    torch.manual_seed(0)
    base = torch.randn(50)
    experts = [base + 0.1 * torch.randn(50) for _ in range(4)]
    n = len(experts)
    naive = sum(
        torch.nn.functional.cosine_similarity(experts[i], experts[j], dim=0)
        for i in range(n)
        for j in range(n)
        if i != j
    ) / (n * n)
    loss = apply_diversity(experts, beta=1.0, lr=10.0)
    assert loss == pytest.approx(float(naive), rel=1e-5)
    after = apply_diversity([e.clone() for e in experts], beta=1.0, lr=0.0)
    assert after < loss and math.isfinite(after)
