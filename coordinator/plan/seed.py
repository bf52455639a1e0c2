"""The seed document's stated figures, and their comparison with the planner's.

The figures are quoted in DESIGN §1, §3 and §8. Each comparison rounds the planner's
value to the precision the seed stated it with: equal → "agrees", else the ratio is
reported and the figure flagged. Figures are for the ``full`` preset on A100s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import floor, log10

from coordinator.plan.compute import Plan, PlanSettings, build_plan
from coordinator.plan.hardware import GPUS
from shared_model.config import PRESETS, PerspectiveConfig

GB = 1e9
A100_PEAK = GPUS["a100"].peak_tflops * 1e12


@dataclass(frozen=True)
class SeedFigure:
    """One figure as the seed states it."""

    key: str
    label: str
    stated: float
    unit: str
    source: str
    sig: int  # significant figures the seed gives


@dataclass(frozen=True)
class Comparison:
    """A seed figure next to the planner's value."""

    figure: SeedFigure
    computed: float
    agrees: bool
    note: str

    @property
    def ratio(self) -> float:
        """computed / stated."""
        return self.computed / self.figure.stated


def round_sig(value: float, sig: int) -> float:
    """``value`` rounded to ``sig`` significant figures."""
    if value == 0:
        return 0.0
    return round(value, sig - 1 - floor(log10(abs(value))))


def s44_memory_bytes(plan: Plan, experts: int = 4) -> float:
    """The seed §4.4 layout on its own terms: ``experts`` columns × (bf16 weights + AdamW
    fp32 m and v) = 10 bytes per parameter, before grads, master weights, shared layers
    and activations."""
    return experts * plan.counts.column * (2 + 8)


def implied_tflops(flops: float, gpu_hours: float) -> float:
    """Sustained TFLOP/s per GPU that ``flops`` in ``gpu_hours`` requires."""
    return flops / (gpu_hours * 3600) / 1e12


_S = "seed, quoted in DESIGN"
SEED_FIGURES: tuple[SeedFigure, ...] = (
    SeedFigure("expert_params", "parameters per expert FFN", 135.3e6, "params", f"{_S} §1", 4),
    SeedFigure("column_params", "parameters per expert column", 8.12e9, "params", f"{_S} §3", 3),
    SeedFigure("experts_total", "expert parameters (all)", 1.04e12, "params", f"{_S} §1", 3),
    SeedFigure("shared_params", "shared parameters", 6.83e9, "params", f"{_S} §1", 3),
    SeedFigure("stage1_flops", "stage 1 training FLOPs", 3.2e21, "FLOPs", f"{_S} §8", 2),
    SeedFigure("stage1_a100_hours", "stage 1 A100-hours", 2700, "GPU-h", f"{_S} §8", 2),
    SeedFigure("total_a100_hours", "stages 1+3+4+5 A100-hours", 33000, "GPU-h", f"{_S} §8", 2),
    SeedFigure("total_cost_usd", "stages 1+3+4+5 cost", 100_000, "USD", f"{_S} §8", 1),
    SeedFigure(
        "s44_memory", "§4.4: 4 experts × 8.12B × 2 B + AdamW", 80 * GB, "bytes", f"{_S} §8", 2
    ),
)

_COMPUTED: dict[str, Callable[[Plan], float]] = {
    "expert_params": lambda p: p.counts.expert,
    "column_params": lambda p: p.counts.column,
    "experts_total": lambda p: p.counts.experts_total,
    "shared_params": lambda p: p.counts.shared,
    "stage1_flops": lambda p: p.stage(1).flops,
    "stage1_a100_hours": lambda p: p.stage(1).gpu_hours,
    "total_a100_hours": lambda p: p.total_gpu_hours,
    "total_cost_usd": lambda p: p.total_cost_usd,
    "s44_memory": s44_memory_bytes,
}


def seed_plan(cfg: PerspectiveConfig, settings: PlanSettings | None = None) -> Plan:
    """The plan the seed's figures are compared with: ``settings`` on A100s, ``params``
    FLOPs basis, all four stages (the seed counts A100-hours of stages 1+3+4+5)."""
    settings = settings or PlanSettings()
    return build_plan(
        cfg, replace(settings, gpu=GPUS["a100"], flops_basis="params", stages=(1, 3, 4, 5))
    )


def is_full_model(cfg: PerspectiveConfig) -> bool:
    """Whether ``cfg`` has the seed's model shape (the figures only describe that one)."""
    return cfg.model == PRESETS["full"].model and cfg.moe.n_experts == PRESETS["full"].moe.n_experts


def compare(plan: Plan) -> list[Comparison]:
    """Every seed figure next to the planner's value for ``plan`` (an A100 plan)."""
    out = []
    for fig in SEED_FIGURES:
        value = float(_COMPUTED[fig.key](plan))
        if fig.key == "s44_memory":
            agrees = value <= fig.stated
            note = "fits" if agrees else f"needs {value / GB:.0f} GB > 80 GB before grads"
        else:
            agrees = round_sig(value, fig.sig) == round_sig(fig.stated, fig.sig)
            note = "agrees" if agrees else f"planner is {value / fig.stated:.1f}× the seed"
        out.append(Comparison(fig, value, agrees, note))
    return out


def stage1_rate_check() -> tuple[float, bool]:
    """The seed's own stage-1 pair (3.2e21 FLOPs in 2,700 A100-hours): the TFLOP/s per
    A100 it needs, and whether that is possible (<= the A100's 312 TFLOP/s peak)."""
    flops = next(f.stated for f in SEED_FIGURES if f.key == "stage1_flops")
    hours = next(f.stated for f in SEED_FIGURES if f.key == "stage1_a100_hours")
    need = implied_tflops(flops, hours)
    return need, need * 1e12 <= A100_PEAK
