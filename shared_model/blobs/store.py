"""Content-addressed blob store on a local directory.

A blob is named by the lowercase hex sha256 of its bytes and lives at
``<root>/blobs/ab/cd/abcd...`` (two shard levels keep directories small at millions of
blobs). Every write goes to a temp file under ``<root>/tmp/``, is hashed while it is
written, fsynced and then renamed into place, so a partially written blob is never
visible under its content id and a crash leaves at most a temp file that :meth:`gc`
removes later.

The store records access times itself (it sets the file's mtime on every read through
:meth:`get`, :meth:`open` or :meth:`path`) rather than trusting the filesystem's atime,
which is usually ``relatime``/``noatime``; :meth:`evict_to` uses them for LRU eviction.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shared_model.blobs.errors import BlobCorrupt, BlobError, BlobNotFound, InvalidContentId
from shared_model.blobs.writer import BlobWriter

_CONTENT_ID_RE = re.compile(r"^[0-9a-f]{64}$")
READ_CHUNK = 1 << 20
DEFAULT_TMP_MAX_AGE_S = 3600.0


def check_content_id(content_id: str) -> str:
    """Return ``content_id`` if it is a sha256 hex digest, else raise :class:`InvalidContentId`."""
    if not isinstance(content_id, str) or not _CONTENT_ID_RE.match(content_id):
        raise InvalidContentId(
            f"invalid content id {content_id!r}: expected 64 lowercase hex characters "
            "(the sha256 of the blob's bytes, e.g. hashlib.sha256(data).hexdigest())"
        )
    return content_id


def sha256_hex(data: bytes) -> str:
    """Content id of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Return ``(content id, size)`` of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while piece := fh.read(READ_CHUNK):
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class BlobInfo:
    """Size and last access time (unix seconds) of a stored blob."""

    content_id: str
    size: int
    last_access: float


@dataclass
class GcReport:
    """What :meth:`BlobStore.gc` removed."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    removed_temp: int = 0


class BlobStore:
    """A directory of immutable blobs addressed by sha256.

    Safe for concurrent use by threads and processes: writers never share a temp file,
    installs are atomic renames, and readers keep an open file valid after a delete.

    Args:
        root: directory of the store; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"cannot create blob store at {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # ----------------------------------------------------------------- writing
    def open_writer(
        self,
        expected_id: str | None = None,
        expected_size: int | None = None,
        max_size: int | None = None,
        resume: bool = False,
    ) -> BlobWriter:
        """Start a streaming write; the blob appears only on a successful ``commit()``.

        Args:
            expected_id: if given, commit fails with :class:`HashMismatch` unless the bytes
                hash to it.
            expected_size: if given, the exact size the blob must have.
            max_size: writes beyond this many bytes raise :class:`QuotaExceeded`.
            resume: keep the temp file as ``tmp/<expected_id>.partial`` across failures and
                continue from it (requires ``expected_id``); see :attr:`BlobWriter.size`.

        Returns:
            A :class:`BlobWriter`; used as a context manager it commits on normal exit and
            aborts on an exception.
        """
        if expected_id is not None:
            check_content_id(expected_id)
        for name, value in (("expected_size", expected_size), ("max_size", max_size)):
            if value is not None and value < 0:
                raise BlobError(f"{name} must be >= 0, got {value}")
        if resume and expected_id is None:
            raise BlobError("open_writer(resume=True) needs expected_id to name the partial file")
        partial = self._tmp / f"{expected_id}.partial" if resume else None
        return BlobWriter(self._install, self._tmp, partial, expected_id, expected_size, max_size)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` and return its content id (a no-op rewrite if already present)."""
        with self.open_writer() as writer:
            writer.write(data)
        return writer.content_id

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Copy the file at ``path`` into the store and return its content id."""
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below; a missing file is a domain error
        except OSError as exc:
            raise BlobError(f"cannot read {path} to store it: {exc}") from exc
        with src, self.open_writer() as writer:
            while piece := src.read(READ_CHUNK):
                writer.write(piece)
        return writer.content_id

    def _install(self, tmp_path: Path, content_id: str) -> Path:
        """Atomically move a verified, fsynced temp file to its content-addressed path."""
        final = self.blob_path(content_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Replacing an existing copy is harmless (same bytes) and heals a corrupt one.
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
        return final

    # ----------------------------------------------------------------- reading
    def blob_path(self, content_id: str) -> Path:
        """Where the blob would live (whether or not it exists)."""
        check_content_id(content_id)
        return self._blobs / content_id[:2] / content_id[2:4] / content_id

    def has(self, content_id: str) -> bool:
        """Whether the blob is stored."""
        return self.blob_path(content_id).is_file()

    def path(self, content_id: str) -> Path:
        """Path of a stored blob (records an access); raises :class:`BlobNotFound`."""
        path = self.blob_path(content_id)
        try:
            os.utime(path)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {content_id} is not in {self.root}") from None
        return path

    def open(self, content_id: str) -> BinaryIO:
        """Open a stored blob for reading (records an access)."""
        path = self.path(content_id)
        try:
            return open(path, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:  # deleted between utime and open
            raise BlobNotFound(f"blob {content_id} is not in {self.root}") from None

    def get(self, content_id: str, verify: bool = False) -> bytes:
        """Return a blob's bytes; with ``verify`` re-hash them and raise :class:`BlobCorrupt`."""
        with self.open(content_id) as fh:
            data = fh.read()
        if verify and sha256_hex(data) != content_id:
            raise BlobCorrupt(
                f"blob {content_id} in {self.root} is corrupt (its bytes hash to "
                f"{sha256_hex(data)}); delete it and fetch it again"
            )
        return data

    def stat(self, content_id: str) -> BlobInfo:
        """Size and last access of a stored blob; raises :class:`BlobNotFound`."""
        try:
            st = self.blob_path(content_id).stat()
        except FileNotFoundError:
            raise BlobNotFound(f"blob {content_id} is not in {self.root}") from None
        return BlobInfo(content_id, st.st_size, st.st_mtime)

    def verify(self, content_id: str, remove_corrupt: bool = True) -> BlobInfo:
        """Re-hash a stored blob; raise :class:`BlobCorrupt` (after removing it) on mismatch."""
        path = self.blob_path(content_id)
        try:
            actual, size = sha256_file(path)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {content_id} is not in {self.root}") from None
        if actual != content_id:
            if remove_corrupt:
                path.unlink(missing_ok=True)
            raise BlobCorrupt(
                f"blob {content_id} in {self.root} is corrupt: its {size} bytes hash to "
                f"{actual}{' (removed; fetch it again)' if remove_corrupt else ''}"
            )
        return self.stat(content_id)

    def iter_ids(self) -> Iterator[str]:
        """All stored content ids (in no particular order)."""
        for shard in self._blobs.glob("??/??"):
            for entry in os.scandir(shard):
                if entry.is_file() and _CONTENT_ID_RE.match(entry.name):
                    yield entry.name

    def _infos(self) -> list[BlobInfo]:
        infos = []
        for content_id in self.iter_ids():
            try:
                infos.append(self.stat(content_id))
            except BlobNotFound:  # removed concurrently
                continue
        return infos

    def total_bytes(self) -> int:
        """Sum of the sizes of all stored blobs (temp files excluded)."""
        return sum(info.size for info in self._infos())

    # --------------------------------------------------------------- removing
    def delete(self, content_id: str) -> bool:
        """Remove a blob; returns whether it existed. Open readers keep their data."""
        try:
            self.blob_path(content_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def gc(
        self,
        referenced: Iterable[str],
        tmp_max_age_s: float = DEFAULT_TMP_MAX_AGE_S,
        now: float | None = None,
        min_age_s: float = 0.0,
    ) -> GcReport:
        """Remove every blob not in ``referenced`` and temp files older than ``tmp_max_age_s``.

        Args:
            referenced: content ids to keep (e.g. all ids the coordinator still needs).
            tmp_max_age_s: temp/partial files untouched for longer than this are removed;
                younger ones may belong to a transfer in progress.
            now: current unix time (tests); defaults to ``time.time()``.
            min_age_s: blobs written or read within this many seconds are kept even when
                not referenced (an upload whose reference has not arrived yet).
        """
        keep = set(referenced)
        now = time.time() if now is None else now
        report = GcReport()
        for info in self._infos():
            if info.content_id in keep or info.last_access > now - min_age_s:
                continue
            if self.delete(info.content_id):
                report.removed.append(info.content_id)
                report.freed_bytes += info.size
        report.removed_temp = self.clean_temp(tmp_max_age_s, now)
        return report

    def clean_temp(self, max_age_s: float = DEFAULT_TMP_MAX_AGE_S, now: float | None = None) -> int:
        """Remove temp and partial files not modified for ``max_age_s``; returns the count."""
        cutoff = (time.time() if now is None else now) - max_age_s
        removed = 0
        for entry in os.scandir(self._tmp):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def temp_files(self) -> list[Path]:
        """Temp and partial files currently present (transfers in progress or abandoned)."""
        return sorted(Path(e.path) for e in os.scandir(self._tmp) if e.is_file())

    def evict_to(self, cap_bytes: int, keep: Iterable[str] = ()) -> list[str]:
        """Delete least-recently-used blobs until the store holds at most ``cap_bytes``.

        Blobs in ``keep`` are never evicted, so the result can stay above the cap when the
        kept blobs alone exceed it (check :meth:`total_bytes`).

        Returns:
            The evicted content ids, oldest access first.
        """
        if cap_bytes < 0:
            raise BlobError(f"cap_bytes must be >= 0, got {cap_bytes}")
        pinned = set(keep)
        infos = sorted(self._infos(), key=lambda info: info.last_access)
        total = sum(info.size for info in infos)
        evicted = []
        for info in infos:
            if total <= cap_bytes:
                break
            if info.content_id in pinned:
                continue
            if self.delete(info.content_id):
                evicted.append(info.content_id)
            total -= info.size
        return evicted


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename into it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
