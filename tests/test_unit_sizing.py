"""Unit sizing: steps of a unit from the participant's measured tokens/s, clamps, settings."""

from __future__ import annotations

import logging

import pytest

from coordinator.federation_settings import FederationSettings
from coordinator.unit_sizing import UnitSizing, UnitSizingError

STEP_TOKENS = 8 * 64  # batch_size x seq_len of the federation benchmark


def sizing_of(min_steps: int | None = None, max_steps: int | None = None, **kw) -> UnitSizing:
    """A sizing built the one way the product builds it: from FederationSettings."""
    if min_steps is not None:
        kw["min_steps_per_unit"] = min_steps
    if max_steps is not None:
        kw["max_steps_per_unit"] = max_steps
    return FederationSettings(**kw).sizing()


def test_fixed_size_without_unit_seconds_or_before_a_report():
    fixed = sizing_of(steps_per_unit=20)
    assert fixed.steps_for(50_000.0, STEP_TOKENS) == 20
    sized = sizing_of(steps_per_unit=20, unit_seconds=10.0)
    assert sized.steps_for(None, STEP_TOKENS) == 20
    assert sized.steps_for(0.0, STEP_TOKENS) == 20


def test_steps_follow_throughput():
    sizing = sizing_of(steps_per_unit=20, unit_seconds=10.0, max_steps=1000)
    slow = sizing.steps_for(1024.0, STEP_TOKENS)  # 2 steps/s
    fast = sizing.steps_for(10_240.0, STEP_TOKENS)  # 20 steps/s
    assert (slow, fast) == (20, 200)
    # A unit trains for about unit_seconds on either machine.
    assert slow * STEP_TOKENS / 1024.0 == pytest.approx(10.0)
    assert fast * STEP_TOKENS / 10_240.0 == pytest.approx(10.0)


def test_clamped_at_both_ends():
    # 3 in flight: at 10 s per step the lease (150 s for 3 units) leaves room for min_steps.
    sizing = sizing_of(
        steps_per_unit=20, unit_seconds=10.0, min_steps=5, max_steps=50, max_in_flight=3
    )
    assert sizing.steps_for(STEP_TOKENS / 10, STEP_TOKENS) == 5  # wants 1 step
    assert sizing.steps_for(STEP_TOKENS * 100, STEP_TOKENS) == 50  # wants 1000
    assert sizing_of(steps_per_unit=20).max_steps == 160  # default 8 x steps_per_unit


def test_lease_bounds_a_very_slow_machine(caplog):
    # 2 units in flight must train within half of a 60 s lease: 15 s each; at 20 s per
    # step even min_steps does not fit, so the unit gets a single step (and says why).
    sizing = sizing_of(
        steps_per_unit=20, unit_seconds=10.0, min_steps=5, lease_seconds=60.0, max_in_flight=2
    )
    with caplog.at_level(logging.INFO, logger="coordinator.unit_sizing"):
        assert sizing.steps_for(STEP_TOKENS / 20, STEP_TOKENS) == 1
    assert "clamped to 1 steps" in caplog.text and "60 s lease" in caplog.text
    # At 1 s per step: 15 fit per unit, and unit_seconds asks for 10.
    assert sizing.steps_for(float(STEP_TOKENS), STEP_TOKENS) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_steps_per_unit": 50, "max_steps_per_unit": 10}, "larger than max_steps_per_unit"),
        ({"min_steps_per_unit": 0}, "must be >= 1"),
        ({"steps_per_unit": 0}, "must be >= 1"),
        ({"unit_seconds": 0.0}, "unit_seconds must be > 0"),
        ({"unit_seconds": -3.0}, "unit_seconds must be > 0"),
        ({"unit_seconds": 100.0, "lease_seconds": 300.0}, "lower unit_seconds or raise"),
    ],
)
def test_bad_settings_raise_on_construction(kwargs, message):
    with pytest.raises(UnitSizingError, match=message):
        FederationSettings(**kwargs)


def test_settings_describe_the_sizing():
    settings = FederationSettings(
        steps_per_unit=10, unit_seconds=8.0, min_steps_per_unit=3, lease_seconds=120.0
    )
    sizing = settings.sizing()
    assert (sizing.steps_per_unit, sizing.unit_seconds) == (10, 8.0)
    assert (sizing.min_steps, sizing.max_steps) == (3, 80)
    assert (sizing.lease_seconds, sizing.max_in_flight) == (120.0, 3)


def test_fixed_units_are_cut_for_a_node_too_slow_for_its_lease() -> None:
    sizing = sizing_of(steps_per_unit=20, lease_seconds=60.0, max_in_flight=2)
    assert sizing.steps_for(None, 256) == 20  # not measured yet
    assert sizing.steps_for(100_000.0, 256) == 20  # fast: H as configured, never more
    # 2.56 s per step: 2 units in flight must train within 30 s -> 5 steps each
    assert sizing.steps_for(100.0, 256) == 5
