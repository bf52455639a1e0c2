"""Stage jobs: every training stage as a resumable, idempotent job (DESIGN §2).

A job is identified by its **key**: the sha256 of the stage name, the full config, the
content id (sha256) of its input checkpoint and the prepared corpus fingerprint. Running
a stage:

* looks the key up in the ``stage_jobs`` table; a ``done`` job is a no-op that returns
  the same output id; a ``queued`` / ``paused`` / ``failed`` job, or a ``running`` one whose
  process died (nobody holds its lock), is resumed;
* trains in ``<out>/jobs/<key[:16]>/`` (the work directory survives the process) and
  resumes from the newest checkpoint there, so a job killed with SIGKILL continues from
  its last checkpoint and ends exactly as an uninterrupted run would;
* stores the output under ``<out>/checkpoints/<sha256>.safetensors`` (content-addressed)
  and records it in the job's ``progress`` (``output``, ``output_path``).

Stages 1-4 are registered here; later stages add themselves with :func:`register_stage`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from coordinator.central.checkpoint import sha256_file
from coordinator.db.engine import transaction
from coordinator.db.models import StageJob
from coordinator.db.stage_jobs import (
    create_stage_job,
    list_stage_jobs,
    transition_stage_job,
    update_stage_progress,
)
from coordinator.db.types import StageJobState
from shared_model.config import PerspectiveConfig
from shared_model.config_loading import save_config
from shared_model.files import atomic_path

S = StageJobState


class StageJobError(RuntimeError):
    """A stage job cannot run (unknown stage, missing input, job busy or output lost)."""


@dataclass
class StageContext:
    """What a stage runner gets.

    Attributes:
        cfg: the job's config.
        init: input checkpoint (None for stages that start from scratch).
        work_dir: persistent directory of this job; checkpoints written here survive a
            crash and are the runner's to resume from.
        data: prepared corpus (``shared_model.data.PreparedCorpus``).
        minutes: optional wall-clock budget.
        nproc: ranks for distributed stages (1 = in-process).
        report: merge a dict into the job's recorded progress.
    """

    cfg: PerspectiveConfig
    init: Path | None
    work_dir: Path
    data: Any
    minutes: float | None = None
    nproc: int = 1
    report: Callable[[dict[str, Any]], None] = lambda progress: None


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, whether it needs an input checkpoint, its runner.

    ``run(ctx)`` returns the path of the stage's final checkpoint. It must be resumable:
    called again with the same ``work_dir`` after a crash it continues from there.
    """

    name: str
    description: str
    needs_init: bool
    run: Callable[[StageContext], Path]


@dataclass
class JobOutcome:
    """Result of :func:`run_stage_job`."""

    job_id: int
    stage: str
    state: str
    output_id: str
    output_path: str
    reused: bool = False
    progress: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> None:
    """Add (or replace) a stage runner under ``spec.name``."""
    _REGISTRY[spec.name] = spec


def registered_stages() -> dict[str, StageSpec]:
    """Registered stages by name, in registration order."""
    return dict(_REGISTRY)


def get_stage(name: str) -> StageSpec:
    """The spec of stage ``name``; raises :class:`StageJobError` if it is not registered."""
    if name not in _REGISTRY:
        raise StageJobError(f"unknown stage {name!r}: registered {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# --- stages 1-4 --------------------------------------------------------------------------


def _resume_point(ctx: StageContext, stage: int) -> Path | None:
    own = ctx.work_dir / f"stage{stage}.safetensors"
    # Stage 2 has no steps to resume: it always starts from its input.
    return own if own.is_file() and stage != 2 else ctx.init


def _train_runner(stage: int) -> Callable[[StageContext], Path]:
    def run(ctx: StageContext) -> Path:
        if ctx.nproc > 1 and stage != 2:
            return _run_torchrun(ctx, stage)
        import torch

        from coordinator.central.trainer import train_stage

        result = train_stage(
            ctx.cfg,
            stage,
            ctx.work_dir,
            init=_resume_point(ctx, stage),
            minutes=ctx.minutes,
            data=ctx.data,
            device="cpu" if ctx.nproc == 1 and not torch.cuda.is_available() else None,
            on_eval=lambda rec: ctx.report({"step": rec["step"], "val_loss": rec["val_loss"]}),
        )
        return Path(result.checkpoint)

    return run


def _run_torchrun(ctx: StageContext, stage: int) -> Path:
    """Run the distributed trainer in ``nproc`` processes, resuming its newest DCP dir."""
    from coordinator.central.parallel.distributed import free_port
    from coordinator.central.parallel.train_dist import latest_dcp

    config = ctx.work_dir / "config.yaml"
    save_config(ctx.cfg, config)
    resume = latest_dcp(ctx.work_dir, stage) or ctx.init
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ctx.nproc}",
        f"--master-port={free_port()}", "-m", "coordinator.central.parallel.train_dist",
        "--stage", str(stage), "--out", str(ctx.work_dir), "--config", str(config),
        "--data", str(ctx.data.manifest["source"]), "--data-dir", str(ctx.data.root.parent),
    ]  # fmt: skip
    if ctx.data.manifest.get("max_bytes") is not None:  # the same corpus, not the whole source
        cmd += ["--max-bytes", str(ctx.data.manifest["max_bytes"])]
    if resume is not None:
        cmd += ["--init", str(resume)]
    if ctx.minutes is not None:
        cmd += ["--minutes", str(ctx.minutes)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageJobError(f"distributed stage {stage} failed: {proc.stderr[-2000:]}")
    return ctx.work_dir / f"stage{stage}.safetensors"


for _k, _desc in (
    (1, "dense seed: shared layers, PDR layers reuse FFN bank l mod n_gqa"),
    (2, "expert init: clone FFN banks into the experts"),
    (3, "expert differentiation: experts + shared layers (centralised baseline)"),
    (4, "ternary distillation: progressive ternary experts, KD vs frozen teacher"),
):
    register_stage(StageSpec(str(_k), _desc, needs_init=_k != 1, run=_train_runner(_k)))

# --- stages 5 and 6 ----------------------------------------------------------------------
# Each runner is idempotent: a work directory that already holds the stage's final JSON
# summary (written last, after the checkpoint) is returned as is, so a job killed mid-run
# simply runs again. Stage 7 (evaluation) and path 9.1 (conversion) keep their own commands
# (``perspective eval``, ``perspective convert``): evaluation writes a report, not a
# checkpoint, and conversion starts from a Hugging Face directory, not a stage checkpoint.


def _manifold(ctx: StageContext) -> Path:
    from coordinator.central.manifold_stage import run_manifold

    done = ctx.work_dir / "stage5.json"
    if not done.is_file():
        ctx.report({"stage": 5, "phase": "running"})
        result = run_manifold(ctx.cfg, ctx.init, ctx.work_dir, data=ctx.data)
        ctx.report({"val_loss": result["val_loss_after"], "trd_files": result["trd"]["files"]})
    return ctx.work_dir / "stage5.safetensors"


def _spp(ctx: StageContext) -> Path:
    from coordinator.central.safety_stage import run_spp

    done = ctx.work_dir / "spp.json"
    if not done.is_file():
        result = run_spp(ctx.cfg, ctx.init, ctx.work_dir, data=ctx.data)
        ctx.report(
            {
                "eps": result["eps"],
                "redteam_block_rate": result["redteam_block_rate"],
                "benign_false_block_rate": result["benign_false_block_rate"],
            }
        )
    return ctx.work_dir / "spp.safetensors"


register_stage(
    StageSpec("5", "manifold alignment: torus router + .trd neighbour deltas", True, _manifold)
)
register_stage(StageSpec("6", "safety polytope: anchors, half-spaces, eps calibration", True, _spp))


# --- the job runner ----------------------------------------------------------------------


def job_key(stage: str, cfg: PerspectiveConfig, init_id: str | None, data_id: str) -> str:
    """Content id of a job: sha256 of its stage, config, input checkpoint id and data."""
    doc = {"stage": stage, "config": cfg.to_dict(), "init": init_id, "data": data_id}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def find_job(session: Session, stage: str, key: str) -> StageJob | None:
    """The newest job of ``stage`` with this key, if any (cancelled jobs are ignored)."""
    offset = 0
    while True:
        page = list_stage_jobs(session, stage=stage, offset=offset, limit=100)
        for job in page.items:
            if job.config.get("key") == key and job.state != S.CANCELLED:
                return job
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return None


@contextmanager
def _job_lock(work_dir: Path) -> Iterator[None]:
    """Exclusive lock on a job's work directory (released by the OS if the process dies)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StageJobError(f"job in {work_dir} is being run by another process") from exc
        yield


def _store_output(path: Path, out_dir: Path) -> tuple[str, Path]:
    """Copy ``path`` to ``<out>/checkpoints/<sha256>.safetensors`` (atomic); (id, path)."""
    sha = sha256_file(path)
    target = out_dir / "checkpoints" / f"{sha}.safetensors"
    if not target.is_file():
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
    return sha, target


def _start(session: Session, stage: str, key: str, record: dict) -> tuple[StageJob, bool]:
    """(job to run or the done job, whether it is already done)."""
    job = find_job(session, stage, key)
    if job is None:
        job = create_stage_job(session, stage=stage, config={"key": key, **record})
    if job.state == S.DONE:
        return job, True
    if job.state == S.FAILED:
        transition_stage_job(session, job_id=job.id, to=S.QUEUED, reason="retry")
    if job.state == S.RUNNING:  # its process died (we hold the lock): carry on
        update_stage_progress(session, job_id=job.id, progress={"resumed": True})
    else:
        transition_stage_job(session, job_id=job.id, to=S.RUNNING)
    return job, False


def run_stage_job(
    factory: sessionmaker[Session],
    stage: str,
    cfg: PerspectiveConfig,
    out_dir: str | Path,
    *,
    data: Any,
    init: str | Path | None = None,
    minutes: float | None = None,
    nproc: int = 1,
) -> JobOutcome:
    """Run (or resume, or reuse) the job of ``stage`` on these inputs.

    Args:
        factory: coordinator DB session factory (:func:`coordinator.db.make_session_factory`).
        stage: registered stage name (``"1"`` .. ``"4"``, later stages once registered).
        cfg: config of the job.
        out_dir: root of job work directories and content-addressed outputs.
        data: prepared corpus (``shared_model.data.prepare_corpus``).
        init: input checkpoint (required by stages that need one).
        minutes: wall-clock budget; a job that runs out is left ``paused``.
        nproc: ranks (>1 runs the distributed trainer under torchrun).

    Raises:
        StageJobError: unknown stage, missing input, job busy or its output lost.
        Exception: whatever the stage raised (the job is then ``failed`` with the reason).
    """
    spec, out_dir = get_stage(stage), Path(out_dir).resolve()
    if spec.needs_init and init is None:
        raise StageJobError(f"stage {stage} needs an input checkpoint (--init)")
    if init is not None and not Path(init).is_file():
        raise StageJobError(f"input checkpoint {init} does not exist")
    init_id = sha256_file(init) if init is not None else None
    key = job_key(stage, cfg, init_id, str(data.manifest["fingerprint"]))
    record = {"config": cfg.to_dict(), "init": init_id, "init_path": str(init) if init else None}
    work_dir = out_dir / "jobs" / key[:16]
    with _job_lock(work_dir):
        with transaction(factory) as session:
            job, done = _start(session, stage, key, record)
            job_id, progress = job.id, dict(job.progress)
        if done:
            return _reused(job_id, stage, progress)
        return _execute(factory, spec, job_id, cfg, init, work_dir, out_dir, data, minutes, nproc)


def _reused(job_id: int, stage: str, progress: dict) -> JobOutcome:
    if not Path(progress.get("output_path", "")).is_file():
        raise StageJobError(
            f"stage {stage} job {job_id} is done but its output {progress.get('output_path')} "
            "is gone: restore the file or cancel the job's record and run again"
        )
    return JobOutcome(
        job_id, stage, S.DONE, progress["output"], progress["output_path"], True, progress
    )


def _execute(factory, spec, job_id, cfg, init, work_dir, out_dir, data, minutes, nproc):
    def report(progress: dict[str, Any]) -> None:
        with transaction(factory) as session:
            update_stage_progress(session, job_id=job_id, progress=progress)

    ctx = StageContext(cfg, Path(init) if init else None, work_dir, data, minutes, nproc, report)
    try:
        path = spec.run(ctx)
    except KeyboardInterrupt:
        with transaction(factory) as session:
            transition_stage_job(session, job_id=job_id, to=S.PAUSED, reason="interrupted")
        raise
    except Exception as exc:
        with transaction(factory) as session:
            transition_stage_job(session, job_id=job_id, to=S.FAILED, reason=str(exc)[:2000])
        raise
    stopped = _stopped_early(path)
    sha, stored = _store_output(path, out_dir)
    final = {"output": sha, "output_path": str(stored), "work_dir": str(work_dir)}
    state = S.PAUSED if stopped else S.DONE
    with transaction(factory) as session:
        reason = "time budget reached; run again to continue" if stopped else None
        job = transition_stage_job(session, job_id=job_id, to=state, reason=reason, progress=final)
        progress = dict(job.progress)
    return JobOutcome(job_id, spec.name, state, sha, str(stored), False, progress)


def _stopped_early(path: Path) -> bool:
    summary = path.with_suffix(".json")
    if not summary.is_file():
        return False
    return bool(json.loads(summary.read_text()).get("stopped_early", False))
