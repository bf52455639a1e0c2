"""The coordinator's held-out column check (:mod:`coordinator.column_validation`): all the
columns of a result are scored in one forward each for base and result, and that must
score every column exactly as a forward of that column alone does."""

from __future__ import annotations

import pytest
import torch

from coordinator.central.checkpoint import load_checkpoint
from coordinator.column_validation import ColumnValidator, ColumnWorse
from coordinator.federation_settings import FederationSettings
from coordinator.publishing import CoordinatorState
from coordinator.routing.assignment import initial_assignment
from shared_model.blobs import BlobStore
from shared_model.model import PerspectiveModel


@pytest.fixture(scope="module")
def validator(tmp_path_factory, tiny_moe_seed):
    """A validator over the suite's trained ``tiny`` seed (an untrained model scores every
    column alike: its head is near uniform)."""
    cfg, corpus, ckpt = tiny_moe_seed
    model = PerspectiveModel(cfg, moe=True)
    model.load_state_dict(load_checkpoint(ckpt).model_state, strict=True)
    store = BlobStore(tmp_path_factory.mktemp("blobs"))
    state = CoordinatorState(cfg, model, store, FederationSettings(stage=3))
    assignment = initial_assignment(model, corpus.dataset("train"), cfg.moe.n_experts)
    window = FederationSettings().column_check_window
    return ColumnValidator(
        state, corpus.dataset("val"), assignment, sequences=4, window=window, tolerance=0.1
    )


def _deltas(validator, columns, scale: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return {
        c: {
            k: scale * torch.randn(v.shape, generator=gen)
            for k, v in validator.state.columns.published_at(c, 0).items()
        }
        for c in columns
    }


def _no_shared_change(validator):
    return {k: torch.zeros_like(v) for k, v in validator.state.shared.published.items()}


def test_columns_checked_together_score_as_each_column_alone(validator) -> None:
    columns = [0, 1, 2]
    deltas = _deltas(validator, columns, scale=0.02)
    together = validator.check_all(deltas, 0, _no_shared_change(validator))
    scored = validator.checked[-3:]
    for c in columns:
        alone = validator.check_all({c: deltas[c]}, 0, _no_shared_change(validator))
        assert alone[c] == pytest.approx(together[c], abs=1e-5)
        assert validator.checked[-1][1:] == pytest.approx(
            next(s for s in scored if s[0] == c)[1:], abs=1e-5
        )
    assert len({round(together[c], 6) for c in columns}) == 3  # really per column


def test_a_column_made_much_worse_is_refused_by_name(validator) -> None:
    deltas = _deltas(validator, [1, 3], scale=0.0)
    deltas[3] = {k: -2 * v for k, v in validator.state.columns.published_at(3, 0).items()}
    with pytest.raises(ColumnWorse, match=r"^column 3: held-out loss of the result's model"):
        validator.check_all(deltas, 0, _no_shared_change(validator))
    assert validator.check_all({1: deltas[1]}, 0, _no_shared_change(validator))[1] == 0.0


def test_a_ternary_result_is_scored_as_trained_against_its_fp_base(validator) -> None:
    """A stage-4 unit at fraction 1 returns its columns' ternary values. Scored at the
    unit's fraction, base and result are the same ternary model (no change beyond the
    STE's float32 scale); scored in FP, the quantisation itself would count for or
    against the participant (on a ``tiny`` demo's trained columns: +10.7 %, refused; on
    this lightly trained seed it is within ±0.2 %)."""
    from shared_model.ternary import ternary_round

    columns = [0, 1]
    deltas = {}
    for c in columns:
        base = validator.state.columns.published_at(c, 0)
        deltas[c] = {}
        for k, v in base.items():
            trits, scale = ternary_round(v)
            deltas[c][k] = trits.float() * scale - v
    shared = _no_shared_change(validator)
    as_trained = validator.check_all(deltas, 0, shared, fraction=1.0)
    scored_ternary = {c: before for c, before, _ in validator.checked[-2:]}
    in_fp = validator.check_all(deltas, 0, shared)
    scored_fp = {c: before for c, before, _ in validator.checked[-2:]}
    for c in columns:
        assert abs(as_trained[c]) < 2e-3, as_trained
        # The base was scored as trained too: as its ternary value, not its FP weights.
        assert scored_ternary[c] != scored_fp[c] and in_fp[c] != as_trained[c]


@pytest.mark.parametrize("window", [16, 10_000])
def test_the_loop_checks_columns_on_windows_of_the_settings_length(tiny_moe_seed, tmp_path, window):
    """``column_check_window`` (serve's and demo's federation settings) reaches the loop's
    check: its held-out sequences are that many tokens, at most ``train.seq_len``, whatever
    the units train on (the check's cost grows with them: docs/federated-training.md §3.3)."""
    from coordinator.coordinator_process import Coordinator, StageBudget

    cfg, corpus, ckpt = tiny_moe_seed
    settings = FederationSettings(stage=3, eval_every=1000, column_check_window=window)
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        coord.prepare(ckpt, settings)
        loop = coord.federated_stage(None, StageBudget(minutes=30), settings)
        validator = loop.intake.validator
        zero = {0: {k: torch.zeros_like(v) for k, v in loop.state.columns.published(0).items()}}
        assert validator.check_all(zero, 0, _no_shared_change(validator)) == {0: 0.0}
        expected = min(window, cfg.train.seq_len) + 1  # inputs and their next tokens
        assert validator._batch(0).shape == (settings.column_check_sequences, expected)
    finally:
        coord.shutdown()
