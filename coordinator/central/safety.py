"""Stage 6, safety polytope (SPP): a convex region of "safe" representations.

Construction (docs/stages.md §6):

1. **Safe vocabulary**: the first ``vocab_size`` words of ``assets/safe_words.txt``.
2. **Representation** of a text: the mean over its tokens of the model's final hidden state
   (output of the last RMSNorm, ``source="final"``) or of its token embeddings
   (``source="embedding"``); d_model dimensions.
3. **Anchors**: k-means (k-means++ start, Lloyd iterations) of the safe words' representations.
4. **Outer polytope**: n half-spaces ``u_j·x <= b_j`` with ``b_j = max_a u_j·a`` over anchors
   (the supporting half-space in direction ``u_j``). Directions: ± the first principal axes
   of the anchors (a quarter of n, at most d of them), the rest random unit vectors (seeded).
5. **Score** ``s(x) = max_j (u_j·x - b_j) / r`` with r the RMS radius of the anchors around
   their mean: ≤ 0 inside, distance-like outside. **Blocked** iff ``s(x) > ε``; ε inflates
   the polytope by ``ε·r`` along every normal.
6. **Calibration**: the largest ε whose block rate on the red-team set reaches the target.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared_model.files import atomic_path


class SafetyError(ValueError):
    """Invalid SPP input or file."""


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``coordinator/central/assets``."""
    return Path(str(resources.files("coordinator.central") / "assets" / name))


def read_words(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Words of a word list (one per line, ``#`` comments skipped), first ``limit`` of them."""
    path = Path(path) if path is not None else asset_path("safe_words.txt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SafetyError(f"cannot read word list {path}: {exc.strerror}") from exc
    words = [w.strip() for w in lines if w.strip() and not w.startswith("#")]
    if not words:
        raise SafetyError(f"word list {path} has no words")
    return words[:limit] if limit is not None else words


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` fields of a JSONL file.

    Raises:
        SafetyError: unreadable file, bad JSON or a line without a string ``prompt``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SafetyError(f"cannot read prompt set {path}: {exc.strerror}") from exc
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SafetyError(f"{path}:{n}: expected a JSON object with a 'prompt'") from exc
        if not isinstance(prompt, str) or not prompt:
            raise SafetyError(f"{path}:{n}: 'prompt' must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise SafetyError(f"prompt set {path} is empty")
    return prompts


class HiddenCapture:
    """Context manager capturing the representation hidden states of a model's forward."""

    def __init__(self, model: torch.nn.Module, source: str = "final") -> None:
        if source not in ("final", "embedding"):
            raise SafetyError(f"source = {source!r} is invalid: allowed final, embedding")
        self.module = model.norm if source == "final" else model.tok_emb
        self.last: Tensor | None = None
        self._hook = None

    def __enter__(self) -> HiddenCapture:
        self._hook = self.module.register_forward_hook(self._store)
        return self

    def _store(self, module, args, output) -> None:
        self.last = output.detach().float()

    def __exit__(self, *exc) -> None:
        self._hook.remove()


@torch.no_grad()
def text_representations(model, tokenizer, texts: list[str], source: str = "final") -> Tensor:
    """``[N, d]`` mean hidden state of each text (texts batched by token length)."""
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if any(not i for i in ids):
        raise SafetyError("a text encodes to no tokens; remove empty texts")
    device = next(model.parameters()).device
    out = torch.empty(len(texts), model.cfg.model.d_model)
    max_len = model.cfg.model.max_seq_len
    by_len: dict[int, list[int]] = {}
    for n, i in enumerate(ids):
        by_len.setdefault(min(len(i), max_len), []).append(n)
    with HiddenCapture(model, source) as cap:
        for length, rows in by_len.items():
            for s in range(0, len(rows), 256):
                chunk = rows[s : s + 256]
                batch = torch.tensor([ids[r][:length] for r in chunk], device=device)
                model(batch)
                out[chunk] = cap.last.mean(1).cpu()
    return out


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> Tensor:
    """k-means centroids ``[k, d]`` (k-means++ start, Lloyd iterations, empty cells reseeded)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise SafetyError(f"k = {k} anchors is invalid for {n} points: allowed 1 .. {n}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = torch.cdist(x, centres).pow(2).squeeze(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = x[torch.multinomial(probs, 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).pow(2).squeeze(1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.allclose(new, centres):
            break
        centres = new
    return centres


def polytope_directions(anchors: Tensor, n: int, seed: int = 0) -> Tensor:
    """``[n, d]`` unit normals: ± the leading principal axes (n/4 of them), then random."""
    d = anchors.shape[1]
    centred = anchors - anchors.mean(0)
    n_pca = min(d, n // 4, max(anchors.shape[0] - 1, 0))
    dirs = []
    if n_pca:
        axes = torch.linalg.svd(centred, full_matrices=False).Vh[:n_pca]
        dirs += [axes, -axes]
    rest = n - 2 * n_pca
    gen = torch.Generator().manual_seed(seed)
    dirs.append(torch.randn(rest, d, generator=gen))
    u = torch.cat(dirs)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class SafetyPolytope:
    """Half-spaces ``u·x <= b + ε·r`` around safe anchors; :meth:`check` scores hidden states."""

    directions: Tensor
    offsets: Tensor
    anchors: Tensor
    radius: float
    eps: float = 0.0
    source: str = "final"
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, anchors: Tensor, n_halfspaces: int, source: str = "final", seed: int = 0):
        """Outer polytope of ``anchors`` with ``n_halfspaces`` supporting half-spaces."""
        if n_halfspaces < 1:
            raise SafetyError(f"n_halfspaces = {n_halfspaces} is invalid: allowed >= 1")
        u = polytope_directions(anchors, n_halfspaces, seed)
        b = (anchors @ u.T).max(0).values
        radius = float((anchors - anchors.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
        return cls(u, b, anchors, radius, 0.0, source)

    def score(self, hidden: Tensor) -> Tensor:
        """Scaled violation ``max_j (u_j·x - b_j) / r`` for ``hidden [..., d]`` (≤ 0 inside)."""
        if hidden.shape[-1] != self.directions.shape[1]:
            raise SafetyError(
                f"hidden size {hidden.shape[-1]} != polytope dimension {self.directions.shape[1]}"
            )
        u = self.directions.to(hidden.device)
        b = self.offsets.to(hidden.device)
        return ((hidden.float() @ u.T) - b).max(-1).values / self.radius

    def check(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``(blocked bool mask [...], score [...])`` for hidden states ``[..., d]``."""
        s = self.score(hidden)
        return s > self.eps, s

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"radius": self.radius, "eps": self.eps, "source": self.source, **self.meta}
        tensors = {"directions": self.directions, "offsets": self.offsets, "anchors": self.anchors}
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(tmp), {"spp": json.dumps(meta)}
            )

    @classmethod
    def load(cls, path: str | Path) -> SafetyPolytope:
        """Read a file written by :meth:`save`.

        Raises:
            SafetyError: not an SPP file.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["spp"])
                t = {k: f.get_tensor(k) for k in ("directions", "offsets", "anchors")}
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise SafetyError(f"{path} is not a safety-polytope file: {exc}") from exc
        radius, eps, source = meta.pop("radius"), meta.pop("eps"), meta.pop("source")
        return cls(t["directions"], t["offsets"], t["anchors"], radius, eps, source, meta)


def calibrate_eps(red_scores: Tensor, target: float) -> float:
    """Largest ε with ``mean(red_scores > ε) >= target``: just below the k-th largest score."""
    if not 0 < target <= 1:
        raise SafetyError(f"target = {target!r} is invalid: allowed 0 < target <= 1")
    # float32 throughout: scores are float32, so ε must be the float32 just below s_k.
    s = torch.sort(red_scores.float(), descending=True).values
    k = math.ceil(target * s.numel() - 1e-9)
    return float(torch.nextafter(s[k - 1], torch.tensor(-math.inf)))


def block_rate(scores: Tensor, eps: float) -> float:
    """Fraction of scores above ε."""
    return float((scores > eps).float().mean())
