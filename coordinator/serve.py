"""``perspective coordinator serve``: run one federated stage against a SuperLink.

The long-lived coordinator process: database, blob service, REST API and the federation
loop attached to the SuperLink as its own ServerApp executor. Restarting it (even after
``kill -9``) on the same ``--work-dir`` resumes the stage: the state checkpoint is
loaded, the result log replayed (:meth:`FederationLoop.recover`), the leases of the dead
run re-queued, and training continues on a new Flower run. A SuperLink that goes away
is waited for (with back-off) and the loop re-attaches to a new run on it.

Secure by default (DESIGN §6): ``--secrets-dir`` (written by ``perspective coordinator
init``) gives TLS for the SuperLink connection, the blob service and the REST API, the
SuperExec secret and the blob-token key, and a :class:`~coordinator.key_sync.KeySync`
registers enrolled volunteers' node keys on the SuperLink and unregisters revoked ones.
``--insecure`` (plain HTTP/gRPC, no node keys) must be asked for and warns loudly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from coordinator import federation_options as fo
from coordinator.network_init import CoordinatorSecrets
from shared_model.identity import SecurityError

log = logging.getLogger(__name__)
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS, no SuperNode authentication. Updates, tokens and node "
    "identities travel in clear text. Use only on one machine for a demo."
)


@dataclass(frozen=True)
class Security:
    """What ``serve`` secures, resolved from ``--secrets-dir`` / ``--insecure``."""

    secrets: CoordinatorSecrets | None
    superexec_secret: bytes
    ca: bytes | None  # the network CA when it uses TLS (read once, at start)


def resolve_security(
    secrets_dir: Path | None, insecure: bool, superexec_secret_file: Path | None
) -> Security:
    """Check the security options and load the secrets.

    Raises:
        typer.BadParameter: A missing or contradictory option (says what to give).
    """
    if secrets_dir is None and not insecure:
        raise typer.BadParameter(
            "serve is secure by default: give --secrets-dir DIR (written by "
            "'perspective coordinator init --dir DIR --host <public name>'), "
            "or --insecure for a one-machine demo"
        )
    secrets = None
    if secrets_dir is not None:
        try:
            secrets = CoordinatorSecrets.load(secrets_dir, tls=not insecure)
        except SecurityError as exc:
            raise typer.BadParameter(str(exc)) from exc
    secret_file = superexec_secret_file or (secrets.superexec_secret if secrets else None)
    if secret_file is None:
        raise typer.BadParameter("give --superexec-secret-file (the SuperLink's secret)")
    try:
        secret = secret_file.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read the SuperExec secret: {exc}") from exc
    ca = secrets.ca_cert.read_bytes() if secrets is not None and secrets.tls else None
    return Security(secrets, secret, ca)


def serve(
    superlink: str = typer.Option(..., help="Loopback host:port of the SuperLink."),
    init: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="Stage-2 (MoE) checkpoint the stage starts from."
    ),
    work_dir: Path = typer.Option(..., help="Blob store, state and (default) SQLite DB."),
    secrets_dir: Path | None = typer.Option(
        None, envvar="PERSPECTIVE_SECRETS_DIR", help="Directory from 'coordinator init'."
    ),
    insecure: bool = typer.Option(False, help="No TLS / node keys (one-machine demo ONLY)."),
    superexec_secret_file: Path | None = typer.Option(
        None, help="SuperLink's SuperExec secret (default: the one in --secrets-dir)."
    ),
    db: str | None = typer.Option(
        None,
        envvar="PERSPECTIVE_DB",
        help="Database URL [default: the one 'coordinator init' recorded in --secrets-dir, "
        "else <work-dir>/coordinator.db].",
    ),
    preset: str = typer.Option("tiny", help="Model preset."),
    config: Path | None = typer.Option(None, help="YAML config overriding the preset."),
    stage: int | None = typer.Option(None, help="Federated stage: 3 or 4 [default: 3]."),
    minutes: float | None = typer.Option(None, min=0.01, help="Stage wall-clock budget."),
    tokens: int | None = typer.Option(None, min=1, help="Stage token budget."),
    federation_config: fo.FederationConfig = None,
    buffer_size: fo.BufferSize = None,
    steps_per_unit: fo.StepsPerUnit = None,
    shared_sync_every: fo.SharedSyncEvery = None,
    unit_seconds: fo.UnitSeconds = None,
    max_steps_per_unit: fo.MaxStepsPerUnit = None,
    max_in_flight: fo.MaxInFlight = None,
    lease_seconds: fo.LeaseSeconds = None,
    score_every: fo.ScoreEvery = None,
    rescore_every_versions: fo.RescoreEveryVersions = None,
    outer_lr: fo.OuterLr = None,
    outer_momentum: fo.OuterMomentum = None,
    max_staleness: fo.MaxStaleness = None,
    checkpoint_every: fo.CheckpointEvery = None,
    trim: fo.Trim = None,
    aggregator: fo.Aggregator = None,
    clip_factor: fo.ClipFactor = None,
    max_update_ratio: fo.MaxUpdateRatio = None,
    update_norm_tolerance: fo.UpdateNormTolerance = None,
    column_loss_tolerance: fo.ColumnLossTolerance = None,
    quarantine_after: fo.QuarantineAfter = None,
    diversity_lr: fo.DiversityLr = None,
    column_codec: fo.ColumnCodec = None,
    ternary_column_codec: fo.TernaryColumnCodec = None,
    shared_codec: fo.SharedCodec = None,
    codec: str | None = typer.Option(
        None, help="Both codecs at once: ternary | sparse (--column/--shared-codec win)."
    ),
    blob_host: str = typer.Option("127.0.0.1", help="Interface of the blob service."),
    blob_port: int = typer.Option(0, min=0, help="Blob service port (0: any free port)."),
    public_host: str | None = typer.Option(
        None, help="Name volunteers dial for blobs (in the certificate); default --blob-host."
    ),
    api_host: str = typer.Option("127.0.0.1", help="Interface of the REST API."),
    api_port: int | None = typer.Option(None, min=0, help="Serve REST API + dashboard here."),
    read_requires_token: bool = typer.Option(
        False, help="Reads (API, dashboard data, blobs, /metrics) need a read or operator token."
    ),
    fleet_address: str | None = typer.Option(
        None, help="Public host:port of the Fleet API (the proxy), told to enrolling volunteers."
    ),
    key_sync_seconds: float = typer.Option(5.0, min=0.5, help="Node-key sync period."),
    data: fo.Data = "stdlib",
    offline_after: float = typer.Option(
        120.0,
        min=15.0,  # a node busy with its units is seen every TOUCH_EVERY_S (5 s)
        help="Seconds without lease/reply/report before a participant is offline (≥ 15).",
    ),
) -> None:
    """Serve one federated stage until its budget is used or SIGTERM/SIGINT."""
    from shared_model.config import ConfigError
    from shared_model.config_loading import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if minutes is None and tokens is None:
        raise typer.BadParameter("give --minutes or --tokens (the stage's budget)")
    column_codec, shared_codec = column_codec or codec, shared_codec or codec
    settings = fo.settings_from_cli(federation_config, locals())
    security = resolve_security(secrets_dir, insecure, superexec_secret_file)
    if db is None and security.secrets is not None:
        # The database init created the first operator token in (a fresh one under
        # --work-dir would answer that token 401).
        db = security.secrets.database
    if insecure:
        typer.secho(INSECURE_WARNING, err=True, fg=typer.colors.RED, bold=True)
    if security.ca is not None and blob_host in ("0.0.0.0", "::") and not public_host:
        raise typer.BadParameter("with --blob-host 0.0.0.0 give --public-host (a name in the cert)")
    try:
        cfg = load_config(preset, config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    endpoints = Endpoints(
        superlink, blob_host, blob_port, public_host, api_host, api_port, fleet_address,
        read_requires_token,
    )  # fmt: skip
    # torch comes with the coordinator: bad settings above are refused without it (seconds)
    from coordinator.coordinator_process import StageBudget

    budget = StageBudget(tokens=tokens, minutes=minutes)
    try:
        run_serve(cfg, work_dir, db, init, security, endpoints, settings, budget, stop,
                  key_sync_seconds=key_sync_seconds, data=data,
                  offline_after=offline_after)  # fmt: skip
    except startup_errors() as exc:
        typer.secho(f"coordinator serve: {type(exc).__name__}: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc


def startup_errors() -> tuple[type[Exception], ...]:
    """Errors that mean a bad setting (database URL, checkpoint, port, certificate), not a bug."""
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.central.checkpoint import CheckpointError
    from coordinator.db import DatabaseConfigError
    from coordinator.flower.run import SuperLinkBusy
    from coordinator.serve_api import ApiServerError
    from shared_model.blobs import BlobError
    from shared_model.data import DataError
    from shared_model.tokenizer import TokenizerError

    return (SQLAlchemyError, DatabaseConfigError, ApiServerError, BlobError, CheckpointError,
            SecurityError, DataError, TokenizerError, SuperLinkBusy)  # fmt: skip


@dataclass(frozen=True)
class Endpoints:
    """Where ``serve`` listens and what it tells participants."""

    superlink: str
    blob_host: str
    blob_port: int
    public_host: str | None
    api_host: str
    api_port: int | None
    fleet_address: str | None = None
    read_requires_token: bool = False


def run_serve(
    cfg, work_dir, db_url, init, security: Security, endpoints: Endpoints, settings, budget,
    stop: threading.Event, *, key_sync_seconds: float, data: str = "stdlib",
    offline_after: float = 120.0,
) -> None:  # fmt: skip
    """Start the coordinator, run the stage (re-attaching after SuperLink outages), stop."""
    from coordinator.blob_server import TlsConfig
    from coordinator.coordinator_process import Coordinator, stage_corpus
    from coordinator.flower.run import check_superlink, owner_id
    from coordinator.key_sync import KeySync
    from coordinator.liveness import Liveness
    from coordinator.stage_control import StageControl

    secrets = security.secrets
    tls = security.ca is not None
    owner = owner_id(work_dir)  # this coordinator's runs on the SuperLink
    check_superlink(endpoints.superlink, owner, insecure=not tls, root_certificates=security.ca)
    corpus = stage_corpus(data, cfg, work_dir)
    log.info("corpus %s prepared at %s", corpus.manifest["source"], corpus.root)
    coord = Coordinator(
        cfg, work_dir, corpus, db_url=db_url, blob_host=endpoints.blob_host,
        blob_port=endpoints.blob_port,
        blob_tls=TlsConfig.from_files(secrets.cert, secrets.key) if tls else None,
        blob_public_host=endpoints.public_host,
        token_key=secrets.token_key.read_bytes() if secrets else None,
    )  # fmt: skip
    key_sync = None
    log.info("database %s", _shown_url(coord.db_url))
    try:
        coord.start()
        if endpoints.api_port is not None:
            url = coord.start_api(
                endpoints.api_host, endpoints.api_port,
                ca_cert=secrets.ca_cert if tls else None,
                fleet_address=endpoints.fleet_address,
                ssl_files=(secrets.cert, secrets.key) if tls else None,
                read_requires_token=endpoints.read_requires_token,
            )  # fmt: skip
            log.info("dashboard and REST API at %s (reads need a token: %s)", url,
                     endpoints.read_requires_token)  # fmt: skip
        if tls:
            key_sync = KeySync(
                coord.session_factory, endpoints.superlink,
                root_certificates=security.ca, period_s=key_sync_seconds,
            ).start()  # fmt: skip
        coord.prepare(init, settings)
        log.info("blob service at %s (TLS: %s)", coord.blob_address, tls)
        connect = lambda: _open_driver(endpoints.superlink, security, stop, owner)  # noqa: E731
        loop = coord.federated_stage(None, budget, settings)
        loop.enrolled_only = tls  # SuperNode auth: only enrolled participants take part
        replayed = loop.recover()
        log.info("recovered at version %d (%d results replayed)", loop.state.version, replayed)
        control = StageControl(coord.session_factory, settings.stage)
        control.begin(config={"preset": cfg.name, "data": data})
        liveness = Liveness(coord.session_factory, offline_after)
        run_attached(loop, connect, stop, control, liveness.tick)
    finally:
        if key_sync is not None:
            key_sync.shutdown()
        coord.shutdown()


def _shown_url(url: str) -> str:
    """The database URL without its password (for the log)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _open_driver(address: str, security: Security, stop: threading.Event, owner: str):
    """A driver on a new Flower run of ``owner``; waits (with back-off) while the SuperLink is
    away. :class:`~coordinator.flower.run.SuperLinkBusy` (another coordinator holds it) is
    not waited out: serve stops and says why."""
    import httpx

    from coordinator.flower.run import open_driver
    from shared_model.flower_runtime import FlowerTransportError

    delay = 1.0
    while not stop.is_set():
        try:
            return open_driver(
                address,
                superexec_secret=security.superexec_secret,
                owner=owner,
                insecure=security.ca is None,
                root_certificates=security.ca,
            )
        except (FlowerTransportError, OSError, httpx.HTTPError) as exc:
            log.warning("SuperLink %s not available (%s); retrying in %.0f s", address, exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    return None


def run_attached(
    loop, connect: Callable[[], object], stop: threading.Event, control=None,
    tick: Callable[[], object] = lambda: None,
) -> None:  # fmt: skip
    """Run ``loop`` to the end of its budget, re-attaching to a new run if the SuperLink goes
    or our run is stopped (``flwr stop``).

    ``control`` (:class:`~coordinator.stage_control.StageControl`, ``None`` for the demo)
    applies the operator's pause / resume / cancel of the stage job at every step; ``tick``
    runs after each step too (:class:`~coordinator.liveness.Liveness`).

    A lost SuperLink (killed, restarted) makes driver calls fail; the leases of the old
    run can never be answered there, so they are re-queued and the loop continues on a
    fresh run once the SuperLink is back. Results already acknowledged are in the DB.
    """
    from shared_model.flower_runtime import FlowerTransportError

    while not stop.is_set():
        driver = connect()
        if driver is None:
            return
        loop.attach(driver)
        try:
            if control is None:
                loop.run(stop.is_set, tick)
                return
            control.tick(loop)  # a stage paused before a restart stays paused
            loop.run(
                lambda: stop.is_set() or control.cancelled(),
                lambda: (control.tick(loop), tick()),
            )
            control.finish(loop)
            return
        except FlowerTransportError as exc:
            log.warning("lost the SuperLink (%s); re-attaching when it is back", exc)
            time.sleep(1.0)
        finally:
            try:
                driver.close()
            except Exception as exc:  # noqa: BLE001 - the run may be gone with the SuperLink
                log.info("closing the old driver: %s", exc)
