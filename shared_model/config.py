"""Typed configuration for the Perspective model and its training, with named presets.

Every preset runs the same code; only sizes differ (DESIGN §7). A config is a tree of
frozen dataclasses; ``load_config`` reads a preset, then a YAML file, then ``key=value``
overrides, and validates the result. Invalid values raise :class:`ConfigError` naming
the field and the allowed range.

Three modules, imported one way: this one holds the dataclasses and presets (the schema),
:mod:`shared_model.config_validation` checks a config built from them, and
:mod:`shared_model.config_loading` builds one from a preset, YAML and overrides.

Layer layout: ``n_layers = n_pdr_layers + n_gqa_layers``; layer ``i`` is a windowed-GQA
layer when ``(i + 1) % gqa_every == 0`` (every 4th layer for all presets), otherwise a
PDR layer. Each GQA layer owns one dense SwiGLU FFN ("FFN bank"); in dense mode PDR
layer ``i`` reuses bank ``i % n_gqa_layers`` (DESIGN §8), in MoE mode each PDR layer
has ``n_experts`` expert FFNs of the same shape instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed range."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the network."""

    vocab_size: int = 512
    d_model: int = 64
    n_pdr_layers: int = 3
    n_gqa_layers: int = 1
    gqa_every: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 172
    pdr_rank: int = 16
    pdr_chunk: int = 32
    window: int = 64
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    pdr_seed: int = 1234

    @property
    def n_layers(self) -> int:
        return self.n_pdr_layers + self.n_gqa_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_gqa_layer(self, layer: int) -> bool:
        """Whether layer index ``layer`` is a windowed-GQA layer (else PDR)."""
        return (layer + 1) % self.gqa_every == 0

    def pdr_layers(self) -> list[int]:
        """Indices of the PDR layers, in order (these carry experts in MoE mode)."""
        return [i for i in range(self.n_layers) if not self.is_gqa_layer(i)]

    def gqa_layers(self) -> list[int]:
        """Indices of the GQA layers, in order (layer k of this list owns FFN bank k)."""
        return [i for i in range(self.n_layers) if self.is_gqa_layer(i)]

    def ffn_bank(self, layer: int) -> int:
        """FFN bank used by ``layer`` in dense mode (PDR layer i reuses bank i mod n_gqa)."""
        if self.is_gqa_layer(layer):
            return self.gqa_layers().index(layer)
        return layer % self.n_gqa_layers


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts settings (experts live in the PDR layers)."""

    n_experts: int = 8
    top_k: int = 1
    balance_alpha: float = 0.01
    diversity_beta: float = 0.001
    clone_noise_std: float = 0.0


@dataclass(frozen=True)
class TernaryConfig:
    """Ternary quantisation of expert weights (stage 4)."""

    threshold_factor: float = 0.7
    schedule: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    kd_weight: float = 0.5


@dataclass(frozen=True)
class OptimConfig:
    """Inner optimiser and schedule (AdamW, warmup then cosine).

    ``expert_lr_scale``: the expert columns train at this multiple of the scheduled lr
    (the shared layers and routers at the lr itself). In a federated stage the coordinator
    sends its value with every unit (``WorkUnit.expert_lr_scale``), so its config decides.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    expert_lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Batch geometry and run length for one training stage."""

    batch_size: int = 8
    seq_len: int = 64
    steps: int = 200
    eval_every: int = 50
    # 16 batches (8k tokens on `tiny`, as the federated loop's): 4 were a 2k-token sample
    # that read 0.8 below a 32k one on the `small` demo's geometry.
    eval_batches: int = 16
    checkpoint_every: int = 100
    seed: int = 0


@dataclass(frozen=True)
class PerspectiveConfig:
    """The whole configuration: model, MoE, ternary, optimiser and training settings."""

    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    ternary: TernaryConfig = field(default_factory=TernaryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists) suitable for YAML/JSON."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


PRESETS: dict[str, PerspectiveConfig] = {
    "tiny": PerspectiveConfig(
        name="tiny",
        model=ModelConfig(),
        moe=MoEConfig(n_experts=8),
        # expert_lr_scale 0.25: docs/federated-training.md §5.1 "The experts' learning rate"
        optim=OptimConfig(
            lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.01, expert_lr_scale=0.25
        ),
        train=TrainConfig(batch_size=8, seq_len=64, steps=200),
    ),
    "small": PerspectiveConfig(
        name="small",
        model=ModelConfig(
            vocab_size=8192,
            d_model=256,
            n_pdr_layers=6,
            n_gqa_layers=2,
            n_heads=8,
            n_kv_heads=2,
            ffn_hidden=688,
            pdr_rank=64,
            pdr_chunk=64,
            window=256,
            max_seq_len=1024,
        ),
        moe=MoEConfig(n_experts=16),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=100, weight_decay=0.1),
        train=TrainConfig(batch_size=16, seq_len=256, steps=2000, eval_every=200),
    ),
    # The seed's stage-1/3 model (DESIGN §1, §7): 6.83B shared + 1.04T expert parameters.
    "full": PerspectiveConfig(
        name="full",
        model=ModelConfig(
            vocab_size=32768,
            d_model=4096,
            n_pdr_layers=60,
            n_gqa_layers=20,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden=11008,
            pdr_rank=256,
            pdr_chunk=128,
            window=4096,
            max_seq_len=4096,
        ),
        moe=MoEConfig(n_experts=128, top_k=1, balance_alpha=0.01, diversity_beta=0.001),
        optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2000, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(batch_size=512, seq_len=4096, steps=100_000, eval_every=1000),
    ),
}
