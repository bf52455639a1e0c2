"""``perspective manifold`` (stage 5) and ``perspective spp`` (stage 6) commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _params(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            _fail(f"--param {item!r} must look like name=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _run(
    kind: str,
    checkpoint: Path,
    out: Path,
    params: list[str],
    data: str,
    data_dir: Path | None,
    max_bytes: int | None,
    device: str | None,
) -> None:
    from coordinator.central.checkpoint import CheckpointError, load_checkpoint
    from coordinator.central.manifold import ManifoldError
    from coordinator.central.safety import SafetyError
    from shared_model.data import DataError, prepare_corpus

    try:
        cfg = load_checkpoint(checkpoint).cfg
        corpus = prepare_corpus(data, cfg.model.vocab_size, data_dir, max_bytes=max_bytes)
        if kind == "manifold":
            from coordinator.central.manifold_stage import run_manifold as fn
        else:
            from coordinator.central.safety_stage import run_spp as fn
        result = fn(cfg, checkpoint, out, data=corpus, device=device, **_params(params))
    except (CheckpointError, DataError, ManifoldError, SafetyError, TypeError) as exc:
        _fail(str(exc))
    keep = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    typer.echo(json.dumps(keep, indent=1))


_CKPT = typer.Option(..., "--checkpoint", help="Input checkpoint.")
_OUT = typer.Option(..., "--out", help="Output directory.")
_PARAM = typer.Option([], "--param", help="Stage parameter, e.g. steps=200 (repeatable).")
_DATA = typer.Option("stdlib", "--data", help="stdlib, txt/jsonl dir or file, hf:NAME.")
_DDIR = typer.Option(None, "--data-dir", help="Prepared-corpus cache.")
_MAXB = typer.Option(None, "--max-bytes", help="Use only this much text.")
_DEV = typer.Option(None, "--device", help="cpu or cuda.")


def manifold_run(
    checkpoint: Path = _CKPT,
    out: Path = _OUT,
    param: list[str] = _PARAM,
    data: str = _DATA,
    data_dir: Path | None = _DDIR,
    max_bytes: int | None = _MAXB,
    device: str | None = _DEV,
) -> None:
    """Stage 5: torus layout, manifold routers, .trd neighbour deltas (stage5.safetensors)."""
    _run("manifold", checkpoint, out, param, data, data_dir, max_bytes, device)


def spp_build(
    checkpoint: Path = _CKPT,
    out: Path = _OUT,
    param: list[str] = _PARAM,
    data: str = _DATA,
    data_dir: Path | None = _DDIR,
    max_bytes: int | None = _MAXB,
    device: str | None = _DEV,
) -> None:
    """Stage 6: build and calibrate the safety polytope (spp.safetensors + spp.json)."""
    _run("spp", checkpoint, out, param, data, data_dir, max_bytes, device)


def register(app: typer.Typer) -> None:
    """Add ``perspective manifold run``."""
    manifold = typer.Typer(help="Stage 5: manifold alignment.", no_args_is_help=True)
    manifold.command("run")(manifold_run)
    app.add_typer(manifold, name="manifold")


def register_spp(app: typer.Typer) -> None:
    """Add ``perspective spp build``."""
    spp = typer.Typer(help="Stage 6: safety polytope.", no_args_is_help=True)
    spp.command("build")(spp_build)
    app.add_typer(spp, name="spp")
