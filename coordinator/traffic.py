"""Traffic per sync in bits per parameter: what the federated design promises to keep small.

A *sync* is one accepted unit: its participant downloads the versions since the one it
holds and uploads the pseudo-gradient of the shared layers plus a delta per column it
trained, so the parameters a sync concerns are the shared layers (routers included) and
the unit's columns. Joins (a first checkpoint) and training data are reported apart: they
are paid once per participant, not per sync.
"""

from __future__ import annotations

from coordinator.plan.params import count_params
from shared_model.config import PerspectiveConfig

#: Downloads that count per sync: version deltas, checkpoint reloads, stage 4's teacher.
PER_SYNC_DOWN = ("delta", "checkpoint", "teacher")


def per_sync_bits(
    cfg: PerspectiveConfig, traffic: dict[str, int], unit_columns: list[int], participants: int
) -> dict[str, float]:
    """Up / down bits per parameter per sync, and a join's bits per parameter.

    Args:
        cfg: the model configuration.
        traffic: bytes per kind (``up``, ``delta``, ``checkpoint``, ``teacher``, ``join``
            or, where joins are not told apart, inside ``checkpoint``).
        unit_columns: columns of every accepted unit (one entry per sync).
        participants: how many participants joined (for the bits of one join).
    """
    counts = count_params(cfg)
    shared = counts.shared + counts.routers
    synced = sum(shared + counts.column * c for c in unit_columns) or 1
    down = sum(traffic.get(k, 0) for k in PER_SYNC_DOWN)
    return {
        "up_bits_per_param": 8 * traffic.get("up", 0) / synced,
        "down_bits_per_param": 8 * down / synced,
        "join_bits_per_param": 8 * traffic.get("join", 0) / max(1, participants * counts.moe_total),
        "data_bytes": traffic.get("data", 0),
    }
