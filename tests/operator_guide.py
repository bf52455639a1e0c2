"""Run the operator guide's shell blocks verbatim (``docs/operator-guide.md``).

A block is the first ```` ```bash ```` fence under a heading. Its ``export NAME=...`` lines
are the operator's own settings (a URL, a token, a database): the test gives their values
through the environment instead, and checks that the block names exactly those. Every other
line runs as written, one ``bash`` command at a time, and must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "operator-guide.md"


def guide_block(heading: str) -> list[str]:
    """The lines of the first bash block under the ``## heading`` (comments kept)."""
    text = GUIDE.read_text()
    start = text.index(f"\n## {heading}\n")
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block under '## {heading}' in {GUIDE}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def exported_names(line: str) -> list[str]:
    """``export A=1 B=2   # note`` -> ``["A", "B"]``."""
    words = shlex.split(line, comments=True)
    return [w.split("=", 1)[0] for w in words[1:]]


def run_guide_block(heading: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    """Run the block's commands in ``cwd`` with ``env`` standing for its ``export`` lines.

    ``perspective`` is this interpreter's (the one the tests installed). Returns what the
    commands printed; raises AssertionError naming the first command that failed.
    """
    lines = guide_block(heading)
    exports = [n for line in lines if line.startswith("export ") for n in exported_names(line)]
    assert sorted(exports) == sorted(env), f"'{heading}' sets {exports}; the test gives {env}"
    bin_dir = Path(sys.executable).parent
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    said = []
    for line in lines:
        if line.startswith("export ") or line.lstrip().startswith("#"):
            continue
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}{done.stderr}"
        said.append(f"$ {line}\n{done.stdout}")
    return "\n".join(said)
