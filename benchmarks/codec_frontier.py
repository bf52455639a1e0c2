"""Loss against bits per parameter for the ternary shared codec's threshold.

``shared_threshold`` (``FederationSettings``) decides how many of the shared layers' trits
are nonzero, both ways: the larger it is, the fewer bits a sync sends and the more the
error-feedback residual carries. This runs ``federation_bench.py``'s federated arm (the
replay of the real loop) once per threshold and seed, all from one stage-2 seed, ``--jobs``
processes at a time, and writes ``benchmarks/results/<name>.json`` (per threshold: the
column-mode validation loss per seed and mean ± sd, the paired difference to the first
threshold, up / down bits per parameter per sync) and ``<name>.png`` (loss against up
bits). ``--plot-only`` re-plots a report already written
(``shared_threshold_sweep.json`` was measured before the setting existed, from a snapshot
that read the same factor from an environment variable).

Usage::

    python benchmarks/codec_frontier.py --thresholds 0.7,1.0,1.2,1.5 --seeds 3
    python benchmarks/codec_frontier.py --plot-only benchmarks/results/shared_threshold_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCH = ROOT / "benchmarks" / "federation_bench.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--thresholds", default="0.7,1.0,1.2,1.5", help="comma-separated, 0 < t < 2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=900_000)
    p.add_argument("--seed-checkpoint", type=Path, default=None, help="reuse this stage 2")
    p.add_argument("--jobs", type=int, default=2, help="bench processes at a time")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--name", default="codec_frontier")
    p.add_argument("--plot-only", type=Path, default=None, help="re-plot this report")
    return p.parse_args()


def _bench(args, work: Path, extra: list[str], name: str) -> Path:
    """Run ``federation_bench.py`` (its federated arm) and return its report's path."""
    cmd = [sys.executable, str(BENCH), "--arms", "federated", "--seeds", "1"]
    cmd += ["--tokens", str(args.tokens), "--work-dir", str(work), "--name", name, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (work.parent / f"{name}.log").open("w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return RESULTS / f"{name}.json"


def run_sweep(args) -> dict:
    """Every threshold × seed from one stage-2 seed; the report (see the module doc)."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="frontier-"))
    work.mkdir(parents=True, exist_ok=True)  # the bench logs go next to its work dirs
    thresholds = [float(t) for t in args.thresholds.split(",")]
    ckpt = args.seed_checkpoint
    jobs = [(t, s) for t in thresholds for s in range(args.seeds)]
    if ckpt is None:  # the first job also trains the seed the others reuse
        t, s = jobs.pop(0)
        first = _job(args, work, t, s, [])
        ckpt = work / f"t{t}_s{s}" / "seed" / "stage2.safetensors"
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(
            pool.map(lambda j: _job(args, work, *j, ["--seed-checkpoint", str(ckpt)]), jobs)
        )
    if args.seed_checkpoint is None:
        done.insert(0, first)
    return report(done, thresholds, args, str(ckpt))


def _job(args, work: Path, threshold: float, seed: int, extra: list[str]):
    name = f"{args.name}_t{threshold}_s{seed}"
    extra = [*extra, "--first-seed", str(seed), "--fed", f"shared_threshold={threshold}"]
    path = _bench(args, work / f"t{threshold}_s{seed}", extra, name)
    federated = next(iter(json.loads(path.read_text())["runs"].values()))["federated"]
    return threshold, seed, federated


def report(done: list, thresholds: list[float], args, ckpt: str) -> dict:
    """Per threshold: scores per seed, mean ± sd, paired difference to the first one."""
    by = {(t, s): f for t, s, f in done}
    first = thresholds[0]
    out = {
        "what": "federated arm of federation_bench.py (replay), column-mode validation loss "
        f"on its fixed set; {args.tokens} tokens; one stage-2 seed ({ckpt}); paired: the "
        f"same seed at shared_threshold {first} subtracted",
        "arms": {},
    }
    for t in thresholds:
        rows = {}
        for s in range(args.seeds):
            f = by[(t, s)]
            keep = ("column_mode", "token_level", "up_bits_per_param", "down_bits_per_param")
            rows[str(s)] = {k: f[k] for k in keep}
            rows[str(s)][f"paired_vs_{first}"] = f["column_mode"] - by[(first, s)]["column_mode"]
        out["arms"][str(t)] = _summary(rows, f"paired_vs_{first}")
    return out


def _summary(rows: dict, paired: str) -> dict:
    def mean_sd(values):
        values = list(values)
        return {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
        }

    return {
        "seeds": rows,
        "column_mode": {**mean_sd(r["column_mode"] for r in rows.values()), "n": len(rows)},
        paired: mean_sd(r[paired] for r in rows.values()),
        "up_bits_per_param": statistics.fmean(r["up_bits_per_param"] for r in rows.values()),
        "down_bits_per_param": statistics.fmean(r["down_bits_per_param"] for r in rows.values()),
    }


def plot(rep: dict, path: Path) -> None:
    """The paired loss difference (mean ± sd over seeds) against up bits per parameter:
    the seeds' own spread is larger than the differences the threshold makes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, arm) in enumerate(rep["arms"].items()):
        paired = next(v for k, v in arm.items() if k.startswith("paired_vs_"))
        x, y = arm["up_bits_per_param"], paired["mean"]
        ax.errorbar(x, y, yerr=paired["sd"] or 0, fmt="o", capsize=3)
        offset = (6, 10 - 12 * (i % 2))  # labels of points at the same bits apart
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    first = next(k for k in next(iter(rep["arms"].values())) if k.startswith("paired_vs_"))
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("up bits / parameter / sync")
    ax.set_ylabel(f"validation loss, {first.replace('_', ' ')} (mean ± sd)")
    ax.set_title("shared codec threshold: loss against traffic (same seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    rep = run_sweep(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rep, indent=1))
    plot(rep, RESULTS / f"{args.name}.png")
    for label, arm in rep["arms"].items():
        print(label, arm["column_mode"], arm["up_bits_per_param"], arm["down_bits_per_param"])


if __name__ == "__main__":
    main()
