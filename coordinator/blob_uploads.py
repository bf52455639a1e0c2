"""Who uploaded each blob: binds the blobs a result names to the lease it answers.

Every unit's capability token carries the unit id as its token id
(:meth:`coordinator.leasing.UnitFactory.request`). The blob service records, for each blob
a ``Put`` installs, the token id it was uploaded with — for the *first* upload only: a
blob that already existed (another lease's upload, a published version, an old accepted
result) stays bound to whoever put it there first. The intake
(:class:`coordinator.intake.PayloadCheck`) accepts a result only if every blob it names
was first uploaded under that result's own lease, so an old accepted result's blobs sent
again under a new lease (a replay) and another node's upload (free-riding) are refused
with ``FOREIGN_BLOB`` before anything is fetched or decoded.

Records are one small file per blob under ``<store>/uploads/``, created atomically
(a hard link: the first writer wins), so they survive a coordinator restart and need no
database table; the blob service and the intake share them through the store directory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from shared_model.blobs import BlobStore
from shared_model.blobs.store import check_content_id


class UploadLedger:
    """The first uploader (a lease's unit id) of each blob of one store.

    Args:
        root: directory of the records (see :meth:`for_store`).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_store(cls, store: BlobStore) -> UploadLedger:
        """The ledger of ``store`` (``<store root>/uploads``)."""
        return cls(store.root / "uploads")

    def _path(self, content_id: str) -> Path:
        return self.root / check_content_id(content_id)

    def record(self, content_id: str, lease: str) -> bool:
        """Record that ``lease`` uploaded ``content_id``; returns False (and changes
        nothing) if another upload was recorded first."""
        path = self._path(content_id)
        if path.exists():
            return False
        tmp = self.root / f".{content_id}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(lease, encoding="utf-8")
        try:
            os.link(tmp, path)  # atomic and complete: a reader never sees a partial record
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def uploader(self, content_id: str) -> str | None:
        """The lease that first uploaded ``content_id`` (``None``: not uploaded by a
        participant, e.g. a blob the coordinator published)."""
        try:
            return self._path(content_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def forget(self, content_id: str) -> None:
        """Drop the record of a deleted blob (blob garbage collection)."""
        self._path(content_id).unlink(missing_ok=True)
