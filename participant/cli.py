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
    bandwidth_mbps: float | None = typer.Option(
        None, min=0.001, help="Cap on blob transfers in Mbit/s (up + down together)."
    ),
    device: str | None = typer.Option(None, help="cpu, cuda or mps (default: best found)."),
    ca_file: Path | None = typer.Option(
        None, help="CA (PEM) of the blob service's TLS certificate: the enrolment ca.crt."
    ),
    stop_grace_s: float = typer.Option(
        20.0, min=0, help="On SIGTERM, let the unit in progress finish this long."
    ),
) -> None:
    """Attach to a SuperNode and train the work units it delivers until SIGTERM.

    On SIGTERM: stop taking units, drop queued ones, finish the unit in progress within
    ``--stop-grace-s`` and keep its result for the next start (``participant/outbox.py``).
    """
    from participant.flower.worker import FlowerWorker
    from participant.hardware import HardwareError, detect
    from participant.runtime import ParticipantRuntime, WorkerConfigError, load_ca_file
    from shared_model.config import ConfigError
    from shared_model.config_loading import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        cfg = load_config(preset, config)
        chosen = detect(state_dir, device).device
        ca_pem = load_ca_file(ca_file) if ca_file is not None else None
    except (ConfigError, HardwareError, WorkerConfigError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    secret = superexec_secret_file.read_bytes() if superexec_secret_file else None
    runtime = ParticipantRuntime(
        cfg,
        state_dir,
        max_columns=max_columns,
        threads=threads,
        cache_cap_bytes=int(cache_cap_mb * 1e6) if cache_cap_mb else None,
        device=chosen,
        bandwidth_mbps=bandwidth_mbps,
        tls_root_cert=ca_pem,
    )
    flower = FlowerWorker(runtime_address, runtime.handle, superexec_secret=secret)
    signal.signal(signal.SIGTERM, lambda *_: flower.shutdown(timeout=0.1))
    flower.run_forever()
    if not runtime.shutdown(grace_s=stop_grace_s):
        logging.warning("the unit in progress did not finish in %.0f s: abandoned", stop_grace_s)


@app.command("local")
def local(
    superlink: str = typer.Option(..., help="host:port of a local SuperLink's Fleet API."),
    base_dir: Path = typer.Option(..., help="Directory for this participant's processes."),
    index: int = typer.Option(0, min=0, help="This participant's index (its node config)."),
    preset: str = typer.Option("tiny", help="Model preset (must match the coordinator)."),
    config: Path | None = typer.Option(None, help="YAML config (must match the coordinator)."),
    threads: int = typer.Option(1, min=1, help="CPU threads for training."),
    max_columns: int = typer.Option(4, min=1, help="Most expert columns to hold."),
    poll_interval: float | None = typer.Option(
        None,
        help="Seconds the SuperNode waits before asking for work again (0.05-3; "
        "default Flower's 3).",
    ),
) -> None:
    """One participant of a local laptop network: a SuperNode plus its worker, until SIGTERM.

    For ``perspective demo`` and tests: no enrolment, no TLS, 127.0.0.1 only. A volunteer
    uses ``participant join`` and ``participant run`` instead.
    """
    from participant.flower.supernode import run_local_participant

    poll_interval = _poll_interval(poll_interval)
    run_local_participant(
        superlink, base_dir, index, preset=preset, config=config, threads=threads,
        max_columns=max_columns, poll_interval=poll_interval,
    )  # fmt: skip


@app.command("join")
def join_cmd(
    coordinator_url: str = typer.Argument(..., help="Coordinator URL, e.g. https://host"),
    token: str = typer.Option(..., envvar="PERSPECTIVE_ENROL_TOKEN", help="Enrolment token."),
    name: str = typer.Option(..., help="Name shown on the dashboard."),
    state_dir: Path = typer.Option(Path("perspective-participant"), help="State directory."),
    max_columns: int = typer.Option(1, min=1, help="Most expert columns to hold."),
    threads: int = typer.Option(1, min=1, help="CPU threads for training."),
    cache_cap_mb: float | None = typer.Option(None, help="Blob cache cap in MB."),
    ram_cap_mb: float | None = typer.Option(None, help="Worker RSS cap in MB."),
    bandwidth_mbps: float | None = typer.Option(None, help="Transfer cap in Mbit/s."),
    schedule: str | None = typer.Option(None, help="Run only in this window, e.g. 22:00-07:00."),
    device: str | None = typer.Option(None, help="cpu, cuda or mps (default: best found)."),
    api_ca: Path | None = typer.Option(None, help="CA file to verify the coordinator URL."),
    ca_fingerprint: str | None = typer.Option(
        None, help="SHA-256 fingerprint of the network CA, as your operator published it."
    ),
) -> None:
    """Enrol this machine with a coordinator (one-time token from the operator)."""
    from participant.join import JoinError, join
    from participant.limits import Limits, LimitsError

    try:
        limits = Limits(max_columns, threads, cache_cap_mb, ram_cap_mb, bandwidth_mbps, schedule)
        enrolment = join(
            coordinator_url, token, name, state_dir, limits=limits, device=device,
            api_ca=str(api_ca) if api_ca else True, pinned_fingerprint=ca_fingerprint,
        )  # fmt: skip
    except (JoinError, LimitsError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(
        f"enrolled as participant {enrolment.participant_id}; fleet {enrolment.fleet_address}"
    )
    if enrolment.ca_cert:
        from shared_model.identity import ca_fingerprint as fingerprint_of

        check = "matches the one you gave" if ca_fingerprint else "compare it with your operator's"
        typer.echo(f"network CA: {enrolment.ca_cert}")
        typer.echo(f"  SHA-256 {fingerprint_of(Path(enrolment.ca_cert))} ({check})")
    typer.echo(f"start it with: perspective participant run --state-dir {state_dir}")


@app.command("run")
def run_cmd(
    state_dir: Path = typer.Option(Path("perspective-participant"), help="State directory."),
    preset: str = typer.Option("tiny", help="Model preset (must match the coordinator)."),
    config: Path | None = typer.Option(None, help="YAML config (must match the coordinator)."),
    max_wait_time: float = typer.Option(60.0, help="Reconnect this long before a restart."),
    stop_grace_s: float = typer.Option(
        20.0, min=0, help="On SIGTERM, let a unit in training finish this long (0: stop at once)."
    ),
    poll_interval: float | None = typer.Option(
        None,
        help="Seconds the SuperNode waits before asking for work again when none is "
        "queued (0.05-3; default Flower's 3 s). Shorter keeps a fast machine busier on short "
        "units and costs the coordinator one request per interval.",
    ),
) -> None:
    """Run the participant daemon (SuperNode + worker, restarts with back-off) until SIGTERM."""
    from participant.daemon import REVOKED_EXIT_CODE, DaemonConfig, ParticipantDaemon
    from participant.join import Enrolment, JoinError
    from participant.limits import Limits
    from participant.report import NodeReporter

    poll = _poll_interval(poll_interval)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        enrolment = Enrolment.load(state_dir)
    except JoinError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not enrolment.ca_cert:
        typer.secho(
            "WARNING: this coordinator gave no CA: no TLS and no node key. Updates and your "
            "identity travel in clear text; fine only for a demo on one machine.",
            err=True,
            fg=typer.colors.RED,
            bold=True,
        )
    limits_file = state_dir / "limits.json"
    cfg = DaemonConfig(
        state_dir=state_dir,
        superlink_address=enrolment.fleet_address,
        root_certificates=Path(enrolment.ca_cert) if enrolment.ca_cert else None,
        auth_private_key=Path(enrolment.key) if enrolment.ca_cert else None,
        preset=preset,
        config=config,
        limits=Limits.load(limits_file) if limits_file.is_file() else Limits(),
        max_wait_time=max_wait_time,
        stop_grace_s=stop_grace_s,
        poll_interval=poll,
    )
    # Refusals go to the coordinator's event log too, signed with our node key; its answer
    # says when the operator revoked us (then retrying is pointless: stop for good).
    reporter = NodeReporter(enrolment)
    daemon = ParticipantDaemon(cfg, on_event=reporter.sink)
    reporter.on_revoked = daemon.revoked
    daemon.run_forever(install_signals=True)
    if daemon.revocation is not None:
        typer.secho(f"participant run: stopped: {daemon.revocation}", err=True, fg="red")
        raise typer.Exit(REVOKED_EXIT_CODE)


def _poll_interval(seconds: float | None) -> float | None:
    """``--poll-interval`` checked (``None``: Flower's own poll), as a typer error."""
    from participant.flower.supernode_main import PollError, check_poll_interval

    if seconds is None:
        return None
    try:
        return check_poll_interval(seconds)
    except PollError as exc:
        raise typer.BadParameter(str(exc), param_hint="--poll-interval") from exc


@app.command("status")
def status_cmd(
    state_dir: Path = typer.Option(Path("perspective-participant"), help="State directory."),
    as_json: bool = typer.Option(False, "--json", help="Print raw JSON."),
) -> None:
    """Show the daemon's state, the unit in progress, today's traffic, credit and limits."""
    import json

    from participant.status import read_status, render_status

    status = read_status(state_dir)
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    for line in render_status(status):
        typer.echo(line)


def register(root: typer.Typer) -> None:
    """Add the ``participant`` group."""
    root.add_typer(app, name="participant")
