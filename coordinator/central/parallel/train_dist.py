"""Distributed trainer for the centralised stages (``torchrun`` entry point).

Same loop semantics as :mod:`coordinator.central.trainer` (AdamW, warmup + cosine, gradient
clipping, evaluation every ``train.eval_every`` steps, checkpoints every
``train.checkpoint_every`` steps and at the end), spread over ranks:

* data: batch ``i`` is the *global* batch ``dataset.batch(i, B, T + 1, seed)``; rank r
  trains on rows ``r·B/W .. (r+1)·B/W``, so W ranks see exactly the single-process data;
* shared layers: FSDP2 (:mod:`~coordinator.central.parallel.fsdp`); MoE experts: expert
  parallelism (:mod:`~coordinator.central.parallel.expert_parallel`);
* stage-3 regularisers use *global* statistics (router token fractions / mean
  probabilities and the expert unit-vector sum are all-reduced), so the loss is the
  single-process loss of the global batch, not a mean of per-rank approximations;
* checkpoints: ``<out>/dcp/stage<k>-step<N>`` (DCP, reloadable on any world size), and at
  the end ``<out>/stage<k>.safetensors`` + ``stage<k>.json`` (the single-process format).

Run: ``torchrun --nproc-per-node 2 -m coordinator.central.parallel.train_dist --stage 1 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from coordinator.central.checkpoint import (
    CheckpointError,
    check_tokenizer,
    seed_generators,
    sha256_file,
)
from coordinator.central.parallel import checkpointing as ckp
from coordinator.central.parallel.distributed import (
    DistEnv,
    DistributedError,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from coordinator.central.parallel.expert_parallel import apply_expert_parallel, scale_expert_grads
from coordinator.central.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from coordinator.central.stages import StageSetup, compute_loss, setup_stage
from coordinator.central.trainer import (
    TrainResult,
    _autocast,
    _datasets,
    _write_summary,
    train_stage,
)
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset, PreparedCorpus, corpus_name
from shared_model.losses import RankSum
from shared_model.model import PerspectiveModel
from shared_model.schedule import build_optimizer, set_scheduled_lr, ternary_fraction_at


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Clip by the global L2 norm over FSDP shards and expert-parallel experts alike."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = sum((g.float().square().sum() for g in local), torch.zeros(()))
    total = float(all_reduce_sum(sq.to(local[0].device) if local else sq).sqrt())
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)
    return total


class _DistRun:
    """Model, optimiser and counters of one distributed stage run on this rank."""

    def __init__(self, cfg, stage, env: DistEnv, setup, opts: dict):
        self.cfg, self.stage, self.env = cfg, stage, env
        # Global router statistics and expert unit-vector sums (see the module doc).
        self.ranks = RankSum(partial(all_reduce_sum, differentiable=True), env.world_size)
        self.teacher = setup.teacher
        self.teacher_path = setup.teacher_path
        self.tokenizer_sha256 = setup.tokenizer_sha256
        model = setup.model.to(env.device).train()
        if model.moe:
            apply_expert_parallel(model)
        if opts.get("activation_checkpointing"):
            apply_activation_checkpointing(model)
        self.model = apply_fsdp(model, mixed_precision=opts.get("mixed_precision"))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step, self.position, self.tokens = 0, 0, 0
        self.history: list[dict[str, float]] = []

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0] // self.env.world_size
        return batch[self.env.rank * b : (self.env.rank + 1) * b].to(self.env.device)

    def train_step(self, dataset: DocumentDataset, total_steps: int) -> float:
        t, world = self.cfg.train, self.env.world_size
        set_scheduled_lr(self.optimizer, self.step, self.cfg.optim, total_steps)
        if self.stage == 4:
            frac = ternary_fraction_at(self.step, total_steps, self.cfg.ternary.schedule)
            self.model.set_ternary_fraction(frac)
        batch = self.local_rows(dataset.batch(self.position, t.batch_size, t.seq_len, t.seed))
        with _autocast(self.env.device):
            x, y = batch[:, :-1], batch[:, 1:]
            loss, _ = compute_loss(self.stage, self.model, x, y, self.teacher, self.ranks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scale_expert_grads(self.model, 1.0 / world)
        if self.cfg.optim.grad_clip > 0:
            clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.step, self.position = self.step + 1, self.position + 1
        self.tokens += t.batch_size * t.seq_len
        return float(all_reduce_sum(loss.detach().float())) / world

    @torch.no_grad()
    def evaluate(self, dataset: DocumentDataset) -> float:
        """Global mean validation LM loss (same batches as :func:`trainer.evaluate`)."""
        from coordinator.central.trainer import EVAL_SEED

        t = self.cfg.train
        self.model.eval()
        total = 0.0
        for i in range(t.eval_batches):
            b = self.local_rows(dataset.batch(i, t.batch_size, t.seq_len, seed=EVAL_SEED))
            with _autocast(self.env.device):
                loss = self.model(b[:, :-1], targets=b[:, 1:]).loss.detach().float()
            total += float(all_reduce_sum(loss)) / self.env.world_size
        self.model.train()
        return total / max(t.eval_batches, 1)

    def meta(self) -> dict:
        extra = {"history": self.history}
        if self.teacher_path:
            extra["teacher"] = self.teacher_path
        return {
            "config": self.cfg.to_dict(),
            "stage": self.stage,
            "step": self.step,
            "data_position": self.position,
            "tokens": self.tokens,
            "extra": extra,
            "tokenizer_sha256": self.tokenizer_sha256,
            "world_size": self.env.world_size,
        }

    def save(self, out_dir: Path) -> Path:
        root = out_dir / "dcp"
        path = ckp.save_dcp(
            root / f"stage{self.stage}-step{self.step:08d}", self.model, self.optimizer, self.meta()
        )
        if self.env.is_main:  # keep only the newest checkpoint of this stage
            for old in root.glob(f"stage{self.stage}-step*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, path: Path) -> None:
        meta = ckp.load_dcp(path, self.model, self.optimizer)
        self.step, self.position = int(meta["step"]), int(meta["data_position"])
        self.tokens = int(meta["tokens"])
        self.history = list(meta.get("extra", {}).get("history", []))


def latest_dcp(out_dir: str | Path, stage: int) -> Path | None:
    """The newest complete distributed checkpoint of ``stage`` under ``<out_dir>/dcp``."""
    found = sorted(p for p in (Path(out_dir) / "dcp").glob(f"stage{stage}-step*"))
    found = [p for p in found if ckp.is_dcp_checkpoint(p)]
    return found[-1] if found else None


def _resolve_init(cfg, stage: int, init, out_dir: Path, env: DistEnv, data: PreparedCorpus):
    """(setup, DCP dir to resume or None) for ``init`` (safetensors file or DCP dir)."""
    if init is not None and Path(init).is_dir():
        meta = ckp.read_meta(init)
        if int(meta["stage"]) != stage or meta["config"]["model"] != cfg.to_dict()["model"]:
            raise CheckpointError(
                f"{init} is a stage-{meta['stage']} DCP checkpoint of another model config; "
                f"give a stage-{stage} checkpoint of this model (or a safetensors one)"
            )
        recorded = meta.get("tokenizer_sha256")
        check_tokenizer(recorded, data.tokenizer_sha256, checkpoint=init, against=corpus_name(data))
        if stage == 4:  # the weights are overwritten by the resume; the teacher is not
            teacher = meta.get("extra", {}).get("teacher")
            return setup_stage(cfg, 4, teacher, corpus=data, device=env.device), Path(init)
        setup = StageSetup(PerspectiveModel(cfg, moe=stage >= 3), None, None)
        setup.tokenizer_sha256 = data.tokenizer_sha256 or recorded
        return setup, Path(init)
    setup = setup_stage(
        cfg, stage, str(init) if init is not None else None, corpus=data, device=env.device
    )
    if setup.resume is None:
        return setup, None
    # Same-stage safetensors checkpoint: convert once (rank 0) and resume from the DCP copy.
    target = out_dir / "dcp" / f"import-{sha256_file(init)[:16]}"
    if env.is_main and not ckp.is_dcp_checkpoint(target):
        ckp.safetensors_to_dcp(init, target)
    barrier()
    return setup, target


def train_stage_distributed(
    cfg: PerspectiveConfig,
    stage: int,
    out_dir: str | Path,
    init: str | Path | None = None,
    minutes: float | None = None,
    *,
    data: PreparedCorpus | None = None,
    until_step: int | None = None,
    device: str | None = None,
    activation_checkpointing: bool = False,
    mixed_precision: bool | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run one centralised stage on every rank of the job (call it on all ranks).

    Args:
        cfg, stage, out_dir, init, minutes, data, until_step: as for
            :func:`coordinator.central.trainer.train_stage`; ``init`` may also be a distributed
            checkpoint directory (same stage: resume, on any world size).
        device: ``cpu`` or ``cuda`` (default: CUDA if available).
        activation_checkpointing: recompute block activations in backward.
        mixed_precision: FSDP bf16 parameters (default: on CUDA only).
        on_step: called on every rank after each step with ``{"step", "loss"}``.

    Raises:
        DistributedError: batch size or expert count not divisible by the world size.
        StageError, CheckpointError, DataError: as the single-process trainer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = init_distributed(device)
    if cfg.train.batch_size % env.world_size:
        raise DistributedError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by the world size "
            f"{env.world_size}: choose a batch size that is a multiple of the rank count"
        )
    train_ds, val_ds, data = _datasets(cfg, data, None, None)
    if stage == 2:  # no training: one rank writes the stage-2 checkpoint
        if env.is_main:
            train_stage(cfg, 2, out_dir, init=init, data=data, device=env.device)
        barrier()
        return TrainResult(**json.loads((out_dir / "stage2.json").read_text()))
    # Same seed on every rank: identical initial weights before FSDP shards them, and the
    # same initial weights as the single-process trainer (which also seeds with train.seed).
    seed_generators(cfg.train.seed)
    setup, resume = _resolve_init(cfg, stage, init, out_dir, env, data)
    opts = {
        "activation_checkpointing": activation_checkpointing,
        "mixed_precision": mixed_precision,
    }
    run = _DistRun(cfg, stage, env, setup, opts)
    if resume is not None:
        run.resume(resume)
    last = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    return _loop(run, train_ds, val_ds, last, minutes, out_dir, on_step)


def _loop(run: _DistRun, train_ds, val_ds, last, minutes, out_dir: Path, on_step) -> TrainResult:
    t = run.cfg.train
    start, start_step = time.perf_counter(), run.step
    deadline = start + minutes * 60 if minutes is not None else None
    loss, val, stopped, saved_at = float("nan"), float("nan"), False, -1
    while run.step < last:
        over = deadline is not None and time.perf_counter() >= deadline
        # Every rank must agree to stop, or the collectives of the next step would hang.
        if float(all_reduce_sum(torch.tensor(float(over)))) > 0:
            stopped = True
            break
        loss = run.train_step(train_ds, t.steps)
        if on_step is not None:
            on_step({"step": run.step, "loss": loss})
        if run.step % t.eval_every == 0 or run.step == t.steps:
            val = run.evaluate(val_ds)
            tps = (run.step - start_step) * t.batch_size * t.seq_len / (time.perf_counter() - start)
            run.history.append(
                {"step": run.step, "train_loss": loss, "val_loss": val, "tokens_per_s": tps}
            )
        if run.step % t.checkpoint_every == 0:
            run.save(out_dir)
            saved_at = run.step
    if stopped or math.isnan(val):
        val = run.evaluate(val_ds)
    elapsed = time.perf_counter() - start
    dcp_path = run.save(out_dir) if saved_at != run.step else latest_dcp(out_dir, run.stage)
    path = out_dir / f"stage{run.stage}.safetensors"
    sha = [ckp.dcp_to_safetensors(dcp_path, path) if run.env.is_main else ""]
    dist.broadcast_object_list(sha, src=0)
    done = run.step - start_step
    result = TrainResult(
        stage=run.stage,
        steps=run.step,
        train_loss=loss,
        val_loss=val,
        tokens=run.tokens,
        tokens_per_s=done * t.batch_size * t.seq_len / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        checkpoint=str(path),
        checkpoint_sha256=sha[0],
        stopped_early=stopped,
        history=run.history,
    )
    if run.env.is_main:
        _write_summary(out_dir, result)
    return result


def _parse(argv):
    p = argparse.ArgumentParser(prog="train_dist", description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--init", type=Path)
    p.add_argument("--minutes", type=float)
    p.add_argument("--until-step", type=int)
    p.add_argument("--data", default="stdlib")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--device")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--losses-json", type=Path, help="rank 0 writes per-step losses here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m coordinator.central.parallel.train_dist --stage K --out DIR [...]``."""
    from coordinator.central.parallel.distributed import shutdown_distributed
    from shared_model.config_loading import load_config
    from shared_model.data import prepare_corpus

    args = _parse(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    env = init_distributed(args.device)
    corpus = None
    for turn in (0, 1):  # rank 0 prepares the corpus cache first, the others then reuse it
        if env.is_main == (turn == 0):
            corpus = prepare_corpus(
                args.data, cfg.model.vocab_size, args.data_dir, max_bytes=args.max_bytes
            )
        barrier()
    losses: list[dict] = []
    result = train_stage_distributed(
        cfg,
        args.stage,
        args.out,
        init=args.init,
        minutes=args.minutes,
        data=corpus,
        until_step=args.until_step,
        device=args.device,
        activation_checkpointing=args.activation_checkpointing,
        on_step=losses.append,
    )
    if env.is_main:
        if args.losses_json is not None:
            args.losses_json.write_text(json.dumps(losses))
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
    # Everything is written (checkpoints by temp + rename) and the group is destroyed. Skip
    # the interpreter's teardown: clearing module dicts destroys torch's C++ collective
    # state in no fixed order, and in CI a rank aborted there after its work was done
    # ("terminate called without an active exception", exit -6), failing a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
