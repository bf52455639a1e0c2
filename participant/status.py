"""``perspective participant status``: the daemon's ``status.json`` + the worker's progress.

The daemon rewrites ``<state>/status.json`` (state, restarts, refusals, limits); its worker
writes ``<state>/state/progress.json`` (unit in progress, traffic today, credit; see
:mod:`participant.progress`). :func:`read_status` merges both with live RSS/CPU and
:func:`render_status` turns the result into the lines the command prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from participant.daemon import tree_usage
from participant.progress import read_progress

WORKER_STATE = "state"  # the worker's state directory inside the daemon's (see _worker_argv)
BAR_WIDTH = 20


def read_status(state_dir: Path, sample_s: float = 1.0) -> dict[str, Any]:
    """The daemon's last status plus the worker's progress and live RSS/CPU.

    Args:
        state_dir: The participant's state directory.
        sample_s: CPU sampling window.

    Returns:
        The status dict with ``running`` (daemon alive), ``age_s``, ``usage`` and
        ``progress`` (``None`` before the worker first wrote it) added.
    """
    path = Path(state_dir) / "status.json"
    progress = read_progress(Path(state_dir) / WORKER_STATE)
    if not path.is_file():
        return {
            "state": "not running (no status.json; start 'perspective participant run')",
            "progress": progress,
        }
    status = json.loads(path.read_text(encoding="utf-8"))
    status["age_s"] = round(time.time() - status.get("updated_at", 0), 1)
    status["running"] = psutil.pid_exists(status.get("daemon_pid") or -1) and status["state"] != (
        "stopped"
    )
    pids = [p for p in (status.get("supernode_pid"), status.get("worker_pid")) if p]
    status["usage"] = tree_usage(pids, interval=sample_s) if status["running"] else None
    status["progress"] = progress
    return status


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as network traffic is counted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def render_unit(unit: dict[str, Any]) -> str:
    """One line for the unit in progress: bar, percent, steps, ETA, tokens/s, the lr of
    its shared layers and of its experts."""
    step, total = int(unit.get("step") or 0), int(unit.get("total_steps") or 0)
    frac = min(1.0, step / total) if total else 0.0
    filled = int(round(frac * BAR_WIDTH))
    line = f"unit {unit.get('unit_id')} (stage {unit.get('stage')})  "
    line += f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {frac:.0%} {step}/{total} steps"
    phase = unit.get("phase")
    if phase == "sync":
        return line + ", syncing"
    if phase == "upload":
        return line + ", uploading"
    if unit.get("eta_s") is not None:
        line += f", ETA {unit['eta_s']:.0f} s"
    if unit.get("tokens_per_s") is not None:
        line += f", {unit['tokens_per_s']:,.0f} tok/s"
    if unit.get("lr") is not None:
        line += f", lr {unit['lr']:.2e} (experts {unit['expert_lr']:.2e})"
    return line


def render_limits(limits: dict[str, Any]) -> str:
    """The limits in force, one line."""

    def cap(key: str, unit: str) -> str:
        value = limits.get(key)
        return "none" if value is None else f"{value:g} {unit}"

    return (
        f"limits:    threads {limits.get('threads')}, columns {limits.get('max_columns')}, "
        f"cache {cap('cache_cap_mb', 'MB')}, RAM {cap('ram_cap_mb', 'MB')}, "
        f"bandwidth {cap('bandwidth_mbps', 'Mbit/s')}, "
        f"schedule {limits.get('schedule') or 'always'}, device {limits.get('device') or 'auto'}"
    )


def render_progress(progress: dict[str, Any], now: float | None = None) -> list[str]:
    """Lines for the worker's progress file: unit, today's traffic, credit, device."""
    lines = []
    unit = progress.get("unit")
    if unit:
        lines.append(render_unit(unit))
    else:
        last = progress.get("last_unit") or {}
        done = f" (last: {last['unit_id']}, {'ok' if last.get('ok') else 'failed'})"
        lines.append("unit:      none in progress" + (done if last.get("unit_id") else ""))
    today = progress.get("today") or {}
    lines.append(
        f"today:     up {human_bytes(today.get('bytes_up', 0))}, "
        f"down {human_bytes(today.get('bytes_down', 0))}, {today.get('units_done', 0)} units"
    )
    credit = progress.get("credit_tokens")
    lines.append(f"credit:    {'unknown' if credit is None else f'{credit:,} tokens'}")
    if progress.get("device"):
        lines.append(f"worker:    {progress['device']}, {progress.get('threads')} torch threads")
    age = (now or time.time()) - progress.get("updated_at", 0)
    if unit and age > 60:
        lines.append(f"           (progress last updated {age:.0f} s ago)")
    return lines


def render_status(status: dict[str, Any]) -> list[str]:
    """Everything ``perspective participant status`` prints, as lines."""
    lines = [f"state:     {status['state']}"]
    for key in ("superlink_address", "restarts", "last_refusal"):
        if key in status:
            lines.append(f"{key + ':':<10} {status[key]}")
    if status.get("progress"):
        lines += render_progress(status["progress"])
    if status.get("limits"):
        lines.append(render_limits(status["limits"]))
    usage = status.get("usage")
    if usage:
        lines.append(
            f"usage:     RSS {usage['rss_bytes'] / 1e6:.0f} MB, CPU {usage['cpu_percent']:.1f} %"
        )
    return lines
