"""Compute, time, cost, memory and traffic per training stage (DESIGN §2 stage 10).

FLOPs per token follow the usual accounting: a forward pass costs 2 FLOPs per weight
per token, the backward pass 2 for the activation gradients plus 2 for the weight
gradients of the weights being trained. Hence ``6·N`` for ordinary training, ``6·N + 2·N``
for knowledge distillation (the frozen teacher's forward), and ``4·N + 2·N_router`` for
stage 5 (experts frozen: the backward still flows through every layer to reach the
routers, but only router weights get gradients).

Two bases for ``N``:

* ``params`` (default; the seed's and DESIGN §8's convention): ``N`` = parameters of the
  model (dense seed: all 6.83B shared; MoE top-1: shared + one column + routers).
* ``per-use``: every weight counted each time a token multiplies through it (the dense
  seed's tied FFN banks run in all 80 layers, not 20), lookups excluded, plus the
  attention and PDR mixing FLOPs. This is what the hardware actually executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.plan.coordinator_host import HostEstimate, HostSettings, estimate_host
from coordinator.plan.hardware import GPUS, GpuSpec, PlanError, require_positive
from coordinator.plan.memory import MemoryEstimate, MemoryLayout, estimate_memory
from coordinator.plan.params import ParamCounts, count_params
from coordinator.plan.participant_host import ParticipantHostEstimate, estimate_participant_host
from coordinator.plan.traffic import CodecBits, TrafficEstimate, estimate_traffic
from shared_model.config import PerspectiveConfig

FLOPS_BASES = ("params", "per-use")
PDR_MAX_CHUNK = 64
"""= ``shared_model.pdr.MAX_STABLE_CHUNK`` (copied so that planning needs no torch import)."""


@dataclass(frozen=True)
class StageDef:
    """What a stage trains and where (DESIGN §2)."""

    number: int
    name: str
    mode: str  # "dense" or "moe"
    where: str  # "coordinator" or "federated"
    trains: str  # "all" (every active weight) or "router"
    teacher: bool
    default_tokens: float
    tokens_source: str


STAGES: dict[int, StageDef] = {
    s.number: s
    for s in (
        StageDef(1, "dense seed", "dense", "coordinator", "all", False, 1e12, "seed (1T tokens)"),
        StageDef(
            3, "expert differentiation", "moe", "federated", "all", False, 2e11, "planner default"
        ),
        StageDef(
            4, "ternary distillation", "moe", "federated", "all", True, 1e11, "planner default"
        ),
        StageDef(
            5,
            "manifold alignment",
            "moe",
            "coordinator",
            "router",
            False,
            4.5e10,
            "planner default",
        ),
    )
}


@dataclass(frozen=True)
class PlanSettings:
    """Everything the planner assumes besides the model config.

    Attributes:
        gpu: accelerator of the coordinator and of each volunteer.
        mfu: model FLOPs utilisation, 0 < mfu <= 1.
        price_per_gpu_hour: USD per GPU-hour (rented; volunteers' hours priced alike).
        gpus: coordinator GPUs (centralised stages 1 and 5; FSDP group).
        volunteers: participants in the federated stages 3 and 4, one GPU each.
        volunteer_mbps: a volunteer's link speed, megabits per second.
        tokens: stage number → tokens, overriding the stage defaults.
        flops_basis: ``params`` or ``per-use`` (which FLOPs the GPU-hours use).
        layout: memory layout per GPU.
        codec: bits per parameter of the federated payloads.
        local_steps: inner steps between shared syncs (H; the federation's default
            ``steps_per_unit``, ``docs/federated-training.md`` §4).
        step_tokens: tokens per inner step of a participant; ``None`` = the config's
            ``train.batch_size × train.seq_len``.
        stages: which stages to plan.
        host: the coordinator host's assumptions (fleet sizes to plan it for).
    """

    gpu: GpuSpec = GPUS["a100"]
    mfu: float = 0.4
    price_per_gpu_hour: float = 3.0
    gpus: int = 64
    volunteers: int = 128
    volunteer_mbps: float = 100.0
    tokens: dict[int, float] = field(default_factory=dict)
    flops_basis: str = "params"
    layout: MemoryLayout = MemoryLayout()
    codec: CodecBits = CodecBits()
    local_steps: int = 10
    step_tokens: int | None = None
    stages: tuple[int, ...] = (1, 3, 4, 5)
    host: HostSettings = HostSettings()

    def validate(self, cfg: PerspectiveConfig) -> None:
        """Raise :class:`PlanError` naming the first invalid setting."""
        require_positive("mfu", self.mfu)
        if self.mfu > 1:
            raise PlanError(f"mfu = {self.mfu} is invalid: allowed 0 < mfu <= 1 (0.4 = 40 %)")
        if self.price_per_gpu_hour < 0:
            raise PlanError(f"price = {self.price_per_gpu_hour}: allowed a value >= 0 USD/hour")
        for name in ("gpus", "volunteers", "volunteer_mbps", "local_steps"):
            require_positive(name, getattr(self, name))
        if self.step_tokens is not None:
            require_positive("step_tokens", self.step_tokens)
        if self.flops_basis not in FLOPS_BASES:
            raise PlanError(f"flops_basis = {self.flops_basis!r}: allowed {', '.join(FLOPS_BASES)}")
        for n in (*self.stages, *self.tokens):
            if n not in STAGES:
                raise PlanError(f"stage {n} has no compute to plan: allowed {list(STAGES)}")
        for n, t in self.tokens.items():
            require_positive(f"stage {n} tokens", t)
        self.layout.validate(cfg)
        self.codec.validate()
        self.host.validate()

    def stage_tokens(self, number: int) -> float:
        """Tokens of stage ``number`` (override or default)."""
        return float(self.tokens.get(number, STAGES[number].default_tokens))


@dataclass(frozen=True)
class StagePlan:
    """The planner's figures for one stage (FLOPs, hours, USD, bytes)."""

    stage: StageDef
    tokens: float
    params_total: int
    params_active: int
    params_trained: int
    flops: float
    flops_per_use: float
    gpu_hours: float
    workers: int
    wall_hours: float
    cost_usd: float
    memory: MemoryEstimate
    traffic: TrafficEstimate | None
    hosts: list[HostEstimate] = field(default_factory=list)
    participant_host: ParticipantHostEstimate | None = None


@dataclass(frozen=True)
class Plan:
    """A whole plan: the config's parameter counts and every planned stage."""

    config_name: str
    counts: ParamCounts
    settings: PlanSettings
    stages: list[StagePlan]

    @property
    def total_flops(self) -> float:
        """FLOPs of all planned stages, ``params`` basis."""
        return sum(s.flops for s in self.stages)

    @property
    def total_flops_per_use(self) -> float:
        """FLOPs of all planned stages, ``per-use`` basis."""
        return sum(s.flops_per_use for s in self.stages)

    @property
    def total_gpu_hours(self) -> float:
        """GPU-hours of all planned stages (on the settings' FLOPs basis)."""
        return sum(s.gpu_hours for s in self.stages)

    @property
    def total_cost_usd(self) -> float:
        """USD of all planned stages at the settings' price."""
        return sum(s.cost_usd for s in self.stages)

    def stage(self, number: int) -> StagePlan:
        """The plan of stage ``number``."""
        for s in self.stages:
            if s.stage.number == number:
                return s
        raise PlanError(
            f"stage {number} is not in this plan: planned {[s.stage.number for s in self.stages]}"
        )


def mixing_flops_per_token(cfg: PerspectiveConfig) -> float:
    """Forward FLOPs per token of the token mixers beyond their weight matmuls.

    GQA: ``4·d·c`` per layer (scores and weighted sum), ``c`` the mean attended context
    under the causal window over a ``train.seq_len`` sequence. PDR in its chunked
    training form (:func:`shared_model.pdr.pdr_chunked`): ``8·d·r + 2·L·(r + d)`` per layer
    (fixed rank-r key and query projections, state read-out and update, and the
    intra-chunk ``L×L`` scores and their product with the values).
    """
    m = cfg.model
    t, w = cfg.train.seq_len, m.window
    # Mean over positions p = 0..t-1 of min(p + 1, w).
    ctx = (sum(range(1, min(t, w) + 1)) + max(0, t - w) * w) / t
    d, r, chunk = m.d_model, m.pdr_rank, min(m.pdr_chunk, PDR_MAX_CHUNK)
    pdr = 8 * d * r + 2 * chunk * (r + d)
    return m.n_gqa_layers * 4 * d * ctx + m.n_pdr_layers * pdr


def stage_flops_per_token(
    cfg: PerspectiveConfig, counts: ParamCounts, stage: StageDef
) -> tuple[float, float]:
    """Training FLOPs per token of ``stage``: (``params`` basis, ``per-use`` basis)."""
    dense = stage.mode == "dense"
    n = counts.dense_total if dense else counts.moe_active
    n_use = counts.dense_per_use if dense else counts.moe_per_use
    trained, trained_use = (n, n_use) if stage.trains == "all" else (counts.routers,) * 2
    teacher = 2 * n if stage.teacher else 0
    params = 4 * n + 2 * trained + teacher
    mix = mixing_flops_per_token(cfg)
    teacher_use = 2 * n_use + mix if stage.teacher else 0
    per_use = 4 * n_use + 2 * trained_use + 3 * mix + teacher_use
    return float(params), float(per_use)


def _plan_stage(
    cfg: PerspectiveConfig, counts: ParamCounts, stage: StageDef, st: PlanSettings
) -> StagePlan:
    tokens = st.stage_tokens(stage.number)
    fpt, fpt_use = stage_flops_per_token(cfg, counts, stage)
    basis = fpt if st.flops_basis == "params" else fpt_use
    sustained = st.gpu.peak_tflops * 1e12 * st.mfu
    gpu_hours = tokens * basis / sustained / 3600
    federated = stage.where == "federated"
    workers = st.volunteers if federated else st.gpus
    traffic = None
    if federated:
        traffic = estimate_traffic(
            counts,
            st.codec,
            stage=stage.number,
            columns=st.layout.experts_per_rank,
            stage_tokens=tokens,
            participants=st.volunteers,
            sync_tokens=st.local_steps
            * (st.step_tokens or cfg.train.batch_size * cfg.train.seq_len),
            flops_per_token=basis,
            flops_per_second=sustained,
            link_mbps=st.volunteer_mbps,
        )
    hosts = [] if traffic is None else [
        estimate_host(counts, traffic, st.codec, stage=stage.number, participants=n,
                      stage_gpu_hours=gpu_hours, settings=st.host)
        for n in st.host.fleets
    ]  # fmt: skip
    participant = None if traffic is None else estimate_participant_host(
        counts, stage=stage.number, columns=traffic.columns
    )  # fmt: skip
    dense = stage.mode == "dense"
    trained = {"all": counts.dense_total if dense else counts.moe_active, "router": counts.routers}
    return StagePlan(
        stage=stage,
        tokens=tokens,
        params_total=counts.dense_total if dense else counts.moe_total,
        params_active=counts.dense_total if dense else counts.moe_active,
        params_trained=trained[stage.trains],
        flops=tokens * fpt,
        flops_per_use=tokens * fpt_use,
        gpu_hours=gpu_hours,
        workers=workers,
        wall_hours=gpu_hours / workers,
        cost_usd=gpu_hours * st.price_per_gpu_hour,
        memory=estimate_memory(cfg, counts, stage.number, st.gpu, st.layout, st.gpus),
        traffic=traffic,
        hosts=hosts,
        participant_host=participant,
    )


def build_plan(cfg: PerspectiveConfig, settings: PlanSettings | None = None) -> Plan:
    """Plan every stage of ``settings.stages`` for ``cfg``.

    Raises:
        PlanError: an invalid setting (message names it and the allowed range).
    """
    settings = settings or PlanSettings()
    settings.validate(cfg)
    counts = count_params(cfg)
    stages = [_plan_stage(cfg, counts, STAGES[n], settings) for n in sorted(set(settings.stages))]
    return Plan(cfg.name, counts, settings, stages)
