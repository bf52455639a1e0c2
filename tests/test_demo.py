"""`perspective demo` through its real entry point: the whole laptop network, end to end.

A short run (tiny preset, 2 participants) of exactly what `make demo` runs: central seed,
then federated stages 3 and 4 over a real SuperLink, SuperNodes and participant workers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _processes_under(path) -> list[str]:
    """Processes whose command line mentions ``path`` (the demo's children all do)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(600)
def test_demo_trains_both_federated_stages_and_exits_cleanly(tmp_path) -> None:
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "shared_model.cli", "demo", "--preset", "tiny"]
    cmd += ["--minutes", "1.5", "--participants", "2", "--work-dir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["participants"] == 2
    s3, s4 = summary["stages"]["3"], summary["stages"]["4"]
    for stage in (s3, s4):
        assert stage["tokens"] > 0 and stage["bytes_up"] > 0 and stage["bytes_down"] > 0
    # The network improved on the central seed it started from ...
    assert s3["final_val_loss"] < summary["stage1_val_loss"]
    # ... and stage 4 continued from stage 3's versions.
    assert s4["versions_end"] > s3["versions_end"] > 0
    assert "Perspective demo summary" in proc.stdout
    # Clean exit: nothing the demo started is left running.
    assert _processes_under(work) == []
