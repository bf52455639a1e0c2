"""Stage jobs: SIGKILL + resume equals an uninterrupted run; done jobs are no-ops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coordinator.central.checkpoint import load_checkpoint
from coordinator.central.stages import StageError
from coordinator.db.engine import init_db, make_session_factory, sqlite_url, transaction
from coordinator.db.stage_jobs import list_stage_jobs
from coordinator.stage_jobs import StageJobError, get_stage, registered_stages, run_stage_job
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus

MAX_BYTES = 600_000
TRAIN = {
    "steps": 40,
    "batch_size": 4,
    "seq_len": 32,
    "eval_every": 20,
    "eval_batches": 1,
    "checkpoint_every": 5,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_corpus("stdlib", 512, root, max_bytes=MAX_BYTES)
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", "train": TRAIN}))
    return path


def _cli(out: Path, config: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "shared_model.cli", "stage", "run", "1", "--config", str(config),
        "--out", str(out), "--data-dir", str(data_dir), "--max-bytes", str(MAX_BYTES),
    ]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _jobs(out: Path):
    factory = make_session_factory(init_db(sqlite_url(out / "stage_jobs.db")))
    with transaction(factory) as session:
        return [(j.id, j.state, dict(j.progress), j.reason) for j in list_stage_jobs(session).items]


def _output(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("output "))


@pytest.mark.slow
def test_sigkilled_job_resumes_to_the_uninterrupted_result(tmp_path, config_file, data_dir):
    whole = subprocess.run(
        _cli(tmp_path / "a", config_file, data_dir), env=_env(), capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = load_checkpoint(
        tmp_path / "a" / "checkpoints" / f"{_output(whole.stdout)}.safetensors"
    )

    out = tmp_path / "b"
    proc = subprocess.Popen(_cli(out, config_file, data_dir), env=_env(), stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("jobs/*/stage1.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ((job_id, state, _, _),) = _jobs(out)
    assert state == "running"  # the dead process never recorded an end
    partial = load_checkpoint(next(out.glob("jobs/*/stage1.safetensors")))
    assert 0 < partial.step < TRAIN["steps"]

    again = subprocess.run(
        _cli(out, config_file, data_dir), env=_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    ((job_id2, state, progress, _),) = _jobs(out)
    assert (job_id2, state, progress.get("resumed")) == (job_id, "done", True)
    got = load_checkpoint(progress["output_path"])
    assert got.step == expected.step == TRAIN["steps"]
    # Weights, optimiser state and RNG are bit-identical (the file hash differs only by
    # the wall-clock throughput recorded in the metadata).
    assert got.meta["tensor_sha256"] == expected.meta["tensor_sha256"]


def test_done_job_is_a_noop_and_failures_are_recorded(tmp_path, data_dir):
    cfg = load_config("tiny", overrides=[f"train.{k}={v}" for k, v in TRAIN.items()]
                      + ["train.steps=2"])  # fmt: skip
    data = prepare_corpus("stdlib", 512, data_dir, max_bytes=MAX_BYTES)
    factory = make_session_factory(init_db(sqlite_url(tmp_path / "jobs.db")))
    first = run_stage_job(factory, "1", cfg, tmp_path, data=data)
    assert first.state == "done" and not first.reused and Path(first.output_path).is_file()
    second = run_stage_job(factory, "1", cfg, tmp_path, data=data)
    assert (second.job_id, second.output_id, second.reused) == (first.job_id, first.output_id, True)
    # Stage 3 from a stage-1 checkpoint fails inside the stage: the job records why.
    with pytest.raises(StageError):
        run_stage_job(factory, "3", cfg, tmp_path, data=data, init=first.output_path)
    with transaction(factory) as session:
        failed = list_stage_jobs(session, stage="3").items[0]
        assert failed.state == "failed" and "stage-1 checkpoint" in failed.reason
    # Stage 2 (no steps) then reuses nothing and produces a stage-2 checkpoint.
    two = run_stage_job(factory, "2", cfg, tmp_path, data=data, init=first.output_path)
    assert load_checkpoint(two.output_path).stage == 2


def test_bad_requests_raise_before_any_job(tmp_path, data_dir):
    cfg = load_config("tiny")
    data = prepare_corpus("stdlib", 512, data_dir, max_bytes=MAX_BYTES)
    factory = make_session_factory(init_db(sqlite_url(tmp_path / "jobs.db")))
    with pytest.raises(StageJobError, match="unknown stage"):
        get_stage("8")
    with pytest.raises(StageJobError, match="needs an input checkpoint"):
        run_stage_job(factory, "3", cfg, tmp_path, data=data)
    with pytest.raises(StageJobError, match="does not exist"):
        run_stage_job(factory, "2", cfg, tmp_path, data=data, init=tmp_path / "nope.safetensors")
    assert list(registered_stages())[:4] == ["1", "2", "3", "4"]
    with transaction(factory) as session:
        assert list_stage_jobs(session).total == 0


@pytest.mark.slow
def test_the_cli_and_a_stage_job_write_the_same_checkpoint(tmp_path, config_file, data_dir):
    """``perspective train`` and ``perspective stage run`` seed every generator the
    checkpoint records: each in its own process, they write the same weights, optimiser
    state and RNG states (numpy's and python's were unseeded in the CLI, so its
    checkpoint differed from every other run's)."""
    job = subprocess.run(
        _cli(tmp_path / "job", config_file, data_dir), env=_env(), capture_output=True, text=True
    )
    assert job.returncode == 0, job.stderr[-3000:]
    from_job = load_checkpoint(
        tmp_path / "job" / "checkpoints" / f"{_output(job.stdout)}.safetensors"
    )
    train = [
        sys.executable, "-m", "shared_model.cli", "train", "--stage", "1", "--config",
        str(config_file), "--out", str(tmp_path / "cli"), "--data-dir", str(data_dir),
        "--max-bytes", str(MAX_BYTES),
    ]  # fmt: skip
    cli = subprocess.run(train, env=_env(), capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-3000:]
    from_cli = load_checkpoint(tmp_path / "cli" / "stage1.safetensors")
    assert from_cli.meta["tensor_sha256"] == from_job.meta["tensor_sha256"]
    assert from_cli.meta["rng"] == from_job.meta["rng"]
