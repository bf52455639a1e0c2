"""PDR: Perspective's linear-recurrence token mixer (the seed names it but never defines it).

Definition used by this project (DESIGN §8). For input ``x_t ∈ R^d`` of one layer:

* ``q_t = φ(x_t P_q)``, ``k_t = φ(x_t P_k) / r`` with ``P_q, P_k ∈ R^{d×r}`` FIXED random
  projections (``r = pdr_rank``), drawn from ``torch.Generator`` seeded with
  ``cfg.model.pdr_seed + layer``. They are non-persistent buffers: not parameters, not in
  the state dict, rebuilt identically from the config on every machine.
  ``φ(z) = elu(z) + 1`` keeps features positive so that ``q·k > 0`` (a stable, softmax-free
  attention kernel); dividing ``k`` by ``r`` keeps ``q·k`` of order one.
* learned value ``v_t = x_t W_v``, gate ``g_t = silu(x_t W_g)``, output ``W_o``: exactly
  ``3·d²`` learned weights, plus a ``d``-sized decay vector. The read-out is RMS-normalised
  without a learned gain (a per-channel gain would commute with the gate and be absorbed by
  ``W_o``), so a PDR layer has exactly ``3·d² + d`` parameters.
* per value channel decay ``λ = sigmoid(decay_logit)``, clamped to ``λ ≥ e^{-2}`` (0.135,
  a memory of under one token; the clamp bounds the exponents in the chunked form).
* state ``S_t ∈ R^{r×d}``: ``S_t = S_{t-1} diag(λ) + k_tᵀ v_t``; read-out ``y_t = q_t S_t``;
  output ``W_o(rms_normalise(y_t) ⊙ g_t)``.

Two equivalent evaluation orders:

* **chunked parallel** (training, prefill): inside a chunk of ``L ≤ 64`` positions,
  ``y_t = Σ_{s≤t} (q_t·k_s) λ^{t-s} ⊙ v_s + λ^{t+1} ⊙ (q_t S_prev)``. The per-channel factor
  ``λ^{t-s}`` is split around the chunk midpoint ``m`` as ``λ^{t-m} · λ^{m-s}`` (log-space
  exponents of magnitude ≤ 32·2 = 64, so no float32 overflow), turning the intra-chunk
  sum into one masked ``[L×L] @ [L×d]`` matmul. The state is carried between chunks with
  exponents ``≤ 0`` only.
* **recurrent** (generation): O(1) work and memory per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.config import ModelConfig
from shared_model.layers import compute_dtype, rms_normalise

MIN_LOG_DECAY = -2.0
"""Lower bound of ``log λ`` (λ ≥ 0.135)."""

MAX_STABLE_CHUNK = 64
"""Largest chunk for which ``exp(MAX_STABLE_CHUNK/2 · |MIN_LOG_DECAY|)`` is safe in float32."""


def pdr_chunked(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk: int, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked parallel PDR scan.

    Args:
        q, k: ``[B, T, r]`` features; v: ``[B, T, d]`` values.
        log_decay: ``[d]`` values of ``log λ`` in ``[MIN_LOG_DECAY, 0]``.
        chunk: chunk length (at most ``MAX_STABLE_CHUNK``).
        state: ``[B, r, d]`` state before position 0, or None for zeros.

    Returns:
        ``(y [B, T, d], final state [B, r, d])``.
    """
    B, T, r = q.shape
    d = v.shape[-1]
    if state is None:
        state = v.new_zeros(B, r, d)
    a = log_decay.to(v.dtype)
    ys = []
    for start in range(0, T, chunk):
        qc, kc, vc = (
            q[:, start : start + chunk],
            k[:, start : start + chunk],
            v[:, start : start + chunk],
        )
        L = qc.shape[1]
        pos = torch.arange(L, device=v.device, dtype=v.dtype)[:, None]  # [L, 1]
        mid = (L - 1) / 2
        scores = torch.tril(qc @ kc.transpose(1, 2))  # [B, L, L], causal
        intra = torch.exp((pos - mid) * a) * (scores @ (vc * torch.exp((mid - pos) * a)))
        inter = torch.exp((pos + 1) * a) * (qc @ state)
        ys.append(intra + inter)
        state = torch.exp(L * a) * state + kc.transpose(1, 2) @ (vc * torch.exp((L - 1 - pos) * a))
    return torch.cat(ys, dim=1), state


def pdr_recurrent(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token PDR recurrence (same arguments and results as :func:`pdr_chunked`)."""
    B, T, r = q.shape
    if state is None:
        state = v.new_zeros(B, r, v.shape[-1])
    lam = torch.exp(log_decay.to(v.dtype))
    ys = []
    for t in range(T):
        state = state * lam + k[:, t, :, None] * v[:, t, None, :]
        ys.append((q[:, t, None, :] @ state).squeeze(1))
    return torch.stack(ys, dim=1), state


def _decay_init(d: int) -> Tensor:
    # Multi-scale memory: λ from 0.9 to 0.999 (timescales 10 .. 1000 tokens), log-spaced.
    one_minus = torch.exp(torch.linspace(math.log(0.1), math.log(0.001), d))
    lam = 1.0 - one_minus
    return torch.log(lam / one_minus)


class PDR(nn.Module):
    """PDR token mixer of one layer (see the module docstring for the definition)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, r = cfg.d_model, cfg.pdr_rank
        self.seed = cfg.pdr_seed + layer
        self.rank = r
        self.chunk = min(cfg.pdr_chunk, MAX_STABLE_CHUNK)
        self.w_v = nn.Linear(d, d, bias=False)
        self.w_g = nn.Linear(d, d, bias=False)
        self.w_o = nn.Linear(d, d, bias=False)
        self.decay_logit = nn.Parameter(_decay_init(d))
        self.eps = cfg.norm_eps
        self.register_buffer("proj_q", torch.empty(d, r), persistent=False)
        self.register_buffer("proj_k", torch.empty(d, r), persistent=False)
        self.reset_projections()

    @torch.no_grad()
    def reset_projections(self) -> None:
        """(Re)draw the fixed projections from the seed (call after ``to_empty``)."""
        d, r = self.proj_q.shape
        gen = torch.Generator().manual_seed(self.seed)
        p = torch.randn(2, d, r, generator=gen, dtype=torch.float32) / math.sqrt(d)
        self.proj_q.copy_(p[0])
        self.proj_k.copy_(p[1])

    def log_decay(self) -> Tensor:
        """``log λ`` per value channel, clamped to ``[MIN_LOG_DECAY, 0]``."""
        return F.logsigmoid(self.decay_logit).clamp(min=MIN_LOG_DECAY)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(q, k, v, g)`` for input ``x`` ``[B, T, d]``."""
        q = F.elu(x @ self.proj_q.to(x.dtype)) + 1.0
        k = (F.elu(x @ self.proj_k.to(x.dtype)) + 1.0) / self.rank
        return q, k, self.w_v(x), F.silu(self.w_g(x))

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mix tokens of ``x`` ``[B, T, d]`` causally.

        Args:
            x: normalised layer input.
            state: recurrent state ``[B, r, d]`` carried from earlier tokens, or None.

        Returns:
            ``(output [B, T, d], state after the last token)``.
        """
        q, k, v, g = self.features(x)
        # The scan runs in float32 (or float64) even under bf16 autocast: the two halves of
        # the split decay factor must cancel exactly, which bf16 exponents would not do.
        dtype = compute_dtype(v.dtype)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if state is not None:
                state = state.to(dtype)
            if x.shape[1] == 1 and state is not None:
                y, state = pdr_recurrent(q, k, v, self.log_decay(), state)
            else:
                y, state = pdr_chunked(q, k, v, self.log_decay(), self.chunk, state)
            y = rms_normalise(y, self.eps)
        return self.w_o(y.to(g.dtype) * g), state
