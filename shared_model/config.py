"""Typed configuration for the Perspective model and its training, with named presets.

Every preset runs the same code; only sizes differ (DESIGN §7). A config is a tree of
frozen dataclasses; ``load_config`` reads a preset, then a YAML file, then ``key=value``
overrides, and validates the result. Invalid values raise :class:`ConfigError` naming
the field and the allowed range.

Layer layout: ``n_layers = n_pdr_layers + n_gqa_layers``; layer ``i`` is a windowed-GQA
layer when ``(i + 1) % gqa_every == 0`` (every 4th layer for all presets), otherwise a
PDR layer. Each GQA layer owns one dense SwiGLU FFN ("FFN bank"); in dense mode PDR
layer ``i`` reuses bank ``i % n_gqa_layers`` (DESIGN §8), in MoE mode each PDR layer
has ``n_experts`` expert FFNs of the same shape instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shared_model.config_validation import ConfigError, validate


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
    """Inner optimiser and schedule (AdamW, warmup then cosine)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Batch geometry and run length for one training stage."""

    batch_size: int = 8
    seq_len: int = 64
    steps: int = 200
    eval_every: int = 50
    eval_batches: int = 4
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
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.01),
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


# --- loading ----------------------------------------------------------------------------


def _coerce(path: str, current: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r} is invalid: allowed true/false")
    try:
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError) as exc:
        kind = type(current).__name__
        raise ConfigError(f"{path} = {value!r} is invalid: allowed a value of type {kind}") from exc
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config field {path!r}: allowed {', '.join(prefix + k for k in known)}"
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping of its fields, got {value!r}")
            changes[key] = _apply(current, value, f"{path}.")
        else:
            changes[key] = _coerce(path, current, value)
    return replace(obj, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["model.d_model=128", "train.steps=10"]`` into a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(
    preset: str = "tiny",
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PerspectiveConfig:
    """Build a validated config from a preset, an optional YAML file and overrides.

    Args:
        preset: one of ``PRESETS`` (``tiny``, ``small``, ``full``); a YAML file may name
            its own base preset with a top-level ``preset:`` key.
        path: optional YAML file with a nested mapping of fields to change.
        overrides: ``section.field=value`` strings or a nested dict, applied last.

    Raises:
        ConfigError: unknown preset, unreadable file, unknown field or invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        preset = data.pop("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: allowed {', '.join(PRESETS)}")
    cfg = _apply(PRESETS[preset], data)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        cfg = _apply(cfg, extra)
    return validate(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at top level")
    return data


def save_config(cfg: PerspectiveConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump({"preset": cfg.name, **cfg.to_dict()}, sort_keys=False))
    tmp.replace(path)


def config_from_dict(data: dict[str, Any]) -> PerspectiveConfig:
    """Rebuild a config from :meth:`PerspectiveConfig.to_dict` output (e.g. a checkpoint)."""
    data = dict(data)
    preset = data.pop("preset", data.get("name", "tiny"))
    base = PRESETS.get(preset, PRESETS["tiny"])
    return validate(_apply(base, data))
