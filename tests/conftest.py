"""Shared fixtures: a headless Chromium (Debian's package) driven by Playwright, and a tiny
stage-2 (MoE) seed checkpoint for the federated tests."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

# typer draws CLI errors in a box as wide as the terminal and breaks a word longer than
# that anywhere: a deep tmp path came out as ".../use d" and a test looking for the path
# failed by the length of pytest's tmp dir name. A wide box (typer's TERMINAL_WIDTH, read
# when typer is imported: by the CLIs the tests start and by CliRunner's alike) keeps
# every path whole; COLUMNS would widen pytest's own output too.
os.environ["TERMINAL_WIDTH"] = "1000"

ARTIFACTS = Path(__file__).parent / "artifacts"
CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def pytest_collection_modifyitems(config, items) -> None:
    """Files with a ``slow`` test run first, each file's tests in their order.

    ``make test`` spreads whole files over two workers (``--dist loadfile``) in collection
    order, and a long file collected late ran on one worker while the other had nothing
    left: by the files' measured durations the integration phase takes 386 s in
    alphabetical order (384 s measured) and 359 s with its slow files first."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file order otherwise kept


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


# Small units so a tiny federated run over real processes takes seconds per version.
TINY_FED_OVERRIDES = ["train.batch_size=4", "train.seq_len=32"]


@pytest.fixture(scope="session")
def tiny_moe_seed(tmp_path_factory):
    """``(cfg, corpus, checkpoint)``: a short stage-1 dense seed cloned into experts (stage 2).

    Session-scoped: every federated test module starts from the same read-only seed (one
    stage-1 run for the whole suite instead of one per module)."""
    from coordinator.central.trainer import train_stage
    from shared_model.config_loading import load_config
    from shared_model.data import prepare_corpus

    cfg = load_config("tiny", overrides=TINY_FED_OVERRIDES)
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=3_000_000)
    out = tmp_path_factory.mktemp("seed")
    r1 = train_stage(cfg, 1, out, data=corpus, until_step=40)
    r2 = train_stage(cfg, 2, out, init=r1.checkpoint, data=corpus)
    return cfg, corpus, r2.checkpoint


@pytest.fixture(scope="module")
def network_of_one(tmp_path_factory):
    """A local Flower network (SuperLink + one participant, ``tiny``) for one module."""
    from coordinator.local_network import LocalNetwork

    net = LocalNetwork(
        tmp_path_factory.mktemp("net"), n_participants=1, preset="tiny", max_columns=4
    )
    with net:
        yield net


def wait_for(predicate, timeout: float, what: str, every: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned) or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
