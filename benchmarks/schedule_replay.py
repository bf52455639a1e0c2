"""How well a time-budgeted stage's schedule placed its units, replayed on recorded demos.

A stage budgeted in minutes does not know how many inner steps it will train, so its lr
and ternary schedules extrapolate a length at every lease
(``StageBudget.schedule_steps``). What the stage did train is known afterwards: each
answered unit's right place is its position over the steps the stage trained in the end.
Leases and answers do not depend on the schedule (a unit takes as long at any lr), so the
work units a demo recorded can be replayed through any estimator, each seeing at every
lease only the answers recorded before it, on a virtual clock.

Estimators compared:

* ``since_first`` (the code until ``8775d12``): the steps answered plus the rate since the
  stage's first answer over the time left;
* ``lag`` (``350720c``, reverted): a unit placed at the share of the minutes it will be
  answered at, the time gone plus the mean lease-to-answer lag of the last 8 answers;
* ``recent_finishing`` (today's ``StageBudget.schedule_steps``, run as is): the steps no
  longer in flight, plus the last minute's rate over the time left, plus the unit each
  node finishes at the end.

Per stage and estimator: the mean error of the answered units' places (placed - right,
as a share of the stage; positive = the schedule ran ahead and ended early), its mean
absolute value, how many units trained in another ternary phase than their right one
(of 4), and how many at the schedule's end (share >= 0.97; lr at its floor).

Usage::

    python benchmarks/schedule_replay.py --run /tmp/demo_small:4 --run /tmp/demo_tiny:1.6 \
        --name schedule_replay

(``DIR:MINUTES``: a demo work dir and its federated stages' budget, 0.4 x the demo's
``--minutes``). Writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path

from coordinator.coordinator_process import StageBudget
from coordinator.db.leases import StageRate
from coordinator.federation_settings import FederationSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PHASES = 4  # the ternary schedule's phases (0.25, 0.5, 0.75, 1.0)


@dataclass
class Unit:
    leased: float  # seconds on the stage's budget clock
    answered: float | None  # None: never answered (dropped at the end, or failed)
    steps: int
    position: int
    node: int | None


def load_stage(db: Path, stage: str, start_offset: float) -> tuple[list[Unit], int]:
    """The stage's units (re-issued copies left out, as positions do) and the schedule
    length its first unit was leased under (the fallback)."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select leased_at, finished_at, state, steps, params, participant_id "
            "from work_units where stage = ? and reissued_from is null order by leased_at",
            (stage,),
        ).fetchall()
    if not rows:
        return [], 0
    t0 = dt.datetime.fromisoformat(rows[0][0])

    def at(ts: str) -> float:
        return (dt.datetime.fromisoformat(ts) - t0).total_seconds() + start_offset

    units = [
        Unit(at(leased), at(done) if done and state == "done" else None, steps,
             json.loads(params)["position"], node)
        for leased, done, state, steps, params, node in rows
    ]  # fmt: skip
    return units, json.loads(rows[0][4])["schedule_steps"]


def rate_at(units: list[Unit], now: float, window_s: float = 60.0) -> StageRate:
    """``leases.stage_rate`` as of ``now``, from the recorded units."""
    live = [u for u in units if u.leased <= now and (u.answered is None or u.answered > now)]
    per_node: dict[int, int] = {}
    for u in live:
        if u.node is not None:
            per_node[u.node] = max(per_node.get(u.node, 0), u.steps)
    done = sorted((u for u in units if u.answered is not None and u.answered <= now),
                  key=lambda u: u.answered)  # fmt: skip
    recent = [u for u in done if done and u.answered >= done[-1].answered - window_s]
    recent = recent if len(recent) >= 3 else done[-3:]
    span = recent[-1].answered - recent[0].answered if recent else 0.0
    per_s = sum(u.steps for u in recent[1:]) / span if span > 0 else None
    return StageRate(sum(u.steps for u in live), sum(per_node.values()), per_s)


def since_first(units, unit, minutes, fallback, state) -> int:
    """The estimator until ``8775d12`` (steps answered + rate since the first answer)."""
    done = sorted(u.answered for u in units if u.answered is not None and u.answered <= unit.leased)
    in_flight = rate_at(units, unit.leased).in_flight
    answered = unit.position - in_flight
    if len(done) < 2 or answered <= 0 or (answered < in_flight and not state.get("up")):
        return fallback
    state["up"] = True
    first = done[0]
    first_steps = sum(u.steps for u in units if u.answered == first)
    steps = sum(u.steps for u in units if u.answered is not None and u.answered <= unit.leased)
    per_s = (steps - first_steps) / (done[-1] - first) if done[-1] > first else 0.0
    return max(unit.position + 1, round(answered + per_s * max(0.0, 60 * minutes - unit.leased)))


def lag(units, unit, minutes, fallback, state) -> int:
    """``350720c``'s time index (reverted): the share of the minutes it is answered at."""
    done = sorted((u for u in units if u.answered is not None and u.answered <= unit.leased),
                  key=lambda u: -u.answered)[:8]  # fmt: skip
    if not done or unit.position <= 0:
        state["reached"] = max(state.get("reached", 0.0), unit.position / fallback)
        return fallback
    wait = statistics.mean(u.answered - u.leased for u in done)
    share = max(state.get("reached", 0.0), min(1.0, (unit.leased + wait) / (60 * minutes)))
    state["reached"] = share
    return max(unit.position + 1, round(unit.position / share))


def replay(units: list[Unit], minutes: float, fallback: int, estimator: str) -> list[float]:
    """Each unit's share of the schedule (step / length) as ``estimator`` leases it."""
    clock = [0.0]
    budget = StageBudget(minutes=minutes, started=0.0, clock=lambda: clock[0])
    settings = FederationSettings(units_hint=1, steps_per_unit=fallback)
    today = budget.schedule_steps(1, settings, prior_steps_per_minute=fallback / minutes)
    shares, state = [], {}
    for unit in units:
        clock[0] = unit.leased
        if estimator == "recent_finishing":
            total = today(unit.position, rate_at(units, unit.leased))
        else:
            old = {"since_first": since_first, "lag": lag}[estimator]
            total = old(units, unit, minutes, fallback, state)
        step = min(unit.position, total - 1)
        shares.append(step / total)
    return shares


def score(units: list[Unit], shares: list[float]) -> dict[str, float | int]:
    """How far the answered units' places were from their right ones."""
    trained = max(u.position + u.steps for u in units if u.answered is not None)
    errors, off, at_end = [], 0, 0
    for unit, share in zip(units, shares, strict=True):
        if unit.answered is None:
            continue
        right = unit.position / trained
        errors.append(share - right)
        off += min(PHASES - 1, int(share * PHASES)) != min(PHASES - 1, int(right * PHASES))
        at_end += share >= 0.97
    return {
        "units": len(errors),
        "steps_trained": trained,
        "mean_error": statistics.mean(errors),
        "mean_abs_error": statistics.mean(abs(e) for e in errors),
        "phase_off": off,
        "at_end": at_end,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="DIR:MINUTES")
    p.add_argument("--start-offset", type=float, default=1.0,
                   help="seconds from the budget's start to the stage's first lease")  # fmt: skip
    p.add_argument("--name", default="schedule_replay")
    args = p.parse_args()
    out = {"estimators": ["since_first", "lag", "recent_finishing"], "runs": []}
    for run in args.run:
        where, minutes = run.rsplit(":", 1)
        db = Path(where) / "coordinator" / "coordinator.db"
        for stage in ("stage3", "stage4"):
            units, fallback = load_stage(db, stage, args.start_offset)
            if not any(u.answered is not None for u in units):
                continue
            row = {"run": where, "stage": stage, "minutes": float(minutes)}
            for name in out["estimators"]:
                row[name] = score(units, replay(units, float(minutes), fallback, name))
                print(where, stage, name, {k: round(v, 3) for k, v in row[name].items()})
            out["runs"].append(row)
    out["mean_abs_error"] = {
        name: statistics.mean(r[name]["mean_abs_error"] for r in out["runs"])
        for name in out["estimators"]
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
