"""Files written whole or not at all: a temp file in the same directory, then a rename.

A reader (another process, or this one after a crash) sees the old file or the new one,
never half of either. The temp name is unique per writer, so two processes writing the
same path at once (participants sharing a shard cache, a restarted daemon) do not write
into each other's temp file; a failed write removes its temp file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` (parents created); the path.

    ``mode`` is the new file's permissions as ``open`` takes them: the process's umask
    narrows them, as it does for any file the process makes (0o600 for a secret, which is
    never readable by others, not even as its temp file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
