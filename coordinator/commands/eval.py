"""``perspective eval``: stage 7 (perplexity, tasks, system tests, SPP) → JSON + markdown."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint to evaluate."),
    out: Path = typer.Option(Path("eval-report"), "--out", help="Directory for report.json/md."),
    task: list[Path] = typer.Option([], "--task", help="Task JSONL (default: shipped tasks)."),
    spp: Path | None = typer.Option(None, "--spp", help="Stage-6 polytope (default: build one)."),
    data: str = typer.Option("stdlib", "--data", help="stdlib, txt/jsonl dir or file, hf:NAME."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Use only this much text."),
    ppl_batches: int | None = typer.Option(None, "--ppl-batches", help="Validation batches."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: auto)."),
) -> None:
    """Evaluate a checkpoint; print the targets table and write report.json + report.md."""
    from coordinator.central.checkpoint import CheckpointError, load_checkpoint
    from coordinator.central.evaluation.lm import EvalError
    from coordinator.central.evaluation.report import run_eval
    from coordinator.central.safety import SafetyError
    from shared_model.data import DataError, prepare_corpus

    try:
        vocab = load_checkpoint(checkpoint).cfg.model.vocab_size
        corpus = prepare_corpus(data, vocab, data_dir, max_bytes=max_bytes)
        report = run_eval(
            checkpoint,
            out,
            data=corpus,
            device=device,
            tasks=task or None,
            spp=spp,
            ppl_batches=ppl_batches,
        )
    except (CheckpointError, DataError, EvalError, SafetyError) as exc:
        _fail(str(exc))
    for row in report["targets"]:
        typer.echo(
            f"{row['status']:>12}  {row['metric']} = {row['value']}  ({row['target'] or '-'})"
        )
    typer.echo(json.dumps({"report": str(out / "report.json"), "markdown": str(out / "report.md")}))


def register(app: typer.Typer) -> None:
    """Add ``perspective eval``."""
    app.command("eval")(eval_command)
