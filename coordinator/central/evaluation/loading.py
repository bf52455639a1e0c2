"""Load any Perspective checkpoint (dense, MoE, stage-5 manifold) into a ready model."""

from __future__ import annotations

from pathlib import Path

import torch

from coordinator.central.checkpoint import Checkpoint, check_compatible, load_checkpoint
from shared_model.model import PerspectiveModel


def model_from_checkpoint(ckpt: Checkpoint) -> PerspectiveModel:
    """Build the right model for a loaded checkpoint and load its weights.

    Dense for stage-1 weights, MoE when expert weights are present, with manifold routers
    when the state holds ``router.positions`` (stage 5).

    Raises:
        CheckpointError: the weights do not fit the model of the checkpoint's config.
    """
    from coordinator.central.manifold import build_manifold_model, is_manifold_state

    state = ckpt.model_state
    if is_manifold_state(state):
        model = build_manifold_model(ckpt.cfg)
    else:
        moe = any(".ffn.experts." in k for k in state)
        model = PerspectiveModel(ckpt.cfg, moe=moe)
    check_compatible(ckpt, model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[PerspectiveModel, Checkpoint]:
    """``(model in eval mode on device, checkpoint)`` for the checkpoint file ``path``."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt).to(device), ckpt
