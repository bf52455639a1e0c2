"""A real-process fleet on this machine: ``perspective demo`` with many participants.

Every participant is a real Flower SuperNode and a participant worker process talking to a
real SuperLink and the coordinator's blob service on 127.0.0.1, exactly as ``make demo``
runs them (``--participants`` of them, ``tiny``). While it trains, every
``--sample-seconds`` this script scrapes the coordinator's ``/metrics`` (the loop's own
lease, intake and step histograms and its counters) and records the coordinator process's
RSS and database size. A *stall* is a stretch of ``--stall-seconds`` (60) with neither a
lease nor a reply taken.

Output: ``benchmarks/results/fleet_real.json`` (``participants``, ``minutes``, ``stalls``,
``rss_mb_start``, ``rss_mb_end``, ``lease_p50_ms``, ``lease_p99_ms``, ``intake_p50_ms``,
``intake_p99_ms``, the samples) and a PNG. Usage::

    python -m benchmarks.fleet_real --participants 20 --minutes 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.fleet_soak import RESULTS, plot

SAMPLE = re.compile(r"^(perspective_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+|\+Inf|NaN)$", re.M)


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as ``{name{labels}: value}``."""
    text = httpx.get(url, timeout=10).text
    return {m.group(1) + (m.group(2) or ""): float(m.group(3)) for m in SAMPLE.finditer(text)}


def quantile(metrics: dict[str, float], name: str, q: float, before: dict | None = None):
    """The ``q`` quantile of histogram ``name`` (its bucket's upper bound, in ms), over the
    observations since ``before`` (a previous scrape) or all of them."""
    buckets = []
    for key, value in metrics.items():
        m = re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', key)
        if m:
            base = (before or {}).get(key, 0.0)
            buckets.append((float(m.group(1)), value - base))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    for bound, count in buckets:
        if count >= q * total:
            return 1000 * bound
    return None


def _counter(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def watch(proc: subprocess.Popen, work: Path, every: float, samples: list, url_box: dict):
    """Sample until the demo exits."""
    coord = psutil.Process(proc.pid)
    last, t0 = None, time.monotonic()
    while proc.poll() is None:
        time.sleep(every)
        if "url" not in url_box:
            continue
        try:
            m = scrape(url_box["url"] + "metrics")
        except httpx.HTTPError:
            continue  # between stages the API restarts
        db = sum(p.stat().st_size for p in (work / "coordinator").glob("coordinator.db*"))
        sample = {
            "t_s": round(time.monotonic() - t0, 1),
            "rss_mb": coord.memory_info().rss / 2**20,
            "db_mb": db / 2**20,
            "leases": m.get("perspective_lease_seconds_count", 0.0),
            "intakes": m.get("perspective_intake_seconds_count", 0.0),
            "accepted": _counter(m, "perspective_units_completed_total"),
            "version": m.get("perspective_global_version", -1),
        }
        if last is not None:
            dt = sample["t_s"] - last[0]["t_s"]
            sample["leases_per_s"] = (sample["leases"] - last[0]["leases"]) / dt
            sample["accepted_per_s"] = (sample["accepted"] - last[0]["accepted"]) / dt
            for h in ("lease", "intake"):
                name = f"perspective_{h}_seconds"
                sample[f"{h}_p99_ms"] = quantile(m, name, 0.99, last[1])
            sample["idle"] = sample["leases"] == last[0]["leases"] and (
                sample["intakes"] == last[0]["intakes"]
            )
            samples.append(sample)
        last = (sample, m)
    url_box["final"] = last[1] if last else {}


def count_stalls(samples: list[dict], seconds: float) -> int:
    """Stretches of at least ``seconds`` with neither a lease nor a reply taken, between the
    first and the last activity (a small fleet's units take longer than one sample window:
    a quiet window alone is not one; after the last stage's budget the demo only shuts
    down)."""
    active = [i for i, s in enumerate(samples) if not s["idle"]]
    samples = samples[: active[-1] + 1] if active else []
    stalls, since = 0, None
    for s in samples:
        if not s["idle"]:
            since = None
            continue
        since = s["t_s"] if since is None else since
        if s["t_s"] - since >= seconds and not s.get("counted"):
            stalls, s["counted"] = stalls + 1, True
            since = float("inf")  # counted once until activity resumes
    return stalls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, default=20)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--sample-seconds", type=float, default=15.0)
    p.add_argument("--steps-per-unit", type=int, default=5)
    p.add_argument("--stall-seconds", type=float, default=60.0)
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fleetreal-"))
    cmd = [sys.executable, "-m", "shared_model.cli", "demo", "--preset", "tiny",
           "--participants", str(args.participants), "--minutes", str(args.minutes),
           "--steps-per-unit", str(args.steps_per_unit), "--work-dir", str(work)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    samples: list[dict] = []
    box: dict = {}
    watcher = threading.Thread(target=watch, args=(proc, work, args.sample_seconds, samples, box))
    watcher.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if m := re.search(r"dashboard: (http://\S+/)", line):
            box["url"] = m.group(1)
    proc.wait()
    watcher.join()
    final = box.get("final", {})
    summary = {
        "participants": args.participants,
        "minutes": args.minutes,
        "exit_code": proc.returncode,
        "stalls": count_stalls(samples, args.stall_seconds),
        "stall_seconds": args.stall_seconds,
        "rss_mb_start": samples[0]["rss_mb"] if samples else None,
        "rss_mb_end": samples[-1]["rss_mb"] if samples else None,
        "rss_mb_max": max((s["rss_mb"] for s in samples), default=None),
        "db_mb_end": samples[-1]["db_mb"] if samples else None,
        "leases_per_s": final.get("perspective_lease_seconds_count", 0) / (60 * args.minutes),
        "lease_p50_ms": quantile(final, "perspective_lease_seconds", 0.5),
        "lease_p99_ms": quantile(final, "perspective_lease_seconds", 0.99),
        "intake_p50_ms": quantile(final, "perspective_intake_seconds", 0.5),
        "intake_p99_ms": quantile(final, "perspective_intake_seconds", 0.99),
        "step_p50_ms": quantile(final, "perspective_loop_step_seconds", 0.5),
        "step_p99_ms": quantile(final, "perspective_loop_step_seconds", 0.99),
        "note": "percentiles are histogram bucket upper bounds (the last stage's run)",
        "samples": samples,
        "demo_tail": "".join(out[-40:]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet_real.json").write_text(json.dumps(summary, indent=1) + "\n")
    for s in samples:  # the plot's panels
        s.setdefault("lease_p99_ms", None)
        s["intake_p99_ms"] = s.get("intake_p99_ms")
        s["online"] = args.participants
    plot(samples, RESULTS / "fleet_real.png", f"{args.participants} real participants (demo)")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("samples", "demo_tail")},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
