"""A throw-away PostgreSQL server on 127.0.0.1 for tests (Debian's ``postgresql`` package).

:func:`postgres_server` is a context manager yielding a SQLAlchemy URL; it raises
:class:`PostgresUnavailable` (with the reason) when the binaries or the driver are missing
or the server cannot start, so a test can skip — or fall back to SQLite — and say why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared_model.processes import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the message says why)."""


def _runner_prefix() -> tuple[list[str], pwd.struct_passwd | None]:
    if os.geteuid() != 0:
        return [], None
    try:  # postgres refuses to run as root
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and no postgres user to run it as") from None
    return ["runuser", "-u", "postgres", "--"], pw


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh cluster (trust auth, fsync off) and yield its ``postgresql+psycopg`` URL."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise PostgresUnavailable("psycopg (PostgreSQL driver) not installed") from exc
    prefix, pw = _runner_prefix()
    root = Path(tempfile.mkdtemp(prefix="perspective-pg-"))
    data, port = root / "data", free_port()
    if pw is not None:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start"],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"could not start a PostgreSQL server: {exc}") from exc
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
