"""Codec benchmark: bits/param vs entropy bounds, and single-core throughput.

Writes ``benchmarks/results/codec_bench.json`` and ``codec_bench.png``.
Run: ``.venv/bin/python benchmarks/codec_bench.py [--params N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared_model.codec import (  # noqa: E402
    apply_delta,
    decode_sparse,
    decode_ternary,
    encode_delta,
    encode_sparse,
    encode_ternary,
)
from shared_model.federated.updates import send_with_feedback  # noqa: E402

OUT = Path(__file__).parent / "results"
FLIPS = (0.005, 0.01, 0.02, 0.05, 0.10)


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def model_trits(limit: int) -> tuple[np.ndarray, str]:
    """Trits of the small preset's expert weights (ternary_round), or Gaussian fallback."""
    try:
        import torch

        from shared_model.config_loading import load_config
        from shared_model.model import PerspectiveModel
        from shared_model.ternary import ternary_round

        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = PerspectiveModel(load_config("small"), moe=True)
        parts, total = [], 0
        for name, p in model.named_parameters():
            if "expert" in name and p.dim() >= 2 and total < limit:
                trits, _ = ternary_round(p.detach())
                parts.append(trits.numpy().reshape(-1))
                total += parts[-1].size
        if parts:
            return np.concatenate(parts)[:limit], "small-preset expert weights (ternary_round)"
    except Exception as exc:  # noqa: BLE001 - fall back and say so in the report
        print(f"model unavailable ({exc}); using Gaussian weights")
    return gaussian_trits(limit, 1), "gaussian (model unavailable)"


def gaussian_trits(n: int, seed: int) -> np.ndarray:
    """Ternarise N(0,1) weights with tau = 0.7 * mean|W|."""
    w = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    a = np.abs(w)
    return (np.sign(w) * (a > 0.7 * a.mean())).astype(np.int8)


def timed(fn, reps: int = 3):
    """Best-of-``reps`` wall time and the last result."""
    best, out = math.inf, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def full_tensor_row(trits: np.ndarray, codec: int) -> dict:
    n = trits.size
    counts = np.bincount(trits.astype(np.int64) + 1, minlength=3) / n
    bound = -sum(p * math.log2(p) for p in counts if p)
    t_enc, blob = timed(lambda: encode_ternary(trits, 0.01, "w", codec=codec))
    t_dec, _ = timed(lambda: decode_ternary(blob))
    return {
        "codec": {0: "auto", 1: "zstd", 2: "rans"}[codec],
        "zero_fraction": float(counts[1]),
        "bound_bits": bound,
        "bits_per_param": len(blob) * 8 / n,
        "ratio_to_bound": len(blob) * 8 / n / bound,
        "encode_mparam_s": n / t_enc / 1e6,
        "decode_mparam_s": n / t_dec / 1e6,
    }


def delta_rows(trits: np.ndarray) -> list[dict]:
    rng = np.random.default_rng(5)
    rows = []
    for f in FLIPS:
        mask = rng.random(trits.size) < f
        new = trits.copy()
        new[mask] = (trits[mask] + 1 + rng.integers(1, 3, size=int(mask.sum()))) % 3 - 1
        fe = float(mask.mean())
        t_enc, blob = timed(lambda new=new: encode_delta(trits, new, 0.01, 0.011))
        t_dec, _ = timed(lambda blob=blob: apply_delta(trits, blob))
        bound = h2(fe) + fe
        rows.append(
            {
                "flip_fraction": fe,
                "bound_bits": bound,
                "bits_per_param": len(blob) * 8 / trits.size,
                "ratio_to_bound": len(blob) * 8 / trits.size / bound,
                "encode_mparam_s": trits.size / t_enc / 1e6,
                "apply_mparam_s": trits.size / t_dec / 1e6,
            }
        )
    return rows


def pseudograd_row(n: int) -> dict:
    g = np.random.default_rng(6).normal(size=n).astype(np.float32)
    t_enc, (blob, recon) = timed(lambda: encode_sparse(g), reps=1)
    t_dec, _ = timed(lambda: decode_sparse(blob), reps=1)
    # Error feedback over 10 rounds of fresh gradients: how much of the sum got through.
    total = np.zeros(n // 4, np.float32)
    got, residual = np.zeros_like(total), {}
    rng = np.random.default_rng(7)
    for r in range(10):
        step = rng.normal(size=total.size).astype(np.float32)
        total += step
        update = {"g": torch.from_numpy(step)}
        sent = send_with_feedback(
            update, residual, "sparse", kind="shared", column=-1, base_version=r
        )
        got += sent.decoded["g"].numpy()
        residual = sent.residual
    return {
        "chunk": 4096,
        "topk": 64,
        "bits_per_param": len(blob) * 8 / n,
        "rel_error_one_shot": float(np.linalg.norm(g - recon) / np.linalg.norm(g)),
        "rel_error_sum_after_10_rounds_ef": float(
            np.linalg.norm(total - got) / np.linalg.norm(total)
        ),
        "encode_mparam_s": n / t_enc / 1e6,
        "decode_mparam_s": n / t_dec / 1e6,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r['source']}\n{r['codec']}" for r in result["full_tensor"]]
    a.bar(names, [r["bits_per_param"] for r in result["full_tensor"]], label="achieved")
    a.scatter(names, [r["bound_bits"] for r in result["full_tensor"]], c="k", label="entropy")
    for y, lab in ((2.0, "2-bit"), (1.6875, "TQ1_0"), (1.6, "5 trits/byte")):
        a.axhline(y, ls="--", lw=0.8)
        a.text(0, y, lab, fontsize=7)
    a.set_ylabel("bits / param (fp16 = 16)")
    a.tick_params(axis="x", labelsize=6)
    a.legend()
    d = result["delta"]
    b.plot([r["flip_fraction"] for r in d], [r["bits_per_param"] for r in d], "o-", label="ours")
    b.plot([r["flip_fraction"] for r in d], [r["bound_bits"] for r in d], "k--", label="h(f)+f")
    b.set_xlabel("flip fraction")
    b.set_ylabel("bits / param")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the benchmark and write the JSON + PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=8_000_000)
    args = parser.parse_args()
    model, source = model_trits(args.params)
    gauss = gaussian_trits(args.params, 2)
    result = {"params": args.params, "model_source": source, "full_tensor": [], "delta": []}
    for label, trits in (("model", model), ("gaussian", gauss)):
        for codec in (0, 1, 2):
            result["full_tensor"].append({"source": label, **full_tensor_row(trits, codec)})
    result["delta"] = delta_rows(model)
    result["pseudograd"] = pseudograd_row(min(args.params, 4_000_000))
    result["reference_bits"] = {"fp16": 16, "2bit": 2, "tq1_0": 1.6875, "base3_packed": 1.6}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "codec_bench.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "codec_bench.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
