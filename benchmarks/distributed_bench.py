"""Distributed trainer throughput: tokens/s of 1 vs 2 CPU ranks (gloo) on ``small``.

Each configuration runs ``torchrun --nproc-per-node N`` of this file in worker mode; the
workers train stage 1 (dense, FSDP2) and, with ``--stage3``, stage 3 (FSDP2 + expert
parallelism) of the ``small`` preset for a few steps on the same global batches, and rank
0 reports steady-state tokens/s (first step excluded as warm-up). Scaling efficiency is
``tps(2) / (2 · tps(1))``. Every rank uses one thread (OMP_NUM_THREADS=1), so 2 ranks need
2 free cores to scale; on a shared 2-core machine expect poor efficiency.

Usage:
    python benchmarks/distributed_bench.py [--steps 5] [--batch 4] [--stage3]
Default (stage 1 only) takes about 2-3 minutes; ``--stage3`` about 5.
Writes ``benchmarks/results/distributed_bench.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_bench.json"


def _overrides(args) -> list[str]:
    return [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.seq_len={args.seq}",
        "train.eval_every=100000",
        "train.eval_batches=1",
        "train.checkpoint_every=100000",
    ]


def worker(args) -> None:
    """One rank: train ``args.stage`` and (rank 0) write step timestamps to ``args.report``."""
    import torch

    from coordinator.central.parallel.distributed import init_distributed, shutdown_distributed
    from coordinator.central.parallel.train_dist import train_stage_distributed
    from shared_model.config_loading import load_config
    from shared_model.data import prepare_corpus

    torch.set_num_threads(1)
    cfg = load_config("small", overrides=_overrides(args))
    env = init_distributed("cpu")
    data = prepare_corpus("stdlib", cfg.model.vocab_size)
    out = Path(args.out)
    init = None
    if args.stage == 3:  # a stage-2 checkpoint of the same (untrained) dense model
        init = out / "stage2" / "stage2.safetensors"
    stamps: list[float] = []
    train_stage_distributed(
        cfg, args.stage, out / f"run{env.world_size}", init=init, data=data, device="cpu",
        on_step=lambda rec: stamps.append(time.perf_counter()),
    )  # fmt: skip
    if env.is_main:
        tokens = args.batch * args.seq * (len(stamps) - 1)
        Path(args.report).write_text(json.dumps({"tps": tokens / (stamps[-1] - stamps[0])}))
    shutdown_distributed()


def _prepare_stage2(args, out: Path) -> None:
    import torch

    from coordinator.central.trainer import train_stage
    from shared_model.config_loading import load_config
    from shared_model.data import prepare_corpus
    from shared_model.model import PerspectiveModel

    cfg = load_config("small", overrides=_overrides(args))
    torch.manual_seed(0)
    dense = PerspectiveModel(cfg)
    from coordinator.central.checkpoint import save_checkpoint

    save_checkpoint(out / "stage1.safetensors", dense, cfg, stage=1, step=0)
    data = prepare_corpus("stdlib", cfg.model.vocab_size)
    train_stage(cfg, 2, out / "stage2", init=out / "stage1.safetensors", data=data, device="cpu")


def measure(args, nproc: int, stage: int, out: Path) -> float:
    """Launch torchrun with ``nproc`` ranks; returns rank 0's tokens/s."""
    from coordinator.central.parallel.distributed import free_port

    report = out / f"report-{stage}-{nproc}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", __file__, "--worker", "--stage", str(stage),
        "--out", str(out / f"s{stage}"), "--report", str(report), "--steps", str(args.steps),
        "--batch", str(args.batch), "--seq", str(args.seq),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text())["tps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--stage3", action="store_true", help="also measure stage 3 (MoE, EP)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        out = Path(tmp)
        stages = [1, 3] if args.stage3 else [1]
        if 3 in stages:
            _prepare_stage2(args, out / "s3")
        for stage in stages:
            tps = {n: measure(args, n, stage, out) for n in (1, 2)}
            rows.append(
                {
                    "stage": stage,
                    "tokens_per_s_1_rank": round(tps[1], 1),
                    "tokens_per_s_2_ranks": round(tps[2], 1),
                    "speedup": round(tps[2] / tps[1], 3),
                    "scaling_efficiency": round(tps[2] / (2 * tps[1]), 3),
                }
            )
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "distributed_bench",
        "preset": "small",
        "backend": "gloo (CPU), FSDP2 per block; stage 3 adds expert parallelism",
        "global_batch": args.batch,
        "seq_len": args.seq,
        "timed_steps": args.steps - 1,
        "threads_per_rank": 1,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "CPU cores shared with other work during the run; see module docstring",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
