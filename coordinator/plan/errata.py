"""The generated part of ``docs/seed-errata.md`` (the planner's defaults, full preset).

``perspective plan --preset full --format errata`` prints it; a test checks the document
still holds exactly this text between its markers.
"""

from __future__ import annotations

from coordinator.plan.compute import PlanSettings
from coordinator.plan.hardware import GPUS
from coordinator.plan.memory import fit_options
from coordinator.plan.report import (
    fit_section,
    params_section,
    seed_section,
    stages_section,
    to_markdown,
)
from coordinator.plan.seed import compare, seed_plan
from shared_model.config import PerspectiveConfig

BEGIN = "<!-- BEGIN GENERATED: perspective plan --preset full --format errata -->"
END = "<!-- END GENERATED -->"


def errata_block(cfg: PerspectiveConfig, settings: PlanSettings | None = None) -> str:
    """Markdown of the seed figures vs the planner, compute per stage and the §4.4 fit.

    Args:
        cfg: the ``full`` config (the seed's figures describe that model).
        settings: planner settings; the GPU is forced to A100 as in the seed.
    """
    plan = seed_plan(cfg, settings)
    comparisons = compare(plan)
    sections = [
        seed_section(comparisons),
        params_section(plan, [c for c in comparisons if c.figure.unit == "params"]),
        stages_section(plan),
        fit_section(plan, fit_options(cfg, plan.counts, GPUS["a100"])),
    ]
    return f"{BEGIN}\n\n{to_markdown(sections)}\n{END}\n"
