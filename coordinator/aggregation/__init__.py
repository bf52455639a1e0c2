"""Asynchronous aggregation of participants' results (FedBuff-style, no global barrier).

One strategy per module:

* :mod:`.staleness` — the staleness weight ``w(s) = 1 / sqrt(1 + s)``;
* :mod:`.columns` — expert columns: the master is pulled toward each owner's copy;
* :mod:`.shared` — shared layers: DiLoCo outer Nesterov step on buffered pseudo-gradients;
* :mod:`.robust` — robust mean of pseudo-gradients (trimmed mean, centered clip);
* :mod:`.diversity` — the exact diversity term applied on the expert masters.
"""

from coordinator.aggregation.columns import ColumnAggregator
from coordinator.aggregation.diversity import apply_diversity
from coordinator.aggregation.robust import centered_clip, trimmed_mean
from coordinator.aggregation.shared import OuterOptimizer, SharedAggregator
from coordinator.aggregation.staleness import staleness_weight

__all__ = [
    "ColumnAggregator",
    "OuterOptimizer",
    "SharedAggregator",
    "apply_diversity",
    "centered_clip",
    "staleness_weight",
    "trimmed_mean",
]
