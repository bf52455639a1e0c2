"""Centralised stage 1 → 2 → 3 → 4 run of a preset on the stdlib corpus, with a JSON summary.

Example (what produced ``benchmarks/results/small_pipeline.json``)::

    python benchmarks/small_pipeline.py --out runs/small --minutes 20 10 10 \\
        --steps 2000 1000 1000

Each stage trains for at most its ``--minutes`` budget and its ``--steps`` schedule
(warmup + cosine; stage 4's ternary fractions are spread over its steps). The summary
lists each stage's final train/val loss, tokens and tokens/s, and the stage-4/stage-3
validation-loss ratio (goal: ternary within 5 % of full precision).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from coordinator.central.trainer import default_device, train_stage
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path, required=True, help="run dir (checkpoints)")
    parser.add_argument("--summary", type=Path, default=None, help="JSON summary path")
    parser.add_argument("--minutes", type=float, nargs=3, default=[20.0, 10.0, 10.0])
    parser.add_argument("--steps", type=int, nargs=3, default=[2000, 1000, 1000])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    base = load_config(args.preset, overrides=args.overrides)
    corpus = prepare_corpus("stdlib", base.model.vocab_size, args.data_dir)
    summary: dict = {
        "preset": args.preset,
        "device": str(device),
        "overrides": args.overrides,
        "corpus": {k: corpus.manifest[k] for k in ("source", "fingerprint")},
        "stages": {},
    }
    budgets = {
        1: (args.minutes[0], args.steps[0]),
        2: (None, 1),
        3: (args.minutes[1], args.steps[1]),
        4: (args.minutes[2], args.steps[2]),
    }
    init = None
    for stage, (minutes, steps) in budgets.items():
        cfg = load_config(args.preset, overrides=[*args.overrides, f"train.steps={steps}"])
        torch.manual_seed(cfg.train.seed)
        t0 = time.perf_counter()
        r = train_stage(
            cfg,
            stage,
            args.out,
            init=init,
            minutes=minutes,
            data=corpus,
            device=device,
            on_eval=lambda rec, s=stage: print(s, rec, flush=True),
        )
        init = r.checkpoint
        summary["stages"][stage] = {k: v for k, v in r.to_dict().items() if k != "history"}
        summary["stages"][stage]["history"] = r.history[-20:]
        summary["stages"][stage]["wall_s"] = time.perf_counter() - t0
        print(
            f"stage {stage}: val {r.val_loss:.4f} steps {r.steps} {r.tokens_per_s:,.0f} tok/s",
            flush=True,
        )
    s = summary["stages"]
    summary["ternary_vs_fp_val_ratio"] = s[4]["val_loss"] / s[3]["val_loss"]
    summary["goal_ratio"] = 1.05
    path = args.summary or args.out / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(
        json.dumps({k: (v["val_loss"], v["steps"]) for k, v in s.items()}),
        summary["ternary_vs_fp_val_ratio"],
    )


if __name__ == "__main__":
    main()
