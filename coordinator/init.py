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

from pathlib import Path
from typing import Annotated

import typer

from coordinator.security import make_tls
from shared_model.procs import write_secret_file


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
        tls = make_tls(directory / "tls", host)
        typer.echo(f"CA certificate:     {tls.ca_cert}  (give this to volunteers)")
        typer.echo(f"server certificate: {tls.cert}  (SAN: {', '.join(host)})")
    typer.echo(f"SuperExec secret:   {write_secret_file(directory / 'superexec.secret')}")
    typer.echo(f"blob token key:     {write_secret_file(directory / 'blob-token.key')}")
    url = db or f"sqlite:///{(directory / 'coordinator.db').resolve()}"
    from coordinator.db import init_db, make_session_factory, sqlite_url
    from coordinator.db.tokens import create_api_token

    factory = make_session_factory(init_db(url if "://" in url else sqlite_url(url)))
    with factory.begin() as session:
        plain, _row = create_api_token(session, name="first-operator", role="operator")
    typer.echo(f"database:           {url}")
    typer.echo("first operator token (shown once; store it now):")
    typer.echo(plain)
