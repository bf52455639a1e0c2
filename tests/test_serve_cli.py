"""``perspective coordinator serve`` refuses bad settings with a clear message, before serving.

Real processes: the installed CLI, a secrets directory written by ``coordinator init``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "shared_model.cli"]


def run(*args: str) -> tuple[int, str]:
    return run_all([args])[0]


def run_all(calls: list[tuple[str, ...]]) -> list[tuple[int, str]]:
    """Run CLI calls side by side (each is mostly interpreter start-up); their exit codes
    and what they said, in order."""
    procs = [
        subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for args in calls
    ]
    out = []
    for proc in procs:
        text, _ = proc.communicate(timeout=120)
        # typer draws errors in a box; join the wrapped lines back into one sentence
        out.append((proc.returncode, " ".join(text.replace("│", " ").split())))
    return out


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    code, said = run("coordinator", "init", "--dir", str(root / "secrets"), "--host", "127.0.0.1",
                     "--db", f"sqlite:///{root / 'c.db'}")  # fmt: skip
    assert code == 0, said
    return root / "secrets"


def serve(tmp_path: Path, *extra: str) -> tuple[int, str]:
    return run(*serve_args(tmp_path, *extra))


def serve_args(tmp_path: Path, *extra: str, work: str = "work") -> tuple[str, ...]:
    ckpt = tmp_path / "stage2.safetensors"
    if not ckpt.exists():
        ckpt.write_bytes(b"not a checkpoint")
    return ("coordinator", "serve", "--superlink", "127.0.0.1:9", "--init", str(ckpt),
            "--work-dir", str(tmp_path / work), "--minutes", "1", *extra)  # fmt: skip


@pytest.mark.integration
def test_serve_refuses_bad_settings_clearly(secrets, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.safetensors"
    insecure, no_secrets, lease, bad_ckpt, no_ckpt, init_db = run_all([
        serve_args(tmp_path, work="w1"),
        serve_args(tmp_path, "--secrets-dir", str(empty), work="w2"),
        serve_args(tmp_path, "--secrets-dir", str(secrets), "--unit-seconds", "1000", work="w3"),
        serve_args(tmp_path, "--secrets-dir", str(secrets), "--db", f"sqlite:///{secrets}/c.db",
                   work="w4"),
        ("coordinator", "serve", "--superlink", "127.0.0.1:9", "--init", str(missing),
         "--work-dir", str(tmp_path / "w5"), "--minutes", "1", "--insecure"),
        serve_args(tmp_path, "--secrets-dir", str(secrets), work="w6"),
    ])  # fmt: skip
    code, said = insecure
    assert code == 2 and "secure by default" in said and "--insecure" in said
    code, said = no_secrets
    assert code == 2 and "is missing or empty" in said and "coordinator init" in said
    code, said = lease
    assert code == 2 and "lease_seconds" in said
    code, said = bad_ckpt
    assert code == 1 and "CheckpointError" in said and "not safetensors" in said
    code, said = no_ckpt
    assert code == 2 and "does not exist" in said
    # Without --db: the database init created the first operator token in, not a fresh one.
    code, said = init_db
    assert code == 1 and "CheckpointError" in said
    assert f"database sqlite:///{secrets.parent / 'c.db'}" in said, said
    assert not (tmp_path / "w6" / "coordinator.db").exists()


@pytest.mark.integration
def test_serve_and_demo_refuse_a_bad_federation_config(tmp_path) -> None:
    bad = tmp_path / "federation.yaml"
    bad.write_text("outer_lr: 1.0\nmax_stalenes: 4\n")  # a typo in a key
    for code, said in run_all([
        serve_args(tmp_path, "--insecure", "--federation-config", str(bad)),
        ("demo", "--federation-config", str(bad)),
    ]):  # fmt: skip
        assert code == 2 and "unknown federation setting(s) max_stalenes" in said, said
        assert "max_staleness" in said  # the allowed keys are listed
    bad.write_text("outer_momentum: 2\n")
    code, said = serve(tmp_path, "--insecure", "--federation-config", str(bad))
    assert code == 2 and "outer_momentum = 2.0 is invalid: allowed 0 <= value < 1" in said, said
    code, said = run("demo", "--federation-config", str(bad), "--max-staleness", "-3")
    assert code == 2 and "max_staleness = -3 is invalid" in said, said


@pytest.mark.integration
def test_demo_refuses_a_work_dir_holding_an_earlier_network(tmp_path) -> None:
    # It would resume that network's state and drop the seed it has just trained.
    used = tmp_path / "used"
    (used / "coordinator").mkdir(parents=True)
    db = used / "coordinator" / "coordinator.db"
    db.write_bytes(b"an earlier run's database")
    code, said = run("demo", "--work-dir", str(used))
    assert code == 2 and f"{used} already holds an earlier demo's network" in said, said
    assert "Pass a new or empty --work-dir" in said
    assert db.read_bytes() == b"an earlier run's database"  # nothing of it touched
    assert sorted(p.name for p in used.iterdir()) == ["coordinator"]


@pytest.mark.integration
def test_serve_logs_its_database_and_read_token_setting(tmp_path) -> None:
    # The API starts before the (here unusable) checkpoint is read: both lines are logged.
    code, said = serve(tmp_path, "--insecure", "--superexec-secret-file", __file__,
                       "--api-port", "0", "--read-requires-token")  # fmt: skip
    assert code == 1 and "CheckpointError" in said
    assert f"database sqlite:///{tmp_path / 'work' / 'coordinator.db'}" in said
    assert "(reads need a token: True)" in said


def test_read_requires_token_closes_reads_blobs_and_metrics(tmp_path) -> None:
    import httpx

    from coordinator.coordinator_process import Coordinator
    from shared_model.config_loading import load_config
    from shared_model.data import prepare_corpus

    cfg = load_config("tiny")
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=3_000_000)
    coord = Coordinator(cfg, tmp_path / "c", corpus)
    try:
        url = coord.start_api(read_requires_token=True)
        cid = coord.store.put_bytes(b"model bytes")
        for path in ("/api/v1/status", f"/api/v1/blobs/{cid}", "/metrics"):
            assert httpx.get(url + path, timeout=10).status_code == 401, path
    finally:
        coord.shutdown()
