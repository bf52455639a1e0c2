"""A whole Flower network on 127.0.0.1: one SuperLink, N SuperNodes, N participant workers.

Used by ``perspective demo`` and the integration tests. Every process is a real child
process in its own session (so nothing is orphaned on shutdown): the SuperLink
(``--isolation process``, SQLite database, SuperExec secret), and per participant a
SuperNode (``--isolation process``) plus our ``perspective participant worker`` attached
to its Runtime API.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.flower.run import open_driver
from coordinator.flower.superlink import SuperLinkProcess
from participant.flower.supernode import SuperNodeProcess
from shared_model.procs import FLOWER_QUIET_ENV, ManagedProcess, write_secret_file


@dataclass
class ParticipantProcs:
    """The two processes of one local participant."""

    index: int
    supernode: SuperNodeProcess
    worker: ManagedProcess
    state_dir: Path


@dataclass
class LocalNetwork:
    """SuperLink + participants under ``work_dir``; ``start()``/``shutdown()``."""

    work_dir: Path
    n_participants: int = 3
    preset: str = "tiny"
    config: Path | None = None
    threads: int = 1
    max_columns: int = 4
    superlink: SuperLinkProcess | None = None
    participants: list[ParticipantProcs] = field(default_factory=list)

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

    def _start_participant(self, i: int) -> ParticipantProcs:
        base = self.work_dir / f"participant-{i}"
        secret = write_secret_file(base / "superexec.secret")
        node = SuperNodeProcess(
            base / "supernode",
            self.superlink.address,
            node_config={"participant": i},
            superexec_secret_file=secret,
        )
        node.start()
        node.wait_until_ready(timeout=120)
        argv = [
            sys.executable, "-m", "shared_model.cli", "participant", "worker",
            "--runtime-address", node.runtime_address,
            "--state-dir", str(base / "state"),
            "--preset", self.preset,
            "--superexec-secret-file", str(secret),
            "--threads", str(self.threads),
            "--max-columns", str(self.max_columns),
        ]  # fmt: skip
        if self.config is not None:
            argv += ["--config", str(self.config)]
        worker = ManagedProcess(
            f"worker-{i}", argv, FLOWER_QUIET_ENV, base / "worker.log", health_url=None
        )
        worker.start()
        return ParticipantProcs(i, node, worker, base / "state")

    def open_driver(self):
        """A new Flower run on the SuperLink with a driver attached to it."""
        return open_driver(self.superlink.address, superexec_secret=self.superlink.superexec_secret)

    def kill_participant(self, index: int) -> None:
        """SIGKILL a participant's worker and SuperNode (failure tests)."""
        p = self.participants[index]
        p.worker.shutdown(timeout=0)
        p.supernode.shutdown(timeout=0)

    def shutdown(self) -> None:
        """Stop everything (workers first, then SuperNodes, then the SuperLink)."""
        for p in self.participants:
            p.worker.shutdown(timeout=5)
        for p in self.participants:
            p.supernode.shutdown(timeout=5)
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
