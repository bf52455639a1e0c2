"""The worker's progress file, read by ``perspective participant status``.

:class:`ProgressWriter` keeps ``progress.json`` in the worker's state directory up to date:
the unit in progress (stage, phase, step of total steps, tokens/s, ETA), the effective
torch threads and device, the participant's credit, and today's traffic and units.
Today's counters are stored in the same file under the local calendar day they belong to,
so a restarted worker continues them and the first update of a new day starts from zero.

The file is rewritten atomically (temp + rename) and at most once per ``min_interval_s``
for step and traffic updates; unit start/end and worker settings are written at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.files import write_json_atomic

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"
PHASES = ("sync", "train", "upload")


def read_progress(state_dir: str | Path) -> dict[str, Any] | None:
    """The last ``progress.json`` written in ``state_dir`` (``None`` if there is none)."""
    path = Path(state_dir) / PROGRESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:  # rename is atomic: only a bad disk
        log.warning("cannot read %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def _empty_day(day: dt.date) -> dict[str, Any]:
    return {"day": day.isoformat(), "bytes_up": 0, "bytes_down": 0, "units_done": 0}


class ProgressWriter:
    """Writes ``progress.json`` for one worker (thread-safe).

    Args:
        state_dir: The worker's state directory.
        today: Local calendar day now (injectable so day rollover can be tested).
        clock: Monotonic seconds (step timing and write throttling).
        min_interval_s: Least time between two throttled writes.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        today: Callable[[], dt.date] = dt.date.today,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(state_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._today, self._clock, self.min_interval_s = today, clock, min_interval_s
        self._lock = threading.Lock()
        self._last_write = float("-inf")
        self._train_t0: float | None = None
        old = read_progress(self.path.parent) or {}
        self.data: dict[str, Any] = {
            "threads": None,
            "device": None,
            "credit_tokens": old.get("credit_tokens"),
            "unit": None,
            "last_unit": old.get("last_unit"),
            "today": old.get("today") or _empty_day(today()),
        }
        self._roll_day()

    # --- updates ---------------------------------------------------------------------------

    def set_worker(self, threads: int, device: str) -> None:
        """Record the effective torch threads and the training device."""
        with self._lock:
            self.data["threads"], self.data["device"] = int(threads), device
            self._write(force=True)

    def set_credit(self, credit_tokens: int) -> None:
        """Record the credit the coordinator reported in its latest request."""
        with self._lock:
            changed = self.data["credit_tokens"] != int(credit_tokens)
            self.data["credit_tokens"] = int(credit_tokens)
            self._write(force=changed)  # changes once per accepted result: keep each

    def start_unit(
        self, unit_id: str, stage: int, total_steps: int, lr: float, expert_lr: float
    ) -> None:
        """A unit begins (phase ``sync``); ``lr`` / ``expert_lr``: what the coordinator's
        schedule gives its shared layers and its expert columns."""
        with self._lock:
            self._train_t0 = None
            self.data["unit"] = {
                "unit_id": unit_id,
                "stage": int(stage),
                "phase": "sync",
                "step": 0,
                "total_steps": int(total_steps),
                "lr": float(lr),
                "expert_lr": float(expert_lr),
                "tokens_per_s": None,
                "eta_s": None,
            }
            self._write(force=True)

    def on_progress(self, phase: str, step: int, total_steps: int, tokens: int) -> None:
        """Trainer callback: ``phase`` in :data:`PHASES`, ``step`` of ``total_steps`` done,
        ``tokens`` trained so far in this unit."""
        with self._lock:
            unit = self.data["unit"]
            if unit is None:
                return
            now = self._clock()
            if phase == "train" and self._train_t0 is None:
                self._train_t0 = now  # the first call comes before the first step
            unit.update(phase=phase, step=int(step), total_steps=int(total_steps))
            elapsed = now - self._train_t0 if self._train_t0 is not None else 0.0
            if phase == "train" and step > 0 and elapsed > 0:
                unit["tokens_per_s"] = round(tokens / elapsed, 1)
                unit["eta_s"] = round((total_steps - step) * elapsed / step, 1)
            if phase == "upload":
                unit["eta_s"] = None
            self._write(force=phase != "train")

    def add_bytes(self, up: int = 0, down: int = 0, *, force: bool = False) -> None:
        """Count bytes uploaded to / downloaded from the blob service (cache misses);
        ``force``: write the file now (else at most once a ``min_interval_s``)."""
        with self._lock:
            self._roll_day()
            self.data["today"]["bytes_up"] += int(up)
            self.data["today"]["bytes_down"] += int(down)
            self._write(force=force)

    def finish_unit(self, ok: bool, error: str | None = None) -> None:
        """The unit in progress ended (``ok``: its result is ready to be sent)."""
        with self._lock:
            self._roll_day()
            unit = self.data["unit"] or {}
            if ok:
                self.data["today"]["units_done"] += 1
            self.data["last_unit"] = {
                "unit_id": unit.get("unit_id"),
                "ok": ok,
                "error": error,
                "tokens_per_s": unit.get("tokens_per_s"),
                "lr": unit.get("lr"),
                "expert_lr": unit.get("expert_lr"),
                "finished_at": time.time(),
            }
            self.data["unit"] = None
            self._write(force=True)

    def flush(self) -> None:
        """Write now, whatever the throttle says."""
        with self._lock:
            self._write(force=True)

    # --- internals -------------------------------------------------------------------------

    def _roll_day(self) -> None:
        today = self._today()
        if self.data["today"].get("day") != today.isoformat():
            self.data["today"] = _empty_day(today)

    def _write(self, force: bool) -> None:
        now = self._clock()
        if not force and now - self._last_write < self.min_interval_s:
            return
        self._roll_day()
        self._last_write = now
        self.data["updated_at"] = time.time()
        try:
            write_json_atomic(self.path, self.data, indent=2)
        except OSError as err:  # a full disk must not fail the unit in progress
            log.warning("cannot write %s: %s", self.path, err)
