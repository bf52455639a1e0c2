"""Files written whole or not at all: a temp file in the same directory, then a rename.

:func:`write_atomic` (and its text and JSON forms) for bytes in hand; :func:`atomic_path`
for a writer that writes to a path itself.

A reader (another process, or this one after a crash) sees the old file or the new one,
never half of either. The temp name is unique per writer, so two processes writing the
same path at once (participants sharing a shard cache, a restarted daemon) do not write
into each other's temp file; a failed write removes its temp file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path`` (parents made), for writers that write to a path
    (safetensors' ``save_file``, ``np.save``, a copy): renamed onto ``path`` when the block
    ends, removed when it raises. ``suffix`` ends the temp name (``np.save`` wants
    ``.npy``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` (parents created); the path.

    ``mode`` is the new file's permissions as ``open`` takes them: the process's umask
    narrows them, as it does for any file the process makes (0o600 for a secret, which is
    never readable by others, not even as its temp file).
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int = 0o666) -> Path:
    """:func:`write_atomic` of ``text`` in UTF-8."""
    return write_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 1,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """:func:`write_atomic` of ``obj`` as JSON (``default`` converts what JSON cannot hold).

    The JSON is made before the file is touched: an object that cannot be written leaves
    the old file as it was.
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=default))
