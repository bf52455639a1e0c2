"""Single-process trainer for the centralised stages 1-4 (and the federated baselines).

``train_stage(cfg, stage, out_dir, init=...)`` builds the stage's model
(:mod:`coordinator.central.stages`), trains it with AdamW (warmup + cosine, gradient clipping,
bf16 autocast on CUDA, fp32 on CPU), evaluates on the validation split every
``train.eval_every`` steps, writes checkpoints every ``train.checkpoint_every`` steps and
at the end (``<out_dir>/stage<k>.safetensors``) and returns a :class:`TrainResult`.

Batch ``i`` of a run is ``dataset.batch(i, B, T + 1, seed)`` and the checkpoint records
the step, the data position and every RNG state, so resuming from a same-stage checkpoint
continues bit-identically on CPU. A run seeds every generator itself (``train.seed``): on
CPU it is a function of its inputs, whoever calls it and whatever ran before it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# At import, not in the run: ``rich.style`` draws from python's ``random`` when first
# imported, which made a run's recorded RNG state depend on whether it was the process's
# first (``train_stage`` seeds the generators before it builds the model).
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from coordinator.central.checkpoint import restore, save_checkpoint, seed_generators
from coordinator.central.stages import StageError, compute_loss, setup_stage
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset, PreparedCorpus, prepare_corpus
from shared_model.files import write_json_atomic
from shared_model.schedule import build_optimizer, set_scheduled_lr, ternary_fraction_at

EVAL_SEED = 1_000_003  # validation batches never depend on the training seed


@dataclass
class TrainResult:
    """Outcome of one :func:`train_stage` call."""

    stage: int
    steps: int
    train_loss: float
    val_loss: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    checkpoint: str
    checkpoint_sha256: str
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: DocumentDataset,
    batches: int,
    batch_size: int,
    seq_len: int,
    device: torch.device | None = None,
) -> float:
    """Mean LM loss of ``model`` over ``batches`` fixed validation batches.

    The batches depend only on :data:`EVAL_SEED`, so numbers are comparable across
    runs and stages. The model's train/eval mode is restored afterwards.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(batches):
        b = dataset.batch(i, batch_size, seq_len, seed=EVAL_SEED).to(device)
        with _autocast(device):
            total += float(model(b[:, :-1], targets=b[:, 1:]).loss)
    model.train(was_training)
    return total / max(batches, 1)


def _datasets(
    cfg, data, train_data, val_data
) -> tuple[DocumentDataset, DocumentDataset, PreparedCorpus | None]:
    """(train, val, the corpus they come from: None when both datasets were given alone)."""
    if train_data is not None and val_data is not None:
        return train_data, val_data, data
    data = data or prepare_corpus("stdlib", cfg.model.vocab_size)
    if data.vocab_size != cfg.model.vocab_size:
        raise StageError(
            f"corpus vocab {data.vocab_size} != model.vocab_size {cfg.model.vocab_size}"
        )
    return train_data or data.dataset("train"), val_data or data.dataset("val"), data


def _progress(enabled: bool):
    return Progress(
        TextColumn("[bold]stage {task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


class _Run:
    """Mutable state of one training loop (kept small so train_stage stays readable)."""

    def __init__(self, cfg, stage, out_dir, total_steps, setup, device):
        self.cfg, self.stage, self.out_dir = cfg, stage, Path(out_dir)
        self.total_steps, self.device = total_steps, device
        self.model = setup.model.to(device).train()
        self.teacher = setup.teacher
        self.extra = {"teacher": setup.teacher_path} if setup.teacher_path else {}
        self.tokenizer_sha256 = setup.tokenizer_sha256
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step, self.position, self.tokens = 0, 0, 0
        self.history: list[dict[str, float]] = []
        if setup.resume is not None:
            restore(setup.resume, self.model, self.optimizer, rng=True)
            self.step = setup.resume.step
            self.position = setup.resume.data_position
            self.tokens = int(setup.resume.meta["tokens"])
            self.history = list(setup.resume.meta["extra"].get("history", []))

    def train_step(self, dataset: DocumentDataset) -> torch.Tensor:
        t = self.cfg.train
        set_scheduled_lr(self.optimizer, self.step, self.cfg.optim, self.total_steps)
        if self.stage == 4:
            frac = ternary_fraction_at(self.step, self.total_steps, self.cfg.ternary.schedule)
            self.model.set_ternary_fraction(frac)
        batch = dataset.batch(self.position, t.batch_size, t.seq_len, seed=t.seed)
        batch = batch.to(self.device, non_blocking=True)
        with _autocast(self.device):
            loss, _ = compute_loss(
                self.stage, self.model, batch[:, :-1], batch[:, 1:], self.teacher
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.position += 1
        self.tokens += t.batch_size * t.seq_len
        return loss.detach()

    def save(self, path: Path) -> str:
        return save_checkpoint(
            path,
            self.model,
            self.cfg,
            stage=self.stage,
            step=self.step,
            optimizer=self.optimizer,
            data_position=self.position,
            tokens=self.tokens,
            extra={**self.extra, "history": self.history},
            tokenizer_sha256=self.tokenizer_sha256,
        )


def train_stage(
    cfg: PerspectiveConfig,
    stage: int,
    out_dir: str | Path,
    init: str | Path | None = None,
    minutes: float | None = None,
    *,
    data: PreparedCorpus | None = None,
    train_data: DocumentDataset | None = None,
    val_data: DocumentDataset | None = None,
    until_step: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run one centralised stage and write ``<out_dir>/stage<stage>.safetensors``.

    Args:
        cfg: validated config; ``train.steps`` is the length of the LR/ternary schedule.
        stage: 1 (dense), 2 (expert init), 3 (MoE), 4 (ternary distillation).
        out_dir: output directory (created).
        init: checkpoint to start from; a checkpoint of the same stage resumes it
            (weights, optimiser, data position, RNG), an earlier stage starts fresh.
        minutes: wall-clock budget; the run stops cleanly and saves when it runs out.
        data: prepared corpus (default: the stdlib corpus at ``cfg.model.vocab_size``).
        train_data, val_data: explicit datasets (e.g. a document subset), overriding data.
        until_step: stop (and save) after this step although the schedule is longer.
        device: torch device (default CUDA if available, else CPU).
        progress: show a rich progress bar.
        on_eval: called with ``{"step", "train_loss", "val_loss", "tokens_per_s"}``.

    Raises:
        StageError, CheckpointError, DataError: unusable arguments or inputs.
    """
    device = torch.device(device) if device is not None else default_device()
    train_ds, val_ds, data = _datasets(cfg, data, train_data, val_data)
    init = str(init) if init is not None else None
    # A run is a pure function of its inputs, whoever calls it: the model's initial weights
    # come from the global generator (a resumed run restores the recorded states later).
    seed_generators(cfg.train.seed)
    setup = setup_stage(cfg, stage, init, corpus=data, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to fit
    if stage == 2:
        return _finish_stage2(cfg, setup, out_dir, val_ds, device)
    run = _Run(cfg, stage, out_dir, cfg.train.steps, setup, device)
    last = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    return _loop(run, train_ds, val_ds, last, minutes, progress, on_eval)


def _finish_stage2(cfg, setup, out_dir: Path, val_ds, device) -> TrainResult:
    model = setup.model.to(device)
    val = evaluate(model, val_ds, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)
    path = out_dir / "stage2.safetensors"
    sha = save_checkpoint(
        path,
        model,
        cfg,
        stage=2,
        step=0,
        extra={"val_loss": val},
        tokenizer_sha256=setup.tokenizer_sha256,
    )
    result = TrainResult(2, 0, float("nan"), val, 0, 0.0, 0.0, str(path), sha)
    _write_summary(out_dir, result)
    return result


def _loop(run: _Run, train_ds, val_ds, last: int, minutes, progress, on_eval) -> TrainResult:
    t = run.cfg.train
    start, start_step = time.perf_counter(), run.step
    deadline = start + minutes * 60 if minutes is not None else None
    loss = torch.tensor(float("nan"))
    val, stopped = float("nan"), False
    with _progress(progress) as bar:
        task = bar.add_task(
            "train",
            total=last,
            completed=run.step,
            stage=run.stage,
            loss=float("nan"),
            val="-",
            tps=0.0,
        )
        while run.step < last:
            if deadline is not None and time.perf_counter() >= deadline:
                stopped = True
                break
            loss = run.train_step(train_ds)
            tps = (run.step - start_step) * t.batch_size * t.seq_len / (time.perf_counter() - start)
            if run.step % t.eval_every == 0 or run.step == run.total_steps:
                val = evaluate(run.model, val_ds, t.eval_batches, t.batch_size, t.seq_len)
                record = {
                    "step": run.step,
                    "train_loss": float(loss),
                    "val_loss": val,
                    "tokens_per_s": tps,
                }
                run.history.append(record)
                if on_eval is not None:
                    on_eval(record)
            if run.step % t.checkpoint_every == 0:
                run.save(run.out_dir / f"stage{run.stage}.safetensors")
            bar.update(task, completed=run.step, loss=float(loss), tps=tps, val=f"{val:.4f}")
    if stopped or math.isnan(val):  # time budget hit (or no eval yet): measure the final model
        val = evaluate(run.model, val_ds, t.eval_batches, t.batch_size, t.seq_len)
    elapsed = time.perf_counter() - start
    path = run.out_dir / f"stage{run.stage}.safetensors"
    sha = run.save(path)
    done = run.step - start_step
    result = TrainResult(
        stage=run.stage,
        steps=run.step,
        train_loss=float(loss),
        val_loss=val,
        tokens=run.tokens,
        tokens_per_s=done * t.batch_size * t.seq_len / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        checkpoint=str(path),
        checkpoint_sha256=sha,
        stopped_early=stopped,
        history=run.history,
    )
    _write_summary(run.out_dir, result)
    return result


def _write_summary(out_dir: Path, result: TrainResult) -> None:
    path = out_dir / f"stage{result.stage}.json"
    write_json_atomic(path, result.to_dict())
