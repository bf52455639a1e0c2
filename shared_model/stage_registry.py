"""Stages 5 and 6 as coordinator stage jobs (:mod:`coordinator.stage_jobs`).

Each runner is idempotent: a work directory that already holds the stage's final JSON
summary (written last, after the checkpoint) is returned as is, so a job killed mid-run
simply runs again. Stage 7 (evaluation) and path 9.1 (conversion) keep their own commands
(``perspective eval``, ``perspective convert``): evaluation writes a report, not a
checkpoint, and conversion starts from a Hugging Face directory, not a stage checkpoint.
"""

from __future__ import annotations

from pathlib import Path


def _manifold(ctx) -> Path:
    from shared_model.manifold_stage import run_manifold

    done = ctx.work_dir / "stage5.json"
    if not done.is_file():
        ctx.report({"stage": 5, "phase": "running"})
        result = run_manifold(ctx.cfg, ctx.init, ctx.work_dir, data=ctx.data)
        ctx.report({"val_loss": result["val_loss_after"], "trd_files": result["trd"]["files"]})
    return ctx.work_dir / "stage5.safetensors"


def _spp(ctx) -> Path:
    from shared_model.safety_stage import run_spp

    done = ctx.work_dir / "spp.json"
    if not done.is_file():
        result = run_spp(ctx.cfg, ctx.init, ctx.work_dir, data=ctx.data)
        ctx.report(
            {
                "eps": result["eps"],
                "redteam_block_rate": result["redteam_block_rate"],
                "benign_false_block_rate": result["benign_false_block_rate"],
            }
        )
    return ctx.work_dir / "spp.safetensors"


def register_extra_stages() -> None:
    """Register stages ``"5"`` (manifold) and ``"6"`` (SPP) with the stage-job runner."""
    from coordinator.stage_jobs import StageSpec, register_stage

    register_stage(
        StageSpec("5", "manifold alignment: torus router + .trd neighbour deltas", True, _manifold)
    )
    register_stage(
        StageSpec("6", "safety polytope: anchors, half-spaces, eps calibration", True, _spp)
    )
