"""``perspective coordinator init``: everything a coordinator host needs before first start.

Writes into ``--dir`` (default ``./perspective-coordinator``):

* ``tls/ca.crt``, ``tls/ca.key`` (kept if present), ``tls/server.crt``, ``tls/server.key`` —
  a private CA and a server certificate whose SAN covers every ``--host``;
* ``superexec.secret`` — HMAC secret for the SuperLink's Runtime API (Flower note §6);
* ``blob-token.key`` — the key that signs blob-service capability tokens;
* the first operator API token, created in the database and printed once.

``--insecure`` skips TLS; it is for a laptop demo only and says so loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from coordinator.security import make_tls
from shared_model.files import write_atomic
from shared_model.identity import SecurityError, ca_fingerprint
from shared_model.processes import write_secret_file

# Names the coordinator's own components dial each other by: nginx verifies its upstreams
# as "localhost"; in deploy/compose.yaml the coordinator reaches "superlink".
INTERNAL_NAMES = ("localhost", "127.0.0.1", "superlink", "coordinator")


#: Where ``init`` records its database URL for ``serve``.
DATABASE_FILE = "database.url"


@dataclass(frozen=True)
class CoordinatorSecrets:
    """The files ``perspective coordinator init`` wrote, as ``coordinator serve`` reads them.

    Attributes:
        directory: The ``--dir`` given to ``init``.
        superexec_secret: File guarding the SuperLink's Runtime API.
        token_key: File with the key that signs blob-service capability tokens.
        ca_cert: The network's CA (handed to volunteers); ``None`` without TLS.
        cert: Server certificate (SAN = every ``--host``); ``None`` without TLS.
        key: Server private key; ``None`` without TLS.
        database: The database URL ``init`` created the first operator token in (the file
            ``database.url``); ``serve`` uses it when given no ``--db``.
    """

    directory: Path
    superexec_secret: Path
    token_key: Path
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    database: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the directory holds TLS material."""
        return self.ca_cert is not None

    @classmethod
    def load(cls, directory: Path, *, tls: bool) -> CoordinatorSecrets:
        """Read and check an ``init`` directory.

        Args:
            directory: The ``--dir`` given to ``init``.
            tls: Use (and require) the TLS files; ``False`` only for ``serve --insecure``.

        Raises:
            SecurityError: A file is missing (names it and how to create it).
        """
        directory = Path(directory)
        fix = f"run 'perspective coordinator init --dir {directory} --host <public name>'"
        needed = ["superexec.secret", "blob-token.key"]
        if tls:
            needed += ["tls/ca.crt", "tls/server.crt", "tls/server.key"]
        for name in needed:
            path = directory / name
            if not path.is_file() or path.stat().st_size == 0:
                raise SecurityError(f"{path} is missing or empty; {fix}")
        tls_dir = directory / "tls"
        recorded = directory / DATABASE_FILE
        database = recorded.read_text().strip() if recorded.is_file() else ""
        return cls(
            database=database or None,
            directory=directory,
            superexec_secret=directory / "superexec.secret",
            token_key=directory / "blob-token.key",
            ca_cert=tls_dir / "ca.crt" if tls else None,
            cert=tls_dir / "server.crt" if tls else None,
            key=tls_dir / "server.key" if tls else None,
        )


def init(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write keys and certs.")] = Path(
        "perspective-coordinator"
    ),
    host: Annotated[
        list[str], typer.Option("--host", help="DNS name or IP volunteers dial (repeatable).")
    ] = ["localhost", "127.0.0.1"],  # noqa: B006 - typer needs a literal default
    db: Annotated[
        str | None, typer.Option("--db", envvar="PERSPECTIVE_DB", help="Database URL or file.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS (demo on one machine ONLY).")] = False,
) -> None:
    """Create the CA, server certificate, secrets and first operator token."""
    directory.mkdir(parents=True, exist_ok=True)
    if insecure:
        typer.secho(
            "WARNING: --insecure: no TLS. Traffic and node identities are unprotected; anyone "
            "on the network can read it. Use only on one machine for a demo.",
            err=True,
            fg=typer.colors.RED,
            bold=True,
        )
    else:
        names = list(dict.fromkeys([*host, *INTERNAL_NAMES]))
        tls = make_tls(directory / "tls", names)
        typer.echo(f"CA certificate:     {tls.ca_cert}  (give this to volunteers)")
        typer.echo(f"CA fingerprint:     {ca_fingerprint(tls.ca_cert)}")
        typer.echo(f"server certificate: {tls.cert}  (SAN: {', '.join(names)})")
    typer.echo(f"SuperExec secret:   {write_secret_file(directory / 'superexec.secret')}")
    typer.echo(f"blob token key:     {write_secret_file(directory / 'blob-token.key')}")
    url = db or f"sqlite:///{(directory / 'coordinator.db').resolve()}"
    from coordinator.db import init_db, make_session_factory, sqlite_url
    from coordinator.db.tokens import create_api_token

    url = url if "://" in url else sqlite_url(url)
    factory = make_session_factory(init_db(url))
    with factory.begin() as session:
        plain, _row = create_api_token(session, name="first-operator", role="operator")
    # serve --secrets-dir without --db uses this one: the token above lives there (it may
    # hold a PostgreSQL password: owner-only).
    write_atomic(directory / DATABASE_FILE, url.encode() + b"\n", mode=0o600)
    typer.echo(f"database:           {url}  (recorded in {directory / DATABASE_FILE})")
    typer.echo("first operator token (shown once; store it now):")
    typer.echo(plain)
