"""A participant's host RAM in a federated stage, as built (``participant/unit_trainer.py``).

What a node keeps between units, beside the model and optimiser on its device
(:mod:`coordinator.plan.memory` plans those; on a CPU-only node they are in RAM too):

* **replica**: the published shared layers (routers included) and each column the node
  holds, FP32 (``Replica``): the version chain's digests are checked against it;
* **local copies**: each held column as the node last trained it, FP32 (``_Local.columns``,
  keep-local: its next delta is ``copy - published``);
* **residual**: the shared pseudo-gradient's error feedback, FP32 (``_Local.residual``);
* **corrections**, in ``CORRECTION_DTYPE`` (bf16): what each held column's last delta left
  out (``_Local.unsent``) and the shared pseudo-gradient of each of its results still in
  transit (eager updates, ``results_in_transit``);
* **teacher** (stage 4): the stage boundary's shared layers and held columns, bf16
  (``UnitTrainer.teacher_replica``, ``TEACHER_DTYPE``). The teacher *model* built from it
  is the device's: bf16 on a GPU, but FP32 on a CPU-only node
  (``shared_model.stage_loss.teacher_run_dtype``), so such a node holds the teacher's
  weights three times over in bf16 terms (this replica and an FP32 model).

Not counted: what one unit's end holds while its result is encoded beside the next unit
(about one more copy of the shared layers and of the unit's columns). Building the model
and the teacher takes no RAM on a GPU node: ``PerspectiveModel.from_weights`` allocates
them on the device from these tensors (it used to build each in FP32 in RAM first).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.plan.params import BF16, FP32, ParamCounts

#: A node's results on their way at once with eager updates (1-2 measured).
RESULTS_IN_TRANSIT = 2


@dataclass(frozen=True)
class ParticipantHostEstimate:
    """A participant's host RAM in one federated stage, bytes per component.

    Attributes:
        columns: columns the participant holds.
        results_in_transit: its results on their way, each a shared pseudo-gradient kept.
        replica: published shared layers and held columns (FP32).
        local_columns: the node's own copies of its held columns (FP32).
        residual: the shared error-feedback residual (FP32).
        corrections: unsent column remainders and shared pseudo-gradients in transit (bf16).
        teacher: stage 4's teacher replica (bf16); 0 in stage 3.
    """

    columns: int
    results_in_transit: int
    replica: float
    local_columns: float
    residual: float
    corrections: float
    teacher: float

    @property
    def total(self) -> float:
        """All the components."""
        return self.replica + self.local_columns + self.residual + self.corrections + self.teacher


def estimate_participant_host(
    counts: ParamCounts,
    *,
    stage: int,
    columns: int,
    results_in_transit: int = RESULTS_IN_TRANSIT,
) -> ParticipantHostEstimate:
    """The host RAM of a participant holding ``columns`` columns in stage ``stage`` (3 or 4)
    with ``results_in_transit`` of its results on their way (eager updates)."""
    shared = counts.shared + counts.routers  # what the replica's shared part holds
    held = columns * counts.column
    return ParticipantHostEstimate(
        columns=columns,
        results_in_transit=results_in_transit,
        replica=FP32 * (shared + held),
        local_columns=FP32 * held,
        residual=FP32 * shared,
        corrections=BF16 * (held + results_in_transit * shared),
        teacher=BF16 * (shared + held) if stage == 4 else 0.0,
    )
