"""Network traffic of a federated participant (stages 3 and 4, DESIGN §3-§4).

What travels today (``docs/wire-format.md``, measured in ``docs/federated-training.md``
§5): per sync (one unit, ``local_steps`` inner steps) a participant uploads, for each column
it holds, a sparse top-k delta (``delta_bits`` ≈ 0.38 per parameter) and the shared-layer
pseudo-gradient (``shared_bits``; dense ternary at ``shared_threshold`` 1.0 with error
feedback: 1.35 bits of entropy per parameter measured, 1.44 with ``tiny``'s per-tensor
framing; 1.58 at TWN's 0.7), and downloads
about the same: the versions published since the one it holds (their shared part and its
columns' deltas). Joining downloads its columns and the shared layers as an FP32 checkpoint
(``column_bits`` = ``shared_initial_bits`` = 32): the replica must be bit-identical to the
published state for the version chain's digests to hold. Stage 3's columns are FP latents,
so its join is FP32 whatever ``column_bits`` says (``STAGE3_COLUMN_BITS``). Once stage 4's
experts are ternary its checkpoints carry them as trits, losslessly (1.74 bits per column
parameter on ``tiny``, ``shared_model/federated/checkpoint_parts.py``): plan such a stage-4
join with ``column_bits`` ≈ 1.7 (the stage-4 teacher, FP, is fetched only by a node whose
replica never held the stage's boundary version, in bf16: ``teacher_download``). Stage
4's all-ternary tail sends
columns as trit flips (0.27-0.37 bits per column parameter measured, after a one-time switch
of about 1.3); ``delta_bits`` stands for both.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.plan.hardware import require_positive
from coordinator.plan.params import BF16, ParamCounts

#: Bits per parameter of a column a node joins stage 3 with: FP latents, FP32 as built.
STAGE3_COLUMN_BITS = 32.0


@dataclass(frozen=True)
class CodecBits:
    """Bits per parameter the codec achieves for each kind of payload."""

    column_bits: float = 32.0  # stage 4's joins (stage 3's: STAGE3_COLUMN_BITS)
    delta_bits: float = 0.38
    shared_bits: float = 1.4
    shared_initial_bits: float = 32.0

    def validate(self) -> None:
        """Raise :class:`PlanError` on a non-positive value."""
        for name in ("column_bits", "delta_bits", "shared_bits", "shared_initial_bits"):
            require_positive(name, getattr(self, name))


@dataclass(frozen=True)
class TrafficEstimate:
    """Traffic of one participant in one federated stage (bytes, seconds).

    Attributes:
        columns: columns the participant holds.
        sync_tokens: tokens it trains between two shared syncs.
        syncs: shared syncs in the stage (its share of the stage's tokens / sync_tokens).
        initial_download: bytes to join (columns at ``column_bits``, shared layers at
            ``shared_initial_bits``).
        join_bits_per_param: ``initial_download`` in bits per parameter of the whole
            model, the unit ``federation_bench.py`` and the demo report a join in (a node
            fetches the shared layers and its own columns only).
        teacher_download: stage 4: bytes a node that joins after the stage's boundary
            fetches besides its join, the teacher's shared layers and its columns (bf16
            parts, ``CheckpointManifest.bf16_parts``). A node that held the boundary
            rebuilds the teacher from its replica and fetches nothing. 0 in stage 3.
        per_sync_up: bytes uploaded per sync.
        per_sync_down: bytes downloaded per sync.
        compute_s_per_sync: seconds of training between syncs on its GPU.
        comm_s_per_sync: seconds to move one sync's bytes at its link speed.
    """

    columns: int
    sync_tokens: float
    syncs: float
    initial_download: float
    join_bits_per_param: float
    teacher_download: float
    per_sync_up: float
    per_sync_down: float
    compute_s_per_sync: float
    comm_s_per_sync: float

    @property
    def per_sync(self) -> float:
        """Bytes up + down per sync."""
        return self.per_sync_up + self.per_sync_down

    @property
    def per_stage(self) -> float:
        """Bytes over the whole stage, including the initial download."""
        return self.initial_download + self.syncs * self.per_sync


def estimate_traffic(
    counts: ParamCounts,
    codec: CodecBits,
    *,
    stage: int,
    columns: int,
    stage_tokens: float,
    participants: int,
    sync_tokens: float,
    flops_per_token: float,
    flops_per_second: float,
    link_mbps: float,
) -> TrafficEstimate:
    """Traffic per participant per sync and per stage.

    Args:
        counts: parameter counts of the model.
        codec: bits per parameter of each payload.
        stage: 3 or 4 (a stage-3 join carries FP32 columns, ``STAGE3_COLUMN_BITS``).
        columns: expert columns the participant holds.
        stage_tokens: tokens of the whole stage (shared evenly by the participants).
        participants: number of volunteers.
        sync_tokens: tokens a participant trains between shared syncs.
        flops_per_token: training FLOPs per token of the stage.
        flops_per_second: the participant GPU's sustained FLOP/s (peak × MFU).
        link_mbps: the participant's link speed, megabits per second; the upload and the
            download are counted one after the other (no overlap).
    """
    codec.validate()
    for name, value in (("participants", participants), ("sync_tokens", sync_tokens)):
        require_positive(name, value)
    require_positive("volunteer_mbps", link_mbps)
    up = (columns * counts.column * codec.delta_bits + counts.shared * codec.shared_bits) / 8
    column_bits = STAGE3_COLUMN_BITS if stage == 3 else codec.column_bits
    initial = columns * counts.column * column_bits + counts.shared * codec.shared_initial_bits
    initial /= 8
    link_bytes_per_s = link_mbps * 1e6 / 8
    return TrafficEstimate(
        columns=columns,
        sync_tokens=float(sync_tokens),
        syncs=stage_tokens / participants / sync_tokens,
        initial_download=initial,
        join_bits_per_param=8 * initial / counts.moe_total,
        teacher_download=BF16 * (columns * counts.column + counts.shared) if stage == 4 else 0.0,
        per_sync_up=up,
        per_sync_down=up,
        compute_s_per_sync=sync_tokens * flops_per_token / flops_per_second,
        comm_s_per_sync=2 * up / link_bytes_per_s,
    )
