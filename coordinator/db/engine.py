"""Engine and session factory; migrations to head on start-up.

SQLite is the default (one file, WAL mode, foreign keys on, busy timeout) and
PostgreSQL is used when the URL says so (``postgresql+psycopg://user@host/db``).

On SQLite every transaction starts with ``BEGIN IMMEDIATE``: the write lock is
taken up front, so two coordinator threads never both read "latest version = 7"
and then race to write version 8, and a read-then-write transaction can never fail
half-way with ``SQLITE_BUSY_SNAPSHOT``. Writers queue on the busy timeout instead.
The coordinator's write rate (a few results per second) makes this serialisation
free in practice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.db.errors import DatabaseConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """Return the SQLAlchemy URL of an SQLite database file at ``path``."""
    return f"sqlite:///{Path(path).resolve()}"


def _parse(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseConfigError(
            f"invalid database URL {url!r}: {exc}; use sqlite:///path/to/file.db or "
            "postgresql+psycopg://user:password@host/dbname"
        ) from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseConfigError(
            f"unsupported database {parsed.get_backend_name()!r} in {url!r}; "
            "use sqlite:///path or postgresql+psycopg://..."
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise DatabaseConfigError(
            "an in-memory SQLite database would vanish with the process and cannot be "
            "shared between sessions; give a file: sqlite:///path/to/coordinator.db"
        )
    return parsed


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event (below) emit BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        # FULL: an acknowledged result survives power loss, not only kill -9.
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """Create an engine for ``url`` with the coordinator's connection settings.

    Args:
        url: ``sqlite:///path`` or ``postgresql+psycopg://...``.
        echo: log SQL statements.

    Returns:
        The engine. Migrations are not run; see :func:`init_db`.

    Raises:
        DatabaseConfigError: the URL is malformed or names an unsupported backend.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, echo=echo, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_pragmas(engine)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Session factory; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | URL | None = None, connection: Connection | None = None) -> Any:
    """Build the Alembic configuration in code, so migrations ship inside the wheel.

    Args:
        url: database URL (used when no connection is given).
        connection: an open connection to run migrations on.

    Returns:
        ``alembic.config.Config`` pointing at ``coordinator/migrations``.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = make_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations on ``engine`` up to ``revision`` in one transaction."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection=connection), revision)


def init_db(url: str | URL, *, echo: bool = False) -> Engine:
    """Create the engine for ``url`` and migrate the schema to head.

    Safe to call on every start-up and from several processes at once: an up-to-date
    database is left unchanged.

    Returns:
        The engine, ready for :func:`make_session_factory`.
    """
    engine = make_engine(url, echo=echo)
    upgrade(engine)
    return engine


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or ``None`` for an empty database."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        row = connection.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        return None if row is None else str(row[0])


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """``with transaction(factory) as session:`` — commit on success, roll back on error."""
    with factory.begin() as session:
        yield session
