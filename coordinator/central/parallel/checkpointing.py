"""Distributed checkpoints (``torch.distributed.checkpoint``) and the safetensors bridge.

A distributed checkpoint is a directory written collectively by all ranks: the DCP files
(``*.distcp`` + ``.metadata``) hold the model and optimiser state keyed by parameter name
(FSDP shards and expert-parallel experts alike), and ``perspective.json`` holds the run
metadata (stage, step, data position, tokens, config, history, world size). DCP reshards
on load, so a checkpoint written by 2 ranks loads on 1 rank and vice versa.

Directories are written under a temporary name and renamed by rank 0 once every rank is
done, so a checkpoint directory is never half-written.

:func:`dcp_to_safetensors` / :func:`safetensors_to_dcp` convert to and from the project's
single-file checkpoint (:mod:`coordinator.central.checkpoint`) in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from coordinator.central.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from coordinator.central.parallel.distributed import barrier, rank
from shared_model.config import ConfigError, PerspectiveConfig
from shared_model.config_loading import config_from_dict

META_FILE = "perspective.json"


def is_dcp_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete distributed checkpoint directory."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file() and (p / META_FILE).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``perspective.json`` metadata of a distributed checkpoint.

    Raises:
        CheckpointError: not a complete distributed checkpoint.
    """
    if not is_dcp_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a distributed checkpoint directory (.metadata and {META_FILE})"
        )
    return json.loads((Path(path) / META_FILE).read_text())


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_state_dict(model, [])[0]}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_dcp(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    no_dist: bool = False,
) -> Path:
    """Collectively write a distributed checkpoint to ``path`` (atomically, by rename).

    Every rank must call this with the same ``path``. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if not no_dist:
        barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=no_dist)
    if not no_dist:
        barrier()
    if rank() == 0 or no_dist:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    if not no_dist:
        barrier()
    return path


def load_dcp(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    no_dist: bool = False,
) -> dict[str, Any]:
    """Collectively load a distributed checkpoint into ``model`` (and ``optimizer``).

    Works for any world size / sharding of ``model``. Optimiser state of parameters that
    had none when saved (never received a gradient) keeps its fresh zero init.

    Returns:
        The checkpoint's metadata.

    Raises:
        CheckpointError: not a checkpoint, or its tensors do not fit the model.
    """
    meta = read_meta(path)
    state = _state(model, optimizer)
    try:
        dcp.load(
            state,
            checkpoint_id=str(path),
            planner=DefaultLoadPlanner(allow_partial_load=optimizer is not None),
            no_dist=no_dist,
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"distributed checkpoint {path} does not fit the model: {exc}"
        ) from exc
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    return meta


def _plain_model(cfg: PerspectiveConfig, stage: int):
    from shared_model.model import PerspectiveModel
    from shared_model.schedule import build_optimizer

    model = PerspectiveModel(cfg, moe=stage >= 2)
    return model, build_optimizer(model, cfg.optim)


def dcp_to_safetensors(path: str | Path, out: str | Path) -> str:
    """Convert a distributed checkpoint into one safetensors checkpoint (one process).

    Returns:
        The sha256 content id of the written file.
    """
    meta = read_meta(path)
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid config in {META_FILE}: {exc}") from exc
    model, optimizer = _plain_model(cfg, int(meta["stage"]))
    load_dcp(path, model, optimizer, no_dist=True)
    return save_checkpoint(
        out,
        model,
        cfg,
        stage=int(meta["stage"]),
        step=int(meta["step"]),
        optimizer=optimizer,
        data_position=int(meta["data_position"]),
        tokens=int(meta["tokens"]),
        extra=meta.get("extra", {}),
        tokenizer_sha256=meta.get("tokenizer_sha256"),
    )


def safetensors_to_dcp(src: str | Path, path: str | Path) -> Path:
    """Convert a safetensors checkpoint into a distributed checkpoint (one process)."""
    ckpt = load_checkpoint(src)
    model, optimizer = _plain_model(ckpt.cfg, ckpt.stage)
    restore(ckpt, model, optimizer, rng=False)
    meta = {
        "config": ckpt.cfg.to_dict(),
        "stage": ckpt.stage,
        "step": ckpt.step,
        "data_position": ckpt.data_position,
        "tokens": int(ckpt.meta.get("tokens", 0)),
        "extra": ckpt.meta.get("extra", {}),
        "tokenizer_sha256": ckpt.tokenizer_sha256,
        "world_size": 1,
    }
    return save_dcp(path, model, optimizer, meta, no_dist=True)
