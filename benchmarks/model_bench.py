"""Model benchmark: ternary-STE training overhead and token-mixer throughput.

Writes ``benchmarks/results/model_bench.json`` (or ``--out``):

* ``train_step``: tokens/s of one full training step (forward, backward, clip, AdamW) of
  the ``small`` MoE model for stage 3 (full precision), the same step with the expert
  weights through ternary STE (fraction 1.0 and 0.5), and the complete stage-4 step
  (ternary student + frozen teacher forward + KD loss). The variants are run
  interleaved (one of each per repeat) and the median is reported, so machine-load drift
  affects them alike; ``overhead_ste`` = FP time / STE time ratio goal <= 1.10.
* ``mixers``: forward tokens/s (batch 1, ``small`` d_model) of PDR chunked, PDR
  recurrent and windowed GQA at sequence lengths 256, 1024 and 4096.
* ``peak_rss_mb`` and the machine description.

Usage: ``python benchmarks/model_bench.py [--device cuda] [--repeats 5] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch

from coordinator.central.stages import compute_loss
from shared_model.attention import WindowedGQA
from shared_model.config_loading import load_config
from shared_model.model import PerspectiveModel
from shared_model.pdr import PDR, pdr_chunked, pdr_recurrent
from shared_model.schedule import build_optimizer

RESULTS = Path(__file__).parent / "results" / "model_bench.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _step_fns(cfg, device, variants: list[str], batch: torch.Tensor) -> dict:
    """One closure per variant (fp, ste1, ste05, stage4) running a full training step.

    The variants share one model and optimiser (only the ternary fraction and the loss
    differ), which keeps memory at one model + one teacher; the weights drift between
    steps but the cost of a step does not depend on their values.
    """
    torch.manual_seed(0)
    model = PerspectiveModel(cfg, moe=True).to(device)
    teacher = PerspectiveModel(cfg, moe=True).to(device).eval().requires_grad_(False)
    opt = build_optimizer(model, cfg.optim)
    fractions = {"fp": None, "ste1": 1.0, "ste05": 0.5, "stage4": 1.0}

    def make(variant: str):
        stage = 4 if variant == "stage4" else 3

        def step() -> None:
            model.set_ternary_fraction(fractions[variant])
            with _autocast(device):
                loss, _ = compute_loss(stage, model, batch[:, :-1], batch[:, 1:], teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()

        return step

    return {v: make(v) for v in variants}


def bench_train_steps(device: torch.device, batch_size: int, seq_len: int, repeats: int) -> dict:
    cfg = load_config("small", overrides=[f"train.seq_len={seq_len}"])
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), generator=gen)
    batch = batch.to(device)
    variants = ["fp", "ste1", "ste05", "stage4"]
    steps = _step_fns(cfg, device, variants, batch)
    for v in variants:  # warm-up (allocator, autograd graph caches)
        steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            steps[v]()
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    med = {v: statistics.median(t) for v, t in times.items()}
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "tokens_per_s": {v: tokens / med[v] for v in variants},
        "median_step_s": med,
        "all_step_s": times,
        "overhead_ste": med["ste1"] / med["fp"],
        "overhead_ste_progressive_0.5": med["ste05"] / med["fp"],
        "overhead_stage4_vs_stage3": med["stage4"] / med["fp"],
        "goal_overhead_ste": 1.10,
    }


def _time(fn, device, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@torch.no_grad()
def bench_mixers(device: torch.device, lengths: list[int], repeats: int) -> dict:
    m = load_config("small", overrides=["model.max_seq_len=4096"]).model
    torch.manual_seed(0)
    pdr = PDR(m, 0).to(device)
    gqa = WindowedGQA(m).to(device)
    out: dict[str, dict[str, float]] = {"pdr_chunked": {}, "pdr_recurrent": {}, "gqa": {}}
    for T in lengths:
        x = torch.randn(1, T, m.d_model, device=device)
        pos = torch.arange(T, device=device)
        q, k, v, _ = pdr.features(x)
        a = pdr.log_decay()
        fns = {
            "pdr_chunked": lambda q=q, k=k, v=v, a=a: pdr_chunked(q, k, v, a, pdr.chunk),
            "pdr_recurrent": lambda q=q, k=k, v=v, a=a: pdr_recurrent(q, k, v, a),
            "gqa": lambda x=x, pos=pos: gqa(x, pos),
        }
        for name, fn in fns.items():
            reps = 1 if name == "pdr_recurrent" and T > 1024 else repeats
            out[name][str(T)] = T / _time(fn, device, reps)
    return {
        "d_model": m.d_model,
        "pdr_rank": m.pdr_rank,
        "window": m.window,
        "batch": 1,
        "tokens_per_s": out,
        "note": "PDR timings cover the scan only (features computed once outside the timer)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": psutil.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "load_avg_1m": psutil.getloadavg()[0],
            "torch": torch.__version__,
        },
        "train_step": bench_train_steps(device, args.batch_size, args.seq_len, args.repeats),
        "mixers": bench_mixers(device, [256, 1024, 4096], max(args.repeats // 2, 1)),
    }
    result["peak_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    try:
        import resource

        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not on Windows
        pass
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    ts = result["train_step"]
    print(
        json.dumps(
            {
                "tokens_per_s": ts["tokens_per_s"],
                "overhead_ste": ts["overhead_ste"],
                "mixers": result["mixers"]["tokens_per_s"],
                "wall_s": result["wall_s"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
