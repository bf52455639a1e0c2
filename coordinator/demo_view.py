"""The demo's live terminal view (rich) and its final summary."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.db import participants as db_participants
from coordinator.db.stats import (
    accepted_column_codecs,
    accepted_unit_columns,
    result_staleness,
    trained_schedule,
    utilisation_by_participant,
)
from coordinator.traffic import per_sync_bits
from shared_model.config import PerspectiveConfig

#: The view's width when stdout is not a terminal (``make demo | tee demo.log``, CI) and
#: ``COLUMNS`` does not say: rich's default of 80 folds the summary's nine columns into
#: slivers one word wide.
LOG_WIDTH = 160


def view_width() -> int | None:
    """The console width: the terminal's (``None``: rich measures it), ``COLUMNS``, or
    :data:`LOG_WIDTH` for a log."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return LOG_WIDTH


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class DemoView:
    """Live table of participants, versions, losses and traffic."""

    def __init__(self, cfg: PerspectiveConfig, n_participants: int) -> None:
        self.cfg, self.n = cfg, n_participants
        self.console = Console(width=view_width())
        self.live: Live | None = None
        self.loop = None
        self.stage = 0
        self.stages: dict[int, dict] = {}
        self.seed_val_loss: float | None = None  # stage 1's seed on the stages' val set
        self.eval_tokens = 0  # tokens each evaluation of the stages' val set scores
        self._last = 0.0
        self._t0 = time.monotonic()

    def say(self, text: str) -> None:
        """Print a progress line."""
        self.console.print(f"[bold cyan]demo[/] {text}")

    @property
    def _batch_tokens(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    def start_stage(self, stage: int, loop) -> None:
        """Begin showing a federated stage."""
        self.stage, self.loop = stage, loop
        self.eval_tokens = loop.settings.eval_batches * self._batch_tokens
        self._t0 = time.monotonic()
        self.say(f"federated stage {stage} started (version {loop.state.version})")
        self.live = Live(self._table(), console=self.console, refresh_per_second=2)
        self.live.start()

    def refresh(self) -> None:
        """Redraw at most once a second (called every loop iteration)."""
        now = time.monotonic()
        if self.live is not None and now - self._last >= 1.0:
            self._last = now
            self.live.update(self._table())

    def _table(self) -> Table:
        loop = self.loop
        st = loop.stats
        val = f"{st.val_loss[-1][1]:.4f}" if st.val_loss else "-"
        util = st.train_s / st.unit_s if st.unit_s else 0.0
        title = (
            f"stage {self.stage} | version {loop.state.version} | val loss {val} | "
            f"tokens {st.tokens:,} | up {_mb(st.bytes_up)} | down {_mb(st.bytes_down)} | "
            f"accepted {st.accepted} rejected {st.rejected} | train/unit time {util:.0%}"
        )
        table = Table(title=title)
        for col in (
            "participant",
            "node",
            "state",
            "columns≤",
            "units",
            "rejected",
            "credit",
            "tok/s",
        ):
            table.add_column(col)
        with loop.factory() as s:
            page = db_participants.list_participants(s, limit=100)
            for p in page.items:
                table.add_row(
                    p.name, str(p.node_id), p.state, str(p.max_columns), str(p.units_done),
                    str(p.units_rejected), f"{p.credit:,}", f"{p.tokens_per_s or 0:.0f}",
                )  # fmt: skip
        return table

    def end_stage(self, stage: int, loop, traffic: dict[str, int] | None = None) -> None:
        """Stop the live view and remember the stage's figures (``traffic``: bytes the
        blob service moved during the stage, per kind of blob)."""
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None
        st = loop.stats
        wall = time.monotonic() - self._t0
        final_val = loop.evaluate()
        traffic = dict(traffic or {})
        # A participant's first checkpoint is its join; later ones would be reloads.
        traffic["join"] = traffic.pop("checkpoint", 0)
        with loop.factory() as s:
            columns = accepted_unit_columns(s, stage=f"stage{stage}")
            # over the whole stage (joins and the first lease included): how busy the
            # network keeps each machine
            busy = utilisation_by_participant(s, stage=f"stage{stage}", wall_s=wall)
            codecs = accepted_column_codecs(s, stage=f"stage{stage}")
            staleness = result_staleness(s, stage=f"stage{stage}")
            schedule = trained_schedule(s, stage=f"stage{stage}")
        self.stages[stage] = {
            "versions_end": loop.state.version,
            "tokens": st.tokens,
            "accepted": st.accepted,
            "rejected": st.rejected,
            "val_loss": st.val_loss,
            "final_val_loss": final_val,
            "bytes_up": st.bytes_up,
            "bytes_down": st.bytes_down,
            "traffic": traffic,
            "results_by_column_codec": codecs,
            **per_sync_bits(self.cfg, traffic, columns, self.n),
            "utilisation": min(busy.values()) if busy else None,
            "utilisation_by_participant": busy,
            # versions published while a result's unit trained and travelled
            "staleness": staleness,
            "train_share_of_unit_time": st.train_s / st.unit_s if st.unit_s else None,
            # the lr and (stage 4) ternary phases the accepted units trained at, in time
            "schedule": schedule,
            # how leased units reached the nodes: Flower messages, or Submit replies
            # (coordinator.unit_handoff)
            "units_by_flower": _units(loop.units_per_message),
            "units_by_submit_reply": _units(loop.units_per_submit_reply),
            "seconds": wall,
        }

    def summary(self, stage1, work: Path) -> dict:
        """Machine-readable summary (also written to ``summary.json``)."""
        return {
            "preset": self.cfg.name,
            "participants": self.n,
            "seed_val_loss": self.seed_val_loss,
            "validation": "column mode on the coordinator's held-out documents, fixed "
            f"sequences ({self.eval_tokens:,} tokens: FederationSettings.eval_batches "
            "batches); the seed row is the stage-1 model (cloned into experts, the same "
            "function) on the same sequences",
            # Stage 1's trainer checks itself on other sequences of the same documents,
            # token-level and without the stages' per-column draw: not comparable with the
            # stages' losses, so kept apart.
            "stage1_own_check": {
                "val_loss": stage1.val_loss,
                "tokens": self.cfg.train.eval_batches * self._batch_tokens,
            },
            "stages": self.stages,
            "work_dir": str(work),
        }

    def close(self) -> None:
        """Stop the live display if it is still running."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def print_summary(self, summary: dict | None, work: Path) -> None:
        """Print the final summary table."""
        if summary is None:
            self.say(f"stopped early; logs and database under {work}")
            return
        table = Table(title="Perspective demo summary (val: same held-out sequences)")
        cols = ("stage", "val loss (first → last)", "tokens", "versions", "up", "down")
        for col in (*cols, "bits/param up·down/sync", "join, data", "train/wall (min)"):
            table.add_column(col)
        seed = summary.get("seed_val_loss")
        table.add_row("1 (central seed)", "-" if seed is None else f"{seed:.4f}", *[""] * 7)
        for stage, s in summary["stages"].items():
            first = f"{s['val_loss'][0][1]:.4f}" if s["val_loss"] else "-"
            util = f"{s['utilisation']:.0%}" if s["utilisation"] is not None else "-"
            t = s.get("traffic", {})
            table.add_row(
                str(stage), f"{first} → {s['final_val_loss']:.4f}", f"{s['tokens']:,}",
                str(s["versions_end"]), _mb(t.get("up", s["bytes_up"])),
                _mb(sum(t.get(k, 0) for k in ("delta", "teacher", "other"))),
                f"{s['up_bits_per_param']:.2f} · {s['down_bits_per_param']:.2f}",
                f"{_mb(t.get('join', 0))}, {_mb(t.get('data', 0))}", util,
            )  # fmt: skip
        self.console.print(table)
        for stage, s in summary["stages"].items():
            by_submit = s["units_by_submit_reply"]
            total = by_submit + s["units_by_flower"]
            stale = _staleness_note(s["staleness"])
            self.say(f"stage {stage}: {by_submit} of {total} units came with Submit replies{stale}")
            if phases := s.get("schedule", {}).get("phases"):
                self.say(f"stage {stage}: ternary fraction by answer time: {_phases_note(phases)}")
        self.say(f"database: {work / 'coordinator' / 'coordinator.db'}")
        self.say(f"blobs and checkpoints: {work / 'coordinator'}; summary: {work / 'summary.json'}")
        self.say(
            "take the trained model out (then perspective generate / eval / manifold run): "
            f"perspective coordinator export --work-dir {work / 'coordinator'} "
            f"--out {work / 'export'}"
        )


def _staleness_note(staleness: dict) -> str:
    """``; results 1.15 versions stale on average, 80 % of units started eagerly``."""
    if not staleness:
        return ""
    note = f"; results {staleness['mean']:.2f} versions stale on average"
    if staleness.get("eager"):
        note += f", {staleness['eager']:.0%} of units started eagerly"
    return note


def _phases_note(phases: dict) -> str:
    """``0.25: 5 units, 2-40 s; 1.0: 9 units, 41-80 s``."""
    return "; ".join(
        f"{f}: {p['units']} units, {p['answered_s'][0]:.0f}-{p['answered_s'][1]:.0f} s"
        for f, p in phases.items()
    )


def _units(batches) -> int:
    """Units sent, from a batch size -> batches count."""
    return sum(size * n for size, n in batches.items())
