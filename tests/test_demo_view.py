"""The demo's terminal view where no terminal is: ``make demo | tee demo.log``, CI logs."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.demo_view import LOG_WIDTH, DemoView
from shared_model.config import PRESETS

#: A summary the demo wrote (``make demo`` at d77052b, benchmarks/results/).
SUMMARY = Path(__file__).parents[1] / "benchmarks/results/demo_tiny_4min_d77052b.json"


def test_the_summary_is_not_folded_in_a_log(capsys, monkeypatch):
    """Captured (not a terminal) and without ``COLUMNS``, each stage's row of the summary
    is one line, not rich's 80 columns folded into slivers one word wide."""
    monkeypatch.delenv("COLUMNS", raising=False)
    summary = json.loads(SUMMARY.read_text())
    view = DemoView(PRESETS["tiny"], 3)
    assert view.console.width == LOG_WIDTH
    view.print_summary(summary, Path("/tmp/demo"))
    lines = capsys.readouterr().out.splitlines()
    assert any("val loss (first → last)" in line and "train/wall (min)" in line for line in lines)
    s3 = summary["stages"]["3"]
    row = f"{s3['val_loss'][0][1]:.4f} → {s3['final_val_loss']:.4f}"
    stage3 = [line for line in lines if row in line]
    assert len(stage3) == 1 and f"{s3['tokens']:,}" in stage3[0], lines
    assert f"{s3['up_bits_per_param']:.2f} · {s3['down_bits_per_param']:.2f}" in stage3[0]


def test_columns_sets_the_width_of_a_log(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert DemoView(PRESETS["tiny"], 3).console.width == 100
