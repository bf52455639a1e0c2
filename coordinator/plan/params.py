"""Analytic parameter counts from a config, without allocating anything.

The counts follow the model's layout (``shared_model/model.py``; DESIGN §1, §8):

* untied token embedding and LM head: ``V·d`` each;
* two pre-norm RMSNorm gains per layer (``d`` each) and a final norm (``d``);
* GQA layer: ``q`` and ``o`` are ``d·d``, ``k`` and ``v`` are ``d·(n_kv·head_dim)``, plus
  its own SwiGLU FFN bank ``3·d·h``;
* PDR layer: value, gate and output projections ``3·d²`` plus a ``d``-sized decay vector
  (its keys/queries come from a fixed seeded projection, which is a buffer, not a
  parameter);
* dense mode: PDR layer ``i`` reuses FFN bank ``i mod n_gqa`` (tied, counted once);
* MoE mode: each PDR layer holds ``n_experts`` SwiGLU experts (``3·d·h`` each) and a
  router ``d·E``.

"Shared" parameters are everything that is not an expert and not a router: the dense
seed model of stage 1 is exactly the shared parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shared_model.config import PerspectiveConfig

#: Bytes per parameter held or sent in FP32 and in bf16.
FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class ParamCounts:
    """Per-component parameter counts of one config (all plain ints).

    Attributes:
        embedding: input token embedding ``V·d``.
        lm_head: output projection ``V·d`` (untied from the embedding).
        norms: all RMSNorm gains (two per layer plus the final norm).
        gqa_attention: one GQA layer's q, k, v, o projections.
        ffn: one SwiGLU FFN (an FFN bank, and also one expert): ``3·d·h``.
        pdr_mixer: one PDR layer's learned weights (value, gate, output, decay).
        router: one PDR layer's router ``d·E``.
        n_gqa: number of GQA layers (each owns one FFN bank).
        n_pdr: number of PDR layers (each holds ``n_experts`` experts in MoE mode).
        n_experts: experts per PDR layer.
        top_k: experts each token is routed to.
    """

    embedding: int
    lm_head: int
    norms: int
    gqa_attention: int
    ffn: int
    pdr_mixer: int
    router: int
    n_gqa: int
    n_pdr: int
    n_experts: int
    top_k: int

    @property
    def n_layers(self) -> int:
        """Total number of layers."""
        return self.n_gqa + self.n_pdr

    @property
    def gqa_layer(self) -> int:
        """One GQA layer with its FFN bank (norms excluded)."""
        return self.gqa_attention + self.ffn

    @property
    def shared(self) -> int:
        """Parameters that are neither experts nor routers (= the dense seed model)."""
        return (
            self.embedding
            + self.lm_head
            + self.norms
            + self.n_gqa * self.gqa_layer
            + self.n_pdr * self.pdr_mixer
        )

    @property
    def dense_total(self) -> int:
        """The dense model of stage 1 (PDR layers reuse the tied FFN banks)."""
        return self.shared

    @property
    def expert(self) -> int:
        """One expert FFN."""
        return self.ffn

    @property
    def column(self) -> int:
        """An expert column: expert ``e`` of every PDR layer (DESIGN §3)."""
        return self.n_pdr * self.ffn

    @property
    def experts_total(self) -> int:
        """All experts of all PDR layers."""
        return self.n_experts * self.column

    @property
    def routers(self) -> int:
        """All routers (one per PDR layer)."""
        return self.n_pdr * self.router

    @property
    def moe_total(self) -> int:
        """The whole MoE model: shared + experts + routers."""
        return self.shared + self.experts_total + self.routers

    @property
    def moe_active(self) -> int:
        """Parameters a token touches in MoE mode: shared + top_k experts per PDR layer
        + the routers."""
        return self.shared + self.top_k * self.column + self.routers

    @property
    def dense_per_use(self) -> int:
        """Weights a token multiplies through in the dense model, each use counted.

        The tied FFN banks run in every layer (80 times for the full preset), so the
        dense model's per-token matmul work is larger than its parameter count; the
        input embedding is a lookup, not a matmul, and norms are elementwise.
        """
        return (
            self.lm_head
            + self.n_gqa * self.gqa_attention
            + self.n_pdr * self.pdr_mixer
            + self.n_layers * self.ffn
        )

    @property
    def moe_per_use(self) -> int:
        """Weights a token multiplies through in MoE mode (lookup and norms excluded)."""
        return (
            self.lm_head
            + self.n_gqa * self.gqa_layer
            + self.n_pdr * (self.pdr_mixer + self.top_k * self.ffn + self.router)
        )

    def as_dict(self) -> dict[str, int]:
        """Components and totals as a flat dict (for JSON)."""
        out = asdict(self)
        for name in (
            "gqa_layer",
            "shared",
            "dense_total",
            "expert",
            "column",
            "experts_total",
            "routers",
            "moe_total",
            "moe_active",
            "dense_per_use",
            "moe_per_use",
        ):
            out[name] = getattr(self, name)
        return out


def count_params(cfg: PerspectiveConfig) -> ParamCounts:
    """Count the parameters of ``cfg``'s model analytically.

    Args:
        cfg: a validated config (any preset, including ``full``: nothing is allocated).

    Returns:
        The per-component counts; totals are properties of the result.
    """
    m = cfg.model
    d, v, h = m.d_model, m.vocab_size, m.ffn_hidden
    kv_dim = m.n_kv_heads * m.head_dim
    return ParamCounts(
        embedding=v * d,
        lm_head=v * d,
        norms=(2 * m.n_layers + 1) * d,
        gqa_attention=2 * d * d + 2 * d * kv_dim,
        ffn=3 * d * h,
        pdr_mixer=3 * d * d + d,
        router=d * cfg.moe.n_experts,
        n_gqa=m.n_gqa_layers,
        n_pdr=m.n_pdr_layers,
        n_experts=cfg.moe.n_experts,
        top_k=cfg.moe.top_k,
    )
