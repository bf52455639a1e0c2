"""Benchmarks of stages 5-7 and path 9.1 → ``benchmarks/results/stages_bench.json``.

* ``.trd`` size between manifold neighbours vs random pairs (bits/param);
* router balance (max/mean load) before and after stage 5;
* MDS: our SMACOF vs scikit-learn's (when installed), time and stress;
* conversion quality per step on a ``small``-sized Mixtral-like model;
* evaluation throughput (scoring and generation tokens/s).

Run: ``.venv/bin/python benchmarks/stages_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coordinator.central import manifold as mf
from coordinator.central.checkpoint import load_checkpoint, save_checkpoint
from coordinator.central.trd import encode_trd, ternary_experts
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel

OUT = Path(__file__).parent / "results" / "stages_bench.json"


def chain_experts(model, step: float, seed: int = 0) -> None:
    """Make experts a random walk (expert e+1 = expert e + noise): structured neighbours."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in model.cfg.model.pdr_layers():
            ffn = model.layers[i].ffn
            for e in range(1, ffn.n_experts):
                for w in ("w1", "w2", "w3"):
                    prev = getattr(ffn.expert(e - 1), w).weight
                    noise = torch.randn(prev.shape, generator=gen) * step * prev.std()
                    getattr(ffn.expert(e), w).weight.copy_(prev + noise)


def trd_sizes(model, positions, threshold: float, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    nb, rnd = [], []
    for layer, pos in positions.items():
        ex = ternary_experts(model, layer, threshold)
        nbrs = mf.torus_neighbours(pos, 3)
        n_params = sum(t.size for t, _ in ex[0].values())
        for e in range(len(ex)):
            for f in nbrs[e].tolist():
                nb.append(8 * len(encode_trd(layer, e, f, ex[e], ex[f])) / n_params)
            f = rng.choice([x for x in range(len(ex)) if x != e])
            rnd.append(8 * len(encode_trd(layer, e, f, ex[e], ex[f])) / n_params)
    return {
        "neighbour_bits_per_param": float(np.mean(nb)),
        "random_bits_per_param": float(np.mean(rnd)),
    }


def bench_manifold(corpus, steps: int) -> dict:
    from coordinator.central.manifold_stage import run_manifold

    cfg = load_config(
        "tiny", overrides=["train.batch_size=8", "train.seq_len=32", "train.eval_batches=2"]
    )
    torch.manual_seed(0)
    out = {}
    for kind in ("clones", "chain"):
        model = PerspectiveModel(cfg).to_moe(noise_std=0.002)
        if kind == "chain":
            chain_experts(model, 0.15)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s3.safetensors"
            save_checkpoint(path, model, cfg, stage=3, step=0)
            res = run_manifold(cfg, path, Path(tmp) / "o", data=corpus, steps=steps)
            ck = load_checkpoint(Path(tmp) / "o" / "stage5.safetensors")
            m5 = mf.build_manifold_model(cfg, ck.model_state)
            pos = {int(k): torch.tensor(v) for k, v in res["positions"].items()}
            sizes = trd_sizes(m5, pos, cfg.ternary.threshold_factor)
        out[kind] = {
            **sizes,
            "max_over_mean_load_before": _mean(res["loads_before"]),
            "max_over_mean_load_after": _mean(res["loads_after"]),
            "val_loss_before": res["val_loss_before"],
            "val_loss_after": res["val_loss_after"],
            "stress": res["stress"],
            "seconds": res["elapsed_s"],
        }
    return out


def _mean(loads: dict) -> float:
    return float(np.mean([v["max_over_mean"] for v in loads.values()]))


def bench_mds(n: int = 128, reps: int = 3) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    t0 = time.perf_counter()
    for _ in range(reps):
        _, s_ours = mf.smacof(d)
    ours = (time.perf_counter() - t0) / reps
    out = {"n_points": n, "ours_s": ours, "ours_stress": s_ours}
    try:
        from sklearn.manifold import MDS
    except ImportError:
        out["sklearn"] = "not installed"
        return out
    t0 = time.perf_counter()
    for _ in range(reps):
        y = MDS(
            n_components=3, dissimilarity="precomputed", random_state=0, n_init=1
        ).fit_transform(d)
    out["sklearn_s"] = (time.perf_counter() - t0) / reps
    out["sklearn_stress"] = mf.stress(y, d)
    return out


def bench_convert(quick: bool) -> dict:
    from transformers import MixtralConfig, MixtralForCausalLM

    from coordinator.central.convert import run_convert

    vocab = 512 if quick else 8192
    corpus = prepare_corpus("stdlib", vocab, max_bytes=3_000_000)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
        )
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_convert(
            hf,
            tmp,
            data=corpus,
            n_experts=16,
            seq_len=64,
            batch_size=4,
            distill_batches=4,
            distill_steps=60 if not quick else 10,
            kd_steps=15 if not quick else 2,
            ppl_batches=4,
        )
    return {
        "model": f"Mixtral-like d=256, 8 layers, 8 experts -> 16, vocab {vocab} (random init)",
        "teacher_ppl": res["teacher_ppl"],
        "steps": [
            {k: s[k] for k in ("step", "experts", "ppl", "ppl_ratio", "seconds")}
            for s in res["steps"]
        ],
        "regression_r2": res["steps"][0]["regression_r2"],
    }


def bench_eval(corpus) -> dict:
    from coordinator.central.evaluation.report import run_eval

    cfg = load_config("tiny", overrides=["train.seq_len=32", "train.eval_batches=4"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_checkpoint(path, PerspectiveModel(cfg, moe=True), cfg, stage=4, step=0)
        rep = run_eval(
            path,
            Path(tmp) / "r",
            data=corpus,
            device="cpu",
            gen_tokens=64,
            spp_params={"vocab_size": 2000, "anchors": 200, "halfspaces": 300},
        )
    return {
        "scoring_tokens_per_s": rep["perplexity"]["scoring_tokens_per_s"],
        "generation_tokens_per_s": rep["system"]["generation_tokens_per_s"],
        "eval_seconds": rep["elapsed_s"],
        "spp": rep["safety"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-convert", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    corpus = prepare_corpus("stdlib", 512, max_bytes=600_000)
    results = {"machine": "CPU, 2 shared cores", "torch": torch.__version__}
    results["mds"] = bench_mds()
    results["manifold"] = bench_manifold(corpus, 10 if args.quick else 40)
    results["eval"] = bench_eval(corpus)
    if not args.skip_convert:
        results["convert"] = bench_convert(args.quick)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
