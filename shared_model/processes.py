"""Small process helpers shared by the Flower wrappers and the demo.

* :func:`free_port` — a TCP port on 127.0.0.1 that nothing listens on right now.
* :func:`usable_cores` — the CPU cores this process may run on.
* :func:`wait_http_ok` — poll an HTTP health URL until it answers 2xx, failing fast
  if the process that should serve it has died.
* :func:`terminate_tree` — SIGTERM then SIGKILL a process *and everything it started*.
* :class:`ManagedProcess` — a hivemind-style daemon wrapper (``start()``,
  ``wait_until_ready()``, ``shutdown()``, context manager) around one command line.

Why process groups *and* a psutil snapshot: Flower's SuperLink/SuperNode start
``flower-superexec`` and ``flwr-clientapp``/``flwr-serverapp`` children; when the
parent dies those are reparented and keep running (see the Flower note §7). Every
managed command is started in its own session (``start_new_session=True``) so the
whole group can be signalled; descendants that moved to another group are found
with psutil *before* the parent is signalled (afterwards they are no longer its
children) and killed individually.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from shared_model.files import write_atomic

#: Environment for every Flower process we start: no telemetry, no update check.
FLOWER_QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class ProcessError(RuntimeError):
    """A managed process failed to start, died, or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free at the time of the call.

    Args:
        host: Interface to probe; loopback by default.

    Returns:
        A port number the OS just handed out (bind to port 0, then release).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(cores or 1)


def console_script(name: str) -> str:
    """Path of a console script installed next to the running interpreter (venv-safe).

    Args:
        name: Script name, e.g. ``flower-superlink``.

    Returns:
        The absolute path if it exists beside ``sys.executable``, else ``name`` (PATH lookup).
    """
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_secret_file(path: Path) -> Path:
    """Create ``path`` with 32 random hex bytes (mode 0600) unless it exists already.

    Written to a temp file and renamed, so a reader never sees a half-written secret.

    Args:
        path: Where the secret lives.

    Returns:
        ``path``.
    """
    path = Path(path)
    if not path.exists():
        write_atomic(path, secrets.token_hex(32).encode(), 0o600)
    return path


def wait_http_ok(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    verify: bool | str = True,
    interval: float = 0.1,
) -> None:
    """Block until ``GET url`` returns a 2xx status.

    Args:
        url: Health URL, e.g. ``http://127.0.0.1:8000/health``.
        timeout: Seconds to wait in total.
        proc: If given, fail at once when this process exits.
        verify: TLS verification for httpx (``True``, ``False`` or a CA file path).
        interval: Seconds between attempts.

    Raises:
        ProcessError: On timeout or when ``proc`` exited.
    """
    import httpx

    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"process exited with code {proc.returncode} before {url} was up")
        try:
            resp = httpx.get(url, timeout=2.0, verify=verify)
            if 200 <= resp.status_code < 300:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(interval)
    raise ProcessError(f"{url} not healthy after {timeout:.1f} s (last: {last})")


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def terminate_tree(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Stop ``proc`` and all its descendants; never leaves orphans behind.

    ``proc`` must have been started with ``start_new_session=True`` (its pid is then
    its process-group id). Sends SIGTERM to the group, waits up to ``timeout`` for the
    leader, then SIGKILLs the group and any descendant seen before the SIGTERM.

    Args:
        proc: The process to stop.
        timeout: Grace period in seconds for a clean shutdown.

    Returns:
        The leader's exit code (``None`` only if it could not be reaped).
    """
    pgid = proc.pid
    snapshot = _descendants(proc.pid)
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Whatever is left of the group (children keep the pgid after reparenting).
    _signal_group(pgid, signal.SIGKILL)
    for child in snapshot + _descendants(proc.pid):
        with contextlib.suppress(psutil.Error):
            child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    # Reap the snapshot so no zombies of ours linger (only direct children can be reaped,
    # psutil.wait_procs handles both cases).
    psutil.wait_procs([c for c in snapshot if c.is_running()], timeout=2.0)
    return proc.returncode


class ManagedProcess:
    """A command line run as a supervised daemon (hivemind style).

    Args:
        name: Short label used in messages and the log file name.
        argv: The command and its arguments.
        env: Extra environment variables (added to a copy of ``os.environ``).
        log_path: File receiving stdout and stderr (appended).
        health_url: URL whose 2xx answer means "ready"; ``None`` means ready once started.
        verify: TLS verification for the health check.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        health_url: str | None,
        verify: bool | str = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.verify = verify
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the leader process, ``None`` before ``start()``."""
        return None if self.proc is None else self.proc.pid

    def is_alive(self) -> bool:
        """Whether the leader process is running."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Spawn the process in its own session; returns without waiting for readiness."""
        if self.proc is not None:
            raise ProcessError(f"{self.name} already started (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until the health URL answers 2xx.

        Raises:
            ProcessError: If not started, if it died, or on timeout (with the log tail).
        """
        if self.proc is None:
            raise ProcessError(f"{self.name}: call start() before wait_until_ready()")
        if self.health_url is None:
            return
        try:
            wait_http_ok(self.health_url, timeout, proc=self.proc, verify=self.verify)
        except ProcessError as err:
            raise ProcessError(f"{self.name}: {err}\n--- log tail ---\n{self.log_tail()}") from err

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL the whole process tree; idempotent."""
        if self.proc is None:
            return None
        return terminate_tree(self.proc, timeout=timeout)

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last ``n_bytes`` of the log file (for error messages)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-n_bytes:].decode("utf-8", errors="replace")

    def __enter__(self) -> ManagedProcess:
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
