"""``perspective convert``: path 9.1, Mixtral-style checkpoint → ternary Perspective MoE."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from coordinator.central.convert_params import ConvertError, ConvertParams

_DEFAULTS = ConvertParams()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def convert(
    source: Path = typer.Option(..., "--from", help="Hugging Face Mixtral checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    experts: int | None = typer.Option(
        _DEFAULTS.n_experts, "--experts", help="Final expert count (x2 steps)."
    ),
    gqa_every: int = typer.Option(
        _DEFAULTS.gqa_every, "--gqa-every", help="Keep attention in every k-th layer."
    ),
    seq_len: int = typer.Option(
        _DEFAULTS.seq_len, "--seq-len", help="Sequence length for KD and perplexity."
    ),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size"),
    distill_steps: int = typer.Option(
        _DEFAULTS.distill_steps, "--distill-steps", help="PDR/FFN regression steps."
    ),
    kd_steps: int = typer.Option(
        _DEFAULTS.kd_steps, "--kd-steps", help="KD fine-tune steps after each step."
    ),
    data: str = typer.Option("stdlib", "--data", help="stdlib, txt/jsonl dir or file, hf:NAME."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Use only this much text."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda."),
) -> None:
    """Convert, fine-tune after every step, print perplexity relative to the original."""
    from coordinator.central.convert import load_mixtral, run_convert
    from shared_model.data import DataError, prepare_corpus

    try:
        params = ConvertParams(  # checked before the source is loaded
            n_experts=experts,
            gqa_every=gqa_every,
            seq_len=seq_len,
            batch_size=batch_size,
            distill_steps=distill_steps,
            kd_steps=kd_steps,
        )
        teacher = load_mixtral(source)
        corpus = prepare_corpus(data, teacher.config.vocab_size, data_dir, max_bytes=max_bytes)
        res = run_convert(teacher, out, data=corpus, device=device, **asdict(params))
    except (ConvertError, DataError) as exc:
        _fail(str(exc))
    typer.echo(f"original perplexity {res['teacher_ppl']:.3f}")
    for s in res["steps"]:
        typer.echo(
            f"{s['step']:>10}  experts {s['experts']:>4}  ppl {s['ppl']:.3f}  "
            f"x{s['ppl_ratio']:.3f} of original"
        )
    typer.echo(json.dumps({"checkpoint": res["checkpoint"], "report": str(out / "convert.json")}))


def register(app: typer.Typer) -> None:
    """Add ``perspective convert``."""
    app.command("convert")(convert)
