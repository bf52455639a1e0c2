"""The volunteer's participant daemon: supervises a SuperNode and our worker.

``perspective participant run`` starts one :class:`ParticipantDaemon`. It keeps two child
processes alive, each in its own session so nothing is orphaned:

* ``flower-supernode`` (``--isolation process``, TLS, SuperNode authentication key) —
  Flower's membership and message transport to the coordinator;
* ``perspective participant worker`` attached to the SuperNode's Runtime API — our
  installed code, which trains the units (no code from the server ever runs here).

Why a supervisor: the SuperNode exits when the coordinator is away longer than
``max_wait_time``, when the SuperLink forgot it (restart without database: HTTP 401), or
when it is refused (unregistered/revoked key, wrong CA, no TLS: exit code 305). Each exit
is classified from the SuperNode's log, reported through ``on_event`` (the coordinator's
event log when the sink writes there, ``events.jsonl`` in the state directory always), and
the node is restarted after an exponential back-off with full jitter (reset once a node
has stayed up for ``stable_s``). The worker survives SuperNode restarts: the Runtime API
port and secret stay the same, and the worker simply retries until it is back.

``status.json`` in the state directory is rewritten every few seconds (temp + rename) for
``perspective participant status``.

Stopping (SIGTERM/SIGINT, :meth:`ParticipantDaemon.shutdown`) signals both children at
once: the SuperNode gets :data:`NODE_STOP_S` to deregister before it is killed, the worker
its ``stop_grace_s`` only while a unit is training (an idle worker exits at once), so the
daemon is gone within 2 s in every state but training. A node refused because the operator
revoked this participant (the coordinator says so in its answer to our signed report)
stops the daemon for good (:meth:`ParticipantDaemon.revoked`): retrying cannot help.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from participant.flower.supernode import SuperNodeProcess, worker_command
from participant.limits import Limits
from shared_model.files import write_json_atomic
from shared_model.processes import FLOWER_QUIET_ENV, ManagedProcess, free_port, write_secret_file

log = logging.getLogger(__name__)
EventSink = Callable[[str, str, dict[str, Any]], None]
ACTIVATION_RETRY_MAX_S = 20.0
NODE_STOP_S = 1.0  # a SuperNode deregisters in well under this; a hung one is killed
#: Flower force-exits 5 s after its exit message; a SuperNode alive past this hangs.
GIVE_UP_GRACE_S = 6.0
REVOKED_EXIT_CODE = 3  # `participant run` exits with this; systemd must not restart it

#: (substring of the SuperNode log, reason code, explanation for the volunteer).
REFUSALS = (
    ("must be registered", "no_key", "node authentication is on and no key was given"),
    ("Failed to activate SuperNode", "key_not_registered",
     "the coordinator would not activate this node: its key is not registered (not enrolled "
     "yet, or revoked), or after a coordinator restart it still counts as online (clears "
     "within a minute: Flower waits 2 missed 30 s heartbeats)"),
    ("CERTIFICATE_VERIFY_FAILED", "tls_untrusted",
     "the coordinator's TLS certificate is not signed by the CA we were given"),
    ("Server disconnected without sending a response", "tls_required",
     "the coordinator speaks TLS but this node connected without it"),
    # The same mismatch, as some attempts end (the TLS server resets the plain connection).
    ("Connection reset by peer", "tls_required",
     "the coordinator reset the connection: it speaks TLS and this node connected without "
     "it (or a proxy in between refused the connection)"),
    # httpx's words for a 401 (a bare "401" also matched run, node and message ids in the
    # log, and a SuperLink outage was once taken for a revocation).
    ("401 Unauthorized", "unauthorized",
     "the coordinator no longer accepts this node (revoked or reset)"),
    ("UNAUTHENTICATED", "unauthorized",
     "the coordinator no longer accepts this node (revoked or reset)"),
)  # fmt: skip


def flower_exit_code(log_tail: str) -> int | None:
    """The ``Exit Code: N`` Flower printed (the process itself may exit with 1 instead)."""
    found = re.findall(r"Exit Code: (\d+)", log_tail)
    return int(found[-1]) if found else None


def classify_exit(code: int | None, log_tail: str) -> tuple[str, str]:
    """Why a SuperNode exited: ``(reason_code, explanation)`` from its exit code and log."""
    for needle, reason, text in REFUSALS:
        if needle in log_tail:
            return reason, text
    if code == 0:
        return "coordinator_unreachable", "gave up reconnecting after max_wait_time"
    return "exited", f"flower-supernode exited with code {code}"


@dataclass
class DaemonConfig:
    """How to reach the coordinator and what this machine may spend.

    Attributes:
        state_dir: Logs, keys, cache, ``status.json`` and ``events.jsonl`` live here.
        superlink_address: Public ``host:port`` of the coordinator's Fleet API (the proxy).
        root_certificates: CA file to verify the coordinator; ``None`` = plain HTTP (tests).
        auth_private_key: OpenSSH ECDSA key registered at enrolment.
        preset: Model preset (must match the coordinator).
        config: YAML model config (must match the coordinator).
        limits: Resource limits.
        max_wait_time: The SuperNode gives up reconnecting after this many seconds and the
            daemon restarts it (so an outage is visible in ``status``).
        backoff_initial: First restart delay in seconds.
        backoff_max: Restart delays never exceed this.
        stable_s: A SuperNode up this long resets the back-off.
        stop_grace_s: On shutdown the worker may finish its unit this long (result kept).
        worker_argv: Replace the worker command (``None``: ``perspective participant worker``).
        poll_interval: Cap on the SuperNode's poll sleeps (``None``: Flower's 3 s;
            :mod:`participant.flower.supernode_main`).
    """

    state_dir: Path
    superlink_address: str
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    preset: str = "tiny"
    config: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_wait_time: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    stable_s: float = 60.0
    worker_argv: list[str] | None = None
    stop_grace_s: float = 20.0
    poll_interval: float | None = None


class ParticipantDaemon:
    """Supervisor of SuperNode + worker with back-off restarts (hivemind-style lifecycle).

    Args:
        cfg: Daemon configuration.
        on_event: Extra sink ``(kind, message, data)`` for supervision events.
    """

    def __init__(self, cfg: DaemonConfig, on_event: EventSink | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event
        self.runtime_port = free_port()
        self.secret_file = write_secret_file(self.state_dir / "runtime.secret")
        self.supernode: SuperNodeProcess | None = None
        self.worker: ManagedProcess | None = None
        self.restarts = 0
        self.last_refusal: dict[str, Any] | None = None
        self.state = "starting"
        self._delay = cfg.backoff_initial
        self._next_start = 0.0
        self._node_started = 0.0
        self._gave_up_at: float | None = None  # when the SuperNode logged giving up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ram_strikes = 0
        self._log_offset = 0
        self.revocation: str | None = None  # why the coordinator revoked us, once it said so

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Run the supervision loop in a background thread."""
        self._thread = threading.Thread(target=self.run_forever, name="participant-daemon")
        self._thread.start()

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until the SuperNode and the worker are both running."""
        deadline = time.monotonic() + timeout
        while not (self.supernode and self.supernode.is_alive() and self.worker_alive()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"participant daemon not up after {timeout:.0f} s ({self.state})"
                )
            time.sleep(0.1)

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop supervising, SIGTERM the worker and the SuperNode (it deregisters cleanly)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._stop_children()

    def run_forever(self, install_signals: bool = False) -> None:
        """Supervise until :meth:`shutdown` (or SIGTERM/SIGINT when ``install_signals``)."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        last_status = 0.0
        try:
            while not self._stop.is_set():
                self._tick()
                if time.monotonic() - last_status > 2.0:
                    self.write_status()
                    last_status = time.monotonic()
                self._stop.wait(0.25)
        finally:
            self._stop_children()
            self.state = "revoked" if self.revocation else "stopped"
            self.write_status()

    # ------------------------------------------------------------------ supervision
    def _tick(self) -> None:
        if not self.cfg.limits.in_window():
            if self.supernode is not None or self.worker is not None:
                self.event("participant.paused", "outside the schedule window; stopping", {})
                self._stop_children()
            self.state = "paused (schedule)"
            return
        if self.worker is None or not self.worker.is_alive():
            self._restart_worker()
        node = self.supernode
        if node is not None and node.is_alive() and self._gave_up_and_hangs():
            # Flower 1.42 logs "terminated gracefully" but the process can hang in
            # threading shutdown: stop it ourselves so the back-off restart happens.
            node.shutdown(timeout=2)
        if node is not None and not node.is_alive():
            self._node_exited(node)
            node = self.supernode = None
        if node is None and time.monotonic() >= self._next_start:
            self._start_node()
        elif node is not None and time.monotonic() - self._node_started > self.cfg.stable_s:
            self._delay = self.cfg.backoff_initial  # a stable node resets the back-off
            self.state = "running"
        self._check_ram()

    def _gave_up_and_hangs(self) -> bool:
        """Whether the SuperNode gave up reconnecting and is still alive after Flower's own
        exit had time to run. Stopping it at once raced that exit: our SIGTERM turned its
        "Exit Code: 305" (the refusal volunteers are told about) into a graceful exit 0."""
        if "Giving up reconnection" not in self._node_log():
            return False
        if self._gave_up_at is None:
            self._gave_up_at = time.monotonic()
        return time.monotonic() - self._gave_up_at > GIVE_UP_GRACE_S

    def _start_node(self) -> None:
        cfg = self.cfg
        self.supernode = SuperNodeProcess(
            self.state_dir / "supernode",
            cfg.superlink_address,
            runtime_port=self.runtime_port,
            root_certificates=cfg.root_certificates,
            auth_private_key=cfg.auth_private_key,
            superexec_secret_file=self.secret_file,
            max_wait_time=cfg.max_wait_time,
            poll_interval=cfg.poll_interval,
        )
        log_path = self.supernode.log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        self.supernode.start()
        self._node_started = time.monotonic()
        self._gave_up_at = None
        self.state = "connecting"

    def _node_log(self) -> str:
        """What the current SuperNode wrote (its log file is appended across restarts)."""
        if self.supernode is None:
            return ""
        try:
            with open(self.supernode.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read(200_000).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _node_exited(self, node: SuperNodeProcess) -> None:
        tail = self._node_log()[-6000:]
        node.shutdown(timeout=2)  # reap anything it left behind
        code = node.proc.returncode if node.proc else None
        reason, text = classify_exit(code, tail)
        # Flower 1.42 retries a plain-HTTP node against a TLS server as if the server were
        # down; a TLS handshake tells the two apart.
        plain = self.cfg.root_certificates is None
        if reason == "coordinator_unreachable" and plain and speaks_tls(self.cfg.superlink_address):
            reason, text = "tls_required", "the coordinator speaks TLS but this node has no CA"
        delay = random.uniform(0.5, 1.0) * self._delay  # jitter so a fleet does not stampede
        self._next_start = time.monotonic() + delay
        # An activation refusal usually clears by itself (key sync, heartbeat expiry): keep
        # retrying often instead of backing off to minutes.
        cap = ACTIVATION_RETRY_MAX_S if reason == "key_not_registered" else self.cfg.backoff_max
        self._delay = min(self._delay * 2, cap, self.cfg.backoff_max)
        self.restarts += 1
        self.state = f"waiting ({reason})"
        data = {
            "exit_code": flower_exit_code(tail),
            "process_exit_code": code,
            "reason": reason,
            "retry_in_s": round(delay, 2),
        }
        if reason not in ("coordinator_unreachable", "exited"):
            self.last_refusal = {**data, "message": text, "at": time.time()}
            self.event("participant.refused", f"SuperNode refused: {text}", data)
        else:
            self.event("participant.disconnected", f"SuperNode stopped: {text}", data)

    def _worker_argv(self) -> list[str]:
        if self.cfg.worker_argv is not None:
            return list(self.cfg.worker_argv)
        argv = worker_command(
            f"127.0.0.1:{self.runtime_port}", self.state_dir / "state", self.cfg.preset,
            self.secret_file, self.cfg.config,
        )  # fmt: skip
        argv += ["--stop-grace-s", str(self.cfg.stop_grace_s)]
        if self.cfg.root_certificates is not None:  # the blob service shares the fleet's CA
            argv += ["--ca-file", str(self.cfg.root_certificates)]
        return argv + self.cfg.limits.worker_args()

    def _restart_worker(self) -> None:
        if self.worker is not None:
            code = self.worker.proc.returncode if self.worker.proc else None
            self.event("participant.worker_restart", f"worker exited with code {code}", {})
            self.worker.shutdown(timeout=2)
        self.worker = ManagedProcess(
            "worker", self._worker_argv(), FLOWER_QUIET_ENV, self.state_dir / "worker.log", None
        )
        self.worker.start()

    def worker_alive(self) -> bool:
        """Whether the worker process runs."""
        return self.worker is not None and self.worker.is_alive()

    def _check_ram(self) -> None:
        cap = self.cfg.limits.ram_cap_mb
        if cap is None or not self.worker_alive():
            return
        rss = tree_usage([self.worker.pid])["rss_bytes"]
        # Three strikes (0.75 s) so a short peak is tolerated but a leak is not.
        self._ram_strikes = self._ram_strikes + 1 if rss > cap * 1e6 else 0
        if self._ram_strikes >= 3:
            self.event("participant.ram_cap", f"worker RSS {rss / 1e6:.0f} MB > cap {cap} MB", {})
            self.worker.shutdown(timeout=2)
            self._ram_strikes = 0

    def _stop_children(self) -> None:
        """SIGTERM both children at once; the worker's grace only while a unit trains."""
        node, worker = self.supernode, self.worker
        grace = self.cfg.stop_grace_s + 1 if self._unit_in_progress() else NODE_STOP_S
        stoppers = [
            threading.Thread(target=proc.shutdown, kwargs={"timeout": t}, name="stop-child")
            for proc, t in ((node, NODE_STOP_S), (worker, grace))
            if proc is not None
        ]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.worker = self.supernode = None

    def _unit_in_progress(self) -> bool:
        """Whether the worker says it is training a unit (its ``progress.json``)."""
        from participant.progress import read_progress
        from participant.status import WORKER_STATE

        with contextlib.suppress(Exception):  # no or half-written file: not training
            return bool((read_progress(self.state_dir / WORKER_STATE) or {}).get("unit"))
        return False

    def revoked(self, message: str) -> None:
        """The coordinator revoked this participant: record it and stop for good."""
        if self.revocation is None:
            self.revocation = message
            self.event("participant.revoked", message, {})
        self.state = "revoked"
        self._stop.set()

    # ------------------------------------------------------------------ reporting
    def event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Record a supervision event (log, ``events.jsonl``, and the ``on_event`` sink)."""
        log.warning("%s: %s %s", kind, message, data)
        line = json.dumps({"at": time.time(), "kind": kind, "message": message, "data": data})
        with open(self.state_dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if self.on_event is not None:
            try:
                self.on_event(kind, message, data)
            except Exception as err:  # reporting must never take the supervisor down
                log.warning("event sink failed: %s", err)

    def pids(self) -> list[int]:
        """PIDs of the running children (the daemon itself not included)."""
        return [p.pid for p in (self.supernode, self.worker) if p is not None and p.is_alive()]

    def write_status(self) -> None:
        """Rewrite ``status.json`` atomically."""
        status = {
            "state": self.state,
            "daemon_pid": psutil.Process().pid,
            "supernode_pid": self.supernode.pid if self.supernode else None,
            "worker_pid": self.worker.pid if self.worker else None,
            "superlink_address": self.cfg.superlink_address,
            "restarts": self.restarts,
            "last_refusal": self.last_refusal,
            "limits": self.cfg.limits.__dict__,
            "updated_at": time.time(),
        }
        write_json_atomic(self.state_dir / "status.json", status, indent=2)


def speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked)."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host.strip("[]")),
        ):
            return True
    except (OSError, ValueError):
        return False


def tree_usage(pids: list[int], interval: float = 0.0) -> dict[str, float]:
    """Summed RSS and CPU percent of ``pids`` and all their descendants.

    Args:
        pids: Root processes.
        interval: CPU sampling window in seconds (0: since the previous call per process).
    """
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.Error:
            continue
    rss, cpu = 0, 0.0
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    if interval > 0:
        time.sleep(interval)
    for p in procs.values():
        try:
            rss += p.memory_info().rss
            cpu += p.cpu_percent(None)
        except psutil.Error:
            continue
    return {"rss_bytes": float(rss), "cpu_percent": cpu, "processes": float(len(procs))}
