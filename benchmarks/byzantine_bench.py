"""Hostile participants against the real federation loop, with the defences on and off.

The loop, intake, aggregation and publishing are the real ones; the participants are the
in-process ones of :mod:`benchmarks.federation_replay`. :class:`AttackDriver` lets the
attackers train honestly, then rewrites each of their results before it goes back to the
loop: every update tensor (column deltas and the shared pseudo-gradient) is transformed,
re-encoded with the same codec, uploaded under the attacker's own lease and named in its
reply, so it passes every format check and must be stopped by the defences:

* ``sign_flip`` — ``-u`` at its normal scale;
* ``sign_flip_bound`` — ``-u`` scaled to 0.999 × the largest size the coordinator accepts
  (an omniscient attacker: it reads the coordinator's bounds and their recent medians;
  undefended, that is the old global ``max_update_norm`` of 1e4);
* ``x1000`` — ``1000 × u``;
* ``noise`` — Gaussian noise with each tensor's own update norm (every size check passes);
* ``stale`` — the attacker's previous honest update again (computed on an older base),
  scaled by 1 + 1e-4 (new bytes) and uploaded under the new lease: double-counted old
  gradients;
* ``replay`` — the previous result's blobs named again as they are (another lease's
  uploads);
* ``column_poison`` — a column owner's subtle poison: its column deltas reversed and
  tripled (inside the relative bounds while the median is honest), the shared part honest;
* ``collude`` — every attacker sends the same shared update (the first one's, reversed
  and scaled to the bound; × 1 + 1e-4 per copy so the bytes differ, re-encoded under each
  one's lease) and reversed columns.

``--attackers K`` makes the last K participants hostile (default 1); ``--repeat R`` runs
every arm R times with training seeds ``train.seed + r`` (mean ± sd of the val loss; the
ratios divide the means).

Arms: ``clean_off`` (no attacker, defences off: the reference every ratio divides by),
``clean_on`` (no attacker, defences on: the honest cost of the defences), and every attack
with the defences on and off. Each run starts from the same stage-2 checkpoint and is
scored on the same validation windows in column mode. Reported in
``benchmarks/results/byzantine_bench.json``: per fleet size, per arm the val loss,
accepted/rejected counts and the honest participants' reject rate; the summary
``attacks: [{name, participants, fraction, defended_ratio, undefended_ratio,
honest_reject_rate}]`` and the calibration data of the defaults (honest update ratios
relative to the running median, honest held-out loss changes).

Usage: ``python -m benchmarks.byzantine_bench --participants 3,5 --tokens 150000``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import torch
from sqlalchemy import select

from benchmarks.federation_bench import (
    both_scores,
    defence_calibration,
    eval_windows,
    fed_overrides,
    seed_checkpoint,
)
from benchmarks.federation_replay import ReplayDriver
from coordinator.aggregation.bounds import UpdateBounds
from coordinator.blob_uploads import UploadLedger
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db import leases as db_leases
from coordinator.db.models import Participant, Result
from coordinator.federation_settings import FederationSettings, load_federation_settings
from coordinator.intake import column_bounds_kind, unit_fresh_columns, unit_step_sizes
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.federated.updates import encode_bundle, read_bundle
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKS = ("sign_flip", "sign_flip_bound", "x1000", "noise", "stale", "replay",
           "column_poison", "collude")  # fmt: skip
#: Defences off: plain mean, no per-tensor bounds, no column check, no quarantine, and the
#: old global norm bound (1e4) that the defaults replaced.
OFF = {
    "aggregator": "mean",
    "max_update_ratio": math.inf,
    "update_norm_tolerance": math.inf,
    "max_update_norm": 1e4,
    "column_check_sequences": 0,
    "quarantine_after": 0,
}
State = dict[str, torch.Tensor]


class AttackDriver(ReplayDriver):
    """A :class:`ReplayDriver` whose ``attackers`` rewrite their results with ``attack``
    (one of :data:`ATTACKS`, or several separated by commas: each in turn).

    ``coordinator`` is read for what an omniscient attacker knows: the weights an update
    is measured against and the intake's bounds (set after the loop is built).
    """

    def __init__(self, *args, attackers: set[int], attack: str, coordinator, **kwargs):
        super().__init__(*args, **kwargs)
        self.attackers, self.attack, self.coordinator = attackers, attack, coordinator
        self.sent: list[tuple[str, str]] = []  # (unit id, attack) of every poisoned result
        self.memory: dict = {}  # per attacker: its previous updates (stale, replay)

    def _handle(self, nid: int):
        reply = super()._handle(nid)
        if nid not in self.attackers or reply.kind != "train.unit":
            return reply
        msg = control_pb2.ControlReply.FromString(reply.payload)
        for result in msg.results:
            cycle = self.attack.split(",")  # several: each in turn
            attack = cycle[len(self.sent) % len(cycle)]
            self.sent.append((result.unit_id, attack))
            loop = self.coordinator.loop
            with loop.factory() as s:  # the bounds' bar is per unit step size (lr × steps)
                unit = db_leases.find_unit(s, unit_id=result.unit_id)
                steps = unit_step_sizes(loop.intake.bounds, unit)
            # colluders share one memory: the first one's shared update goes out from all
            memory = self.memory.setdefault("all" if attack == "collude" else nid, {})
            poison(result, attack, self.coordinator.state, loop.intake.bounds, steps, memory,
                   fresh=unit_fresh_columns(unit))  # fmt: skip
        return replace(reply, payload=msg.SerializeToString())


def poison(
    result,
    attack: str,
    state,
    bounds: UpdateBounds,
    steps: tuple[float, float] = (1.0, 1.0),
    memory=None,
    fresh: Collection[int] = (),
) -> None:
    """Rewrite every update of ``result`` with ``attack``, uploaded to ``state``'s store
    under the result's own lease (so only the defences can stop it); ``steps``: the unit's
    step sizes for its columns and its shared update (``unit_step_sizes``: the bounds
    allow more for a bigger one); ``memory``: the attacker's own record of its earlier
    updates (``stale``, ``replay``); ``fresh``: the unit's columns started from the published
    weights (the bounds measure them against their own history: ``column_bounds_kind``)."""
    memory = {} if memory is None else memory
    parts = [(d.delta, "column", d.column) for d in result.column_deltas]
    parts.append((result.shared_update.blob, "shared", -1))
    for ref, kind, column in parts:
        if kind == "column":
            reference = state.columns.published_at(column, result.base_version)
        else:
            reference = state.shared.published
        previous = memory.get(("ref", kind, column))
        memory[("ref", kind, column)] = tensor_pb2.BlobRef.FromString(ref.SerializeToString())
        if attack == "replay":
            if previous is not None:  # the first result goes out honest
                ref.CopyFrom(previous)
            continue
        step = steps[0] if kind == "column" else steps[1]
        bar_kind = column_bounds_kind(None, column in fresh) if kind == "column" else kind
        ref.CopyFrom(_rewrite(ref, kind, column, reference, result, attack, state, bounds,
                              (bar_kind, step), memory))  # fmt: skip


def _rewrite(ref, kind: str, column: int, reference: State, result, attack, state, bounds,
             bar: tuple[str, float], memory: dict):  # fmt: skip
    """``ref``'s update rewritten by ``attack``; ``bar``: the bounds' history kind of the
    update and its unit's step size, what a ``*_bound`` attack stays under."""
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    bundle, tensors = read_bundle(state.store.get(ref.content_id), kind=kind, expected=expected)
    if attack == "collude" and kind == "shared":  # one update from every colluder
        key = ("collude", result.base_version)
        first = memory.setdefault(key, _flip_to_bound(bar[0], tensors, reference, bounds, bar[1]))
        uses = memory[("uses", key)] = memory.get(("uses", key), 0) + 1
        # 1 + 1e-4 per use: new bytes each time (an identical blob would be a replay)
        bad = {k: v * (1 + 1e-4 * uses) for k, v in first.items()}
    elif attack == "collude":
        bad = {k: -u for k, u in tensors.items()}
    elif attack == "stale":
        # scaled by 1 + 1e-4 so its bytes differ from the first time (the intake refuses a
        # blob another lease uploaded: an identical re-send is a replay)
        bad = {k: v * (1 + 1e-4) for k, v in memory.get(("update", kind, column), tensors).items()}
        memory[("update", kind, column)] = tensors
    else:
        bad = transform(attack, kind, tensors, reference, bounds, bar)
    codec = "sparse" if _is_sparse(bundle) else "ternary"
    data, _ = encode_bundle(bad, codec, kind=kind, column=column, base_version=result.base_version)
    cid = state.store.put_bytes(data)
    UploadLedger.for_store(state.store).record(cid, result.unit_id)  # under its own lease
    return tensor_pb2.BlobRef(content_id=cid, size=len(data))


def _is_sparse(bundle) -> bool:
    from shared_model.codec.container import CODEC_SPARSE_2BIT, parse_container

    return parse_container(bundle.tensors[0].payload).codec == CODEC_SPARSE_2BIT


def transform(
    attack: str, kind: str, update: State, reference: State, bounds, bar: tuple[str, float]
) -> State:
    """The attacker's version of an honest ``kind`` update (``bar``: the bounds' history
    kind it is measured against and its unit's step size)."""
    if attack == "sign_flip":
        return {k: -u for k, u in update.items()}
    if attack == "x1000":
        return {k: 1000.0 * u for k, u in update.items()}
    if attack == "sign_flip_bound":
        return _flip_to_bound(bar[0], update, reference, bounds, bar[1])
    if attack == "noise":
        return {k: torch.randn_like(u) * (u.norm() / u.numel() ** 0.5) for k, u in update.items()}
    if attack == "column_poison":
        return {k: -3.0 * u for k, u in update.items()} if kind == "column" else update
    raise ValueError(f"unknown attack {attack!r}")


def _flip_to_bound(
    kind: str, update: State, reference: State, bounds: UpdateBounds, step: float = 1.0
) -> State:
    """``-u`` with each tensor scaled to 0.999 × the ratio the bounds allow it now, and the
    whole part to 0.999 × the absolute bound when that binds (or is the only bound)."""
    out, capped = {}, True
    for name, u in update.items():
        bar, norm = bounds.bar(kind, name, step), float(u.norm())
        capped = capped and math.isfinite(bar)
        scale = 0.999 * bar * float(reference[name].norm()) / norm if capped and norm else 1.0
        out[name] = -u * scale
    total = math.sqrt(sum(float(t.norm()) ** 2 for t in out.values()))
    if math.isfinite(bounds.max_norm) and total > 0:
        factor = 0.999 * bounds.max_norm / total
        out = {k: t * (min(1.0, factor) if capped else factor) for k, t in out.items()}
    return out


def fed_settings(
    participants: int, tokens_per_unit: int, tokens: int, defended: bool, aggregator: str = "",
    steps_per_unit: int | None = None, defence_overrides: dict | None = None,
):  # fmt: skip
    """The arm's settings; ``defence_overrides`` (``--fed``) apply to the defended arms."""
    values = {
        "stage": 3,
        **({"steps_per_unit": steps_per_unit} if steps_per_unit else {}),
        "buffer_size": participants,
        "eval_every": 1_000_000,  # scored at the end on the fixed windows instead
        "units_hint": max(1, tokens // tokens_per_unit),
    }
    if not defended:
        values.update(OFF)
    else:
        values.update(defence_overrides or {})
        if aggregator:
            values["aggregator"] = aggregator
    return load_federation_settings(None, values)  # unknown keys named, as serve does


def run_arm(cfg, corpus, ckpt, work: Path, args, participants: int, attack: str | None,
            defended: bool, windows, aggregator: str = "") -> dict:  # fmt: skip
    step_tokens = cfg.train.batch_size * cfg.train.seq_len
    settings = fed_settings(participants, step_tokens * 20, args.tokens, defended, aggregator,
                            args.steps_per_unit, fed_overrides(args.fed))  # fmt: skip
    coord = Coordinator(cfg, work / "coordinator", corpus)
    coord.start()
    t0 = time.perf_counter()
    try:
        coord.prepare(ckpt, settings)
        hostile = range(participants - args.attackers + 1, participants + 1)
        attackers = set(hostile) if attack else set()  # the last K of N
        driver = AttackDriver(
            cfg, coord.store, corpus.dataset("train"), work / "nodes", [1.0] * participants,
            attackers=attackers, attack=attack or "", coordinator=coord,
        )  # fmt: skip
        loop = coord.federated_stage(driver, StageBudget(tokens=args.tokens), settings)
        loop.run(lambda: False)
        scores = both_scores(
            loop.state.published_model(), windows, coord.assignment, corpus.dataset("val")
        )
        out = {
            "attackers": len(attackers),
            "val_loss": scores["column_mode"],
            "val_loss_token_level": scores["token_level"],
            "versions": loop.state.version,
            "seconds": time.perf_counter() - t0,
            **_outcomes(coord, attackers),
        }
        if defended:
            out["calibration"] = defence_calibration(loop)
            out["refusals"] = _refusals(coord, attackers)
        return out
    finally:
        coord.shutdown()


def merge_runs(runs: list[dict]) -> dict:
    """One arm's repeated runs: the val loss as mean (``val_loss``), sd and every run's;
    result counts summed (the reject rate over all runs); the last run's details."""
    out = dict(runs[-1])
    losses = [r["val_loss"] for r in runs]
    out["val_loss"] = statistics.fmean(losses)
    out["val_loss_sd"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
    out["val_loss_runs"] = losses
    for key in ("honest_results", "honest_rejected", "attacker_results", "attacker_accepted",
                "seconds"):  # fmt: skip
        out[key] = sum(r[key] for r in runs)
    out["honest_reject_rate"] = out["honest_rejected"] / max(1, out["honest_results"])
    reasons: dict[str, int] = {}
    for r in runs:
        for k, v in r["reject_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    out["reject_reasons"] = reasons
    return out


def _outcomes(coord, attackers: set[int]) -> dict:
    with coord.session_factory() as s:
        rows = s.execute(
            select(Participant.node_id, Result.state, Result.reject_reason).join(
                Participant, Participant.id == Result.participant_id
            )
        ).all()
    honest = [r for r in rows if r.node_id not in attackers]
    hostile = [r for r in rows if r.node_id in attackers]
    reasons: dict[str, int] = {}
    for r in rows:
        if r.reject_reason:
            key = f"{'attacker' if r.node_id in attackers else 'honest'}:{r.reject_reason}"
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "honest_results": len(honest),
        "honest_rejected": sum(r.state == "rejected" for r in honest),
        "honest_reject_rate": sum(r.state == "rejected" for r in honest) / max(1, len(honest)),
        "attacker_results": len(hostile),
        "attacker_accepted": sum(r.state == "accepted" for r in hostile),
        "reject_reasons": reasons,
    }


def _refusals(coord, attackers: set[int]) -> list[str]:
    """``attacker|honest: reason: detail`` of every refused result."""
    with coord.session_factory() as s:
        rows = s.execute(
            select(Participant.node_id, Result.reject_reason, Result.reject_detail)
            .join(Participant, Participant.id == Result.participant_id)
            .where(Result.state == "rejected")
        ).all()
    who = {True: "attacker", False: "honest"}
    return [f"{who[r.node_id in attackers]}: {r.reject_reason}: {r.reject_detail}" for r in rows]


def summarise(fleets: dict[int, dict]) -> list[dict]:
    """The ``attacks`` table: each attack's val loss ÷ the clean, undefended run."""
    table = []
    for n, arms in fleets.items():
        if "clean_off" not in arms or "clean_on" not in arms:
            continue
        clean = arms["clean_off"]["val_loss"]
        table.append(
            {
                "name": "none (honest cost of the defences)",
                "participants": n,
                "fraction": 0.0,
                "defended_ratio": arms["clean_on"]["val_loss"] / clean,
                "undefended_ratio": 1.0,
                "honest_reject_rate": arms["clean_on"]["honest_reject_rate"],
            }
        )
        for attack in ATTACKS:
            on, off = arms.get(f"{attack}_on"), arms.get(f"{attack}_off")
            if on is None or off is None:
                continue
            table.append(
                {
                    "name": attack,
                    "participants": n,
                    "fraction": on.get("attackers", 1) / n,  # older runs: 1 attacker
                    "defended_sd": on.get("val_loss_sd", 0.0) / clean,
                    "undefended_sd": off.get("val_loss_sd", 0.0) / clean,
                    "defended_ratio": on["val_loss"] / clean,
                    "undefended_ratio": off["val_loss"] / clean,
                    "honest_reject_rate": on["honest_reject_rate"],
                }
            )
    return table


def defence_cost(cfg, buffers: list[int]) -> dict:
    """Coordinator time per result spent in the defences, with ``n`` results per outer
    step (``buffer_size`` = n simulated participants): the per-tensor bounds of one result
    (a column and the shared layers), the robust mean per result, and the held-out
    forward passes of one column check."""
    from coordinator.aggregation.robust import robust_reducer
    from shared_model.model import PerspectiveModel

    torch.manual_seed(0)
    model = PerspectiveModel(cfg, moe=True).eval()
    shared, column = model.shared_state(), model.expert_state(0)
    settings = FederationSettings()
    bounds = UpdateBounds.from_settings(settings)

    def noise(st):
        return {k: 0.01 * v.norm() * torch.randn_like(v) / v.numel() ** 0.5 for k, v in st.items()}

    t0 = time.perf_counter()
    for _ in range(20):
        bounds.record(bounds.check("column", noise(column), column))
        bounds.record(bounds.check("shared", noise(shared), shared))
    out: dict = {"bounds_ms_per_result": 1000 * (time.perf_counter() - t0) / 20}
    seq = torch.randint(0, cfg.model.vocab_size, (8, cfg.train.seq_len + 1))
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(5):
            model(seq[:, :-1], targets=seq[:, 1:], columns=torch.zeros(8, dtype=torch.long))
    out["column_check_ms_per_column"] = 2 * 1000 * (time.perf_counter() - t0) / 5
    for name in ("centered_clip", "median", "mean"):
        reduce = robust_reducer(name, trim=0, clip_factor=1.0)
        for n in buffers:
            grads = [noise(shared) for _ in range(n)]
            t0 = time.perf_counter()
            for key in shared:
                reduce(torch.stack([g[key] for g in grads]), torch.ones(n))
            out[f"{name}_ms_per_result_at_{n}"] = 1000 * (time.perf_counter() - t0) / n
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--participants", default="3,5", help="comma-separated fleet sizes")
    p.add_argument("--tokens", type=int, default=150_000, help="stage-3 token budget per run")
    p.add_argument("--seed-steps", type=int, default=300)
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="of the stdlib corpus")
    p.add_argument("--override", action="append", default=[], help="config key=value")
    p.add_argument("--seed-checkpoint", type=Path, default=None)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--arms", default="", help="only these arms (comma list; default all)")
    p.add_argument("--compare", default="", help="aggregators also run defended (comma list)")
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--attackers", type=int, default=1, help="the last K participants")
    p.add_argument("--repeat", type=int, default=1, help="runs per arm (mean ± sd)")
    p.add_argument("--steps-per-unit", type=int, default=None, help="default: the setting's")
    p.add_argument("--fed", action="append", default=[], metavar="KEY=VALUE",
                   help="a FederationSettings field of the defended arms (value in YAML), "
                   "e.g. column_check_window=128 (repeatable)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (arms on equal terms)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--name", default="byzantine_bench")
    p.add_argument("--merge", default="", help="only merge these result files' fleets (comma "
                   "list, later files win) into --name")  # fmt: skip
    p.add_argument("--cost", default="", help="only measure the defences' cost at these "
                   "buffer sizes (comma list), into <name>_cost.json")  # fmt: skip
    return p.parse_args()


def merge_reports(paths: list[Path], name: str) -> None:
    """One report from several runs (e.g. one per fleet size, or arms re-run): their arms by
    fleet size, each naming its run (whose settings ``runs`` lists; a later file's arm
    replaces an earlier one's), and the ``attacks`` table over all of them."""
    merged: dict = {"runs": {}, "fleets": {}}
    for path in paths:
        report = json.loads(path.read_text())
        settings = {k: v for k, v in report.items() if k not in ("fleets", "attacks", "runs")}
        merged["runs"][path.name] = settings
        for n, arms in report["fleets"].items():
            for arm, out in arms.items():  # a later file's arm replaces an earlier one's
                merged["fleets"].setdefault(n, {})[arm] = {**out, "run": path.name}
    fleets = {int(n): arms for n, arms in merged["fleets"].items()}
    merged["attacks"] = summarise(fleets)
    (RESULTS / f"{name}.json").write_text(json.dumps(merged, indent=1))
    print(json.dumps(merged["attacks"], indent=1))


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge_reports([Path(f) for f in args.merge.split(",")], args.name)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=args.override)
    if args.cost:
        cost = defence_cost(cfg, [int(x) for x in args.cost.split(",")])
        cost["preset"] = args.preset
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}_cost.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost, indent=1))
        return
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=args.corpus_bytes)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="byzbench-"))
    ckpt = str(args.seed_checkpoint or seed_checkpoint(cfg, corpus, work, args.seed_steps))
    windows = eval_windows(corpus.dataset("val"), cfg.train.seq_len, args.eval_tokens)
    attacks = [a for a in args.attacks.split(",") if a]
    fleets: dict[int, dict] = {}
    report = {"preset": args.preset, "tokens": args.tokens, "off_settings": OFF,
              "attackers": args.attackers, "repeat": args.repeat,
              "steps_per_unit": args.steps_per_unit, "defence_overrides": args.fed}  # fmt: skip
    for n in (int(x) for x in args.participants.split(",")):
        arms = [("clean_off", None, False, ""), ("clean_on", None, True, "")]
        arms += [(f"{a}_{d}", a, d == "on", "") for a in attacks for d in ("on", "off")]
        for agg in (x for x in args.compare.split(",") if x):  # other aggregators, defended
            arms += [(f"clean_on_{agg}", None, True, agg)]
            arms += [(f"{a}_on_{agg}", a, True, agg) for a in attacks if a == "sign_flip_bound"]
        fleets[n] = {}
        for name, attack, defended, agg in arms:
            if args.arms and name not in args.arms.split(","):
                continue
            runs = [
                run_arm(replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + r)), corpus,
                        ckpt, work / f"n{n}" / name / str(r), args, n, attack, defended, windows,
                        agg)
                for r in range(args.repeat)
            ]  # fmt: skip
            out = merge_runs(runs)
            fleets[n][name] = out
            print(f"{n} participants, {name}: val {out['val_loss']:.4f} ± {out['val_loss_sd']:.4f} "
                  f"honest rejected {out['honest_rejected']}/{out['honest_results']} "
                  f"attacker accepted {out['attacker_accepted']}/{out['attacker_results']} "
                  f"({out['seconds']:.0f} s)", flush=True)  # fmt: skip
            for line in out.get("refusals", []):
                print("   ", line[:160], flush=True)
            report["fleets"] = {str(k): v for k, v in fleets.items()}
            report["attacks"] = summarise(fleets)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["attacks"], indent=1))


if __name__ == "__main__":
    main()
