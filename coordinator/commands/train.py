"""``perspective train`` (centralised stages 1-4) and a temporary central ``perspective demo``.

The central demo trains the ``small`` preset's dense stage 1 on the standard-library
corpus and prints the falling loss and throughput; the federated demo replaces it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from shared_model.config import ConfigError


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(preset: str, config: Path | None, overrides: list[str]):
    from shared_model.config_loading import load_config

    try:
        return load_config(preset, config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


def train(
    stage: int = typer.Option(..., "--stage", help="1 dense, 2 expert init, 3 MoE, 4 ternary KD."),
    out: Path = typer.Option(..., "--out", help="Output directory for checkpoints/summaries."),
    preset: str = typer.Option("small", "--preset", help="tiny, small or full."),
    config: Path | None = typer.Option(None, "--config", help="YAML config file."),
    init: Path | None = typer.Option(None, "--init", help="Checkpoint to start or resume from."),
    minutes: float | None = typer.Option(None, "--minutes", help="Wall-clock budget."),
    overrides: list[str] = typer.Option([], "--set", help="Override, e.g. train.steps=500."),
    data: str = typer.Option("stdlib", "--data", help="stdlib, txt/jsonl dir or file, hf:NAME."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Use only this much text."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: auto)."),
) -> None:
    """Train one centralised stage and write <out>/stage<k>.safetensors and stage<k>.json."""
    from coordinator.central.checkpoint import CheckpointError
    from coordinator.central.stages import StageError
    from coordinator.central.trainer import train_stage
    from shared_model.data import DataError, prepare_corpus

    cfg = _load(preset, config, overrides)
    try:
        corpus = prepare_corpus(data, cfg.model.vocab_size, data_dir, max_bytes=max_bytes)
        result = train_stage(
            cfg,
            stage,
            out,
            init=init,
            minutes=minutes,
            data=corpus,
            device=device,
            progress=True,
            on_eval=_print_eval,
        )
    except (StageError, CheckpointError, DataError, ConfigError) as exc:
        _fail(str(exc))
    typer.echo(
        f"stage {result.stage}: {result.steps} steps, val loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:,.0f} tok/s -> {result.checkpoint}"
        + (" (time budget reached)" if result.stopped_early else "")
    )


def _print_eval(record: dict) -> None:
    typer.echo(
        f"step {record['step']:>6}  train {record['train_loss']:.4f}  "
        f"val {record['val_loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
    )


def register(app: typer.Typer) -> None:
    """Add ``train``."""
    app.command("train")(train)
