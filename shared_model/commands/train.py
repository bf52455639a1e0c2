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
    from shared_model.config import load_config

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
    data: str = typer.Option("stdlib", "--data", help="'stdlib' or a directory of txt/jsonl."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Use only this much text."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: auto)."),
) -> None:
    """Train one centralised stage and write <out>/stage<k>.safetensors and stage<k>.json."""
    import torch

    from shared_model.checkpoint import CheckpointError
    from shared_model.data import DataError, prepare_corpus
    from shared_model.stages import StageError
    from shared_model.trainer import train_stage

    cfg = _load(preset, config, overrides)
    torch.manual_seed(cfg.train.seed)
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


def central_demo(
    minutes: float = typer.Option(3.0, "--minutes", help="How long to train."),
    out: Path | None = typer.Option(None, "--out", help="Output dir (default: temp dir)."),
    preset: str = typer.Option("small", "--preset", help="Preset to train."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
) -> None:
    """Train stage 1 of the small model on the Python standard library for a few minutes."""
    import tempfile

    import torch

    from shared_model.data import prepare_corpus
    from shared_model.trainer import train_stage

    # A laptop CPU does ~1-2k tok/s on `small`: smaller batches, a short warmup and
    # frequent evals make the loss visibly fall within a few minutes.
    cfg = _load(
        preset,
        None,
        [
            "train.batch_size=8",
            "train.seq_len=128",
            "train.steps=400",
            "train.eval_every=10",
            "train.eval_batches=2",
            "train.checkpoint_every=100000",
            "optim.warmup_steps=20",
        ],
    )
    torch.manual_seed(cfg.train.seed)
    out = out or Path(tempfile.mkdtemp(prefix="perspective-demo-"))
    typer.echo(f"preparing the standard-library corpus (vocab {cfg.model.vocab_size}) ...")
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, data_dir)
    n_train = sum(s["n_tokens"] for s in corpus.manifest["splits"]["train"])
    typer.echo(f"{n_train:,} training tokens; training {preset} stage 1 for {minutes} min")
    result = train_stage(
        cfg, 1, out, minutes=minutes, data=corpus, progress=True, on_eval=_print_eval
    )
    typer.echo(
        f"done: {result.steps} steps, {result.tokens:,} tokens, val loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:,.0f} tok/s; checkpoint {result.checkpoint}"
    )


def register(app: typer.Typer) -> None:
    """Add ``train`` (and ``demo`` unless another module already provides one)."""
    app.command("train")(train)
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    if "demo" not in names:
        app.command("demo")(central_demo)
