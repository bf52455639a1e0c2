"""Staleness weighting of asynchronous results (FedBuff)."""

from __future__ import annotations

import math


def staleness_weight(staleness: int, grace: int) -> float:
    """``w(s) = 1 / sqrt(1 + max(0, s - grace))`` where ``s`` = versions published since the
    result's base and ``grace`` the versions a result may miss undiscounted (a pipelined
    network's own: a node's next unit starts before its last result is applied).

    Raises:
        ValueError: negative staleness (a result cannot be based on a future version).
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + max(0, staleness - grace))
