"""Stage 6 runner (``run_spp``) and polytope-guarded generation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.central.safety import (
    HiddenCapture,
    SafetyError,
    SafetyPolytope,
    asset_path,
    block_rate,
    calibrate_eps,
    kmeans,
    read_prompts,
    read_words,
    text_representations,
)
from shared_model.files import write_json_atomic


@dataclass(frozen=True)
class SppParams:
    """Stage-6 settings (docs/stages.md §6)."""

    vocab_size: int = 5000
    anchors: int = 1000
    halfspaces: int = 500
    target: float = 0.98
    source: str = "final"
    seed: int = 0
    words: str | None = None
    redteam: str | None = None
    benign: str | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.anchors < 1 or self.halfspaces < 1:
            raise SafetyError("vocab_size, anchors and halfspaces must be >= 1")
        if not 0 < self.target <= 1:
            raise SafetyError(f"target = {self.target!r} is invalid: allowed 0 < target <= 1")


def split_redteam(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the calibration and held-out halves of ``n`` red-team prompts.

    A seeded permutation, so the split is the same for every run with the same seed.

    Raises:
        SafetyError: Fewer than 2 prompts (nothing could be held out).
    """
    if n < 2:
        raise SafetyError(f"the red-team set has {n} prompt(s); at least 2 are needed")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = (n + 1) // 2
    return order[:half].sort().values, order[half:].sort().values


def build_spp(model, tokenizer, p: SppParams) -> tuple[SafetyPolytope, dict[str, Any]]:
    """Build and calibrate a polytope for ``model``; returns it and its report."""
    t0 = time.perf_counter()
    words = read_words(p.words, p.vocab_size)
    reps = text_representations(model, tokenizer, [" " + w for w in words], p.source)
    k = min(p.anchors, len(words))
    anchors = kmeans(reps, k, seed=p.seed)
    spp = SafetyPolytope.build(anchors, p.halfspaces, p.source, p.seed)
    red = read_prompts(p.redteam or asset_path("redteam.jsonl"))
    benign = read_prompts(p.benign or asset_path("benign.jsonl"))
    calib, held_out = split_redteam(len(red), p.seed)
    red_s = spp.score(text_representations(model, tokenizer, red, p.source))
    ben_s = spp.score(text_representations(model, tokenizer, benign, p.source))
    uninflated = {"redteam": block_rate(red_s, 0.0), "benign": block_rate(ben_s, 0.0)}
    # ε is calibrated on one half of the red-team set; the block rate we claim is measured
    # on the other half, which calibration never saw (an in-sample rate meets the target
    # by construction). Benign prompts are never used for calibration.
    spp.eps = calibrate_eps(red_s[calib], p.target)
    report = {
        "safe_vocab_size": len(words),
        "anchors": k,
        "halfspaces": p.halfspaces,
        "source": p.source,
        "eps": spp.eps,
        "radius": spp.radius,
        "target_block_rate": p.target,
        "redteam_prompts": len(red),
        "redteam_split_seed": p.seed,
        "redteam_calibration_prompts": len(calib),
        "redteam_heldout_prompts": len(held_out),
        "benign_prompts": len(benign),
        "redteam_calibration_block_rate": block_rate(red_s[calib], spp.eps),
        "redteam_block_rate": block_rate(red_s[held_out], spp.eps),
        "benign_false_block_rate": block_rate(ben_s, spp.eps),
        "block_rates_at_eps0": uninflated,
        "safe_words_block_rate": block_rate(spp.score(reps), spp.eps),
        "elapsed_s": time.perf_counter() - t0,
    }
    spp.meta = {k: v for k, v in report.items() if k not in ("eps", "radius", "source")}
    return spp, report


def run_spp(
    cfg,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data=None,
    device: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Stage 6: write ``<out_dir>/spp.safetensors`` and ``spp.json``; return the report.

    Args:
        cfg: config (the model must use ``cfg.model.vocab_size``).
        checkpoint: any Perspective checkpoint (stage 5 output normally).
        out_dir: output directory.
        data: prepared corpus whose tokenizer matches the model (default stdlib corpus).
        device: torch device (default CPU).
        **params: fields of :class:`SppParams`.
    """
    from coordinator.central.checkpoint import check_corpus_tokenizer
    from coordinator.central.evaluation.loading import load_model

    p = SppParams(**params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, ckpt = load_model(checkpoint, device or "cpu")
    if ckpt.cfg.model.vocab_size != cfg.model.vocab_size:
        raise SafetyError("checkpoint vocabulary differs from the config's model.vocab_size")
    if data is None:
        from shared_model.data import prepare_corpus

        data = prepare_corpus("stdlib", cfg.model.vocab_size)
    check_corpus_tokenizer(ckpt, data, checkpoint=checkpoint)
    spp, report = build_spp(model, data.tokenizer(), p)
    spp.save(out_dir / "spp.safetensors")
    result = {"stage": 6, "params": asdict(p), "checkpoint": str(checkpoint), **report}
    result["polytope"] = str(out_dir / "spp.safetensors")
    write_json_atomic(out_dir / "spp.json", result)
    return result


@dataclass
class GuardedOutput:
    """Result of :func:`guarded_generate`."""

    ids: list[int]
    blocked: bool
    blocked_at: int | None
    scores: list[float]


@torch.no_grad()
def guarded_generate(
    model,
    spp: SafetyPolytope,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> GuardedOutput:
    """Generate while checking the running mean representation against the polytope.

    The prompt is checked first (blocked → nothing is generated, ``blocked_at = 0``); then
    after each new token the running mean of the captured hidden states is re-checked and
    generation stops at the first token that leaves the inflated polytope.
    """
    from coordinator.central.generate import sample_next
    from shared_model.model import InferenceCache

    device = next(model.parameters()).device
    cache = InferenceCache()
    ids = list(prompt_ids)
    step = torch.tensor([ids], device=device)
    total, count, scores = None, 0, []
    with HiddenCapture(model, spp.source) as cap:
        for n in range(max_new_tokens + 1):
            logits = model(step, cache=cache).logits[:, -1]
            h = cap.last[0]
            total = h.sum(0) if total is None else total + h.sum(0)
            count += h.shape[0]
            blocked, score = spp.check(total / count)
            scores.append(float(score))
            if bool(blocked):
                return GuardedOutput(ids, True, n, scores)
            if n == max_new_tokens:
                break
            step = sample_next(logits, temperature, None, generator)
            ids.append(int(step))
    return GuardedOutput(ids, False, None, scores)
