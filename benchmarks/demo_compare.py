"""``perspective demo`` of two revisions, run alternately on this machine, side by side.

The machine's speed drifts through the day (the same unit tests took 150 s to 226 s in
one afternoon), so two demo runs hours apart do not compare. This runs revision A, then
B, then A again..., each from a ``git archive`` snapshot with the same arguments, and
reports per stage each run's utilisation (training / wall per participant), tokens,
validation losses and bits per parameter per sync, and each arm's mean ± sd.

Usage::

    python benchmarks/demo_compare.py --a f1fb6b1 --b HEAD --runs 2 --name handoff
    python benchmarks/demo_compare.py --a f1fb6b1 --b HEAD --a-dirs RUN... --b-dirs RUN... \
        --name handoff

(the second form summarises demo work dirs that already ran; the revisions only label
them). Writes
``benchmarks/results/demo_compare_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def snapshot(rev: str, dest: Path) -> Path:
    """Extract ``rev``'s tree (``git archive``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    tar_path = dest.with_suffix(".tar")
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return dest


def run_demo(code: Path, work: Path, demo_args: list[str], timeout: float) -> Path:
    """Run ``perspective demo`` from the snapshot ``code`` (first on the path) into ``work``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "shared_model.cli", "demo", "--work-dir", str(work)]
    log = work.with_suffix(".log")
    with log.open("w") as out:
        subprocess.run(
            cmd + demo_args, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT,
            check=True, timeout=timeout,
        )  # fmt: skip
    return work


def stage_figures(summary: dict) -> dict[str, dict]:
    """The compared figures of each federated stage of one demo's ``summary.json``."""
    out = {}
    for stage, s in summary["stages"].items():
        busy = s["utilisation_by_participant"]
        out[stage] = {
            "utilisation_min": min(busy.values()),
            "utilisation_max": max(busy.values()),
            "train_share_of_unit_time": s["train_share_of_unit_time"],
            "tokens": s["tokens"],
            "final_val_loss": s["final_val_loss"],
            "up_bits_per_param": s["up_bits_per_param"],
            "down_bits_per_param": s["down_bits_per_param"],
            "units_by_submit_reply": s.get("units_by_submit_reply"),
            "units_by_flower": s.get("units_by_flower"),
        }
    return out


def arm_stats(runs: list[dict]) -> dict[str, dict]:
    """Mean ± sd over an arm's runs, per stage and figure (sd 0 for one run)."""
    stats: dict[str, dict] = {}
    for stage in runs[0]["stages"]:
        figures = {}
        for key, first in runs[0]["stages"][stage].items():
            if first is None:
                continue
            values = [r["stages"][stage][key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            figures[key] = {"mean": statistics.fmean(values), "sd": sd}
        stats[stage] = figures
    vals = [r["seed_val_loss"] for r in runs]
    stats["seed_val_loss"] = {"mean": statistics.fmean(vals)}
    return stats


def read_run(work: Path) -> dict:
    """One finished demo: its seed loss and per-stage figures."""
    summary = json.loads((work / "summary.json").read_text())
    return {
        "work_dir": str(work),
        "seed_val_loss": summary["seed_val_loss"],
        "stages": stage_figures(summary),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", help="revision A (git rev)")
    ap.add_argument("--b", help="revision B (git rev)")
    ap.add_argument("--runs", type=int, default=2, help="runs per revision, alternating")
    ap.add_argument("--a-dirs", nargs="*", default=[], help="finished demo work dirs of A")
    ap.add_argument("--b-dirs", nargs="*", default=[], help="finished demo work dirs of B")
    ap.add_argument("--name", required=True, help="results/demo_compare_<name>.json")
    ap.add_argument("--demo-args", default="", help="extra demo arguments (one string)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per demo run")
    args = ap.parse_args(argv)
    dirs = {"a": [Path(d) for d in args.a_dirs], "b": [Path(d) for d in args.b_dirs]}
    if args.a and args.b and not (dirs["a"] or dirs["b"]):
        tmp = Path(tempfile.mkdtemp(prefix="demo_compare_"))
        code = {
            arm: snapshot(rev, tmp / f"code_{arm}") for arm, rev in (("a", args.a), ("b", args.b))
        }
        for i in range(args.runs):
            for arm in ("a", "b"):
                work = tmp / f"run_{arm}{i}"
                dirs[arm].append(run_demo(code[arm], work, args.demo_args.split(), args.timeout))
    if not dirs["a"] or not dirs["b"]:
        ap.error("give --a and --b revisions, or --a-dirs and --b-dirs")
    report = {"a": args.a, "b": args.b, "demo_args": args.demo_args}
    for arm in ("a", "b"):
        runs = [read_run(d) for d in dirs[arm]]
        report[arm + "_runs"], report[arm + "_stats"] = runs, arm_stats(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"demo_compare_{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for arm in ("a", "b"):
        for stage in ("3", "4"):
            s = report[arm + "_stats"].get(stage, {})
            u, v = s.get("utilisation_min", {}), s.get("final_val_loss", {})
            util = f"{u.get('mean', 0):.3f} ± {u.get('sd', 0):.3f}"
            val = f"{v.get('mean', 0):.3f} ± {v.get('sd', 0):.3f}"
            print(f"{arm} stage {stage}: utilisation min {util}, val {val}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
