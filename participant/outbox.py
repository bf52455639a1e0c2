"""Finished results waiting to be acknowledged, kept on disk so a restart does not lose them.

A finished result goes to the blob service's ``Submit`` at once, or, when that is not
offered or refused, with the reply to the *next* message (:mod:`participant.runtime`); so
at any moment the worker may hold results whose decision it has not heard. Their blobs are
already uploaded; only the small ``WorkResult`` message matters. It is written here when
the unit finishes (before it is submitted) and removed only when the
coordinator acknowledges it (a ``WorkAck`` in a later ``ControlRequest``, sent after the
coordinator's database committed its decision; :mod:`coordinator.acks`). Until then the
worker re-sends it, so neither a stopped worker (SIGTERM, reboot, even SIGKILL) nor a
coordinator killed before its commit, nor a reply Flower never delivered, loses it; the
coordinator answers a re-sent result with the decision it stored.

Every acknowledgement is appended to ``acks.jsonl`` beside the results: what became of
each result (accepted, or refused with the coordinator's reason), for the volunteer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from shared_model.files import write_atomic
from shared_model.wire.perspective.v1 import federation_pb2

log = logging.getLogger(__name__)
ACK_LOG = "acks.jsonl"


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
        """Keep ``result`` until :meth:`acknowledged` (temp file + rename: never half-written)."""
        write_atomic(self._path(result.unit_id), result.SerializeToString())

    def acknowledged(self, ack: federation_pb2.WorkAck) -> bool:
        """Record the coordinator's decision on a result and forget the result.

        Returns:
            Whether the outbox held that result (an ack of an unknown unit is ignored:
            the coordinator repeats acks of re-sent results).
        """
        try:
            path = self._path(ack.unit_id)
        except ValueError:
            return False
        if not path.exists():
            return False
        entry = {
            "unit_id": ack.unit_id,
            "accepted": ack.accepted,
            "reason": ack.reason_code,
            "detail": ack.detail,
            "at": round(time.time(), 3),
        }
        with open(self.directory / ACK_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        path.unlink(missing_ok=True)
        return True

    def acks(self) -> list[dict]:
        """Every acknowledgement recorded so far, oldest first (``acks.jsonl``)."""
        path = self.directory / ACK_LOG
        if not path.exists():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: its ack comes again
                continue
        return entries

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
