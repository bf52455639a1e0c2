"""Finished results waiting to be delivered, kept on disk so a restart does not lose them.

Units are pipelined (:mod:`participant.runtime`): a finished result travels with the reply
to the *next* message, so at any moment the worker usually holds one result the
coordinator has not seen. Its blobs are already uploaded; only the small ``WorkResult``
message is missing. Writing it here when the unit finishes, and removing it once a reply
has carried it, means a worker stopped (SIGTERM, reboot, even SIGKILL) delivers it with its
first reply after the restart. The coordinator accepts it while the lease is valid and
answers a duplicate idempotently.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared_model.wire.perspective.v1 import federation_pb2

log = logging.getLogger(__name__)


class ResultOutbox:
    """One ``<unit_id>.result`` file (a serialised ``WorkResult``) per undelivered result.

    Args:
        directory: Where the files live (created if missing).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, unit_id: str) -> Path:
        if not unit_id or "/" in unit_id or unit_id.startswith("."):
            raise ValueError(f"unit id {unit_id!r} cannot name a file")
        return self.directory / f"{unit_id}.result"

    def put(self, result: federation_pb2.WorkResult) -> None:
        """Keep ``result`` until :meth:`delivered` (temp file + rename: never half-written)."""
        path = self._path(result.unit_id)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(result.SerializeToString())
        tmp.replace(path)

    def delivered(self, unit_ids: list[str]) -> None:
        """Forget results a reply has carried."""
        for unit_id in unit_ids:
            self._path(unit_id).unlink(missing_ok=True)

    def pending(self) -> list[federation_pb2.WorkResult]:
        """Results not delivered yet, oldest first; unreadable files are set aside (logged)."""
        results = []
        files = sorted(self.directory.glob("*.result"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                results.append(federation_pb2.WorkResult.FromString(path.read_bytes()))
            except Exception as exc:  # noqa: BLE001 - protobuf DecodeError: a damaged file
                log.warning("setting aside unreadable result %s: %s", path.name, exc)
                path.replace(path.with_suffix(".damaged"))
        return results
