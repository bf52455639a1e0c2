"""``perspective participant status``: what the daemon is doing, from ``status.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from participant.daemon import tree_usage


def read_status(state_dir: Path, sample_s: float = 1.0) -> dict[str, Any]:
    """The daemon's last status plus live RSS/CPU of its processes.

    Args:
        state_dir: The participant's state directory.
        sample_s: CPU sampling window.

    Returns:
        The status dict with ``running`` (daemon alive), ``age_s`` and ``usage`` added.
    """
    path = Path(state_dir) / "status.json"
    if not path.is_file():
        return {"state": "not running (no status.json; start 'perspective participant run')"}
    status = json.loads(path.read_text(encoding="utf-8"))
    status["age_s"] = round(time.time() - status.get("updated_at", 0), 1)
    status["running"] = psutil.pid_exists(status.get("daemon_pid") or -1) and status["state"] != (
        "stopped"
    )
    pids = [p for p in (status.get("supernode_pid"), status.get("worker_pid")) if p]
    status["usage"] = tree_usage(pids, interval=sample_s) if status["running"] else None
    return status
