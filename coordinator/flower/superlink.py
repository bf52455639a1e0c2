"""``flower-superlink`` as a supervised child process of the coordinator.

The SuperLink runs with ``--isolation process`` by default: it then starts no
``flower-superexec`` of its own, and the coordinator process itself acquires the
ServerApp task from the Runtime API (see :mod:`coordinator.flower.driver`). A random
SuperExec secret (HMAC) is written to the work directory unless one is given, so
nobody else who can reach the port can claim that task (Flower note §6).

Runtime dependency installation is always disabled (it would call ``uv sync`` and
need a package index), telemetry and the update check are switched off, and each
process gets a private ``FLWR_HOME`` so nothing is written to ``~/.flwr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared_model.processes import (
    FLOWER_QUIET_ENV,
    ManagedProcess,
    console_script,
    free_port,
    write_secret_file,
)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for the SuperLink's HTTPS endpoint (one set covers all its APIs).

    Attributes:
        ca_cert: CA certificate that signed ``cert`` (clients verify with it).
        cert: Server certificate (SAN must cover the address clients dial).
        key: Server private key.
    """

    ca_cert: Path
    cert: Path
    key: Path

    def validate(self) -> None:
        """Raise ``FileNotFoundError`` naming the first missing file."""
        for label, path in (("ca_cert", self.ca_cert), ("cert", self.cert), ("key", self.key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS {label} file {path} does not exist")


class SuperLinkProcess(ManagedProcess):
    """A ``flower-superlink`` child process.

    Args:
        work_dir: Directory for the log, ``FLWR_HOME`` and the generated secret.
        host: Interface to bind (keep loopback; expose only ``/v1/fleet`` via a proxy).
        port: Port for Fleet, Control and Runtime APIs (a free one if ``None``).
        database: SQLite file for persistent state; ``None`` keeps state in memory.
        tls: Certificate files; ``None`` runs plain HTTP (``--insecure``).
        isolation: ``"process"`` (our coordinator is the executor) or ``"subprocess"``.
        superexec_secret_file: Secret for Runtime ``AcquireTask``; generated if ``None``
            in process isolation.
        enable_supernode_auth: Require registered SuperNode keys (needs TLS).
    """

    def __init__(
        self,
        work_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        database: Path | None = None,
        tls: TLSFiles | None = None,
        isolation: str = "process",
        superexec_secret_file: Path | None = None,
        enable_supernode_auth: bool = False,
    ) -> None:
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation must be 'process' or 'subprocess', got {isolation!r}")
        if enable_supernode_auth and tls is None:
            raise ValueError("enable_supernode_auth needs TLS files (Flower exits with 104)")
        if tls is not None:
            tls.validate()
        self.work_dir = Path(work_dir)
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.isolation = isolation
        if isolation == "process" and superexec_secret_file is None:
            superexec_secret_file = write_secret_file(self.work_dir / "superexec.secret")
        self.superexec_secret_file = superexec_secret_file
        argv = [console_script("flower-superlink"), "--host", host, "--port", str(self.port)]
        argv += ["--isolation", isolation, "--disable-runtime-dependency-installation"]
        if database is not None:
            argv += ["--database", str(database)]
        if tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert)]
            argv += ["--ssl-keyfile", str(tls.key)]
        if superexec_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(superexec_secret_file)]
        if enable_supernode_auth:
            argv.append("--enable-supernode-auth")
        env = {**FLOWER_QUIET_ENV, "FLWR_HOME": str(self.work_dir / "flwr-home-superlink")}
        scheme = "http" if tls is None else "https"
        super().__init__(
            name="flower-superlink",
            argv=argv,
            env=env,
            log_path=self.work_dir / "superlink.log",
            health_url=f"{scheme}://{self.address}/health",
            verify=False if tls is None else str(tls.ca_cert),
        )

    @property
    def address(self) -> str:
        """``host:port`` of all SuperLink APIs (Fleet, Control, Runtime)."""
        return f"{self.host}:{self.port}"

    @property
    def insecure(self) -> bool:
        """Whether clients must use plain HTTP."""
        return self.tls is None

    @property
    def root_certificates(self) -> bytes | None:
        """CA bytes clients should verify the server with (``None`` when insecure)."""
        return None if self.tls is None else Path(self.tls.ca_cert).read_bytes()

    @property
    def superexec_secret(self) -> bytes | None:
        """The raw SuperExec secret bytes, if one is configured."""
        if self.superexec_secret_file is None:
            return None
        return Path(self.superexec_secret_file).read_bytes()

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until ``/health`` answers (about 4 s on a small machine)."""
        super().wait_until_ready(timeout)
