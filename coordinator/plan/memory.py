"""Memory per GPU for each stage's parallel layout (weights, grads, optimiser, activations).

Bytes per *trained* parameter under mixed precision (ZeRO paper accounting): bf16
weights 2 + bf16 grads 2 + AdamW m and v (fp32: 4 + 4, or 8-bit: 1 + 1) + an fp32
master copy 4 when training in bf16 = 16 bytes by default. A *frozen* parameter costs
its bf16 weight, 2 bytes. FSDP divides the shared parameters' bytes by the number of
GPUs in the group; expert parallelism puts ``experts_per_rank`` columns (optionally
sliced to ``expert_layers`` of their PDR layers) on each GPU.

Activations per token (bf16, flash attention so no ``T²`` term), the tensors a layer
saves for backward:

* GQA layer: ``2·(6·d + 2·kv_dim + 4·h)`` bytes (two norm inputs/outputs, q, k, v,
  attention output, and the SwiGLU's w1, w3, silu and product outputs);
* PDR layer: ``2·(7·d + 2·r + 4·h)`` bytes (value, gate, mixer output; rank-r keys and
  queries);
* logits: ``6·V`` bytes (bf16 logits + fp32 softmax for the loss).

This is Korthikanti et al. (2022)'s ``34·d`` per token per layer, redone for SwiGLU
(≈34.5·d for the full preset). With activation checkpointing (default) each layer keeps
only its bf16 input, ``2·d`` bytes per token, and one layer is recomputed at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from coordinator.plan.hardware import GpuSpec, PlanError
from coordinator.plan.params import BF16, ParamCounts
from shared_model.config import PerspectiveConfig

GB = 1e9


@dataclass(frozen=True)
class MemoryLayout:
    """How a stage is laid out over GPUs, and the precision of its training state.

    Attributes:
        experts_per_rank: expert columns held by one GPU in stages 3 and 4 (the seed's
            §4.4 layout is 4).
        expert_layers: PDR layers of each column a GPU holds (layer slicing for weak
            machines); ``None`` = whole columns.
        optimizer_bits: precision of AdamW's m and v: 32 or 8.
        master_fp32: keep an fp32 master copy of the bf16 weights being trained.
        activation_checkpointing: keep only each layer's input; recompute in backward.
        micro_batch_tokens: tokens per GPU micro-batch; ``None`` = one ``train.seq_len``
            sequence.
        participant_gpus: GPUs of one volunteer (FSDP group for the shared layers in the
            federated stages).
    """

    experts_per_rank: int = 4
    expert_layers: int | None = None
    optimizer_bits: int = 32
    master_fp32: bool = True
    activation_checkpointing: bool = True
    micro_batch_tokens: int | None = None
    participant_gpus: int = 1

    def validate(self, cfg: PerspectiveConfig) -> None:
        """Raise :class:`PlanError` on a value outside its range."""
        if self.experts_per_rank < 1:
            raise PlanError(f"experts_per_rank = {self.experts_per_rank}: allowed >= 1")
        if self.experts_per_rank > cfg.moe.n_experts:
            raise PlanError(
                f"experts_per_rank = {self.experts_per_rank}: allowed 1 .. moe.n_experts "
                f"({cfg.moe.n_experts})"
            )
        n_pdr = cfg.model.n_pdr_layers
        if self.expert_layers is not None and not 1 <= self.expert_layers <= n_pdr:
            raise PlanError(f"expert_layers = {self.expert_layers}: allowed 1 .. {n_pdr}")
        if self.optimizer_bits not in (8, 32):
            raise PlanError(f"optimizer_bits = {self.optimizer_bits}: allowed 8 or 32")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise PlanError(f"micro_batch_tokens = {self.micro_batch_tokens}: allowed >= 1")
        if self.participant_gpus < 1:
            raise PlanError(f"participant_gpus = {self.participant_gpus}: allowed >= 1")

    @property
    def trained_bytes(self) -> float:
        """Bytes per trained parameter: weight + grad + AdamW m, v (+ fp32 master)."""
        return 2 + 2 + 2 * self.optimizer_bits / 8 + (4 if self.master_fp32 else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component for one stage, and whether it fits.

    Attributes:
        components: name → bytes on one GPU.
        gpu_memory: the GPU's memory, bytes.
        columns_per_gpu: expert columns resident on one GPU (0 for the dense stage).
        expert_layers_per_gpu: expert FFNs (column × layer) resident on one GPU.
        shard_group: GPUs the shared parameters are sharded over (FSDP).
    """

    components: dict[str, float] = field(default_factory=dict)
    gpu_memory: float = 0.0
    columns_per_gpu: int = 0
    expert_layers_per_gpu: int = 0
    shard_group: int = 1

    @property
    def total(self) -> float:
        """Sum of the components, bytes."""
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        """Whether the total fits the GPU's memory."""
        return self.total <= self.gpu_memory


def activation_bytes(cfg: PerspectiveConfig, layout: MemoryLayout) -> float:
    """Activation bytes of one GPU micro-batch (see the module docstring for the formula)."""
    m = cfg.model
    d, h, r, v = m.d_model, m.ffn_hidden, m.pdr_rank, m.vocab_size
    tokens = layout.micro_batch_tokens or cfg.train.seq_len
    gqa = 2 * (6 * d + 2 * m.n_kv_heads * m.head_dim + 4 * h)
    pdr = 2 * (7 * d + 2 * r + 4 * h)
    if layout.activation_checkpointing:
        per_token = m.n_layers * 2 * d + max(gqa, pdr)
    else:
        per_token = m.n_gqa_layers * gqa + m.n_pdr_layers * pdr
    return float(tokens * (per_token + 6 * v))


def _shared_part(counts: ParamCounts, per_param: float, group: int) -> float:
    return counts.shared * per_param / group


def estimate_memory(
    cfg: PerspectiveConfig,
    counts: ParamCounts,
    stage: int,
    gpu: GpuSpec,
    layout: MemoryLayout,
    gpus: int,
) -> MemoryEstimate:
    """Bytes per GPU for ``stage`` (1, 3, 4 or 5) under ``layout``.

    Stage 1 shards the dense model over ``gpus`` (FSDP). Stages 3 and 4 are a volunteer's
    GPU: the shared layers trained (sharded over ``participant_gpus``) and
    ``experts_per_rank`` trained columns; stage 4 adds the frozen bf16 teacher's shared
    layers and the same columns. Stage 5 holds every expert frozen, spread over ``gpus``
    by expert parallelism, shared layers frozen and FSDP-sharded, routers trained.
    """
    layout.validate(cfg)
    tb = layout.trained_bytes
    comps: dict[str, float] = {}
    layers = layout.expert_layers or counts.n_pdr
    cols, group = 0, gpus
    if stage == 1:
        comps["shared (trained)"] = _shared_part(counts, tb, gpus)
    elif stage in (3, 4):
        group = layout.participant_gpus
        cols = layout.experts_per_rank
        comps["shared (trained)"] = _shared_part(counts, tb, group)
        comps["experts (trained)"] = cols * layers * counts.ffn * tb
        if stage == 4:
            teacher = counts.shared / group + cols * layers * counts.ffn
            comps["teacher (frozen, bf16)"] = teacher * BF16
    elif stage == 5:
        cols = math.ceil(counts.n_experts / gpus)
        comps["shared (frozen)"] = _shared_part(counts, BF16, gpus)
        comps["experts (frozen)"] = cols * layers * counts.ffn * BF16
        comps["routers (trained)"] = counts.routers * tb
    else:
        raise PlanError(f"stage {stage} has no training memory: allowed 1, 3, 4, 5")
    comps["activations"] = activation_bytes(cfg, layout)
    return MemoryEstimate(
        components=comps,
        gpu_memory=gpu.memory_gb * GB,
        columns_per_gpu=cols,
        expert_layers_per_gpu=cols * layers if stage != 1 else 0,
        shard_group=group,
    )


@dataclass(frozen=True)
class FitOption:
    """One way to lay out a volunteer's stage-3 GPU, and how much expert work fits."""

    description: str
    shared_bytes: float
    bytes_per_expert_param: float
    max_expert_layers: int
    n_pdr: int

    @property
    def max_columns(self) -> float:
        """Whole columns' worth of expert layers that fit (may be fractional)."""
        return self.max_expert_layers / self.n_pdr


def fit_options(cfg: PerspectiveConfig, counts: ParamCounts, gpu: GpuSpec) -> list[FitOption]:
    """How many expert FFNs (column × layer) fit one stage-3 GPU under common recipes."""
    budget = gpu.memory_gb * GB - activation_bytes(cfg, MemoryLayout())
    std = MemoryLayout().trained_bytes
    lean = MemoryLayout(optimizer_bits=8, master_fp32=False).trained_bytes
    recipes = [
        (
            "mixed-precision AdamW (16 B/param), shared layers trained here",
            std * counts.shared,
            std,
        ),
        ("mixed-precision AdamW (16 B/param), shared layers frozen bf16", 2 * counts.shared, std),
        (
            "8-bit AdamW, no fp32 master (6 B/param), shared trained here",
            lean * counts.shared,
            lean,
        ),
        ("8-bit AdamW, no fp32 master (6 B/param), shared frozen bf16", 2 * counts.shared, lean),
    ]
    out = []
    for text, shared_b, per_param in recipes:
        room = budget - shared_b
        layers = max(0, math.floor(room / (per_param * counts.ffn))) if room > 0 else 0
        out.append(FitOption(text, shared_b, per_param, layers, counts.n_pdr))
    return out
