"""Validation of a :class:`~shared_model.config.PerspectiveConfig`: one clear error per bad field.

Reads the dataclasses of :mod:`shared_model.config`; used by
:mod:`shared_model.config_loading` on every config it builds.
"""

from __future__ import annotations

import math
from typing import Any

from shared_model.config import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    PerspectiveConfig,
    TernaryConfig,
)

_POSITIVE_INTS = {
    "model": [
        "vocab_size",
        "d_model",
        "n_pdr_layers",
        "n_gqa_layers",
        "gqa_every",
        "n_heads",
        "n_kv_heads",
        "ffn_hidden",
        "pdr_rank",
        "pdr_chunk",
        "window",
        "max_seq_len",
    ],
    "moe": ["n_experts", "top_k"],
    "train": ["batch_size", "seq_len", "steps", "eval_every", "eval_batches", "checkpoint_every"],
}


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path} = {value!r} is invalid: allowed {allowed}")


def validate(cfg: PerspectiveConfig) -> PerspectiveConfig:
    """Check every field; raise :class:`ConfigError` on the first invalid one.

    Returns:
        The same config, for chaining.
    """
    for section, names in _POSITIVE_INTS.items():
        obj = getattr(cfg, section)
        for name in names:
            value = getattr(obj, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(f"{section}.{name}", value, "an integer >= 1")
    _validate_model(cfg.model)
    _validate_moe(cfg.moe)
    _validate_ternary(cfg.ternary)
    _validate_optim(cfg.optim)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", cfg.train.seq_len, f"<= model.max_seq_len ({cfg.model.max_seq_len})")
    return cfg


def _validate_model(m: ModelConfig) -> None:
    if m.d_model % m.n_heads:
        _fail("model.n_heads", m.n_heads, f"a divisor of model.d_model ({m.d_model})")
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads, f"a divisor of model.n_heads ({m.n_heads})")
    if m.head_dim % 2:
        _fail("model.n_heads", m.n_heads, "a value giving an even head_dim (d_model / n_heads)")
    if m.window > m.max_seq_len:
        _fail("model.window", m.window, f"1 .. model.max_seq_len ({m.max_seq_len})")
    if m.pdr_rank > m.d_model:
        _fail("model.pdr_rank", m.pdr_rank, f"1 .. model.d_model ({m.d_model})")
    n_gqa = sum(1 for i in range(m.n_layers) if m.is_gqa_layer(i))
    if n_gqa != m.n_gqa_layers:
        _fail(
            "model.n_gqa_layers",
            m.n_gqa_layers,
            f"n_layers // gqa_every = {n_gqa} for {m.n_layers} layers with gqa_every={m.gqa_every}",
        )
    if not (0 < m.norm_eps < 1):
        _fail("model.norm_eps", m.norm_eps, "0 < norm_eps < 1")
    if not (m.init_std > 0 and math.isfinite(m.init_std)):
        _fail("model.init_std", m.init_std, "a finite value > 0")


def _validate_moe(moe: MoEConfig) -> None:
    if moe.top_k > moe.n_experts:
        _fail("moe.top_k", moe.top_k, f"1 .. moe.n_experts ({moe.n_experts})")
    for name in ("balance_alpha", "diversity_beta", "clone_noise_std"):
        value = getattr(moe, name)
        if not (math.isfinite(value) and value >= 0):
            _fail(f"moe.{name}", value, "a finite value >= 0")


def _validate_ternary(t: TernaryConfig) -> None:
    if not (0 < t.threshold_factor < 2):
        _fail("ternary.threshold_factor", t.threshold_factor, "0 < value < 2")
    sched = list(t.schedule)
    if not sched or any(not (0 < f <= 1) for f in sched) or sched != sorted(sched):
        _fail("ternary.schedule", t.schedule, "a non-empty increasing list of fractions in (0, 1]")
    if sched[-1] != 1.0:
        _fail("ternary.schedule", t.schedule, "a list ending at 1.0 (all weights ternary)")
    if not (0 <= t.kd_weight <= 1):
        _fail("ternary.kd_weight", t.kd_weight, "0 .. 1")


def _validate_optim(o: OptimConfig) -> None:
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(o, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            _fail(f"optim.{name}", value, "a finite value >= 0")
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "a finite value > 0")
    scale = o.expert_lr_scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0 < scale <= 10):
        _fail("optim.expert_lr_scale", scale, "0 < value <= 10 (1: the experts at the lr)")
    if o.min_lr > o.lr:
        _fail("optim.min_lr", o.min_lr, f"0 .. optim.lr ({o.lr})")
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if not (0 <= value < 1):
            _fail(f"optim.{name}", value, "0 <= value < 1")
