"""``perspective coordinator serve``: run one federated stage against a SuperLink.

The long-lived coordinator process: database, blob service and the federation loop
attached to the SuperLink as its own ServerApp executor. Restarting it (even after
``kill -9``) on the same ``--work-dir`` resumes the stage: the state checkpoint is
loaded, the result log replayed (:meth:`FederationLoop.recover`), the leases of the dead
run re-queued, and training continues on a new Flower run.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer


def serve(
    superlink: str = typer.Option(..., help="host:port of the SuperLink (Control/Runtime API)."),
    superexec_secret_file: Path = typer.Option(..., help="The SuperLink's SuperExec secret."),
    init: Path = typer.Option(
        ..., help="Stage-2 (MoE) checkpoint the federated stage starts from."
    ),
    work_dir: Path = typer.Option(..., help="Database, blob store and state live here."),
    preset: str = typer.Option("tiny", help="Model preset."),
    config: Path | None = typer.Option(None, help="YAML config overriding the preset."),
    stage: int = typer.Option(3, min=3, max=4, help="Federated stage: 3 or 4."),
    minutes: float | None = typer.Option(None, min=0.01, help="Stage wall-clock budget."),
    tokens: int | None = typer.Option(None, min=1, help="Stage token budget."),
    buffer_size: int = typer.Option(2, min=1, help="Results per outer step / version."),
    steps_per_unit: int = typer.Option(20, min=1, help="Inner steps per unit (H)."),
    lease_seconds: float = typer.Option(300.0, min=5, help="Lease deadline."),
    blob_port: int = typer.Option(0, min=0, help="Blob service port (0: any free port)."),
    api_port: int | None = typer.Option(None, min=0, help="Serve REST API + dashboard here."),
    codec: str = typer.Option("ternary", help="Update codec: ternary | sparse."),
) -> None:
    """Serve one federated stage until its budget is used or SIGTERM/SIGINT."""
    from coordinator.federation import FederationSettings
    from coordinator.flower.run import open_driver
    from coordinator.network import Coordinator, StageBudget, demo_corpus_bytes
    from shared_model.config import ConfigError, load_config
    from shared_model.data import prepare_corpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if minutes is None and tokens is None:
        raise typer.BadParameter("give --minutes or --tokens (the stage's budget)")
    if codec not in ("ternary", "sparse"):
        raise typer.BadParameter(f"--codec must be 'ternary' or 'sparse', got {codec!r}")
    try:
        cfg = load_config(preset, config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=demo_corpus_bytes(cfg.name))
    coord = Coordinator(cfg, work_dir, corpus, blob_port=blob_port)
    try:
        coord.start()
        if api_port is not None:
            logging.info("dashboard and REST API at %s", coord.start_api(port=api_port))
        coord.prepare(init, buffer_size=buffer_size, codec=codec)
        driver = open_driver(superlink, superexec_secret=superexec_secret_file.read_bytes())
        settings = FederationSettings(
            stage=stage,
            steps_per_unit=steps_per_unit,
            lease_seconds=lease_seconds,
            column_codec=codec,
            shared_codec=codec,
        )
        budget = StageBudget(tokens=tokens, minutes=minutes)
        loop = coord.federated_stage(stage, driver, budget, settings, units_hint=200)
        replayed = loop.recover()
        logging.info("recovered at version %d (%d results replayed)", loop.state.version, replayed)
        loop.run(stop.is_set)
        driver.close()
    finally:
        coord.shutdown()
