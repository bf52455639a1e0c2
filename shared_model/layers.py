"""Small building blocks shared by the Perspective model: RMSNorm, SwiGLU FFN, RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.ternary import ternary_ste


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision for reductions: at least float32 (float64 stays float64, for tests)."""
    return torch.promote_types(dtype, torch.float32)


def rms_normalise(x: Tensor, eps: float) -> Tensor:
    """Divide the last dimension of ``x`` by its root mean square (no learned gain)."""
    dtype = x.dtype
    x = x.to(compute_dtype(dtype))
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-channel gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``."""
        return rms_normalise(x, self.eps) * self.weight.to(x.dtype)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``, no biases.

    ``ternary_fraction`` (None = full precision) routes the three weights through the
    progressive ternary straight-through quantiser in the forward pass; the model sets it
    on expert FFNs only (:meth:`PerspectiveModel.set_ternary_fraction`).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.ternary_fraction: float | None = None
        self.threshold_factor: float = 0.7

    def _weight(self, lin: nn.Linear) -> Tensor:
        if self.ternary_fraction is None:
            return lin.weight
        return ternary_ste(lin.weight, self.ternary_fraction, self.threshold_factor)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the FFN to ``x`` of shape ``[..., dim]``."""
        return swiglu(x, self._weight(self.w1), self._weight(self.w2), self._weight(self.w3))


def swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """SwiGLU with explicit weights (used by MoE layers with batch-quantised experts)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables ``[T, head_dim/2]`` for absolute ``positions`` ``[T]``.

    Computed on the fly (cheap) so that generation can run past ``max_seq_len``.
    """
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    # float64 angles: positions up to ~1e6 keep full precision before the cos/sin.
    angles = positions.to(torch.float64)[:, None] * inv_freq.double()[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs of channels of ``x`` ``[B, H, T, head_dim]`` (half-split convention)."""
    dtype = x.dtype
    x = x.to(compute_dtype(dtype))
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(dtype)
