"""``perspective coordinator`` commands against a live API server on 127.0.0.1."""

from __future__ import annotations

from typer.testing import CliRunner

from coordinator.api import ApiSettings, create_app
from coordinator.cli import app
from coordinator.db import init_db, make_session_factory, sqlite_url
from coordinator.metrics import CoordinatorMetrics
from coordinator.serve_api import ApiServer
from tests.coordinator_feed import NetworkFeed


def test_cli_tokens_and_api_commands(tmp_path):
    db = str(tmp_path / "c.db")
    runner = CliRunner()
    args = ["token", "create", "--db", db, "--name", "ops", "--role", "operator"]
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("pspk_")
    factory = make_session_factory(init_db(sqlite_url(db)))
    NetworkFeed(factory).run(2)
    # A name stored before the API refused control characters: printed harmlessly.
    from coordinator.db.participants import create_participant

    with factory.begin() as s:
        create_participant(s, name="eve\x1b[2J\x1b]0;pwned\x07")
    server_app = create_app(factory, ApiSettings(), metrics=CoordinatorMetrics())
    with ApiServer(server_app, port=0) as server:
        env = {"PERSPECTIVE_COORDINATOR_URL": server.url, "PERSPECTIVE_TOKEN": token}
        out = runner.invoke(app, ["status"], env=env)
        assert out.exit_code == 0 and "version      2" in out.stdout
        out = runner.invoke(app, ["participants"], env=env)
        assert out.exit_code == 0 and "volunteer-2" in out.stdout
        assert "\x1b" not in out.stdout and "eve\\x1b[2J\\x1b]0;pwned\\x07" in out.stdout
        out = runner.invoke(app, ["stage", "start", "stage3"], env=env)
        assert out.exit_code == 0 and "job 1 (stage3): running" in out.stdout
        assert "paused" in runner.invoke(app, ["stage", "pause", "1"], env=env).stdout
        again = runner.invoke(app, ["stage", "pause", "1"], env=env)
        assert again.exit_code == 1 and "HTTP 409" in again.output
        assert "running" in runner.invoke(app, ["stage", "resume", "1"], env=env).stdout
        revoked = runner.invoke(app, ["token", "revoke", "--db", db, "1"])
        assert revoked.exit_code == 0
        denied = runner.invoke(app, ["stage", "cancel", "1"], env=env)
        assert denied.exit_code == 1 and "HTTP 401" in denied.output
    listed = runner.invoke(app, ["token", "list", "--db", db])
    assert "revoked" in listed.stdout and token not in listed.stdout


def test_cli_reaches_an_https_coordinator_with_the_networks_ca(tmp_path):
    """``--ca`` (or the secrets directory's CA by default) verifies the coordinator's cert."""
    runner = CliRunner()
    db = str(tmp_path / "c.db")
    secrets = tmp_path / "secrets"
    done = runner.invoke(app, ["init", "--dir", str(secrets), "--host", "127.0.0.1", "--db", db])
    assert done.exit_code == 0, done.output
    factory = make_session_factory(init_db(sqlite_url(db)))
    server_app = create_app(factory, ApiSettings(), metrics=CoordinatorMetrics())
    tls = secrets / "tls"
    with ApiServer(server_app, host="127.0.0.1", port=0, ssl_certfile=tls / "server.crt",
                   ssl_keyfile=tls / "server.key") as server:  # fmt: skip
        assert server.url.startswith("https://")
        env = {"PERSPECTIVE_COORDINATOR_URL": server.url, "PERSPECTIVE_SECRETS_DIR": ""}
        refused = runner.invoke(app, ["status"], env=env)
        assert refused.exit_code == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.output
        out = runner.invoke(app, ["status", "--ca", str(tls / "ca.crt")], env=env)
        assert out.exit_code == 0 and "participants 0 online" in out.stdout, out.output
        by_default = runner.invoke(app, ["stage", "list"], env={**env, "PERSPECTIVE_SECRETS_DIR":
                                                              str(secrets)})  # fmt: skip
        assert by_default.exit_code == 0, by_default.output
        bad = runner.invoke(app, ["participants", "--ca", str(tmp_path / "nope.crt")], env=env)
        assert bad.exit_code == 1 and "cannot load the CA certificate" in bad.output
