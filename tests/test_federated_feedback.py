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
