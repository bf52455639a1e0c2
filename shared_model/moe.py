"""Mixture-of-experts FFN of the PDR layers, expert naming, and stage-2 expert init.

Parameter naming is an API (checkpoints, codec, coordinator and participants use it):

* expert e of layer i: ``layers.{i}.ffn.experts.{e}.{w1,w2,w3}.weight``
* router of layer i:   ``layers.{i}.ffn.router.weight``

An *expert column* e is expert e in every PDR layer (DESIGN §3).

Two routing modes:

* **token-level top-1** (centralised training, inference): a linear router ``d → E``,
  softmax, each token goes to its arg-max expert. The output is multiplied by
  ``p / stop_grad(p)`` — exactly 1 in value, the Switch Transformer's ``p`` in gradient —
  so the router learns as in Switch, but a stage-2 model (every expert a clone of its FFN
  bank) computes exactly what the dense model did instead of scaling every FFN by ~1/E
  (that scaling had raised `small`'s validation loss from 4.04 to 5.09 at stage 2).
* **column mode** (federated, document-level routing): every token of sequence b goes
  through expert ``columns[b]`` with gate 1 (Branch-Train-Mix style); the router is not
  evaluated and experts not named in ``columns`` are never touched, so a participant's
  model may hold only its own columns (``PerspectiveModel(cfg, moe=True, columns=[...])``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from shared_model.config import PerspectiveConfig
from shared_model.layers import SwiGLU, swiglu
from shared_model.ternary import ternary_ste_stacked

EXPERT_WEIGHTS = ("w1", "w2", "w3")
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


class ModelError(ValueError):
    """Invalid model input or model operation (shapes, columns, state dicts)."""


def expert_param_names(cfg: PerspectiveConfig, column: int) -> list[str]:
    """Names of the parameters of expert column ``column`` (all PDR layers, w1/w2/w3)."""
    if not (0 <= column < cfg.moe.n_experts):
        raise ModelError(f"column {column} is invalid: allowed 0 .. {cfg.moe.n_experts - 1}")
    return [
        f"layers.{i}.ffn.experts.{column}.{w}.weight"
        for i in cfg.model.pdr_layers()
        for w in EXPERT_WEIGHTS
    ]


def is_expert_param(name: str) -> tuple[bool, int | None]:
    """Whether ``name`` is an expert weight, and its column if so."""
    m = _EXPERT_RE.match(name)
    return (True, int(m.group(2))) if m else (False, None)


class MoEFFN(nn.Module):
    """Top-1 routed SwiGLU experts of one PDR layer."""

    def __init__(self, dim: int, hidden: int, n_experts: int, columns: list[int] | None = None):
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(dim, n_experts, bias=False)
        held = range(n_experts) if columns is None else sorted(set(columns))
        # ModuleDict keyed "0".."E-1" gives the same names as a ModuleList but allows holes.
        self.experts = nn.ModuleDict({str(e): SwiGLU(dim, hidden) for e in held})

    def expert(self, e: int) -> SwiGLU:
        """Expert ``e``; raises ModelError if this model does not hold it."""
        key = str(e)
        if key not in self.experts:
            raise ModelError(
                f"expert {e} is not held by this model (held: {sorted(map(int, self.experts))}); "
                "build the model with all experts or route only to held columns"
            )
        return self.experts[key]

    def forward(self, x: Tensor, columns: Tensor | None = None) -> tuple[Tensor, dict | None]:
        """Apply the experts to ``x`` ``[B, T, d]``.

        Returns:
            ``(output, stats)``; stats is ``{"probs": [B*T, E], "index": [B*T]}`` for
            token-level routing and None in column mode.
        """
        if columns is not None:
            return self._by_column(x, columns), None
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        gate, index = probs.max(dim=-1)
        out = self._dispatch(flat, index)
        scale = gate / gate.detach()  # 1 in value, d(gate) in gradient (see module doc)
        out = out * scale.to(out.dtype)[:, None]
        return out.view(*x.shape[:-1], -1), {"probs": probs, "index": index}

    def _weights(self, used: list[int]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """(w1, w2, w3) of the used experts; ternary-STE'd together when training ternary."""
        experts = [self.expert(e) for e in used]
        fraction = experts[0].ternary_fraction if experts else None
        if fraction is None:
            return {
                e: (x.w1.weight, x.w2.weight, x.w3.weight)
                for e, x in zip(used, experts, strict=True)
            }
        factor = experts[0].threshold_factor
        quantised = [
            ternary_ste_stacked([getattr(x, w).weight for x in experts], fraction, factor)
            for w in EXPERT_WEIGHTS
        ]
        return {e: (quantised[0][j], quantised[1][j], quantised[2][j]) for j, e in enumerate(used)}

    def _dispatch(self, flat: Tensor, index: Tensor) -> Tensor:
        # Sort tokens by expert so each expert runs one dense matmul on its own tokens.
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=self.n_experts).tolist()
        pieces = flat.index_select(0, order).split(counts)
        used = [e for e, n in enumerate(counts) if n]
        weights = self._weights(used)
        outs = torch.cat([swiglu(pieces[e], *weights[e]) for e in used])
        # outs may be bf16 under autocast: build the result in its dtype
        return outs.new_zeros(outs.shape).index_copy(0, order, outs)

    def _by_column(self, x: Tensor, columns: Tensor) -> Tensor:
        outs, rows = [], []
        used = torch.unique(columns).tolist()
        weights = self._weights(used)
        for c in used:
            sel = (columns == c).nonzero().squeeze(1)
            rows.append(sel)
            outs.append(swiglu(x.index_select(0, sel), *weights[c]))
        outs = torch.cat(outs)
        return outs.new_zeros(outs.shape).index_copy(0, torch.cat(rows), outs)


def check_columns(columns: Tensor, batch: int, n_experts: int) -> None:
    """Validate a ``columns`` argument: integer tensor ``[B]`` with values in ``[0, E)``."""
    if not isinstance(columns, Tensor) or columns.dtype not in (torch.int32, torch.int64):
        raise ModelError("columns must be an integer (Long) tensor with one column per sequence")
    if columns.shape != (batch,):
        raise ModelError(f"columns has shape {tuple(columns.shape)}, expected ({batch},)")
    if batch and (columns.min() < 0 or columns.max() >= n_experts):
        raise ModelError(f"columns values must be in 0 .. {n_experts - 1}")


@torch.no_grad()
def init_experts_from_dense(
    dense_model: nn.Module,
    moe_model: nn.Module,
    noise_std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Stage 2: copy the dense model into a MoE model, cloning FFN banks into experts.

    Every shared parameter is copied by name; expert e of PDR layer i becomes a copy of
    FFN bank ``i % n_gqa_layers`` plus optional Gaussian noise (absolute std
    ``noise_std``, default ``cfg.moe.clone_noise_std``). Routers keep their own init.

    Returns:
        ``moe_model`` (modified in place).
    """
    cfg = moe_model.cfg
    if not getattr(moe_model, "moe", False) or getattr(dense_model, "moe", True):
        raise ModelError("init_experts_from_dense needs a dense source and a MoE destination")
    if dense_model.cfg.model != cfg.model:
        raise ModelError("dense and MoE models have different model configs")
    noise = cfg.moe.clone_noise_std if noise_std is None else noise_std
    dst = dict(moe_model.named_parameters())
    for name, param in dense_model.named_parameters():
        if name not in dst:
            raise ModelError(f"dense parameter {name} has no counterpart in the MoE model")
        dst[name].copy_(param)
    for i in cfg.model.pdr_layers():
        bank = dense_model.ffn_for(i)
        for expert in moe_model.layers[i].ffn.experts.values():
            for w in EXPERT_WEIGHTS:
                src = getattr(bank, w).weight
                value = src.clone()
                if noise > 0:
                    value += noise * torch.randn(
                        src.shape, generator=generator, dtype=src.dtype
                    ).to(src.device)
                getattr(expert, w).weight.copy_(value)
    return moe_model
