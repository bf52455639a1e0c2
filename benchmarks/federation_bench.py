"""Federated vs centralised training on the same tokens, scored on one fixed validation set.

Every arm starts from the same stage-2 checkpoint (a short central stage-1 seed cloned into
experts), sees the same token budget of the same corpus, and is scored on the *same*
validation sequences (``--eval-tokens``, default 32k tokens from held-out documents), both
token-level (the router picks experts) and in column mode (each sequence through its
document's column, as the federated model is used). Two sets of those: windows drawn
uniformly (a long document weighs by its length: one ``stdlib`` document holds 55 % of
them) and windows drawn per document (``*_balanced``: every document weighs about alike).
Arms (``--arms``):

* ``central_token``: the central trainer, token-level routing, batch ``b`` (the batch of
  one participant), the schedule over the same tokens: the strict baseline;
* ``central_column``: central, column mode (document routing), batch ``b``: the floor of
  document routing, so ``federated ÷ central_column`` is the cost of federation alone;
* ``central_big``: central token-level with batch ``N·b`` (what synchronous averaging of N
  participants is equivalent to at best): the fair baseline;
* ``central_column_big``: central column mode with batch ``N·b``: the floor of N
  participants that each train their columns' documents and sync every step;
* ``federated``: the real loop (intake, aggregation, publishing, unit trainer) with the
  participants in this process on a virtual clock (:mod:`benchmarks.federation_replay`);
  ``--mode flower`` runs it over a real SuperLink + SuperNodes instead;
* ``federated_1``: the same with one participant; ``federated_sparse`` /
  ``federated_ternary``: every update (columns and shared layers) with that codec.

Reported (``benchmarks/results/<name>.json`` + ``.png``): per arm and seed both scores,
wall time, traffic per kind (up / down deltas / checkpoint reloads / joins / teacher / data)
in bytes and bits per parameter per sync, utilisation; mean ± sd over seeds; a top-level
``summary`` (``ratio_vs_central_token`` on the uniform set, ``ratio_balanced`` on the
per-document one). Usage: ``python benchmarks/federation_bench.py --preset tiny --tokens 900000``.

``--stage 4`` runs ternary distillation instead, from a stage-3 seed (the committed
``results/federation_bench_stage4_seed.safetensors``: the stage-2 seed after central
token-level stage 3 on 900k tokens), which is every arm's frozen teacher; arms
``central_token``, ``central_big``, ``federated`` and ``federated_1``, each scored with its
experts ternary, as stage 4 hands the model on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.federation_replay import ReplayDriver
from coordinator.central.checkpoint import load_checkpoint
from coordinator.central.trainer import train_stage
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db.stats import (
    accepted_unit_columns,
    reject_counts,
    result_staleness,
    utilisation_by_participant,
)
from coordinator.federation_settings import load_federation_settings
from coordinator.routing.assignment import initial_assignment
from coordinator.traffic import per_sync_bits
from shared_model.config_loading import load_config
from shared_model.data import DocumentDataset, prepare_corpus
from shared_model.model import PerspectiveModel
from shared_model.schedule import build_optimizer, set_scheduled_lr
from shared_model.stage_loss import stage_loss

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = (
    "central_token",
    "central_column",
    "central_big",
    "central_column_big",
    "federated",
    "federated_1",
)
#: the scores of an arm: on the uniform windows, and on the per-document ones
SCORES = ("token_level", "column_mode", "token_level_balanced", "column_mode_balanced")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--participants", type=int, default=3)
    p.add_argument("--tokens", type=int, default=900_000, help="the stage's token budget")
    p.add_argument(
        "--stage",
        type=int,
        default=3,
        choices=[3, 4],
        help="the federated stage every arm trains: 3 (MoE) or 4 (ternary distillation, "
        "from a stage-3 seed; a stage-2 --seed-checkpoint gets central stage 3 first)",
    )
    p.add_argument("--seed-steps", type=int, default=300, help="central stage-1 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--seed-checkpoint",
        type=Path,
        default=None,
        help="reuse this checkpoint (stage 2; with --stage 4 stage 2 or 3)",
    )
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    p.add_argument("--mode", default="replay", choices=["replay", "flower"])
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--steps-per-unit", type=int, default=None)
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--buffer-size", type=int, default=None, help="default: participants")
    p.add_argument("--outer-lr", type=float, default=None)
    p.add_argument("--outer-momentum", type=float, default=None)
    p.add_argument(
        "--speed-spread",
        type=float,
        default=0.5,
        help="replay: the slowest participant's step time is 1 + this × the fastest's",
    )
    p.add_argument(
        "--reply-latency",
        type=float,
        default=3.0,
        help="replay: virtual seconds from a unit's end of training to its result reaching "
        "the coordinator (its node trains on meanwhile; a step takes 1 to 1 + spread). "
        "3: results as stale as make demo's over Flower (1.16 versions against 1.15-1.36); "
        "0: at once, the replay of the stops before (0.57)",
    )
    p.add_argument(
        "--lease-base",
        action="store_true",
        help="units train from the version current when leased (not the newest at start)",
    )
    p.add_argument(
        "--max-columns",
        type=int,
        default=None,
        help="replay: the columns each participant offers to hold (default: serve's rule, "
        "ceil(experts / participants))",
    )
    p.add_argument("--codec", default=None, choices=["ternary", "sparse"], help="both parts")
    p.add_argument("--column-codec", default=None, choices=["ternary", "sparse"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: arms are compared on equal terms on a shared machine)",
    )
    p.add_argument(
        "--fed",
        dest="fed_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="federation setting of the federated arms (a FederationSettings field, the value "
        "in YAML), e.g. aggregator=mean (repeatable)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every arm, e.g. train.batch_size=4 (repeatable)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="flower mode: cap on the SuperNodes' poll (participant local --poll-interval)",
    )
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--name", default="federation_bench", help="result file stem")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="only merge the runs of these result files (e.g. one process per seed) into --name",
    )
    return p.parse_args()


# --- the fixed validation set ---------------------------------------------------------------


def eval_windows(
    val: DocumentDataset,
    seq_len: int,
    n_tokens: int,
    seed: int = 1234,
    per_document: bool = False,
):
    """Fixed validation sequences: ``(tokens [n, seq_len + 1], document index [n])``.

    Drawn uniformly from all the held-out windows, so a long document weighs by its length
    (``stdlib``'s largest validation document holds 55 % of them); ``per_document``: drawn
    round-robin over the documents instead (each gives an equal number, or all it has), so
    every held-out document weighs about alike.
    """
    by_doc: list[list[np.ndarray]] = []
    for _, doc in val.iter_documents():
        by_doc.append(
            [
                np.asarray(doc[start : start + seq_len + 1], dtype=np.int64)
                for start in range(0, len(doc) - seq_len - 1, seq_len + 1)
            ]
        )
    rng = np.random.default_rng(seed)
    want = n_tokens // seq_len
    if per_document:
        orders = [list(rng.permutation(len(w))) for w in by_doc]
        picked: list[tuple[int, int]] = []
        while len(picked) < want and any(orders):
            for d in rng.permutation(len(by_doc)):
                if orders[d] and len(picked) < want:
                    picked.append((int(d), int(orders[d].pop())))
    else:
        flat = [(d, i) for d, w in enumerate(by_doc) for i in range(len(w))]
        pick = rng.choice(len(flat), size=min(len(flat), want), replace=False)
        picked = [flat[i] for i in pick]
    picked.sort()
    tokens = torch.from_numpy(np.stack([by_doc[d][i] for d, i in picked]))
    return tokens, np.array([d for d, _ in picked])


@torch.no_grad()
def score(model: PerspectiveModel, windows, columns: np.ndarray | None) -> float:
    """Mean LM loss over the windows; ``columns`` per window forces column mode."""
    tokens, _ = windows
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), 64):
        batch = tokens[i : i + 64]
        cols = None if columns is None else torch.as_tensor(columns[i : i + 64])
        out = model(batch[:, :-1], targets=batch[:, 1:], columns=cols)
        total += float(out.loss) * len(batch)
        count += len(batch)
    return total / count


def both_scores(model, windows, assignment, val, balanced=None) -> dict[str, float]:
    """Token-level and column-mode loss (each window routed by its document's column); with
    ``balanced`` (the per-document windows) the same two on those, as ``*_balanced``."""
    doc_columns = assignment.route(val)
    out = {
        "token_level": score(model, windows, None),
        "column_mode": score(model, windows, doc_columns[windows[1]]),
    }
    if balanced is not None:
        out["token_level_balanced"] = score(model, balanced, None)
        out["column_mode_balanced"] = score(model, balanced, doc_columns[balanced[1]])
    return out


# --- arms ------------------------------------------------------------------------------------


def seed_checkpoint(cfg, corpus, work: Path, steps: int) -> str:
    r1 = train_stage(cfg, 1, work / "seed", data=corpus, until_step=steps)
    return train_stage(cfg, 2, work / "seed", init=r1.checkpoint, data=corpus).checkpoint


def load_model(cfg, path: str) -> PerspectiveModel:
    model = PerspectiveModel(cfg, moe=True)
    model.load_state_dict(load_checkpoint(path).model_state, strict=True)
    return model


def central_token(
    cfg, corpus, ckpt: str, work: Path, tokens: int, batch: int, stage: int = 3
) -> PerspectiveModel:
    """The central trainer on ``tokens`` of ``stage`` (stage 4: the init is the teacher)."""
    steps = max(1, tokens // (batch * cfg.train.seq_len))
    cfg = replace(cfg, train=replace(cfg.train, batch_size=batch, steps=steps, eval_every=steps))
    r = train_stage(cfg, stage, work, init=ckpt, data=corpus)
    return as_exported(load_model(cfg, r.checkpoint), stage)


def as_exported(model: PerspectiveModel, stage: int) -> PerspectiveModel:
    """The model as its stage hands it on: after stage 4 the experts are ternary (the
    schedule's last fraction, 1), so every stage-4 arm is scored that way."""
    if stage == 4:
        model.set_ternary_fraction(model.cfg.ternary.schedule[-1])
    return model


def stage3_seed(cfg, corpus, ckpt: str, work: Path, tokens: int) -> str:
    """The seed of a stage-4 run: ``ckpt`` itself if it is a stage-3 checkpoint; from a
    stage-2 one, central token-level stage 3 over ``tokens`` first (its checkpoint is
    printed, to be passed as ``--seed-checkpoint`` next time)."""
    stage = load_checkpoint(ckpt).meta["stage"]
    if stage == 3:
        return ckpt
    if stage != 2:
        raise SystemExit(f"--stage 4 needs a stage-2 or stage-3 seed checkpoint; {ckpt} is {stage}")
    steps = max(1, tokens // (cfg.train.batch_size * cfg.train.seq_len))
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, eval_every=steps))
    out = train_stage(cfg, 3, work / "stage3-seed", init=ckpt, data=corpus).checkpoint
    print(f"stage-3 seed: {out}", flush=True)
    return out


def central_column(
    cfg, corpus, ckpt: str, tokens: int, assignment, batch: int | None = None
) -> PerspectiveModel:
    """Central training in column mode: every sequence through its document's column
    (``batch``: sequences per step, default the config's)."""
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg, ckpt).train()
    opt = build_optimizer(model, cfg.optim)
    train = corpus.dataset("train")
    b, t = batch or cfg.train.batch_size, cfg.train.seq_len
    by_col = {c: train.subset(assignment.documents(c)) for c in range(cfg.moe.n_experts)}
    order = [c for c, ds in by_col.items() if ds.n_tokens > t + 1]
    steps = max(1, tokens // (b * t))
    for step in range(steps):
        set_scheduled_lr(opt, step, cfg.optim, steps)
        cols = [order[(step * b + j) % len(order)] for j in range(b)]
        batch = torch.cat(
            [by_col[c].batch(step * b + j, 1, t, cfg.train.seed) for j, c in enumerate(cols)]
        )
        loss, _ = stage_loss(model, batch[:, :-1], batch[:, 1:], columns=torch.tensor(cols))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
    return model


def fed_settings(args, participants: int, codec: str | None, tokens_per_unit: int):
    values = {
        "stage": args.stage,
        "buffer_size": args.buffer_size or participants,
        "eval_every": 1_000_000,  # scored at the end on the fixed set instead
        "units_hint": max(1, args.tokens // tokens_per_unit),
    }
    for key in ("steps_per_unit", "max_in_flight", "outer_lr", "outer_momentum"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if codec or args.codec:
        values["column_codec"] = values["shared_codec"] = codec or args.codec
    if args.column_codec:
        values["column_codec"] = args.column_codec
    values.update(fed_overrides(args.fed_overrides))
    return load_federation_settings(None, values)  # unknown keys named, as serve does


def fed_overrides(items: list[str]) -> dict:
    """``--fed KEY=VALUE`` items as settings (each value read as YAML, as in a
    ``--federation-config`` file)."""
    return {key: yaml.safe_load(value) for key, _, value in (i.partition("=") for i in items)}


def federated(cfg, corpus, ckpt: str, work: Path, args, participants: int, codec=None):
    """The real loop; participants in-process on a virtual clock (or over Flower)."""
    settings = fed_settings(args, participants, codec, cfg.train.batch_size * cfg.train.seq_len)
    coord = Coordinator(cfg, work / "coordinator", corpus)
    coord.start()
    t0 = time.perf_counter()
    try:
        coord.prepare(ckpt, settings)
        if args.mode == "flower":
            out = _over_flower(cfg, coord, work, args, participants, settings)
        else:
            driver = ReplayDriver(
                cfg, coord.store, corpus.dataset("train"), work / "nodes",
                step_times(participants, args.speed_spread),
                latency=args.reply_latency,
                publisher=None if args.lease_base else coord.state.publisher,
                max_columns=args.max_columns,
            )  # fmt: skip
            loop = coord.federated_stage(driver, StageBudget(tokens=args.tokens), settings)
            loop.run(lambda: False)
            out = {
                "traffic": driver.traffic(),
                "utilisation": driver.utilisation(),
                "unit_columns": driver.unit_columns,
            }
        loop = coord.loop
        totals = loop.stats
        out.update(
            tokens=totals.tokens,
            versions=loop.state.version,
            results=totals.accepted,
            rejected=totals.rejected,
            reject_reasons=_reject_reasons(coord),
            staleness=_staleness(coord, args.stage),
            calibration=defence_calibration(loop),
            seconds=time.perf_counter() - t0,
        )
        unit_columns = out.pop("unit_columns", None) or _unit_columns(coord, args.stage)
        out.update(per_sync_bits(cfg, out["traffic"], unit_columns, participants))
        return as_exported(loop.state.published_model(), args.stage), coord.assignment, out
    finally:
        coord.shutdown()


def defence_calibration(loop) -> dict:
    """Honest update sizes (ratio to the running median and to the tensor) and held-out
    loss changes: what the defaults of the bounds and the column check are set from."""
    bounds = loop.intake.bounds
    to_median, ratios = [], []
    for history in bounds.history().values():
        values = list(history)
        ratios.extend(values)
        for i in range(8, len(values)):
            median = statistics.median(values[max(0, i - 64) : i])
            if median > 0:  # a tensor never moved is not checked against its median
                to_median.append(values[i] / median)
    checked = loop.intake.validator.checked if loop.intake.validator else []
    changes = [(after - before) / before for _, before, after in checked]
    return {
        "max_ratio_to_tensor": max(ratios, default=0.0),
        "p99_ratio_to_tensor": _quantile(ratios, 0.99),
        "max_ratio_to_median": max(to_median, default=0.0),
        "p99_ratio_to_median": _quantile(to_median, 0.99),
        "max_loss_change": max(changes, default=0.0),
        "p99_loss_change": _quantile(changes, 0.99),
        "median_loss_change": _quantile(changes, 0.5),
        "column_checks": len(changes),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def step_times(participants: int, spread: float) -> list[float]:
    """Virtual seconds per inner step of each participant: evenly spread over
    ``1 .. 1 + spread`` (equal machines would finish in lockstep, a synchronous loop)."""
    if participants == 1:
        return [1.0]
    return [1.0 + spread * i / (participants - 1) for i in range(participants)]


def _reject_reasons(coord) -> dict[str, int]:
    """Refused results per reason: an honest run should have none, and when it has, why."""
    with coord.session_factory() as s:
        return reject_counts(s)


def _staleness(coord, stage: int) -> dict:
    with coord.session_factory() as s:
        return result_staleness(s, stage=f"stage{stage}")


def _unit_columns(coord, stage: int) -> list[int]:
    with coord.session_factory() as s:
        return accepted_unit_columns(s, stage=f"stage{stage}")


def _over_flower(cfg, coord, work: Path, args, participants: int, settings) -> dict:
    from coordinator.coordinator_process import default_columns_per_participant
    from coordinator.local_network import LocalNetwork

    net = LocalNetwork(
        work / "net",
        participants,
        preset=cfg.name,
        max_columns=default_columns_per_participant(cfg.moe.n_experts, participants),
        poll_interval=args.poll_interval,
    )
    with net:
        driver = net.open_driver()
        loop = coord.federated_stage(driver, StageBudget(tokens=args.tokens), settings)
        t0 = time.perf_counter()
        loop.run(lambda: False)
        wall = time.perf_counter() - t0
        driver.close()
    with coord.session_factory() as s:
        utilisation = utilisation_by_participant(s, stage=f"stage{args.stage}", wall_s=wall)
    traffic = coord.traffic()  # the blob service's split: joins are its "checkpoint" bytes
    traffic["join"] = traffic.pop("checkpoint", 0)
    return {
        "traffic": traffic,
        "utilisation": utilisation,
        "wall_s": wall,
        "units_per_message": dict(sorted(loop.units_per_message.items())),
        "units_per_submit_reply": dict(sorted(loop.units_per_submit_reply.items())),
    }


# --- driver ------------------------------------------------------------------------------------


def run_seed(
    cfg, corpus, ckpt, work: Path, args, seed: int, windows, on_arm=None, balanced=None
) -> dict:
    cfg = replace(cfg, train=replace(cfg.train, seed=seed))
    val = corpus.dataset("val")
    base = load_model(cfg, ckpt)
    assignment = initial_assignment(base, corpus.dataset("train"), cfg.moe.n_experts, seed=seed)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    out: dict[str, dict] = {
        "seed_checkpoint": both_scores(base, windows, assignment, val, balanced)
    }
    b, n = cfg.train.batch_size, args.participants
    for arm in arms:
        t0 = time.perf_counter()
        extra: dict = {}
        where = work / f"seed{seed}" / arm
        if arm.startswith("central_column") and args.stage == 4:
            raise SystemExit(f"arm {arm} trains stage 3 only (no teacher, no ternary schedule)")
        if arm == "central_token":
            model = central_token(cfg, corpus, ckpt, where, args.tokens, b, args.stage)
        elif arm == "central_big":
            model = central_token(cfg, corpus, ckpt, where, args.tokens, b * n, args.stage)
        elif arm == "central_column":
            model = central_column(cfg, corpus, ckpt, args.tokens, assignment)
        elif arm == "central_column_big":
            model = central_column(cfg, corpus, ckpt, args.tokens, assignment, b * n)
        elif arm.startswith("federated"):
            participants = 1 if arm == "federated_1" else n
            codec = {"federated_sparse": "sparse", "federated_ternary": "ternary"}.get(arm)
            model, assignment_used, extra = federated(
                cfg, corpus, ckpt, where, args, participants, codec
            )
            scores = both_scores(model, windows, assignment_used, val, balanced)
            out[arm] = {**scores, **extra}
            print(f"seed {seed} {arm}: {out[arm]['column_mode']:.4f}", flush=True)
            if on_arm is not None:
                on_arm(out)
            continue
        else:
            raise SystemExit(
                f"unknown arm {arm!r}; known: {', '.join(ARMS)}, federated_sparse, "
                "federated_ternary"
            )
        out[arm] = {**both_scores(model, windows, assignment, val, balanced), **extra}
        out[arm]["seconds"] = time.perf_counter() - t0
        print(f"seed {seed} {arm}: {out[arm]['token_level']:.4f}", flush=True)
        if on_arm is not None:
            on_arm(out)
    return out


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def ratio(rows: list[dict], arm: str, score: str, baseline: str) -> tuple[float, float]:
    """Mean and sd over seeds of ``arm``'s ``score`` ÷ central token-level's ``baseline``."""
    spread = mean_sd([r[arm][score] / r["central_token"][baseline] for r in rows])
    return spread["mean"], spread["sd"]


def summarise(runs: dict[int, dict]) -> dict:
    """Mean ± sd per arm and the headline ratios (federated on its column-mode score)."""
    arms = sorted({a for r in runs.values() for a in r})
    table = {}
    for arm in arms:
        rows = [r[arm] for r in runs.values() if arm in r]
        kinds = [k for k in SCORES if all(k in row for row in rows)]
        table[arm] = {k: mean_sd([row[k] for row in rows]) for k in kinds}
    summary: dict = {"seeds": len(runs), "arms": table}
    both = [r for r in runs.values() if "federated" in r and "central_token" in r]
    if both:
        mean, sd = ratio(both, "federated", "column_mode", "token_level")
        fed = [r["federated"] for r in both]
        summary.update(
            ratio_vs_central_token=mean,
            ratio_sd=sd,
            up_bits_per_param=statistics.fmean(f["up_bits_per_param"] for f in fed),
            down_bits_per_param=statistics.fmean(f["down_bits_per_param"] for f in fed),
            join_bits_per_param=statistics.fmean(f["join_bits_per_param"] for f in fed),
            utilisation_min=min(min(f["utilisation"].values()) for f in fed),
            # replay: training time over the virtual clock (queueing only: no Flower, no
            # sharing of cores); over Flower (--mode flower): over the wall clock.
            utilisation_clock="wall" if all("wall_s" in f for f in fed) else "virtual",
        )
        summary["seeds"] = len(both)
        if all("column_mode_balanced" in r["federated"] for r in both):
            ratios = ratio(both, "federated", "column_mode_balanced", "token_level_balanced")
            summary["ratio_balanced"], summary["ratio_balanced_sd"] = ratios
    floor = [r for r in runs.values() if "central_column_big" in r and "central_token" in r]
    if floor:  # the synchronous floor of N participants in column mode, the same ratio
        ratios = ratio(floor, "central_column_big", "column_mode", "token_level")
        summary["floor_ratio"], summary["floor_ratio_sd"] = ratios
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report["summary"]["arms"]
    names = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = [k for k in SCORES if all(k in table[a] for a in names)]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [table[a][kind]["mean"] for a in names]
        sds = [table[a][kind]["sd"] for a in names]
        ax.bar(np.arange(len(names)) + width * i, means, width, yerr=sds, label=kind)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    low = min(table[a][k]["mean"] for a in names for k in kinds)
    ax.set_ylim(low * 0.97, None)
    ax.set_ylabel("validation loss (same set, mean ± sd)")
    seeds = report["summary"]["seeds"]
    stage = report.get("stage", 3)  # reports before --stage: stage 3
    ax.set_title(f"{report['preset']}, stage {stage}, {report['tokens']:,} tokens, {seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths: list[Path], name: str) -> None:
    """One report from several (same settings, different seeds or arms; e.g. run in
    parallel). Per seed, an arm in a later file replaces the same arm of an earlier one:
    a re-run of one arm merges with the other arms of its seed."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    report = {k: v for k, v in reports[0].items() if k not in ("summary", "runs")}
    runs: dict[int, dict] = {}
    for r in reports:
        for k, arms in r["runs"].items():
            runs.setdefault(int(k), {}).update(arms)
    report["summary"] = summarise(runs)
    report["runs"] = {str(k): v for k, v in sorted(runs.items())}
    report["merged_from"] = [str(p) for p in paths]
    # each file's own settings: arms merged from runs with different flags say which
    report["settings_by_file"] = {
        str(p): r.get("settings") for p, r in zip(paths, reports, strict=True)
    }
    arms = {a for seed in runs.values() for a in seed if a != "seed_checkpoint"}
    report["settings"] = {**report.get("settings", {}), "arms": ",".join(sorted(arms))}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(report, RESULTS / f"{name}.png")
    print(json.dumps(report["summary"], indent=1))


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge(args.merge, args.name)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=args.overrides)
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedbench-"))
    ckpt = str(args.seed_checkpoint or seed_checkpoint(cfg, corpus, work, args.seed_steps))
    if args.stage == 4:
        ckpt = stage3_seed(cfg, corpus, ckpt, work, args.tokens)
    windows = eval_windows(corpus.dataset("val"), cfg.train.seq_len, args.eval_tokens)
    balanced = eval_windows(
        corpus.dataset("val"), cfg.train.seq_len, args.eval_tokens, per_document=True
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    report = {
        "preset": args.preset,
        "participants": args.participants,
        "tokens": args.tokens,
        "stage": args.stage,
        "eval_tokens": int(windows[0][:, 1:].numel()),
        "settings": {k: str(v) for k, v in vars(args).items()},
        # the preset's optimiser after --set: what every arm trained with
        "optim": asdict(cfg.optim),
        "runs": {},
    }
    RESULTS.mkdir(exist_ok=True)

    def write(seed: int, out: dict) -> None:  # after every arm: a long run keeps what it did
        report["runs"][str(seed)] = out
        report["summary"] = summarise({int(k): v for k, v in report["runs"].items()})
        (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))

    for seed in seeds:
        on_arm = partial(write, seed)
        on_arm(run_seed(cfg, corpus, ckpt, work, args, seed, windows, on_arm, balanced))
    plot(report, RESULTS / f"{args.name}.png")
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
