"""``perspective stage run NAME`` / ``perspective stage list``: stages as resumable DB jobs."""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_OUT = Path("perspective-stages")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _factory(db: str | None, out: Path):
    from coordinator.db.engine import init_db, make_session_factory, sqlite_url

    return make_session_factory(init_db(db or sqlite_url(out / "stage_jobs.db")))


def run(
    name: str = typer.Argument(..., help="Stage name, e.g. 1, 2, 3, 4 (see `stage list`)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config file."),
    preset: str = typer.Option("tiny", "--preset", help="Preset when the YAML names none."),
    overrides: list[str] = typer.Option([], "--set", help="Override, e.g. train.steps=500."),
    init: Path | None = typer.Option(None, "--init", help="Input checkpoint (stages 2+)."),
    db: str | None = typer.Option(None, "--db", help="Database URL (default: OUT/stage_jobs.db)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Work dirs and content-addressed outputs."),
    minutes: float | None = typer.Option(None, "--minutes", help="Wall-clock budget."),
    nproc: int = typer.Option(1, "--nproc", help="Ranks; >1 runs torchrun (FSDP2 + EP)."),
    data: str = typer.Option("stdlib", "--data", help="stdlib, txt/jsonl dir or file, hf:NAME."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Prepared-corpus cache."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Use only this much text."),
) -> None:
    """Run a stage as an idempotent job: resume it if interrupted, reuse it if done."""
    from coordinator.central.checkpoint import CheckpointError
    from coordinator.central.stages import StageError
    from coordinator.db.errors import DatabaseError
    from coordinator.stage_jobs import StageJobError, run_stage_job
    from shared_model.config import ConfigError
    from shared_model.config_loading import load_config
    from shared_model.data import DataError, prepare_corpus

    try:
        cfg = load_config(preset, config, overrides)
        corpus = prepare_corpus(data, cfg.model.vocab_size, data_dir, max_bytes=max_bytes)
        outcome = run_stage_job(
            _factory(db, out), name, cfg, out,
            data=corpus, init=init, minutes=minutes, nproc=nproc,
        )  # fmt: skip
    except (StageJobError, StageError, CheckpointError, DataError, ConfigError) as exc:
        _fail(str(exc))
    except DatabaseError as exc:
        _fail(f"database: {exc}")
    typer.echo(
        f"stage {outcome.stage} job {outcome.job_id}: {outcome.state}"
        + (" (already done, reused)" if outcome.reused else "")
        + f"\noutput {outcome.output_id}\npath {outcome.output_path}"
    )


def list_(
    db: str | None = typer.Option(None, "--db", help="Database URL (default: OUT/stage_jobs.db)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Where `stage run` wrote its jobs."),
) -> None:
    """List the registered stages and the recorded jobs."""
    from coordinator.db.engine import transaction
    from coordinator.db.stage_jobs import list_stage_jobs
    from coordinator.stage_jobs import registered_stages

    typer.echo("stages:")
    for name, spec in registered_stages().items():
        typer.echo(f"  {name:>5}  {spec.description}")
    if db is None and not (out / "stage_jobs.db").is_file():
        typer.echo("jobs: none (no database yet)")
        return
    with transaction(_factory(db, out)) as session:
        jobs = list_stage_jobs(session, limit=1000).items
        typer.echo(f"jobs ({len(jobs)}):")
        for job in jobs:
            output = job.progress.get("output", "")[:16]
            typer.echo(
                f"  {job.id:>4}  stage {job.stage:>5}  {job.state:<9}  {output:<16}  "
                f"{job.reason or ''}"
            )


def register(app: typer.Typer) -> None:
    """Add the ``stage`` command group."""
    group = typer.Typer(help="Stages as resumable, idempotent jobs.", no_args_is_help=True)
    group.command("run")(run)
    group.command("list")(list_)
    app.add_typer(group, name="stage")
