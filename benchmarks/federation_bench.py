"""Federated (N participants over real Flower) vs centralised training on the same tokens.

Both runs start from the same stage-2 checkpoint (a short central stage-1 seed cloned
into experts) and see the same token budget from the same corpus. Reported
(``benchmarks/results/federation_bench.json`` + ``.png``):

* validation loss of each, and the ratio federated / central (the central run routes
  token-level; the federated model is evaluated in column mode with document routing);
* upload bytes per participant per sync (unit) and bits per parameter vs fp16 (16);
* participant utilisation = training time / wall time of the stage, per participant;
* coordinator process CPU time and peak RSS.

Usage: ``python benchmarks/federation_bench.py --preset small --tokens 400000``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil

from coordinator.central.trainer import train_stage
from coordinator.coordinator_process import (
    Coordinator,
    StageBudget,
    default_columns_per_participant,
)
from coordinator.federation_settings import FederationSettings
from coordinator.local_network import LocalNetwork
from coordinator.plan.params import count_params
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--participants", type=int, default=3)
    p.add_argument("--tokens", type=int, default=400_000, help="stage-3 token budget")
    p.add_argument("--seed-steps", type=int, default=150, help="central stage-1 steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps-per-unit", type=int, default=20)
    p.add_argument(
        "--unit-seconds",
        type=float,
        default=None,
        help="size units to this much training time from each participant's tokens/s",
    )
    p.add_argument("--codec", default="ternary", choices=["ternary", "sparse"])
    p.add_argument("--max-in-flight", type=int, default=2, help="units leased per participant")
    p.add_argument("--buffer-size", type=int, default=None, help="results per version")
    p.add_argument(
        "--score-every", type=int, default=0, help="every Nth unit is a scoring unit (0: off)"
    )
    p.add_argument(
        "--rescore-every", type=int, default=0, help="re-route documents every N versions (0: off)"
    )
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--name", default=None, help="result file stem (default federation_bench)")
    return p.parse_args()


def seed_checkpoint(cfg, corpus, work: Path, steps: int) -> str:
    r1 = train_stage(cfg, 1, work / "seed", data=corpus, until_step=steps)
    return train_stage(cfg, 2, work / "seed", init=r1.checkpoint, data=corpus).checkpoint


def central(cfg, corpus, ckpt: str, work: Path, tokens: int) -> dict:
    steps = max(1, tokens // (cfg.train.batch_size * cfg.train.seq_len))
    # The schedule spans exactly the token budget (train.steps is the cosine length).
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, eval_every=steps))
    t0 = time.perf_counter()
    r = train_stage(cfg, 3, work / "central", init=ckpt, data=corpus)
    return {"val_loss": r.val_loss, "tokens": r.tokens, "seconds": time.perf_counter() - t0}


def federated(cfg, corpus, ckpt: str, work: Path, args) -> dict:
    me = psutil.Process()
    cpu0 = me.cpu_times()
    net = LocalNetwork(
        work / "net",
        args.participants,
        preset=cfg.name,
        max_columns=default_columns_per_participant(cfg.moe.n_experts, args.participants),
    )
    coord = Coordinator(cfg, work / "coordinator", corpus)
    peak_rss = 0
    with net:
        coord.start()
        units = max(
            1, args.tokens // (args.steps_per_unit * cfg.train.batch_size * cfg.train.seq_len)
        )
        settings = FederationSettings(
            stage=3,
            steps_per_unit=args.steps_per_unit,
            unit_seconds=args.unit_seconds,
            max_in_flight=args.max_in_flight,
            buffer_size=args.buffer_size or args.participants,
            column_codec=args.codec,
            shared_codec=args.codec,
            eval_every=5,
            eval_batches=cfg.train.eval_batches,
            score_every=args.score_every,
            rescore_every_versions=args.rescore_every,
            units_hint=units,
        )
        coord.prepare(ckpt, settings)
        driver = net.open_driver()
        loop = coord.federated_stage(driver, StageBudget(tokens=args.tokens), settings)
        initial_labels = loop.assignment.labels.copy()
        t0 = time.perf_counter()

        def tick() -> None:
            nonlocal peak_rss
            peak_rss = max(peak_rss, me.memory_info().rss)

        loop.run(lambda: False, on_tick=tick)
        wall = time.perf_counter() - t0
        final = loop.evaluate()
        driver.close()
        coord.shutdown()
    cpu1 = me.cpu_times()
    return {
        "val_loss": final,
        "val_curve": loop.stats.val_loss,
        "tokens": loop.stats.tokens,
        "seconds": wall,
        "versions": loop.state.version,
        **traffic(cfg, work / "coordinator" / "coordinator.db", wall),
        "coordinator_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "coordinator_peak_rss_mb": peak_rss / 1e6,
        "documents_scored": len(loop.rescoring.table),
        "documents_moved": int((loop.assignment.labels != initial_labels).sum()),
    }


def traffic(cfg, db_path: Path, wall: float) -> dict:
    """Upload bytes per sync, bits/param and utilisation from the results table."""
    counts = count_params(cfg)
    # A unit uploads its columns and every shared tensor (routers included).
    shared, per_column = counts.shared + counts.routers, counts.column
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "select r.participant_id, r.timings, u.columns, u.steps "
            "from results r join work_units u on u.unit_id = r.unit_id "
            "join participants p on p.id = r.participant_id where r.state = 'accepted' "
            "order by r.received_at"
        ).fetchall()
        up = dict(db.execute("select id, bytes_up from participants").fetchall())
    train_s: dict[int, float] = {}
    busy_s: dict[int, float] = {}
    steps: dict[int, list[int]] = {}
    params = 0
    for pid, timings, columns, unit_steps in rows:
        steps.setdefault(pid, []).append(int(unit_steps))
        t = json.loads(timings) if isinstance(timings, str) else timings
        train_s[pid] = train_s.get(pid, 0.0) + float(t.get("train_s", 0.0))
        busy_s[pid] = busy_s.get(pid, 0.0) + float(t.get("total_s", 0.0))
        cols = json.loads(columns) if isinstance(columns, str) else columns
        params += shared + per_column * len(cols)
    total_up = sum(up.values())
    return {
        "results": len(rows),
        "upload_bytes_per_sync": total_up / max(len(rows), 1),
        "upload_bits_per_param": 8 * total_up / max(params, 1),
        "fp16_bits_per_param": 16,
        # training time / wall time: bounded by CPU sharing (N participants + coordinator
        # on this machine's cores), not only by waiting on the network.
        "utilisation_per_participant": {str(k): v / wall for k, v in train_s.items()},
        # time the participant's trainer had a unit (sync + train + encode/upload) / wall:
        # 1.0 means it never waited for work.
        "busy_fraction_per_participant": {str(k): v / wall for k, v in busy_s.items()},
        "train_share_of_unit_time": sum(train_s.values()) / max(sum(busy_s.values()), 1e-9),
        # sized units (--unit-seconds): steps per unit, first and mean, per participant
        "unit_steps_per_participant": {
            str(k): {"first": v[0], "mean": sum(v) / len(v), "units": len(v)}
            for k, v in steps.items()
        },
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = report["federated"]["val_curve"]
    if curve:
        ax.plot(
            [v for v, _ in curve],
            [loss for _, loss in curve],
            "o-",
            label="federated (column mode)",
        )
    ax.axhline(report["central"]["val_loss"], color="k", ls="--", label="central, same tokens")
    ax.set_xlabel("published version")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{report['preset']}: federated vs central, {report['tokens']:,} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    cfg = load_config(
        args.preset,
        overrides=[f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}"],
    )
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedbench-"))
    ckpt = seed_checkpoint(cfg, corpus, work, args.seed_steps)
    report = {
        "preset": args.preset,
        "participants": args.participants,
        "tokens": args.tokens,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    report["central"] = central(cfg, corpus, ckpt, work, args.tokens)
    report["federated"] = federated(cfg, corpus, ckpt, work, args)
    report["val_loss_ratio_federated_over_central"] = (
        report["federated"]["val_loss"] / report["central"]["val_loss"]
    )
    RESULTS.mkdir(exist_ok=True)
    name = args.name or "federation_bench"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(report, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in report.items() if k != "federated"}, indent=1))


if __name__ == "__main__":
    main()
