"""Planner: analytic parameter counts, compute, memory, cost and traffic per stage.

Nothing here allocates a model: every figure is computed from a
:class:`~shared_model.config.PerspectiveConfig` (DESIGN §2 stage 10, §8 errata).
"""

from coordinator.plan.params import ParamCounts, count_params

__all__ = ["ParamCounts", "count_params"]
