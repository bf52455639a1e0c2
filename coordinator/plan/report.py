"""Render a plan as sections of rows: a rich terminal table, Markdown, or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.plan.compute import Plan, StagePlan
from coordinator.plan.memory import GB, FitOption
from coordinator.plan.seed import Comparison, stage1_rate_check
from coordinator.plan.traffic import STAGE3_COLUMN_BITS


@dataclass
class Section:
    """A titled table: header cells, rows of cells, notes under it."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt_count(n: float) -> str:
    """``6.83B``-style count with 3 significant figures (4 below 1000 of a unit)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{4 if n / scale < 1000 else 0}g}{unit}"
    return f"{n:,.0f}"


def fmt_sci(x: float) -> str:
    """``4.10e22``."""
    return f"{x:.2e}".replace("e+", "e")


def fmt_gb(b: float) -> str:
    """Bytes as GB (1e9) with one decimal."""
    return f"{b / GB:,.1f} GB"


def fmt_hours(h: float) -> str:
    """Hours, with days when long."""
    return f"{h:,.0f} h ({h / 24:,.1f} d)" if h >= 48 else f"{h:,.1f} h"


def params_section(plan: Plan, comparisons: list[Comparison]) -> Section:
    """Per-component parameter counts with the seed's stated figures next to them."""
    c = plan.counts
    seed = {cmp.figure.key: cmp for cmp in comparisons}
    sec = Section("Parameters", ["component", "formula", "count", "exact", "seed states", "check"])

    def row(name: str, formula: str, value: int, key: str | None = None) -> None:
        cmp = seed.get(key) if key else None
        stated = fmt_count(cmp.figure.stated) if cmp else ""
        check = ("ok" if cmp.agrees else "MISMATCH") if cmp else ""
        sec.rows.append([name, formula, fmt_count(value), f"{value:,}", stated, check])

    row("token embedding", "V·d", c.embedding)
    row("LM head (untied)", "V·d", c.lm_head)
    row("RMSNorm gains", "(2·layers + 1)·d", c.norms)
    row("GQA attention, per layer", "2·d² + 2·d·kv", c.gqa_attention)
    row("FFN bank = one expert", "3·d·h", c.ffn, "expert_params")
    row("PDR mixer, per layer", "3·d² + d", c.pdr_mixer)
    row("router, per PDR layer", "d·E", c.router)
    row(
        "shared (= dense seed)",
        f"emb + head + norms + {c.n_gqa}·GQA + {c.n_pdr}·PDR",
        c.shared,
        "shared_params",
    )
    row("expert column", f"{c.n_pdr}·expert", c.column, "column_params")
    row("all experts", f"{c.n_experts}·column", c.experts_total, "experts_total")
    row("routers", f"{c.n_pdr}·router", c.routers)
    row("MoE total", "shared + experts + routers", c.moe_total)
    row(f"active per token (top-{c.top_k})", f"shared + {c.top_k}·column + routers", c.moe_active)
    sec.notes.append(
        "PDR keys/queries come from a fixed seeded projection (buffers, not parameters); "
        "dense-mode PDR layers reuse FFN bank (i mod n_gqa), counted once."
    )
    return sec


def stages_section(plan: Plan) -> Section:
    """FLOPs, GPU-hours, wall-clock and cost per stage."""
    st = plan.settings
    sec = Section(
        f"Compute per stage ({st.gpu.label}, MFU {st.mfu:.0%}, ${st.price_per_gpu_hour:g}/GPU-h)",
        [
            "stage",
            "where",
            "tokens",
            "active params",
            "FLOPs (6·N·T)",
            "FLOPs per use",
            "GPU-hours",
            "GPUs",
            "wall-clock",
            "cost",
        ],
    )
    for s in plan.stages:
        sec.rows.append(
            [
                f"{s.stage.number} {s.stage.name}",
                s.stage.where,
                fmt_count(s.tokens),
                fmt_count(s.params_active),
                fmt_sci(s.flops),
                fmt_sci(s.flops_per_use),
                f"{s.gpu_hours:,.0f}",
                str(s.workers),
                fmt_hours(s.wall_hours),
                f"${s.cost_usd:,.0f}",
            ]
        )
    sec.rows.append(
        [
            "total",
            "",
            "",
            "",
            fmt_sci(plan.total_flops),
            fmt_sci(plan.total_flops_per_use),
            f"{plan.total_gpu_hours:,.0f}",
            "",
            "",
            f"${plan.total_cost_usd:,.0f}",
        ]
    )
    sec.notes.append(f"GPU-hours use the '{st.flops_basis}' FLOPs basis.")
    sec.notes.extend(
        f"stage {s.stage.number} tokens: {s.stage.tokens_source}"
        for s in plan.stages
        if s.tokens == s.stage.default_tokens
    )
    return sec


def memory_section(plan: Plan) -> Section:
    """Bytes per GPU by component for each stage."""
    lay = plan.settings.layout
    sec = Section(
        f"Memory per GPU ({plan.settings.gpu.memory_gb:g} GB; {lay.trained_bytes:g} B per "
        f"trained param, 2 B per frozen param)",
        ["stage", "layout", "components", "total", "fits"],
    )
    for s in plan.stages:
        m = s.memory
        layout = f"FSDP over {m.shard_group}"
        if m.columns_per_gpu:
            layout += f", {m.columns_per_gpu} columns ({m.expert_layers_per_gpu} expert FFNs)"
        comps = "; ".join(f"{k} {fmt_gb(v)}" for k, v in m.components.items())
        sec.rows.append(
            [str(s.stage.number), layout, comps, fmt_gb(m.total), "yes" if m.fits else "NO"]
        )
    return sec


def traffic_section(plan: Plan) -> Section:
    """Per-participant traffic of the federated stages."""
    cb = plan.settings.codec
    sec = Section(
        f"Traffic per participant ({plan.settings.volunteers} volunteers at "
        f"{plan.settings.volunteer_mbps:g} Mbit/s)",
        [
            "stage",
            "columns",
            "join download",
            "join bits/param",
            "per sync up",
            "per sync down",
            "syncs",
            "per stage",
            "compute / sync",
            "transfer / sync",
        ],
    )
    for s in plan.stages:
        t = s.traffic
        if t is None:
            continue
        sec.rows.append(
            [
                str(s.stage.number),
                str(t.columns),
                fmt_gb(t.initial_download),
                f"{t.join_bits_per_param:.2f}",
                fmt_gb(t.per_sync_up),
                fmt_gb(t.per_sync_down),
                f"{t.syncs:,.1f}",
                fmt_gb(t.per_stage),
                fmt_hours(t.compute_s_per_sync / 3600),
                fmt_hours(t.comm_s_per_sync / 3600),
            ]
        )
    sec.notes.append(
        f"bits/param: joined column {STAGE3_COLUMN_BITS:g} in stage 3 (FP32 latents), "
        f"{cb.column_bits:g} in stage 4 (FP32 until its experts are all ternary, then trits, "
        f"~1.7: --column-bits), column delta {cb.delta_bits:g}, shared pseudo-gradient "
        f"{cb.shared_bits:g}, shared join {cb.shared_initial_bits:g}; join bits/param: the "
        f"join download per parameter of the whole model"
    )
    late = [s.traffic for s in plan.stages if s.traffic is not None and s.traffic.teacher_download]
    for t in late:  # stage 4 only
        sec.notes.append(
            f"a node joining stage 4 after its boundary also fetches the teacher (its shared "
            f"layers and columns, bf16): {fmt_gb(t.teacher_download)} more"
        )
    return sec


def participant_host_section(plan: Plan) -> Section:
    """A participant's host RAM per federated stage, beside its device's model and optimiser."""
    sec = Section(
        "Participant host RAM per federated stage (as built, beside the model on its GPU)",
        ["stage", "columns", "replica", "local copies", "residual", "corrections (bf16)",
         "teacher", "total"],
    )  # fmt: skip
    in_transit = 0
    for s in plan.stages:
        p = s.participant_host
        if p is None:
            continue
        in_transit = p.results_in_transit
        sec.rows.append(
            [str(s.stage.number), str(p.columns)]
            + [fmt_gb(v) for v in (p.replica, p.local_columns, p.residual, p.corrections)]
            + [fmt_gb(p.teacher) if p.teacher else "-", fmt_gb(p.total)]
        )
    sec.notes.append(
        "replica: published shared layers and held columns (FP32, digest-checked); local "
        "copies: the node's own trained columns (FP32); residual: the shared error feedback "
        f"(FP32); corrections: each column's unsent remainder and {in_transit} shared "
        "pseudo-gradients in transit (eager updates); teacher: stage 4's boundary shared "
        "layers and columns (bf16). While a result is encoded beside the next unit, about one more "
        "copy of the shared layers and the unit's columns"
    )
    return sec


def host_section(plan: Plan) -> Section:
    """The coordinator's own RAM, disk and bandwidth per federated stage and fleet size."""
    sec = Section(
        "Coordinator host per federated stage (one process, as built)",
        ["stage", "participants", "results/s", "buffer", "RAM columns", "RAM shared",
         "disk blobs", "DB / day", "in", "out", "joins", "sync period", "stage wall"],
    )  # fmt: skip
    for s in plan.stages:
        for h in s.hosts:
            sec.rows.append(
                [
                    str(s.stage.number),
                    f"{h.participants:,}",
                    f"{h.results_per_s:,.1f}",
                    f"{h.buffer_size:,}",
                    fmt_gb(h.ram_columns),
                    fmt_gb(h.ram_shared),
                    fmt_gb(h.disk),
                    f"{h.db_bytes_per_day / 1e6:,.0f} MB",
                    f"{h.ingress_bps * 8 / 1e9:,.2f} Gbit/s",
                    f"{h.egress_bps * 8 / 1e9:,.2f} Gbit/s",
                    fmt_gb(h.join_bytes),
                    fmt_hours(h.participants / h.results_per_s / 3600),
                    fmt_hours(h.stage_days * 24),
                ]
            )
    hs = plan.settings.host
    sec.notes.append(
        f"RAM: FP32 column masters + {hs.max_staleness + 1} published copies each (staleness "
        f"window); shared master, published copy, momentum + a buffer of FP32 pseudo-gradients "
        f"({hs.buffer_fraction:g} × the fleet). Disk: FP32 checkpoints (newest, previous, "
        f"stage 4's teacher), {hs.checkpoint_every} versions of deltas, one checkpoint period "
        f"of uploads. DB: {hs.db_bytes_per_result:g} B per result (fleet soak). Past one host: "
        "docs/architecture.md §6.1."
    )
    return sec


def seed_section(comparisons: list[Comparison]) -> Section:
    """The seed's stated figures next to the planner's."""
    sec = Section(
        "Seed figures vs planner (full preset, A100)", ["figure", "seed", "planner", "check"]
    )
    for c in comparisons:
        f = c.figure
        show = fmt_gb if f.unit == "bytes" else (fmt_sci if f.unit == "FLOPs" else fmt_count)
        sec.rows.append(
            [
                f"{f.label} ({f.source})",
                show(f.stated),
                show(c.computed),
                "ok" if c.agrees else f"FLAG: {c.note}",
            ]
        )
    need, possible = stage1_rate_check()
    sec.notes.append(
        f"The seed's 3.2e21 FLOPs in 2,700 A100-hours needs {need:.0f} TFLOP/s per A100"
        f"{'' if possible else ' (> the 312 TFLOP/s peak: impossible)'}."
    )
    return sec


def fit_section(plan: Plan, fits: list[FitOption]) -> Section:
    """What fits one stage-3 GPU, recipe by recipe (the seed's §4.4 layout does not)."""
    c, gpu = plan.counts, plan.settings.gpu
    sec = Section(
        f"What fits one stage-3 GPU ({gpu.label})",
        ["recipe", "shared", "B / expert param", "expert FFNs", "columns"],
    )
    for f in fits:
        sec.rows.append(
            [
                f.description,
                fmt_gb(f.shared_bytes),
                f"{f.bytes_per_expert_param:g}",
                str(f.max_expert_layers),
                f"{f.max_columns:.2f}",
            ]
        )
    weights = 4 * c.column * 2
    sec.notes.append(
        f"Seed §4.4: 4 columns × {fmt_count(c.column)} × 2 B = {fmt_gb(weights)} of bf16 "
        f"weights alone; + AdamW m, v in fp32 (8 B/param) = {fmt_gb(4 * c.column * 10)}; "
        f"with bf16 grads and an fp32 master (16 B/param) = {fmt_gb(4 * c.column * 16)}."
    )
    return sec


def build_sections(
    plan: Plan,
    comparisons: list[Comparison],
    fits: list[FitOption] | None = None,
    params_only: bool = False,
) -> list[Section]:
    """All sections of the report (only parameters when ``params_only``)."""
    param_cmp = [c for c in comparisons if c.figure.unit == "params"]
    if params_only:
        return [params_section(plan, param_cmp)]
    secs = [params_section(plan, param_cmp), stages_section(plan), memory_section(plan)]
    if any(s.traffic for s in plan.stages):
        secs.append(traffic_section(plan))
    if any(s.participant_host for s in plan.stages):
        secs.append(participant_host_section(plan))
    if any(s.hosts for s in plan.stages):
        secs.append(host_section(plan))
    if fits:
        secs.append(fit_section(plan, fits))
    if comparisons:
        secs.append(seed_section(comparisons))
    return secs


def to_markdown(sections: list[Section]) -> str:
    """Sections as GitHub-flavoured Markdown tables."""
    out: list[str] = []
    for sec in sections:
        out += [
            f"### {sec.title}",
            "",
            "| " + " | ".join(sec.headers) + " |",
            "|" + "---|" * len(sec.headers),
        ]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in sec.rows]
        out += [""] + [f"* {n}" for n in sec.notes] + ([""] if sec.notes else [])
    return "\n".join(out).rstrip() + "\n"


def print_tables(sections: list[Section], console: Any = None) -> None:
    """Print sections as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for sec in sections:
        table = Table(title=sec.title, title_justify="left", show_lines=False)
        for h in sec.headers:
            table.add_column(h, overflow="fold")
        for row in sec.rows:
            table.add_row(*row)
        console.print(table)
        for note in sec.notes:
            console.print(f"  • {note}")


def stage_dict(s: StagePlan) -> dict[str, Any]:
    """One stage's figures as plain JSON-able data."""
    skip = ("memory", "traffic", "participant_host")
    out = {k: v for k, v in asdict(s).items() if k not in skip}
    out["memory"] = {
        "components": s.memory.components,
        "total": s.memory.total,
        "gpu_memory": s.memory.gpu_memory,
        "fits": s.memory.fits,
        "columns_per_gpu": s.memory.columns_per_gpu,
        "expert_layers_per_gpu": s.memory.expert_layers_per_gpu,
        "shard_group": s.memory.shard_group,
    }
    if s.traffic is not None:
        out["traffic"] = {
            **asdict(s.traffic),
            "per_sync": s.traffic.per_sync,
            "per_stage": s.traffic.per_stage,
        }
    if s.participant_host is not None:
        out["participant_host"] = {
            **asdict(s.participant_host),
            "total": s.participant_host.total,
        }
    if s.hosts:
        out["coordinator_host"] = [{**asdict(h), "ram": h.ram, "disk": h.disk} for h in s.hosts]
    return out


def to_json_dict(
    plan: Plan, comparisons: list[Comparison], fits: list[FitOption] | None = None
) -> dict[str, Any]:
    """The whole plan as plain data (raw numbers: params, FLOPs, hours, USD, bytes)."""
    st = plan.settings
    need, possible = stage1_rate_check()
    return {
        "config": plan.config_name,
        "settings": {
            "gpu": asdict(st.gpu),
            "mfu": st.mfu,
            "price_per_gpu_hour": st.price_per_gpu_hour,
            "gpus": st.gpus,
            "volunteers": st.volunteers,
            "volunteer_mbps": st.volunteer_mbps,
            "flops_basis": st.flops_basis,
            "layout": asdict(st.layout),
            "trained_bytes_per_param": st.layout.trained_bytes,
            "codec": asdict(st.codec),
            "local_steps": st.local_steps,
            "step_tokens": st.step_tokens,
            "host": asdict(st.host),
        },
        "params": plan.counts.as_dict(),
        "stages": [stage_dict(s) for s in plan.stages],
        "totals": {
            "flops": plan.total_flops,
            "flops_per_use": plan.total_flops_per_use,
            "gpu_hours": plan.total_gpu_hours,
            "cost_usd": plan.total_cost_usd,
        },
        "fit_options": [{**asdict(f), "max_columns": f.max_columns} for f in fits or []],
        "seed": [
            {
                "key": c.figure.key,
                "label": c.figure.label,
                "stated": c.figure.stated,
                "unit": c.figure.unit,
                "source": c.figure.source,
                "computed": c.computed,
                "ratio": c.ratio,
                "agrees": c.agrees,
                "note": c.note,
            }
            for c in comparisons
        ],
        "seed_stage1_required_tflops": need if comparisons else None,
        "seed_stage1_possible": possible if comparisons else None,
    }
