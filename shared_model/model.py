"""The Perspective language model (nanoGPT-style, readable).

Layout (DESIGN §1, §8): untied token embedding and LM head, ``n_layers`` pre-norm residual
blocks, final RMSNorm. Layer ``i`` mixes tokens with windowed GQA when
``(i + 1) % gqa_every == 0`` (:mod:`shared_model.attention`), otherwise with PDR
(:mod:`shared_model.pdr`). Every block then applies a SwiGLU FFN:

* **dense** mode: GQA layer k owns FFN bank k (``layers.{i}.ffn``); PDR layer ``i`` reuses
  bank ``i % n_gqa_layers`` (the very same module, so counted and stored once);
* **MoE** mode: PDR layers own a :class:`~shared_model.moe.MoEFFN` (router + experts);
  GQA layers keep their dense bank.

Incremental decoding uses an :class:`InferenceCache` (PDR recurrent state + GQA KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from shared_model.attention import KVCache, WindowedGQA
from shared_model.config import PerspectiveConfig
from shared_model.layers import RMSNorm, SwiGLU
from shared_model.losses import balance_loss, lm_loss
from shared_model.moe import (
    ModelError,
    MoEFFN,
    check_columns,
    expert_param_names,
    init_experts_from_dense,
    is_expert_param,
)
from shared_model.pdr import PDR

__all__ = [
    "InferenceCache",
    "ModelError",
    "ModelOutput",
    "PerspectiveModel",
    "expert_param_names",
    "init_experts_from_dense",
    "is_expert_param",
]


@dataclass
class ModelOutput:
    """Result of :meth:`PerspectiveModel.forward`.

    Attributes:
        logits: ``[B, T, V]``.
        loss: mean LM cross-entropy when targets were given, else None.
        aux: router statistics of token-level MoE routing (empty otherwise):
            ``router_probs`` / ``expert_index``: per MoE layer ``[B*T, E]`` / ``[B*T]``;
            ``prob_mean`` / ``token_fraction``: ``[n_moe_layers, E]``;
            ``balance_loss``: mean over layers of ``E·Σ f_i P_i`` (1 when uniform).
    """

    logits: Tensor
    loss: Tensor | None = None
    aux: dict = field(default_factory=dict)


@dataclass
class InferenceCache:
    """Decoding state: next absolute position and one entry per layer (PDR state or KV)."""

    pos: int = 0
    layers: list = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: PerspectiveConfig, layer: int, ffn: nn.Module | None) -> None:
        super().__init__()
        m = cfg.model
        self.is_gqa = m.is_gqa_layer(layer)
        self.mixer_norm = RMSNorm(m.d_model, m.norm_eps)
        self.mixer = WindowedGQA(m) if self.is_gqa else PDR(m, layer)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
        if ffn is not None:  # dense PDR layers borrow their bank from a GQA block instead
            self.ffn = ffn

    def forward(
        self,
        x: Tensor,
        ffn: nn.Module,
        positions: Tensor,
        state: Tensor | KVCache | None,
        use_cache: bool,
        columns: Tensor | None,
    ) -> tuple[Tensor, Tensor | KVCache | None, dict | None]:
        """Apply the block; ``ffn`` is this layer's FFN (a shared bank for dense PDR layers).

        Returns:
            ``(x, new layer state (PDR state or KV cache), router stats or None)``.
        """
        h = self.mixer_norm(x)
        if self.is_gqa:
            h, state = self.mixer(h, positions, state, use_cache)
        else:
            h, state = self.mixer(h, state)
        x = x + h
        h = self.ffn_norm(x)
        stats = None
        if isinstance(ffn, MoEFFN):
            h, stats = ffn(h, columns)
        else:
            h = ffn(h)
        return x + h, state, stats


class PerspectiveModel(nn.Module):
    """Perspective LM in dense (stage 1) or MoE (stages 2+) mode.

    Args:
        cfg: validated config (:func:`shared_model.config_loading.load_config`).
        moe: build MoE FFNs in the PDR layers.
        columns: MoE only; hold just these expert columns (federated participants).
    """

    def __init__(
        self, cfg: PerspectiveConfig, moe: bool = False, columns: list[int] | None = None
    ) -> None:
        super().__init__()
        m = cfg.model
        self.cfg, self.moe = cfg, moe
        if columns is not None and not moe:
            raise ModelError("columns=... only makes sense for a MoE model (moe=True)")
        if columns is not None and any(not 0 <= c < cfg.moe.n_experts for c in columns):
            raise ModelError(f"columns {columns} must be in 0 .. {cfg.moe.n_experts - 1}")
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        layers = []
        for i in range(m.n_layers):
            if m.is_gqa_layer(i):
                ffn = SwiGLU(m.d_model, m.ffn_hidden)
            elif moe:
                ffn = MoEFFN(m.d_model, m.ffn_hidden, cfg.moe.n_experts, columns)
            else:
                ffn = None
            layers.append(Block(cfg, i, ffn))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self._bank_owner = {k: i for k, i in enumerate(m.gqa_layers())}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std); residual output projections / sqrt(2·n_layers)."""
        std = self.cfg.model.init_std
        out_std = std / math.sqrt(2 * self.cfg.model.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms and PDR decays keep their constructor init
            last = name.rsplit(".", 2)[-2]
            nn.init.normal_(p, 0.0, out_std if last in ("w_o", "wo", "w2") else std)

    def ffn_for(self, layer: int) -> nn.Module:
        """The FFN module used by ``layer`` (a shared bank for dense PDR layers)."""
        block = self.layers[layer]
        if hasattr(block, "ffn"):
            return block.ffn
        return self.layers[self._bank_owner[self.cfg.model.ffn_bank(layer)]].ffn

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        columns: Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            idx: ``[B, T]`` token ids.
            targets: ``[B, T]`` next-token ids for the LM loss (optional).
            columns: ``[B]`` expert column per sequence (MoE column mode), or None for
                token-level top-1 routing.
            cache: decoding state; updated in place (``pos`` advances by T).

        Returns:
            :class:`ModelOutput`.
        """
        self._check_inputs(idx, targets, columns)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        if cache is not None and not cache.layers:
            cache.layers = [None] * len(self.layers)
        x = self.tok_emb(idx)
        router_stats = []
        for i, block in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            x, state, stats = block(
                x, self.ffn_for(i), positions, state, cache is not None, columns
            )
            if cache is not None:
                cache.layers[i] = state
            if stats is not None:
                router_stats.append(stats)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        loss = lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits, loss, self._aux(router_stats))

    def _check_inputs(self, idx: Tensor, targets: Tensor | None, columns: Tensor | None) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ModelError(
                f"idx must be an integer tensor [B, T], got {idx.dtype} {tuple(idx.shape)}"
            )
        if bool(((idx < 0) | (idx >= self.cfg.model.vocab_size)).any()):  # one host sync
            raise ModelError(f"token ids must be in 0 .. {self.cfg.model.vocab_size - 1}")
        if targets is not None and targets.shape != idx.shape:
            raise ModelError(f"targets {tuple(targets.shape)} must match idx {tuple(idx.shape)}")
        if columns is not None:
            if not self.moe:
                raise ModelError("columns=... needs a MoE model; this one is dense")
            check_columns(columns, idx.shape[0], self.cfg.moe.n_experts)

    def _aux(self, router_stats: list[dict]) -> dict:
        if not router_stats:
            return {}
        n = self.cfg.moe.n_experts
        probs = [s["probs"] for s in router_stats]
        index = [s["index"] for s in router_stats]
        fraction = torch.stack(
            [torch.bincount(i, minlength=n).float() / max(i.numel(), 1) for i in index]
        )
        balance = torch.stack([balance_loss(p, i, n) for p, i in zip(probs, index, strict=True)])
        return {
            "router_probs": probs,
            "expert_index": index,
            "prob_mean": torch.stack([p.mean(0) for p in probs]),
            "token_fraction": fraction,
            "balance_loss": balance.mean(),
        }

    # --- experts ---------------------------------------------------------------------------

    def set_ternary_fraction(self, fraction: float | None) -> None:
        """Route expert FFN weights through progressive ternary STE (None = full precision).

        Only expert FFNs are affected (shared FFN banks stay full precision); a dense
        model has no experts, so this is a no-op there.
        """
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ModelError(f"ternary fraction {fraction!r} is invalid: allowed 0 .. 1 or None")
        for module in self.modules():
            if isinstance(module, MoEFFN):
                for expert in module.experts.values():
                    expert.ternary_fraction = fraction
                    expert.threshold_factor = self.cfg.ternary.threshold_factor

    def expert_state(self, column: int) -> dict[str, Tensor]:
        """Detached tensors (sharing storage) of expert column ``column``."""
        params = dict(self.named_parameters())
        names = expert_param_names(self.cfg, column)
        missing = [n for n in names if n not in params]
        if missing:
            raise ModelError(f"this model does not hold column {column} ({missing[0]} missing)")
        return {n: params[n].detach() for n in names}

    def shared_state(self) -> dict[str, Tensor]:
        """Every state-dict entry that is not an expert weight (routers included)."""
        return {k: v for k, v in self.state_dict().items() if not is_expert_param(k)[0]}

    @torch.no_grad()
    def load_expert_state(self, column: int, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from :meth:`expert_state`) into expert column ``column``.

        Raises:
            ModelError: missing/unexpected names or shape mismatch (nothing is changed).
        """
        own = self.expert_state(column)
        if set(state) != set(own):
            extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
            raise ModelError(
                f"column {column} state mismatch: missing {missing}, unexpected {extra}"
            )
        for name, value in state.items():
            if value.shape != own[name].shape:
                raise ModelError(
                    f"{name}: shape {tuple(value.shape)} != expected {tuple(own[name].shape)}"
                )
        for name, value in state.items():
            own[name].copy_(value)

    @classmethod
    def from_weights(
        cls,
        cfg: PerspectiveConfig,
        shared: dict[str, Tensor],
        columns: dict[int, dict[str, Tensor]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PerspectiveModel:
        """A MoE model over ``columns`` holding exactly these weights (see
        :meth:`load_weights`), allocated once, on ``device`` (default CPU) in ``dtype``
        (default FP32).

        Built on the meta device: no weight is drawn at random only to be overwritten, and
        none is held twice on the way (the FP32 CPU model a GPU node used to build first
        was the teacher's whole size again, 157 GB for a `full` node's four columns).
        """
        with torch.device("meta"):
            model = cls(cfg, moe=True, columns=sorted(columns))
        if dtype is not None:
            model.to(dtype=dtype)
        model.to_empty(device=device or "cpu")
        for module in model.modules():
            if isinstance(module, PDR):
                module.reset_projections()  # fixed buffers, not weights: drawn from the seed
        model.load_weights(shared, columns)
        return model

    @torch.no_grad()
    def load_weights(self, shared: dict[str, Tensor], columns: dict[int, dict[str, Tensor]]):
        """Copy ``shared`` (every weight but the experts', as :meth:`shared_state` gives)
        and each column's expert state (:meth:`expert_state`) into this model.

        Columns the model holds and ``columns`` does not name keep their weights.

        Raises:
            ModelError: a shared weight missing or unexpected, or a column's state does not
                fit.
        """
        missing, unexpected = self.load_state_dict(shared, strict=False)
        missing = [k for k in missing if not is_expert_param(k)[0]]
        if missing or unexpected:
            raise ModelError(
                f"the shared weights do not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for column, state in columns.items():
            self.load_expert_state(column, state)

    def to_moe(self, noise_std: float | None = None, generator=None) -> PerspectiveModel:
        """Stage 2: a new MoE model whose experts are clones of this dense model's banks."""
        moe = PerspectiveModel(self.cfg, moe=True).to(next(self.parameters()).device)
        return init_experts_from_dense(self, moe, noise_std, generator)

    def num_parameters(self, kind: str = "total") -> int:
        """Count parameters (tied modules once).

        Args:
            kind: ``total``, ``shared`` (everything but expert weights, routers included),
                ``experts`` (all expert weights held), or ``embeddings``.
        """
        kinds = {
            "total": lambda n: True,
            "shared": lambda n: not is_expert_param(n)[0],
            "experts": lambda n: is_expert_param(n)[0],
            "embeddings": lambda n: n.startswith(("tok_emb.", "lm_head.")),
        }
        if kind not in kinds:
            raise ModelError(f"kind {kind!r} is invalid: allowed {', '.join(kinds)}")
        return sum(p.numel() for n, p in self.named_parameters() if kinds[kind](n))
