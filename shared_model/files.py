"""Files written whole or not at all: a temp file in the same directory, then a rename.

A reader (another process, or this one after a crash) sees the old file or the new one,
never half of either. The temp name is unique per writer, so two processes writing the
same path at once (participants sharing a shard cache, a restarted daemon) do not write
into each other's temp file; a failed write removes its temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` (parents created) with permissions ``mode``; the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
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
