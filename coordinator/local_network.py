"""A whole Flower network on 127.0.0.1: one SuperLink and N local participants.

Used by ``perspective demo`` and the integration tests. Every process is a real child
process in its own session (so nothing is orphaned on shutdown): the SuperLink
(``--isolation process``, SQLite database, SuperExec secret), and per participant one
``perspective participant local`` process, which runs a SuperNode and the participant
worker attached to its Runtime API. The coordinator side starts participants only as
processes through the CLI; it never imports participant code.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.flower.run import open_driver
from coordinator.flower.superlink import SuperLinkProcess
from shared_model.processes import FLOWER_QUIET_ENV, ManagedProcess, ProcessError, usable_cores


@dataclass
class LocalParticipant:
    """One local participant: its ``participant local`` process and directories."""

    index: int
    process: ManagedProcess
    base_dir: Path

    @property
    def state_dir(self) -> Path:
        """The worker's state directory (units, residuals, blob cache, outbox)."""
        return self.base_dir / "state"

    def wait_until_ready(self, timeout: float) -> None:
        """Block until its SuperNode's Runtime API is up and the worker started."""
        deadline = time.monotonic() + timeout
        while not (self.base_dir / "ready").is_file():
            if not self.process.is_alive():
                raise ProcessError(f"participant {self.index} exited; see {self.process.log_path}")
            if time.monotonic() > deadline:
                raise ProcessError(f"participant {self.index} not ready after {timeout:.0f} s")
            time.sleep(0.1)


@dataclass
class LocalNetwork:
    """SuperLink + participants under ``work_dir``; ``start()``/``shutdown()``."""

    work_dir: Path
    n_participants: int = 3
    preset: str = "tiny"
    config: Path | None = None
    threads: int = 1
    max_columns: int = 4
    #: Cap on the SuperNodes' poll (``participant local --poll-interval``; None: Flower's 3 s)
    poll_interval: float | None = None
    superlink: SuperLinkProcess | None = None
    participants: list[LocalParticipant] = field(default_factory=list)

    def cores_left(self) -> int:
        """Cores of this machine the participants' trainers leave (at least 1): what a
        coordinator on the same machine should give torch. With its default threads (one per
        core) beside 3 one-thread participants on 2 cores, the coordinator's idle OpenMP
        threads spun against theirs: ``make demo`` trained 0.46-0.67 of the wall time
        instead of 0.56-0.85 (docs/federated-training.md §5.1, "Utilisation")."""
        return max(1, usable_cores() - self.n_participants * self.threads)

    def start(self) -> None:
        """Start the SuperLink and every participant; wait until all are up."""
        self.work_dir = Path(self.work_dir)
        self.superlink = SuperLinkProcess(
            self.work_dir / "superlink", database=self.work_dir / "superlink" / "state.db"
        )
        self.superlink.start()
        self.superlink.wait_until_ready(timeout=120)
        for i in range(self.n_participants):
            self.participants.append(self._start_participant(i))
        for p in self.participants:
            p.wait_until_ready(timeout=120)

    def _start_participant(self, i: int) -> LocalParticipant:
        base = self.work_dir / f"participant-{i}"
        (base / "ready").unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "shared_model.cli", "participant", "local",
            "--superlink", self.superlink.address, "--base-dir", str(base),
            "--index", str(i), "--preset", self.preset,
            "--threads", str(self.threads), "--max-columns", str(self.max_columns),
        ]  # fmt: skip
        if self.config is not None:
            argv += ["--config", str(self.config)]
        if self.poll_interval is not None:
            argv += ["--poll-interval", str(self.poll_interval)]
        process = ManagedProcess(
            f"participant-{i}", argv, FLOWER_QUIET_ENV, base / "participant.log", health_url=None
        )
        process.start()
        return LocalParticipant(i, process, base)

    def open_driver(self, owner: str | None = None):
        """A new Flower run of ``owner`` (:func:`~coordinator.flower.run.owner_id`; default a
        fresh one) on the SuperLink with a driver attached to it."""
        return open_driver(
            self.superlink.address,
            superexec_secret=self.superlink.superexec_secret,
            owner=owner if owner is not None else secrets.token_hex(8),
        )

    def kill_participant(self, index: int) -> None:
        """SIGKILL a participant's process tree: worker and SuperNode (failure tests)."""
        self.participants[index].process.shutdown(timeout=0)

    def shutdown(self) -> None:
        """Stop every participant (worker, then SuperNode), then the SuperLink."""
        for p in self.participants:
            p.process.shutdown(timeout=15)
        if self.superlink is not None:
            self.superlink.shutdown(timeout=10)

    def __enter__(self) -> LocalNetwork:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
