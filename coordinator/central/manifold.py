"""Stage 5, manifold alignment: experts placed on the 3-torus and routed by Voronoi cell.

Definitions (docs/stages.md §5 has the reasoning):

* **Expert distance.** ``D[e, f]`` = mean absolute difference of the concatenated
  ``w1, w2, w3`` weights of experts e and f of one PDR layer (L1 per parameter). The
  column distance is the mean of the per-layer matrices.
* **Layout.** Metric MDS to 3-D (classical-MDS start, then SMACOF), then one uniform
  scale + shift maps the cloud into ``[margin, 1 - margin]^3`` on the torus ``[0, 1)^3``.
* **Torus distance.** ``δ = (a - b) - round(a - b)`` per axis (wrap-around), ``d² = |δ|²``.
* **Manifold router.** ``z = sigmoid(W h)`` (a point of the torus); the token goes to the
  expert whose position is nearest (its Voronoi cell) with gate 1 in the forward pass.
  The arg-min has no gradient, so the gate is ``q_e / stopgrad(q_e)`` with the soft
  assignment ``q = softmax(-d² / T)``: value 1, gradient of ``q_e``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.moe import EXPERT_WEIGHTS, ModelError, MoEFFN


class ManifoldError(ValueError):
    """Invalid input to a manifold-alignment function."""


# --- distances and MDS ------------------------------------------------------------------


def expert_matrix(moe: MoEFFN) -> Tensor:
    """``[E, P]`` float32 matrix of the flattened ``w1, w2, w3`` weights of every expert."""
    rows = []
    for e in range(moe.n_experts):
        ex = moe.expert(e)
        rows.append(torch.cat([getattr(ex, w).weight.detach().reshape(-1) for w in EXPERT_WEIGHTS]))
    return torch.stack(rows).float()


def l1_distances(weights: Tensor, block: int = 1 << 20) -> Tensor:
    """Pairwise mean-absolute distances ``[E, E]`` of the rows of ``weights`` ``[E, P]``.

    Computed in column blocks so memory stays ``O(E² · block)`` for huge experts.
    """
    if weights.dim() != 2 or weights.shape[0] < 2:
        raise ManifoldError(f"need an [E>=2, P] weight matrix, got {tuple(weights.shape)}")
    n, p = weights.shape
    out = torch.zeros(n, n, dtype=torch.float64)
    step = max(1, block // n)
    for s in range(0, p, step):
        w = weights[:, s : s + step].double()
        out += (w[:, None, :] - w[None, :, :]).abs().sum(-1)
    return (out / p).float()


def classical_mds(dist: np.ndarray, dim: int = 3) -> np.ndarray:
    """Torgerson scaling: top eigenvectors of the double-centred squared distances."""
    n = dist.shape[0]
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (dist**2) @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dim]
    x = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    if x.shape[1] < dim:  # fewer points than dimensions
        x = np.pad(x, ((0, 0), (0, dim - x.shape[1])))
    return x


def stress(x: np.ndarray, dist: np.ndarray) -> float:
    """Normalised stress-1: ``sqrt(Σ (|x_i - x_j| - D_ij)² / Σ D_ij²)``."""
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return float(np.sqrt(((d - dist) ** 2).sum() / max((dist**2).sum(), 1e-300)))


def smacof(
    dist: np.ndarray, dim: int = 3, iters: int = 300, tol: float = 1e-7, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Metric MDS by SMACOF (Guttman transform), started from classical MDS.

    Args:
        dist: symmetric ``[n, n]`` non-negative distances with a zero diagonal.
        dim: output dimension.
        iters: maximum Guttman iterations; stops when stress improves by < ``tol``.
        seed: jitter for the start when classical MDS is degenerate (identical experts).

    Returns:
        ``(positions [n, dim], stress-1)``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1] or not np.isfinite(dist).all():
        raise ManifoldError("dist must be a finite square matrix")
    if (dist < 0).any() or not np.allclose(dist, dist.T, atol=1e-6 * max(dist.max(), 1e-12)):
        raise ManifoldError("dist must be symmetric and non-negative")
    n = dist.shape[0]
    x = classical_mds(dist, dim)
    rng = np.random.default_rng(seed)
    x = x + rng.normal(scale=1e-6 * max(dist.max(), 1e-12), size=x.shape)
    prev = stress(x, dist)
    for _ in range(iters):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        ratio = np.where(d > 1e-12, dist / np.maximum(d, 1e-12), 0.0)
        b = -ratio
        b[np.diag_indices(n)] = ratio.sum(1)
        x = b @ x / n
        cur = stress(x, dist)
        if prev - cur < tol:
            prev = cur
            break
        prev = cur
    return x, prev


def to_torus(x: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Map points into ``[margin, 1 - margin]^dim`` by one uniform scale and a shift.

    A single scale keeps the MDS geometry (ratios of distances). The margin keeps experts
    on opposite faces from becoming wrap-around neighbours: their torus distance is at
    least ``2·margin`` across the seam.
    """
    if not 0.0 <= margin < 0.5:
        raise ManifoldError(f"margin = {margin!r} is invalid: allowed 0 <= margin < 0.5")
    lo, hi = x.min(0), x.max(0)
    span = float((hi - lo).max())
    width = 1.0 - 2.0 * margin
    if span <= 1e-12:
        return np.full_like(x, 0.5)
    centre = (lo + hi) / 2.0
    return np.clip(0.5 + (x - centre) * (width / span), margin, 1.0 - margin)


def torus_delta(a: Tensor, b: Tensor) -> Tensor:
    """Wrap-around difference ``a - b`` on ``[0, 1)^k`` (each component in [-0.5, 0.5])."""
    d = a - b
    return d - torch.round(d)


def torus_sqdist(points: Tensor, positions: Tensor) -> Tensor:
    """Squared torus distances ``[N, E]`` between ``points [N, k]`` and ``positions [E, k]``."""
    return torus_delta(points[:, None, :], positions[None, :, :]).pow(2).sum(-1)


def torus_neighbours(positions: Tensor, k: int) -> Tensor:
    """``[E, k]`` indices of the k nearest other experts on the torus (nearest first)."""
    n = positions.shape[0]
    if not 1 <= k < n:
        raise ManifoldError(f"k = {k} neighbours is invalid: allowed 1 .. {n - 1}")
    d = torus_sqdist(positions, positions)
    d.fill_diagonal_(float("inf"))
    return torch.topk(d, k, largest=False).indices


# --- router --------------------------------------------------------------------------------


class ManifoldRouter(nn.Module):
    """Hidden state → point on the torus; experts sit at trainable torus positions."""

    def __init__(self, dim: int, positions: Tensor, temperature: float) -> None:
        super().__init__()
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ManifoldError(f"positions must be [E, 3], got {tuple(positions.shape)}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ManifoldError(f"temperature = {temperature!r} is invalid: allowed > 0")
        self.proj = nn.Linear(dim, 3)
        self.positions = nn.Parameter(positions.detach().clone().float())
        # A buffer, so the softness travels with the checkpoint.
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def point(self, h: Tensor) -> Tensor:
        """Torus point ``[N, 3]`` of hidden states ``[N, d]``."""
        return torch.sigmoid(self.proj(h.float()))

    def assign(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(hard index [N], soft assignment [N, E], points [N, 3])`` for ``h [N, d]``."""
        z = self.point(h)
        d2 = torus_sqdist(z, self.positions)
        soft = torch.softmax(-d2 / self.temperature, dim=-1)
        return d2.argmin(-1), soft, z


class ManifoldMoEFFN(MoEFFN):
    """A :class:`MoEFFN` routed by a :class:`ManifoldRouter` (Voronoi cells on the torus).

    Parameter names: ``router.proj.weight``, ``router.proj.bias``, ``router.positions``;
    experts keep their names. Column mode is unchanged.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, temperature: float = 0.01):
        super().__init__(dim, hidden, n_experts)
        self.router = ManifoldRouter(dim, torch.full((n_experts, 3), 0.5), temperature)
        self.last_points: Tensor | None = None

    @classmethod
    def from_moe(cls, moe: MoEFFN, positions: Tensor, temperature: float) -> ManifoldMoEFFN:
        """Wrap ``moe``'s experts (shared, not copied) with a manifold router."""
        if positions.shape[0] != moe.n_experts:
            raise ManifoldError(f"{positions.shape[0]} positions for {moe.n_experts} experts")
        dim = moe.router.in_features
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.n_experts = moe.n_experts
        out.router = ManifoldRouter(dim, positions, temperature).to(moe.router.weight.device)
        out.experts = moe.experts
        out.last_points = None
        return out

    def forward(self, x: Tensor, columns: Tensor | None = None) -> tuple[Tensor, dict | None]:
        """Route each token to its nearest expert on the torus (gate 1, soft gradient)."""
        if columns is not None:
            return self._by_column(x, columns), None
        flat = x.reshape(-1, x.shape[-1])
        index, soft, z = self.router.assign(flat)
        q = soft.gather(1, index[:, None]).squeeze(1)
        gate = q / q.detach()
        self.last_points = z.view(*x.shape[:-1], 3)
        out = self._dispatch(flat, index) * gate.to(x.dtype)[:, None]
        return out.view_as(x), {"probs": soft, "index": index}


def manifold_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose FFN is a :class:`ManifoldMoEFFN`."""
    return [
        i for i, b in enumerate(model.layers) if isinstance(getattr(b, "ffn", None), ManifoldMoEFFN)
    ]


def install_manifold_routers(
    model: nn.Module, positions: dict[int, Tensor], temperature: float | dict[int, float]
) -> None:
    """Replace the router of each MoE layer named in ``positions`` by a manifold router."""
    for i, pos in positions.items():
        ffn = getattr(model.layers[i], "ffn", None)
        if not isinstance(ffn, MoEFFN):
            raise ModelError(f"layer {i} has no MoE FFN to align")
        t = temperature[i] if isinstance(temperature, dict) else temperature
        model.layers[i].ffn = ManifoldMoEFFN.from_moe(ffn, pos, t)


def is_manifold_state(state: dict[str, Tensor]) -> bool:
    """Whether a model state dict comes from a stage-5 (manifold-routed) model."""
    return any(k.endswith(".ffn.router.positions") for k in state)


def build_manifold_model(cfg, state: dict[str, Tensor] | None = None) -> nn.Module:
    """A MoE :class:`PerspectiveModel` with manifold routers (for loading stage-5 weights)."""
    from shared_model.model import PerspectiveModel

    model = PerspectiveModel(cfg, moe=True)
    pos = {i: torch.full((cfg.moe.n_experts, 3), 0.5) for i in cfg.model.pdr_layers()}
    install_manifold_routers(model, pos, 0.01)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def default_temperature(positions: Tensor, factor: float = 0.5) -> float:
    """``factor`` × mean squared torus distance from each expert to its nearest neighbour."""
    d = torus_sqdist(positions, positions)
    d.fill_diagonal_(float("inf"))
    return float(factor * d.min(1).values.mean().clamp_min(1e-8))


def load_stats(index: Tensor, n: int) -> dict[str, float]:
    """Balance of hard assignments: ``max/mean`` load and coefficient of variation."""
    counts = torch.bincount(index.reshape(-1), minlength=n).double()
    mean = counts.mean().clamp_min(1e-12)
    return {"max_over_mean": float(counts.max() / mean), "cv": float(counts.std() / mean)}


# --- losses --------------------------------------------------------------------------------


def delta_loss(positions: Tensor, dist: Tensor, sigma2: float) -> Tensor:
    """Proximity-weighted L1 between experts: ``Σ w_ef D_ef / Σ w_ef``, ``w = exp(-d²/σ²)``.

    ``D`` is normalised by its mean off-diagonal value, so the loss is 1 when proximity
    ignores weight similarity and < 1 when neighbours on the torus are similar experts.
    """
    d2 = torus_sqdist(positions, positions)
    off = ~torch.eye(positions.shape[0], dtype=torch.bool, device=positions.device)
    w = torch.exp(-d2 / sigma2)[off]
    dn = (dist / dist[off].mean().clamp_min(1e-12))[off]
    return (w * dn).sum() / w.sum().clamp_min(1e-12)


def balance_var_loss(soft: Tensor) -> Tensor:
    """``E² · Var(load)`` of the soft Voronoi loads (0 when every cell gets 1/E of tokens)."""
    load = soft.mean(0)
    n = soft.shape[1]
    return n * n * ((load - 1.0 / n) ** 2).mean()


def smooth_loss(points: Tensor) -> Tensor:
    """Mean squared torus distance between router points of adjacent tokens ``[B, T, 3]``."""
    if points.shape[1] < 2:
        return points.new_zeros(())
    return torus_delta(points[:, 1:], points[:, :-1]).pow(2).sum(-1).mean()


def tetrahedra(positions: Tensor) -> Tensor:
    """``[E, 4]`` tetrahedra: each expert with its 3 nearest torus neighbours."""
    return torch.cat([torch.arange(positions.shape[0])[:, None], torus_neighbours(positions, 3)], 1)


def signed_volumes(positions: Tensor, tets: Tensor) -> Tensor:
    """Signed volumes (×6) of tetrahedra, edges taken as wrap-around differences."""
    base = positions[tets[:, 0]]
    edges = torch.stack([torus_delta(positions[tets[:, k]], base) for k in (1, 2, 3)], 1)
    return torch.linalg.det(edges)


def fold_loss(positions: Tensor, tets: Tensor, ref_volumes: Tensor) -> Tensor:
    """Penalty on updates that fold the layout: tetrahedra whose orientation flips.

    A fold is an update after which a tetrahedron of neighbouring experts (fixed at the
    start of stage 5) has changed the sign of its volume, i.e. the map has turned inside
    out locally. Loss: ``mean relu(-sign(V0)·V) / mean|V0|`` (0 while no tetrahedron is
    inverted; volumes merely shrinking are allowed).
    """
    v = signed_volumes(positions, tets)
    scale = ref_volumes.abs().mean().clamp_min(1e-12)
    return F.relu(-torch.sign(ref_volumes) * v).mean() / scale
