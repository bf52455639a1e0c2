"""``perspective plan``: parameters, FLOPs, GPU-hours, cost, memory and traffic per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from shared_model.files import write_text_atomic

FORMATS = ("table", "json", "markdown", "errata")


def _parse_tokens(items: list[str]) -> dict[int, float]:
    from coordinator.plan.hardware import PlanError

    out: dict[int, float] = {}
    for item in items:
        stage, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(stage)] = float(value)
        except ValueError as exc:
            raise PlanError(f"--tokens {item!r} must look like STAGE=COUNT, e.g. 3=2e11") from exc
    return out


def _parse_fleets(text: str) -> tuple[int, ...]:
    from coordinator.plan.hardware import PlanError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise PlanError(f"--fleets {text!r} must be participant counts, e.g. 1000,100000") from exc


def plan(
    preset: Annotated[str, typer.Option(help="tiny, small or full")] = "full",
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    override: Annotated[list[str], typer.Option("--set", help="section.field=value")] = [],  # noqa: B006
    params: Annotated[bool, typer.Option("--params", help="parameter counts only")] = False,
    gpu: Annotated[str, typer.Option(help="a100, h100, h200, l40s, rtx4090, ...")] = "a100",
    peak_tflops: Annotated[float | None, typer.Option(help="override the GPU's peak")] = None,
    gpu_memory_gb: Annotated[float | None, typer.Option(help="override GPU memory")] = None,
    mfu: Annotated[float, typer.Option(help="model FLOPs utilisation, 0 < mfu <= 1")] = 0.4,
    price: Annotated[float, typer.Option(help="USD per GPU-hour")] = 3.0,
    gpus: Annotated[int, typer.Option(help="coordinator GPUs (stages 1, 5)")] = 64,
    volunteers: Annotated[int, typer.Option(help="participants (stages 3, 4)")] = 128,
    volunteer_mbps: Annotated[float, typer.Option(help="volunteer link, Mbit/s")] = 100.0,
    tokens: Annotated[list[str], typer.Option(help="STAGE=COUNT, e.g. 3=2e11")] = [],  # noqa: B006
    flops_basis: Annotated[str, typer.Option(help="params (6·N·T) or per-use")] = "params",
    experts_per_rank: Annotated[int, typer.Option(help="columns per GPU, stages 3/4")] = 4,
    expert_layers: Annotated[int | None, typer.Option(help="layers per column slice")] = None,
    optimizer_bits: Annotated[int, typer.Option(help="AdamW m, v bits: 32 or 8")] = 32,
    master_fp32: Annotated[bool, typer.Option(help="fp32 master weights")] = True,
    delta_bits: Annotated[
        float | None, typer.Option(help="column delta bits/param (default: CodecBits)")
    ] = None,
    column_bits: Annotated[
        float | None, typer.Option(help="joined column bits/param (default: CodecBits)")
    ] = None,
    shared_bits: Annotated[
        float | None, typer.Option(help="shared pseudo-grad bits/param (default: CodecBits)")
    ] = None,
    local_steps: Annotated[
        int | None, typer.Option(help="inner steps per shared sync (default: PlanSettings)")
    ] = None,
    fleets: Annotated[
        str, typer.Option(help="fleet sizes for the coordinator-host figures, comma list")
    ] = "1000,100000",
    fmt: Annotated[str, typer.Option("--format", help="table, json, markdown, errata")] = "table",
    output: Annotated[Path | None, typer.Option(help="write to this file instead")] = None,
) -> None:
    """Plan parameters, FLOPs, GPU-hours, cost, memory and traffic per training stage."""
    from dataclasses import replace

    from coordinator.plan.compute import PlanSettings, build_plan
    from coordinator.plan.coordinator_host import HostSettings
    from coordinator.plan.hardware import PlanError, gpu_spec
    from coordinator.plan.memory import MemoryLayout
    from coordinator.plan.traffic import CodecBits
    from shared_model.config import ConfigError
    from shared_model.config_loading import load_config

    try:
        if fmt not in FORMATS:
            raise PlanError(f"--format {fmt!r} is invalid: allowed {', '.join(FORMATS)}")
        cfg = load_config(preset, config, override)
        settings = PlanSettings(
            gpu=gpu_spec(gpu, peak_tflops, gpu_memory_gb),
            mfu=mfu,
            price_per_gpu_hour=price,
            gpus=gpus,
            volunteers=volunteers,
            volunteer_mbps=volunteer_mbps,
            tokens=_parse_tokens(tokens),
            flops_basis=flops_basis,
            layout=MemoryLayout(
                experts_per_rank=experts_per_rank,
                expert_layers=expert_layers,
                optimizer_bits=optimizer_bits,
                master_fp32=master_fp32,
            ),
            codec=replace(
                CodecBits(),
                **{
                    k: v
                    for k, v in (
                        ("delta_bits", delta_bits),
                        ("column_bits", column_bits),
                        ("shared_bits", shared_bits),
                    )
                    if v is not None
                },
            ),
            **({} if local_steps is None else {"local_steps": local_steps}),
            host=HostSettings(fleets=_parse_fleets(fleets)),
        )
        text = _render(cfg, build_plan(cfg, settings), settings, fmt, params)
    except (ConfigError, PlanError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if output is None:
        if text is not None:
            typer.echo(text, nl=False)
        return
    write_text_atomic(output, text if text is not None else "")
    typer.echo(f"wrote {output}")


def _render(cfg, the_plan, settings, fmt: str, params_only: bool) -> str | None:
    """Produce the text (None = already printed as rich tables)."""
    from coordinator.plan.errata import errata_block
    from coordinator.plan.hardware import PlanError
    from coordinator.plan.memory import fit_options
    from coordinator.plan.report import build_sections, print_tables, to_json_dict, to_markdown
    from coordinator.plan.seed import compare, is_full_model, seed_plan

    full = is_full_model(cfg)
    if fmt == "errata":
        if not full:
            raise PlanError("--format errata needs the full model (--preset full)")
        return errata_block(cfg, settings)
    comparisons = compare(seed_plan(cfg, settings)) if full else []
    fits = None if params_only else fit_options(cfg, the_plan.counts, settings.gpu)
    if fmt == "json":
        data = to_json_dict(the_plan, comparisons, fits)
        if params_only:
            data = {
                "config": data["config"],
                "params": data["params"],
                "seed": [s for s in data["seed"] if s["unit"] == "params"],
            }
        return json.dumps(data, indent=2) + "\n"
    sections = build_sections(the_plan, comparisons, fits, params_only)
    if fmt == "markdown":
        return to_markdown(sections)
    print_tables(sections)
    return None


def register(app: typer.Typer) -> None:
    """Add ``perspective plan`` to ``app``."""
    app.command("plan")(plan)
