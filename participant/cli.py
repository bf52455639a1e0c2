"""``perspective participant ...``: the volunteer side.

``worker`` is the long-lived process attached to a SuperNode's Runtime API: it runs our
installed code only (no code from the server) and trains the units it receives.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import typer

app = typer.Typer(help="Volunteer participant: train expert columns for a coordinator.")


@app.command("worker")
def worker(
    runtime_address: str = typer.Option(..., help="host:port of the SuperNode Runtime API."),
    state_dir: Path = typer.Option(..., help="Where units, residuals and the blob cache live."),
    preset: str = typer.Option("tiny", help="Model preset (must match the coordinator)."),
    config: Path | None = typer.Option(None, help="YAML config (must match the coordinator)."),
    superexec_secret_file: Path | None = typer.Option(None, help="SuperNode's SuperExec secret."),
    threads: int = typer.Option(1, min=1, help="CPU threads for training."),
    max_columns: int = typer.Option(4, min=1, help="Most expert columns to hold."),
    cache_cap_mb: float | None = typer.Option(None, min=1, help="Blob cache cap in MB."),
) -> None:
    """Attach to a SuperNode and train the work units it delivers until SIGTERM."""
    from participant.flower.worker import FlowerWorker
    from participant.runtime import ParticipantRuntime
    from shared_model.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        cfg = load_config(preset, config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    secret = superexec_secret_file.read_bytes() if superexec_secret_file else None
    runtime = ParticipantRuntime(
        cfg,
        state_dir,
        max_columns=max_columns,
        threads=threads,
        cache_cap_bytes=int(cache_cap_mb * 1e6) if cache_cap_mb else None,
    )
    flower = FlowerWorker(runtime_address, runtime.handle, superexec_secret=secret)
    signal.signal(signal.SIGTERM, lambda *_: flower.shutdown(timeout=0.1))
    flower.run_forever()
    runtime.shutdown()


def register(root: typer.Typer) -> None:
    """Add the ``participant`` group."""
    root.add_typer(app, name="participant")
