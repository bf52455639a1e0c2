"""Windowed grouped-query attention with RoPE and a bounded KV cache.

Query ``t`` attends to keys ``s`` with ``t - window < s <= t`` (causal sliding window).
``n_kv_heads`` key/value heads are shared by groups of ``n_heads / n_kv_heads`` query heads.
The KV cache used in generation keeps at most ``window`` entries per layer: that is all
any later query can see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import ModelConfig
from shared_model.layers import apply_rope, rope_angles


@dataclass
class KVCache:
    """Keys/values (after RoPE) of the last ``window`` positions of one attention layer."""

    k: Tensor  # [B, n_kv_heads, L, head_dim]
    v: Tensor  # [B, n_kv_heads, L, head_dim]
    positions: Tensor  # [L] absolute positions


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """Boolean ``[Tq, Tk]`` mask, True where query position may attend key position."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window)


class WindowedGQA(nn.Module):
    """Sliding-window grouped-query attention (no biases)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.window = cfg.window
        self.rope_theta = cfg.rope_theta
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, kv, bias=False)
        self.wv = nn.Linear(d, kv, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, cache: KVCache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, KVCache | None]:
        """Attend over ``x`` ``[B, T, d]`` at absolute ``positions`` ``[T]``.

        Args:
            x: normalised layer input.
            positions: absolute positions of the T tokens (consecutive).
            cache: keys/values of earlier positions (generation), or None.
            use_cache: return an updated cache holding the last ``window`` entries.

        Returns:
            ``(output [B, T, d], new cache or None)``.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pos = positions
        if cache is not None:
            k = torch.cat([cache.k, k], dim=2)
            v = torch.cat([cache.v, v], dim=2)
            k_pos = torch.cat([cache.positions, positions])
        new_cache = None
        if use_cache:
            keep = min(self.window, k.shape[2])
            new_cache = KVCache(k[:, :, -keep:], v[:, :, -keep:], k_pos[-keep:])
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if cache is None and self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = window_mask(positions, k_pos, self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), new_cache
