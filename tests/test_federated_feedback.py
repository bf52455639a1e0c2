"""Error feedback (shared_model.federated.updates) on both codecs, and its persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from participant.unit_trainer import UnitTrainer
from shared_model.codec import CodecError
from shared_model.config_loading import load_config
from shared_model.federated.updates import read_bundle, send_with_feedback


@pytest.mark.parametrize(
    ("codec", "shape", "rounds"), [("ternary", (64, 32), 20), ("sparse", (4096,), 10)]
)
def test_error_feedback_loses_nothing(codec, shape, rounds) -> None:
    rng = np.random.default_rng(1 if codec == "ternary" else 2)
    total = torch.zeros(shape)
    received = torch.zeros(shape)
    residual: dict[str, torch.Tensor] = {}
    for step in range(rounds):
        update = {"w": torch.from_numpy(rng.normal(size=shape).astype(np.float32))}
        total += update["w"]
        sent = send_with_feedback(
            update, residual, codec, kind="shared", column=-1, base_version=step
        )
        _, decoded = read_bundle(sent.bundle, kind="shared", expected={"w": shape})
        assert torch.equal(decoded["w"], sent.decoded["w"])  # what the receiver decodes
        received += decoded["w"]
        residual = sent.residual
    # Nothing is lost: what was not sent yet sits in the residual.
    np.testing.assert_allclose(total, received + residual["w"], atol=1e-4)


@pytest.mark.parametrize(("threshold", "zeros"), [(0.7, (0.38, 0.46)), (1.6, (0.77, 0.83))])
def test_the_ternary_threshold_decides_the_zero_trits_and_feedback_keeps_the_rest(
    threshold, zeros
) -> None:
    """A Gaussian update: tau = threshold x mean|v| zeroes P(|v| < 0.80 sigma x threshold)
    of it (42 % at 0.7, 80 % at 1.6); what is not sent is owed in the residual."""
    from shared_model.federated.updates import UpdateError, check_threshold

    update = {"w": torch.from_numpy(np.random.default_rng(3).normal(size=(128, 64)).astype("f4"))}
    sent = send_with_feedback(
        update, {}, "ternary", kind="shared", column=-1, base_version=0, threshold=threshold
    )
    _, decoded = read_bundle(sent.bundle, kind="shared", expected={"w": (128, 64)})
    assert torch.equal(decoded["w"], sent.decoded["w"])
    assert zeros[0] < float((decoded["w"] == 0).float().mean()) < zeros[1]
    torch.testing.assert_close(decoded["w"] + sent.residual["w"], update["w"])
    for bad in (0.0, 2.0, float("nan")):
        with pytest.raises(UpdateError, match="ternary threshold"):
            check_threshold(bad)


@pytest.mark.parametrize("codec", ["ternary", "sparse"])
def test_error_feedback_rejects_non_finite(codec) -> None:
    update = {"w": torch.full((4, 4), float("nan"))}
    with pytest.raises(CodecError, match="NaN"):
        send_with_feedback(update, {}, codec, kind="shared", column=-1, base_version=0)


def test_participant_residual_persists(tmp_path) -> None:
    cfg = load_config("tiny")
    trainer = UnitTrainer(cfg, None, tmp_path)  # persistence only: no training data needed
    trainer.local.residual = {"w": torch.randn(64, 32)}
    trainer._save_local()
    again = UnitTrainer(cfg, None, tmp_path)
    assert torch.equal(again.local.residual["w"], trainer.local.residual["w"])
