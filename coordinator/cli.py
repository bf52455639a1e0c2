"""``perspective coordinator ...``: tokens (direct database access) and REST API clients.

* ``token create|revoke|list`` and ``enrolment-token`` open the coordinator database
  (``--db`` or ``PERSPECTIVE_DB``) directly: they are how the first operator token is made.
* ``status``, ``participants`` and ``stage start|pause|resume|cancel|list`` call the running
  coordinator's REST API (``--url`` or ``PERSPECTIVE_COORDINATOR_URL``) with a bearer token
  (``--token`` or ``PERSPECTIVE_TOKEN``).

The group object is :data:`app`; other modules add commands to it (``coordinator serve``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from coordinator.export import export
from coordinator.network_init import init as coordinator_init
from coordinator.serve import serve

app = typer.Typer(
    name="coordinator",
    help="Run and operate the coordinator: tokens, status, participants, stage jobs.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="Operator API tokens (direct database access).", no_args_is_help=True)
stage_app = typer.Typer(help="Stage jobs (through the REST API).", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(stage_app, name="stage")
app.command("serve")(serve)
app.command("init")(coordinator_init)
app.command("export")(export)

DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="PERSPECTIVE_DB",
        help="Database URL (sqlite:///path, postgresql+psycopg://...) or an SQLite file path.",
    ),
]
UrlOpt = Annotated[
    str,
    typer.Option(
        "--url", envvar="PERSPECTIVE_COORDINATOR_URL", help="Base URL of the coordinator."
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="PERSPECTIVE_TOKEN",
        help="Bearer token (operator for changes).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]
CaOpt = Annotated[
    str | None,
    typer.Option(
        "--ca",
        envvar="PERSPECTIVE_CA",
        help="CA certificate of an HTTPS coordinator [default: tls/ca.crt in "
        "$PERSPECTIVE_SECRETS_DIR when set, else the system's CAs].",
        show_default=False,
    ),
]
DEFAULT_URL = "http://127.0.0.1:8080"


def shown(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences) as ``\\xNN``."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def _factory(db: str) -> Any:
    from coordinator.db import DatabaseConfigError, init_db, make_session_factory, sqlite_url

    url = db if "://" in db else sqlite_url(db)
    try:
        return make_session_factory(init_db(url))
    except DatabaseConfigError as exc:
        raise _fail(str(exc)) from exc


@token_app.command("create")
def token_create(
    db: DbOpt,
    name: Annotated[str, typer.Option(help="Who or what uses the token.")],
    role: Annotated[str, typer.Option(help="operator or read (default read, as the API)")] = "read",
) -> None:
    """Create an API token and print it once (only its hash is stored)."""
    from coordinator.db import DatabaseError, TokenRole
    from coordinator.db.tokens import create_api_token

    if role not in {r.value for r in TokenRole}:
        raise _fail(f"role must be operator or read, got {role!r}")
    try:
        with _factory(db).begin() as session:
            plain, row = create_api_token(session, name=name, role=TokenRole(role))
    except DatabaseError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"token {row.id} ({row.name}, {row.role}); shown once, keep it secret:", err=True)
    typer.echo(plain)


@token_app.command("revoke")
def token_revoke(db: DbOpt, token_id: Annotated[int, typer.Argument(help="Token id.")]) -> None:
    """Revoke an API token by id."""
    from coordinator.db import DatabaseError
    from coordinator.db.tokens import revoke_api_token

    try:
        with _factory(db).begin() as session:
            row = revoke_api_token(session, token_id=token_id)
    except DatabaseError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"token {row.id} ({row.name}) revoked at {row.revoked_at.isoformat()}")


@token_app.command("list")
def token_list(db: DbOpt, as_json: JsonOpt = False) -> None:
    """List API tokens (ids, names, roles; never the secrets)."""
    from coordinator.db.tokens import list_api_tokens

    with _factory(db)() as session:
        rows = [
            {
                "id": t.id,
                "name": t.name,
                "role": t.role,
                "created_at": t.created_at.isoformat(),
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in list_api_tokens(session)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for t in rows:
        state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
        typer.echo(f"{t['id']:>4}  {t['role']:<8}  {shown(t['name']):<24}  {state}")


@app.command("enrolment-token")
def enrolment_token(
    db: DbOpt,
    note: Annotated[str, typer.Option(help="Who the token is for.")] = "",
    ttl_hours: Annotated[float, typer.Option(help="Lifetime in hours.")] = 168.0,
) -> None:
    """Create a one-time enrolment token for a volunteer and print it once."""
    import datetime as dt

    from coordinator.db.tokens import create_enrolment_token

    if ttl_hours <= 0:
        raise _fail("--ttl-hours must be > 0")
    with _factory(db).begin() as session:
        plain, row = create_enrolment_token(session, note=note, ttl=dt.timedelta(hours=ttl_hours))
    typer.echo(f"enrolment token {row.id}, expires {row.expires_at.isoformat()}:", err=True)
    typer.echo(plain)


def _verify(ca: str | None) -> Any:
    """What httpx verifies the coordinator's certificate with: ``--ca``, else the secrets
    directory's CA (``coordinator init`` wrote it), else the system's CAs."""
    import os
    import ssl
    from pathlib import Path

    if ca is None and os.environ.get("PERSPECTIVE_SECRETS_DIR"):
        default = Path(os.environ["PERSPECTIVE_SECRETS_DIR"]) / "tls" / "ca.crt"
        ca = str(default) if default.is_file() else None
    if ca is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(f"--ca {ca}: cannot load the CA certificate: {exc}") from exc


def _call(
    url: str, token: str | None, method: str, path: str, body: Any = None, ca: str | None = None
) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(
            method, url.rstrip("/") + "/api/v1" + path, json=body, headers=headers, timeout=30,
            verify=_verify(ca),
        )  # fmt: skip
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the coordinator at {url}: {exc}") from exc
    try:
        data = r.json()
    except ValueError:
        data = {"detail": r.text}
    if r.status_code >= 400:
        raise _fail(f"{method} {path} -> HTTP {r.status_code}: {data.get('detail', data)}")
    return data


@app.command("status")
def status(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False, ca: CaOpt = None
) -> None:
    """Show the network's status."""
    s = _call(url, token, "GET", "/status", ca=ca)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    val = "-" if s["latest_val_loss"] is None else f"{s['latest_val_loss']:.4f}"
    typer.echo(f"stage        {s['stage'] or '-'} ({s['stage_job_state'] or 'no job'})")
    typer.echo(f"version      {s['global_version'] if s['global_version'] is not None else '-'}")
    typer.echo(f"tokens       {s['tokens_trained']:,}")
    typer.echo(f"val loss     {val}")
    typer.echo(
        f"participants {s['participants_online']} online of {sum(s['participants'].values())}"
    )
    typer.echo(
        f"results      {s['results']['accepted']} accepted, {s['results']['rejected']} rejected"
    )


@app.command("participants")
def participants(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    as_json: JsonOpt = False,
    ca: CaOpt = None,
) -> None:
    """List participants."""
    query = "/participants?limit=1000" + (f"&state={state}" if state else "")
    page = _call(url, token, "GET", query, ca=ca)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    for p in page["items"]:
        typer.echo(
            f"{p['id']:>4}  {shown(p['name']):<20}  {p['state']:<8}  done {p['units_done']:>5}  "
            f"rejected {p['units_rejected']:>4}  credit {p['credit']:,}"
        )
    typer.echo(f"{page['total']} participant(s)", err=True)


def _print_job(job: dict[str, Any]) -> None:
    typer.echo(f"job {job['id']} ({job['stage']}): {job['state']}")


@stage_app.command("start")
def stage_start(
    stage: Annotated[str, typer.Argument(help="Federated stage: stage3 or stage4.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    config: Annotated[str, typer.Option(help="Job config as JSON.")] = "{}",
    ca: CaOpt = None,
) -> None:
    """Queue a job for STAGE and start it."""
    try:
        cfg = json.loads(config)
    except json.JSONDecodeError as exc:
        raise _fail(f"--config is not valid JSON: {exc}") from exc
    _print_job(
        _call(
            url, token, "POST", "/stage-jobs", {"stage": stage, "config": cfg, "start": True}, ca=ca
        )  # fmt: skip
    )


def _action(action: str) -> None:
    def command(
        job_id: Annotated[int, typer.Argument(help="Stage job id.")],
        url: UrlOpt = DEFAULT_URL,
        token: TokenOpt = None,
        reason: Annotated[str | None, typer.Option(help="Recorded with the change.")] = None,
        ca: CaOpt = None,
    ) -> None:
        body = {"reason": reason}
        _print_job(_call(url, token, "POST", f"/stage-jobs/{job_id}/{action}", body, ca=ca))

    command.__doc__ = f"{action.capitalize()} stage job JOB_ID."
    stage_app.command(action)(command)


for _name in ("pause", "resume", "cancel"):
    _action(_name)


@stage_app.command("list")
def stage_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, ca: CaOpt = None) -> None:
    """List stage jobs, newest first."""
    for job in _call(url, token, "GET", "/stage-jobs?limit=100", ca=ca)["items"]:
        _print_job(job)


def register(root: typer.Typer) -> None:
    """Add the ``coordinator`` group to the ``perspective`` CLI."""
    root.add_typer(app, name="coordinator")
