"""``perspective generate``: sample text from a checkpoint with incremental decoding."""

from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint (.safetensors)."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy."),
    top_k: int | None = typer.Option(50, "--top-k", help="Sample among the k best tokens."),
    column: int | None = typer.Option(
        None, "--column", help="MoE only: route every token through this expert column."
    ),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="tokenizer.json [default: the one beside the checkpoint, else the stdlib corpus's].",
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Continue PROMPT with a trained model (dense or MoE, FP or ternary-trained)."""
    import torch

    from coordinator.central.checkpoint import (
        CheckpointError,
        check_tokenizer,
        load_checkpoint,
        restore,
    )
    from coordinator.central.generate import generate as run_generate
    from shared_model import tokenizer as tk
    from shared_model.model import ModelError, PerspectiveModel
    from shared_model.shards import DataError

    try:
        ckpt = load_checkpoint(checkpoint)
        moe = any(k.endswith("ffn.router.weight") for k in ckpt.model_state)
        model = PerspectiveModel(ckpt.cfg, moe=moe)
        restore(ckpt, model, rng=False)
        model.eval()
        tokenizer = tokenizer or _beside(checkpoint)
        tok, digest, source = _tokenizer(tokenizer, data_dir, ckpt.cfg.model.vocab_size)
        check_tokenizer(ckpt.tokenizer_sha256, digest, checkpoint=checkpoint, against=source)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        if not ids:
            _fail("the prompt encodes to no tokens; give some text")
        columns = None
        if column is not None:
            if not moe:
                _fail("--column needs a MoE checkpoint (stage 2 or later)")
            columns = torch.tensor([column])
        gen = torch.Generator().manual_seed(seed)
        out = run_generate(
            model, torch.tensor([ids]), max_new_tokens, temperature, top_k, True, columns, gen
        )
    except (CheckpointError, ModelError, tk.TokenizerError, DataError) as exc:
        _fail(str(exc))
    typer.echo(tok.decode(out[0].tolist()))


def _beside(checkpoint: Path) -> Path | None:
    """``tokenizer.json`` next to the checkpoint (what ``coordinator export`` writes)."""
    path = checkpoint.parent / "tokenizer.json"
    return path if path.is_file() else None


def _tokenizer(path: Path | None, data_dir: Path | None, vocab_size: int):
    """(tokenizer, the sha256 of its ``tokenizer.json``, where it comes from)."""
    from shared_model import tokenizer as tk

    if path is not None:
        from coordinator.central.checkpoint import sha256_file

        return tk.load_tokenizer(path, vocab_size), sha256_file(path), f"tokenizer {path}"
    from shared_model.data import corpus_name, prepare_corpus

    corpus = prepare_corpus("stdlib", vocab_size, data_dir=data_dir)
    return corpus.tokenizer(), corpus.tokenizer_sha256, corpus_name(corpus)


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command."""
    app.command("generate")(generate)
