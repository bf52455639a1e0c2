"""``flower-supernode`` as a supervised child process of the participant daemon.

The SuperNode runs with ``--isolation process``: it serves only its Runtime API on
loopback and starts no ``flower-superexec``, so no code shipped by the server ever
runs here; our own long-lived :class:`participant.flower.worker.FlowerWorker`
claims its tasks instead. A random SuperExec secret (HMAC on ``AcquireTask``) is
written to the work directory by default, so another local user cannot claim
tasks from the Runtime API port either.

Readiness (``/health`` on the Runtime API) means the process is up; it says nothing
about registration with the SuperLink — the coordinator sees the node in
``FlowerDriver.node_ids()`` once the SuperNode has connected.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from participant.flower.supernode_main import check_poll_interval
from shared_model.files import write_text_atomic
from shared_model.processes import (
    FLOWER_QUIET_ENV,
    ManagedProcess,
    console_script,
    free_port,
    write_secret_file,
)

NodeConfigValue = bool | int | float | str


def format_node_config(node_config: Mapping[str, NodeConfigValue]) -> str:
    """Render ``{"k": v}`` as Flower's ``--node-config`` string (``k=v k2="s"``).

    Raises:
        ValueError: For keys with spaces/``=`` or values of unsupported type.
    """
    parts = []
    for key, value in node_config.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise ValueError(
                f"node_config key {key!r} must be non-empty without spaces, = or quotes"
            )
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value!r}")
        elif isinstance(value, str):
            if '"' in value:
                raise ValueError(f"node_config[{key!r}] must not contain double quotes")
            parts.append(f"{key}={json.dumps(value)}")
        else:
            raise ValueError(
                f"node_config[{key!r}] has type {type(value).__name__}; use bool, int, float or str"
            )
    return " ".join(parts)


class SuperNodeProcess(ManagedProcess):
    """A ``flower-supernode`` child process.

    Args:
        work_dir: Directory for the log, ``FLWR_HOME`` and the generated secret.
        superlink_address: ``host:port`` of the SuperLink Fleet API.
        runtime_port: Loopback port of this node's Runtime API (free one if ``None``).
        node_config: Values the node reports as ``context.node_config``.
        root_certificates: CA file to verify the SuperLink; ``None`` means ``--insecure``.
        auth_private_key: OpenSSH ECDSA private key registered with the SuperLink.
        isolation: ``"process"`` (our worker executes tasks) or ``"subprocess"``.
        superexec_secret_file: Secret guarding ``AcquireTask``; generated if ``None``
            in process isolation (pass the same file to the worker).
        max_wait_time: Give up reconnecting after this many seconds (``None``: forever).
        poll_interval: Cap on the SuperNode's sleeps between pulls (Flower's are 3 s idle,
            0.5 s while waiting for a reply; :mod:`participant.flower.supernode_main`);
            ``None``: Flower's own.
    """

    def __init__(
        self,
        work_dir: Path,
        superlink_address: str,
        runtime_port: int | None = None,
        node_config: Mapping[str, NodeConfigValue] | None = None,
        root_certificates: Path | None = None,
        auth_private_key: Path | None = None,
        isolation: str = "process",
        superexec_secret_file: Path | None = None,
        max_wait_time: float | None = None,
        poll_interval: float | None = None,
    ) -> None:
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation must be 'process' or 'subprocess', got {isolation!r}")
        if auth_private_key is not None and root_certificates is None:
            raise ValueError("auth_private_key needs root_certificates (TLS); Flower exits 303")
        for label, path in (("root_certificates", root_certificates), ("key", auth_private_key)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"SuperNode {label} file {path} does not exist")
        self.work_dir = Path(work_dir)
        self.runtime_port = runtime_port or free_port()
        if isolation == "process" and superexec_secret_file is None:
            superexec_secret_file = write_secret_file(self.work_dir / "runtime.secret")
        self.superexec_secret_file = superexec_secret_file
        argv = [console_script("flower-supernode")]
        if poll_interval is not None:
            check_poll_interval(poll_interval)
            argv = [sys.executable, "-m", "participant.flower.supernode_main"]
            argv += ["--poll-interval", str(poll_interval)]
        argv += ["--superlink", superlink_address]
        argv += ["--host", "127.0.0.1", "--port", str(self.runtime_port), "--isolation", isolation]
        if node_config:
            argv += ["--node-config", format_node_config(node_config)]
        if root_certificates is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(root_certificates)]
        if auth_private_key is not None:
            argv += ["--auth-supernode-private-key", str(auth_private_key)]
        if superexec_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(superexec_secret_file)]
        if max_wait_time is not None:
            argv += ["--max-wait-time", str(max_wait_time)]
        env = {**FLOWER_QUIET_ENV, "FLWR_HOME": str(self.work_dir / "flwr-home-supernode")}
        super().__init__(
            name="flower-supernode",
            argv=argv,
            env=env,
            log_path=self.work_dir / "supernode.log",
            health_url=f"http://{self.runtime_address}/health",
            verify=False,
        )

    @property
    def runtime_address(self) -> str:
        """``127.0.0.1:port`` of this node's Runtime API (what the worker attaches to)."""
        return f"127.0.0.1:{self.runtime_port}"

    @property
    def superexec_secret(self) -> bytes | None:
        """The raw secret bytes the worker must present, if any."""
        if self.superexec_secret_file is None:
            return None
        return Path(self.superexec_secret_file).read_bytes()


def worker_command(
    runtime_address: str, state_dir: Path, preset: str, secret_file: Path, config: Path | None
) -> list[str]:
    """The command line of a ``perspective participant worker`` attached to a SuperNode's
    Runtime API (the daemon and the laptop network add their own limits to it)."""
    argv = [
        sys.executable, "-m", "shared_model.cli", "participant", "worker",
        "--runtime-address", runtime_address, "--state-dir", str(state_dir),
        "--preset", preset, "--superexec-secret-file", str(secret_file),
    ]  # fmt: skip
    if config is not None:
        argv += ["--config", str(config)]
    return argv


def run_local_participant(
    superlink: str,
    base_dir: Path,
    index: int,
    *,
    preset: str,
    config: Path | None,
    threads: int,
    max_columns: int,
    poll_interval: float | None = None,
) -> None:
    """Run a SuperNode and a ``participant worker`` attached to it until SIGTERM/SIGINT.

    The process behind ``perspective participant local``: the laptop network of
    ``perspective demo`` starts one per participant (insecure, loopback only), so the
    coordinator side never imports participant code. ``poll_interval`` caps its
    SuperNode's poll (``None``: Flower's 3 s; :mod:`participant.flower.supernode_main`).
    """
    base = Path(base_dir)
    secret = write_secret_file(base / "superexec.secret")
    node = SuperNodeProcess(
        base / "supernode", superlink, node_config={"participant": index},
        superexec_secret_file=secret, poll_interval=poll_interval,
    )  # fmt: skip
    argv = worker_command(node.runtime_address, base / "state", preset, secret, config)
    argv += ["--threads", str(threads), "--max-columns", str(max_columns)]
    worker = ManagedProcess(
        f"worker-{index}", argv, FLOWER_QUIET_ENV, base / "worker.log", health_url=None
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        node.start()
        node.wait_until_ready(timeout=120)
        worker.start()
        # Tells whoever started us (LocalNetwork) that the Runtime API is up.
        write_text_atomic(base / "ready", node.runtime_address)  # never read half-written
        # Either child dying ends the participant: the network's owner sees it exit.
        while not stop.wait(0.5) and node.is_alive() and worker.is_alive():
            pass
    finally:
        worker.shutdown(timeout=5)
        node.shutdown(timeout=5)
