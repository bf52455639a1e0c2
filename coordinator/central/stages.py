"""What each centralised training stage builds and optimises (DESIGN §2, stages 1-4).

* stage 1, dense seed: dense model, loss = LM.
* stage 2, expert init: dense checkpoint → MoE model whose experts clone FFN bank
  ``i mod n_gqa`` (:func:`shared_model.moe.init_experts_from_dense`); no training.
* stage 3, expert differentiation: MoE model, loss = LM + α·balance + β·diversity with
  α = ``moe.balance_alpha``, β = ``moe.diversity_beta``.
* stage 4, ternary distillation: MoE model whose expert weights go through progressive
  ternary STE (``ternary.schedule`` spread over the steps); loss =
  ``kd_loss(student, teacher, targets, ternary.kd_weight)`` against a frozen teacher:
  the stage-3 model the stage starts from, without ternary, held in bf16
  (:func:`shared_model.stage_loss.freeze_teacher`).

The losses themselves are :func:`shared_model.stage_loss.stage_loss`, the one function
the federated participants use too; :func:`compute_loss` picks its terms per stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from coordinator.central.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_compatible,
    check_tokenizer,
    load_checkpoint,
)
from shared_model.config import PerspectiveConfig
from shared_model.data import PreparedCorpus, corpus_name
from shared_model.losses import RankSum
from shared_model.model import PerspectiveModel
from shared_model.stage_loss import Distillation, freeze_teacher, stage_loss

STAGES = (1, 2, 3, 4)
# Which stage's checkpoints each stage may start from (same stage = resume).
_VALID_INIT = {1: (1,), 2: (1,), 3: (2, 3), 4: (3, 4)}


class StageError(ValueError):
    """A stage was asked for with an unusable initial checkpoint or arguments."""


@dataclass
class StageSetup:
    """Model(s) for a stage, and the checkpoint to resume from (same-stage init)."""

    model: PerspectiveModel
    #: stage 4's teacher, frozen on the stage's device (apart from ``model``)
    teacher: PerspectiveModel | None
    resume: Checkpoint | None
    teacher_path: str | None = None
    #: the tokenizer the stage trains with (the corpus's, else the init checkpoint's):
    #: what its checkpoints record.
    tokenizer_sha256: str | None = None


def _load_model(cfg: PerspectiveConfig, ckpt: Checkpoint, moe: bool) -> PerspectiveModel:
    model = PerspectiveModel(cfg, moe=moe)
    check_compatible(ckpt, model)
    model.load_state_dict(ckpt.model_state)
    return model


def _check_init(stage: int, init: Checkpoint | None, cfg: PerspectiveConfig) -> None:
    if stage not in STAGES:
        raise StageError(f"stage {stage} is invalid: allowed {', '.join(map(str, STAGES))}")
    if init is None:
        if stage != 1:
            raise StageError(
                f"stage {stage} needs --init: a stage-{_VALID_INIT[stage][0]} checkpoint"
            )
        return
    if init.stage not in _VALID_INIT[stage]:
        allowed = " or ".join(str(s) for s in _VALID_INIT[stage])
        raise StageError(
            f"stage {stage} cannot start from a stage-{init.stage} checkpoint: "
            f"give a stage-{allowed} checkpoint"
        )
    if init.cfg.model != cfg.model:
        raise CheckpointError(
            "checkpoint model config differs from the requested one; use the same preset "
            "and model.* overrides the checkpoint was trained with"
        )


def setup_stage(
    cfg: PerspectiveConfig,
    stage: int,
    init: str | None,
    *,
    corpus: PreparedCorpus | None = None,
    device: torch.device | str = "cpu",
) -> StageSetup:
    """Build the model (and teacher) for ``stage`` from an optional checkpoint path.

    Args:
        cfg: the run's config.
        stage: 1-4.
        init: checkpoint to start from (None: stage 1 from scratch).
        corpus: the training corpus (None: datasets without one, tokenizer unknown); the
            init checkpoint and a stage-4 teacher must have been trained with its tokenizer.
        device: where the stage trains: a stage-4 teacher is frozen there, in the dtype
            it runs in on that device (:func:`shared_model.stage_loss.teacher_run_dtype`).

    Raises:
        StageError: wrong stage or init checkpoint of the wrong stage.
        CheckpointError: unreadable checkpoint, a model-config or tokenizer mismatch.
    """
    ckpt = load_checkpoint(init) if init is not None else None
    _check_init(stage, ckpt, cfg)
    tokenizer_sha256 = corpus.tokenizer_sha256 if corpus is not None else None
    against = corpus_name(corpus) if corpus is not None else "the datasets given"
    if ckpt is not None:
        check_tokenizer(ckpt.tokenizer_sha256, tokenizer_sha256, checkpoint=init, against=against)
        tokenizer_sha256 = tokenizer_sha256 or ckpt.tokenizer_sha256
    setup = _build_stage(cfg, stage, init, ckpt, tokenizer_sha256, against, device)
    setup.tokenizer_sha256 = tokenizer_sha256
    return setup


def _build_stage(cfg, stage, init, ckpt, tokenizer_sha256, against, device) -> StageSetup:
    if stage == 1:
        if ckpt is None:
            return StageSetup(PerspectiveModel(cfg, moe=False), None, None)
        return StageSetup(_load_model(cfg, ckpt, moe=False), None, ckpt)
    if stage == 2:
        dense = _load_model(cfg, ckpt, moe=False)
        return StageSetup(dense.to_moe(), None, None)
    model = _load_model(cfg, ckpt, moe=True)
    resume = ckpt if ckpt.stage == stage else None
    if stage == 3:
        return StageSetup(model, None, resume)
    teacher_path = init if resume is None else ckpt.meta["extra"].get("teacher")
    if teacher_path is None:
        raise CheckpointError("stage-4 checkpoint does not name its teacher checkpoint")
    if resume is None:
        teacher = copy.deepcopy(model)  # the stage's start; the model itself trains on
    else:
        teacher_ckpt = load_checkpoint(teacher_path)
        check_tokenizer(
            teacher_ckpt.tokenizer_sha256,
            tokenizer_sha256,
            checkpoint=teacher_path,
            against=against,
        )
        teacher = _load_model(cfg, teacher_ckpt, True)
    return StageSetup(model, freeze_teacher(teacher, device), resume, str(teacher_path))


def compute_loss(
    stage: int,
    model: PerspectiveModel,
    x: Tensor,
    y: Tensor,
    teacher: PerspectiveModel | None = None,
    ranks: RankSum | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss of one batch for ``stage`` and a dict of its parts (detached tensors).

    Args:
        stage: 1, 3 or 4.
        model: the model being trained (ternary fraction already set for stage 4).
        x, y: inputs and next-token targets ``[B, T]``.
        teacher: stage 4 only, the frozen full-precision model.
        ranks: distributed trainer only: regularisers over all ranks' tokens and experts
            (this rank's loss is then its share; the mean over ranks is the global loss).
    """
    distill = None
    if stage == 4:
        if teacher is None:
            raise StageError("stage 4 needs a teacher model")
        distill = Distillation(teacher, model.cfg.ternary.kd_weight)
    return stage_loss(model, x, y, distill=distill, regularise=stage == 3, ranks=ranks)
