"""Streaming blob writer: hash while writing, commit only when the bytes match what was declared.

The writer knows nothing of the store's layout: committing hands the verified temp file to
an ``install`` callable (:meth:`BlobStore._install`), so the store imports the writer and
not the other way round.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shared_model.blobs.errors import BlobError, HashMismatch, QuotaExceeded

# Moves a verified, fsynced temp file to its content-addressed place (the store's job).
Installer = Callable[[Path, str], Path]
_READ_CHUNK = 1 << 20


class BlobWriter:
    """Write a blob piece by piece; obtain one from :meth:`BlobStore.open_writer`.

    ``size`` is the number of bytes written so far; for a resumed writer it starts at the
    length of the partial file kept by an earlier failed transfer, which is the offset to
    ask the sender to resume from.
    """

    def __init__(
        self,
        install: Installer,
        tmp_dir: Path,
        partial: Path | None,
        expected_id: str | None,
        expected_size: int | None,
        max_size: int | None,
    ) -> None:
        self._install = install
        self.expected_id = expected_id
        self.expected_size = expected_size
        self.max_size = max_size
        self.content_id: str | None = None
        self._digest = hashlib.sha256()
        self._closed = False
        self.resumable = False
        self.size = 0
        fh = self._open_partial(partial) if partial is not None else None
        if fh is None:
            fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".tmp")
            fh = os.fdopen(fd, "w+b")
            self.tmp_path = Path(name)
        self._fh: BinaryIO = fh

    def _open_partial(self, partial: Path) -> BinaryIO | None:
        """Open and lock the partial file, hashing what it holds; None if another writer has it."""
        fh = open(partial, "a+b")  # noqa: SIM115 - owned by the writer
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a concurrent transfer of the same blob: use a private temp
            fh.close()
            return None
        try:  # the holder we waited for may have renamed the file into the store meanwhile
            same_file = os.stat(partial).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:
            fh.close()
            return None
        limit = min(x for x in (self.expected_size, self.max_size, float("inf")) if x is not None)
        fh.seek(0)
        while piece := fh.read(_READ_CHUNK):
            self._digest.update(piece)
            self.size += len(piece)
        if self.size > limit:  # cannot be a prefix of the blob: start over
            fh.truncate(0)
            self._digest, self.size = hashlib.sha256(), 0
        fh.seek(0, os.SEEK_END)
        self.tmp_path, self.resumable = partial, True
        return fh

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort(keep_partial=True)

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`QuotaExceeded` past ``max_size``/``expected_size``."""
        if self._closed:
            raise BlobError("write() on a blob writer that was already committed or aborted")
        new_size = self.size + len(data)
        for limit, what in ((self.max_size, "size cap"), (self.expected_size, "declared size")):
            if limit is not None and new_size > limit:
                self.abort()
                raise QuotaExceeded(
                    f"blob is larger than its {what} of {limit} bytes (got at least "
                    f"{new_size}); declare the real size or ask for a larger quota"
                )
        self._fh.write(data)
        self._digest.update(data)
        self.size = new_size

    def reset(self) -> None:
        """Drop everything written so far (e.g. the sender refused to resume this prefix)."""
        self._fh.seek(0)
        self._fh.truncate(0)
        self._digest, self.size = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        """sha256 of the bytes written so far."""
        return self._digest.hexdigest()

    def commit(self) -> str:
        """Verify, fsync and atomically install the blob; returns its content id.

        Raises:
            HashMismatch: size or sha256 differ from what was declared (nothing is kept).
        """
        if self._closed:
            raise BlobError("commit() on a blob writer that was already committed or aborted")
        actual = self._digest.hexdigest()
        problem = None
        if self.expected_size is not None and self.size != self.expected_size:
            problem = f"{self.size} bytes received, {self.expected_size} declared"
        elif self.expected_id is not None and actual != self.expected_id:
            problem = f"bytes hash to {actual}, declared {self.expected_id}"
        if problem is not None:
            self.abort()
            raise HashMismatch(f"blob rejected: {problem}; nothing was stored")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._closed = True
        try:  # rename while still holding the partial file's lock (see _open_partial)
            self._install(self.tmp_path, actual)
        except OSError as exc:
            self.tmp_path.unlink(missing_ok=True)
            raise BlobError(f"cannot install blob {actual}: {exc}") from exc
        finally:
            self._fh.close()
        self.content_id = actual
        return actual

    def abort(self, keep_partial: bool = False) -> None:
        """Discard the write; with ``keep_partial`` a resumable writer keeps a non-empty partial."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._fh.flush()
        self._fh.close()
        if not (keep_partial and self.resumable and self.size > 0):
            self.tmp_path.unlink(missing_ok=True)
