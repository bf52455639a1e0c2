"""Checkpoints: one safetensors file with weights, optimiser state and JSON metadata.

Layout of the tensors in the file:

* ``model.<param name>``: every entry of ``model.state_dict()``;
* ``optim.<param name>.<key>``: AdamW per-parameter state (``step``, ``exp_avg``,
  ``exp_avg_sq``), keyed by parameter *name* so it survives re-creating the optimiser;
* ``rng.torch`` (CPU generator state, uint8), ``rng.numpy`` (MT19937 key), ``rng.cuda.<i>``.

The safetensors header's ``__metadata__`` holds one key, ``perspective``: a JSON object
with ``format``, ``config`` (``PerspectiveConfig.to_dict()``), ``stage``, ``step``,
``data_position``, ``tokens``, optimiser ``param_groups`` (hyper-parameters, params as
names), python/numpy RNG scalars, free-form ``extra``, ``tokenizer_sha256`` (the sha256 of
the ``tokenizer.json`` the weights were trained with, null when unknown: token ids mean
nothing without it, see :func:`check_tokenizer`) and ``tensor_sha256`` (hash of all tensor
names and bytes, so a flipped bit anywhere is detected on load).

Files are written to a temporary name and renamed, so a checkpoint is never half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from shared_model.config import ConfigError, PerspectiveConfig
from shared_model.config_loading import config_from_dict
from shared_model.data import PreparedCorpus, corpus_name
from shared_model.files import atomic_path

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt or does not match the model/config."""


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on CPU)."""

    cfg: PerspectiveConfig
    meta: dict[str, Any]
    model_state: dict[str, Tensor]
    optim_tensors: dict[str, Tensor] = field(default_factory=dict)
    rng_tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def stage(self) -> int:
        return int(self.meta["stage"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def data_position(self) -> int:
        return int(self.meta["data_position"])

    @property
    def tokenizer_sha256(self) -> str | None:
        """sha256 of the tokenizer the weights were trained with (None: not recorded)."""
        return self.meta.get("tokenizer_sha256")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (its content id)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], list[dict]]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu()
    return tensors, groups


def _rng_capture() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, pystate, pygauss = random.getstate()
    scalars = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(pystate), pygauss],
    }
    return tensors, scalars


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: PerspectiveConfig,
    *,
    stage: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    data_position: int = 0,
    tokens: int = 0,
    extra: dict[str, Any] | None = None,
    tokenizer_sha256: str | None = None,
) -> str:
    """Write a checkpoint atomically and return its content id (sha256 of the file).

    Args:
        path: destination ``.safetensors`` file.
        model: the model whose ``state_dict()`` is saved.
        cfg: the config the model was built from.
        stage: training stage (1-4) that produced the weights.
        step: optimiser steps taken in this stage.
        optimizer: AdamW (or any torch optimiser) whose state to include.
        data_position: next batch position of the data loader.
        tokens: training tokens seen in this stage.
        extra: JSON-serialisable extra metadata (e.g. losses).
        tokenizer_sha256: sha256 of the ``tokenizer.json`` whose token ids the model was
            trained on (``PreparedCorpus.tokenizer_sha256``); None when unknown.
    """
    path = Path(path)
    # Clone: safetensors refuses shared/non-contiguous storage (views, tied weights).
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    groups: list[dict] = []
    if optimizer is not None:
        opt_t, groups = _optimizer_tensors(model, optimizer)
        tensors.update(opt_t)
    rng_t, rng_scalars = _rng_capture()
    tensors.update(rng_t)
    meta = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "stage": int(stage),
        "step": int(step),
        "data_position": int(data_position),
        "tokens": int(tokens),
        "param_groups": groups,
        "rng": rng_scalars,
        "extra": extra or {},
        "tokenizer_sha256": tokenizer_sha256,
        "tensor_sha256": _tensor_digest(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"perspective": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return sha256_file(path)


def _read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("perspective")
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a Perspective checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}"
        )
    return meta


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Read a checkpoint (to CPU) and check its integrity.

    Raises:
        CheckpointError: missing file, not safetensors, corrupt tensors, bad metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        meta = _read_meta(path)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not safetensors: {exc}") from exc
    if verify and _tensor_digest(tensors) != meta.get("tensor_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor data does not match its hash")
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {exc}") from exc
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for name, t in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in groups:
            raise CheckpointError(f"checkpoint {path} has unexpected tensor {name!r}")
        groups[prefix][rest if prefix != "rng" else name] = t
    return Checkpoint(cfg, meta, groups["model"], groups["optim"], groups["rng"])


def check_tokenizer(
    recorded: str | None, tokenizer_sha256: str | None, *, checkpoint: str | Path, against: str
) -> None:
    """Raise :class:`CheckpointError` if a checkpoint was trained with another tokenizer.

    A model's token ids mean the words of the tokenizer it was trained with; fed another
    corpus's ids (same vocabulary size, other words) it trains or scores on garbage
    without any error. Either digest unknown (a checkpoint written before digests were
    recorded, datasets without a prepared corpus) passes: there is nothing to compare.

    Args:
        recorded: the checkpoint's ``tokenizer_sha256`` (:attr:`Checkpoint.tokenizer_sha256`).
        tokenizer_sha256: sha256 of the ``tokenizer.json`` about to be used with it.
        checkpoint: the checkpoint's path, for the message.
        against: what that tokenizer belongs to, for the message (e.g. ``corpus stdlib``).
    """
    if recorded is None or tokenizer_sha256 is None or recorded == tokenizer_sha256:
        return
    raise CheckpointError(
        f"checkpoint {checkpoint} was trained with tokenizer {recorded[:12]}, but {against} "
        f"tokenizes with {tokenizer_sha256[:12]}: the model's token ids would mean other "
        "text. Use the corpus the checkpoint was trained on (the same --data and "
        "--max-bytes), or a checkpoint trained on this one"
    )


def check_corpus_tokenizer(
    ckpt: Checkpoint, data: PreparedCorpus, *, checkpoint: str | Path
) -> None:
    """:func:`check_tokenizer` of a loaded checkpoint against a prepared corpus."""
    check_tokenizer(
        ckpt.tokenizer_sha256,
        data.tokenizer_sha256,
        checkpoint=checkpoint,
        against=corpus_name(data),
    )


def check_compatible(ckpt: Checkpoint, model: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's tensors fit ``model`` exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt.model_state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches, e.g. {k}: {got[k]} vs model {expected[k]}"
            )
        raise CheckpointError(
            "checkpoint does not match the model (" + "; ".join(parts) + "): was it written "
            "for another preset/stage? Use the checkpoint's own config or the right stage"
        )


def restore(
    ckpt: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = True,
) -> None:
    """Load weights (and optionally optimiser and RNG state) from ``ckpt`` in place.

    Raises:
        CheckpointError: tensor names/shapes or optimiser parameters do not match.
    """
    check_compatible(ckpt, model)
    model.load_state_dict(ckpt.model_state, strict=True)
    if optimizer is not None:
        _restore_optimizer(ckpt, model, optimizer)
    if rng:
        restore_rng(ckpt)


def _restore_optimizer(
    ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    saved_groups = ckpt.meta.get("param_groups") or []
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint has {len(saved_groups)} optimiser groups, optimiser has "
            f"{len(optimizer.param_groups)}: resume with the same stage and settings"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        if [names[id(p)] for p in group["params"]] != saved["params"]:
            raise CheckpointError("optimiser parameter groups differ from the checkpoint's")
        group.update({k: v for k, v in saved.items() if k != "params"})
        for p in group["params"]:
            prefix = f"{names[id(p)]}."
            state = {
                k[len(prefix) :]: v.to(p.device) if v.dim() else v.clone()
                for k, v in ckpt.optim_tensors.items()
                if k.startswith(prefix)
            }
            if state:
                optimizer.state[p] = state


def seed_generators(seed: int) -> None:
    """Seed every generator a checkpoint records (torch, numpy, python ``random``), so a
    run is a pure function of its inputs: the same weights and recorded states from
    ``perspective train``, a stage job, a benchmark or a torchrun rank, and the same
    whether a run went through or was killed and resumed. The batches come from explicit
    generators (``DocumentDataset.batch``), a new model's weights from torch's global one."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def restore_rng(ckpt: Checkpoint) -> None:
    """Restore torch (CPU, CUDA), numpy and python RNG states saved in ``ckpt``."""
    torch.set_rng_state(ckpt.rng_tensors["rng.torch"])
    cuda = [ckpt.rng_tensors[k] for k in sorted(ckpt.rng_tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = ckpt.meta["rng"]["numpy"]
    key = ckpt.rng_tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, key, pos, has_gauss, gauss))
    version, pystate, pygauss = ckpt.meta["rng"]["python"]
    random.setstate((version, tuple(pystate), pygauss))
