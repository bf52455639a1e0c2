"""Shared fixtures: a headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"
CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    env = os.environ.get("PERSPECTIVE_CHROMIUM")
    for path in ((env,) if env else ()) + CANDIDATES:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium; skips with the reason when Playwright or Chromium is missing."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    path = _chromium()
    if path is None:
        pytest.skip("Chromium not found: apt-get install -y chromium (or set PERSPECTIVE_CHROMIUM)")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
