"""Mapping a Hugging Face Mixtral model onto a Perspective config and weights (path 9.1)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from coordinator.central.convert_params import ConvertError
from shared_model.config import PerspectiveConfig
from shared_model.config_loading import load_config


def _rope_theta(hf_cfg) -> float:
    theta = getattr(hf_cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def config_from_mixtral(
    hf_cfg, n_experts: int | None = None, gqa_every: int = 4, seq_len: int = 64
) -> PerspectiveConfig:
    """A :class:`PerspectiveConfig` with the Mixtral's shapes and our layer layout.

    Layer i keeps attention (windowed GQA) iff ``(i + 1) % gqa_every == 0``; the others
    become PDR layers carrying the experts. ``n_experts`` (default: the source's) must be
    the source's expert count times a power of two (growth doubles).

    Raises:
        ConvertError: unsupported shapes (head_dim != hidden/heads, too few layers, ...).
    """
    d, heads = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or d // heads
    if head_dim * heads != d:
        raise ConvertError(f"head_dim {head_dim} x {heads} heads != hidden_size {d}: unsupported")
    n_layers = hf_cfg.num_hidden_layers
    n_gqa = n_layers // gqa_every
    if n_gqa < 1:
        raise ConvertError(f"{n_layers} layers with gqa_every={gqa_every} leave no attention layer")
    e0 = hf_cfg.num_local_experts
    target = n_experts or e0
    ratio = target // e0
    if target < e0 or target % e0 or ratio & (ratio - 1):
        raise ConvertError(f"n_experts {target} must be {e0} x a power of two (experts double)")
    max_len = min(int(hf_cfg.max_position_embeddings), 4096)
    window = min(int(getattr(hf_cfg, "sliding_window", None) or max_len), max_len)
    model = {
        "vocab_size": hf_cfg.vocab_size,
        "d_model": d,
        "n_pdr_layers": n_layers - n_gqa,
        "n_gqa_layers": n_gqa,
        "gqa_every": gqa_every,
        "n_heads": heads,
        "n_kv_heads": hf_cfg.num_key_value_heads,
        "ffn_hidden": hf_cfg.intermediate_size,
        "pdr_rank": max(1, min(256, d // 4)),
        "pdr_chunk": 64,
        "window": window,
        "max_seq_len": max_len,
        "norm_eps": float(hf_cfg.rms_norm_eps),
        "rope_theta": _rope_theta(hf_cfg),
    }
    train = {"seq_len": min(seq_len, max_len)}
    return load_config(
        "tiny", overrides={"model": model, "moe": {"n_experts": target}, "train": train}
    )


def with_experts(cfg: PerspectiveConfig, n: int) -> PerspectiveConfig:
    """``cfg`` with ``moe.n_experts = n``."""
    return replace(cfg, moe=replace(cfg.moe, n_experts=n))


def mixtral_experts(layer) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``[(w1, w2, w3)]`` per expert of a Mixtral MoE block (fused or per-expert layout).

    ``w1`` is the gate projection, ``w3`` the up projection, ``w2`` the down projection,
    exactly as in our SwiGLU ``w2(silu(w1 x) * w3 x)``.
    """
    moe = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
    experts = moe.experts
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: fused [E, 2I, d] / [E, d, I]
        gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        inter = gu.shape[1] // 2
        return [(gu[e, :inter], down[e], gu[e, inter:]) for e in range(gu.shape[0])]
    return [(ex.w1.weight.detach(), ex.w2.weight.detach(), ex.w3.weight.detach()) for ex in experts]


def moe_block(layer):
    """The sparse-MoE module of a Mixtral decoder layer."""
    return getattr(layer, "mlp", None) or layer.block_sparse_moe


@torch.no_grad()
def map_weights(teacher, student) -> None:
    """Copy embeddings, norms, kept attention and experts/routers from the Mixtral.

    PDR mixers and the dense FFNs of attention layers are left for distillation.
    """
    hf = teacher.model
    student.tok_emb.weight.copy_(hf.embed_tokens.weight)
    student.lm_head.weight.copy_(teacher.lm_head.weight)
    student.norm.weight.copy_(hf.norm.weight)
    for src, dst in zip(hf.layers, student.layers, strict=True):
        dst.mixer_norm.weight.copy_(src.input_layernorm.weight)
        dst.ffn_norm.weight.copy_(src.post_attention_layernorm.weight)
        if dst.is_gqa:
            att = src.self_attn
            for ours, theirs in (
                ("wq", "q_proj"),
                ("wk", "k_proj"),
                ("wv", "v_proj"),
                ("wo", "o_proj"),
            ):
                getattr(dst.mixer, ours).weight.copy_(getattr(att, theirs).weight)
            continue
        experts = mixtral_experts(src)
        dst.ffn.router.weight.copy_(moe_block(src).gate.weight)
        for e, (w1, w2, w3) in enumerate(experts):
            ex = dst.ffn.expert(e)
            ex.w1.weight.copy_(w1)
            ex.w2.weight.copy_(w2)
            ex.w3.weight.copy_(w3)


@torch.no_grad()
def grow_experts(model, cfg_new: PerspectiveConfig, noise: float, generator: torch.Generator):
    """A model with twice the experts: expert ``j + E`` is a perturbed clone of expert ``j``.

    Every non-expert weight is copied. The router rows of the clones are the originals plus
    noise, so ties in the top-1 choice split between original and clone. ``noise`` is
    relative to each tensor's standard deviation.
    """
    from shared_model.model import PerspectiveModel

    e_old = model.cfg.moe.n_experts
    if cfg_new.moe.n_experts != 2 * e_old:
        raise ConvertError(f"growth doubles experts: {e_old} -> {2 * e_old}")
    new = PerspectiveModel(cfg_new, moe=True).to(next(model.parameters()).device)
    old_state = model.state_dict()
    for name, t in new.state_dict().items():
        if ".experts." in name:
            parts = name.split(".")
            e = int(parts[4])
            parts[4] = str(e % e_old)
            src = old_state[".".join(parts)]
            t.copy_(src if e < e_old else src + _noise(src, noise, generator))
        elif name.endswith("ffn.router.weight") and t.shape[0] == 2 * e_old:
            src = old_state[name]
            t.copy_(torch.cat([src, src + _noise(src, noise, generator)]))
        else:
            t.copy_(old_state[name])
    return new


def _noise(t: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    z = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t)
    return scale * t.float().std().clamp_min(1e-12) * z
