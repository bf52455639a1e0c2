"""REST API of the coordinator on a real SQLite database (and PostgreSQL when installed)."""

from __future__ import annotations

import datetime as dt
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from coordinator.api import ApiSettings, ApiSettingsError, create_app
from coordinator.db import TokenRole, init_db, make_session_factory, sqlite_url
from coordinator.db.tokens import create_api_token
from coordinator.metrics import CoordinatorMetrics
from coordinator.serve_api import ApiServer, ApiServerError
from shared_model.blobs import BlobStore
from tests.coordinator_feed import FeedConfig, NetworkFeed
from tests.test_db import pg_url  # noqa: F401 - fixture: throw-away PostgreSQL server

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"


def _setup(url: str, tmp_path, **settings):
    engine = init_db(url)
    factory = make_session_factory(engine)
    with factory.begin() as s:
        op, _ = create_api_token(s, name="op", role=TokenRole.OPERATOR)
        ro, _ = create_api_token(s, name="dash", role=TokenRole.READ)
    metrics = CoordinatorMetrics()
    cfg = ApiSettings(blob_root=tmp_path / "blobs", ca_cert_pem=CA_PEM, **settings)
    client = TestClient(create_app(factory, cfg, metrics=metrics))
    return (
        engine,
        factory,
        client,
        {"Authorization": f"Bearer {op}"},
        {"Authorization": f"Bearer {ro}"},
    )


@pytest.fixture
def env(tmp_path):
    engine, factory, client, op, ro = _setup(sqlite_url(tmp_path / "c.db"), tmp_path)
    feed = NetworkFeed(factory, FeedConfig(participants=3, reject_every=4))
    feed.run(4)
    yield factory, client, op, ro, feed
    client.close()
    engine.dispose()


def test_status_matches_the_database(env):
    _factory, client, _op, _ro, feed = env
    st = client.get("/api/v1/status").json()
    # 4 ticks x 3 participants = 12 results; every 4th rejected -> 9 accepted.
    assert st["results"] == {"accepted": 9, "rejected": 3}
    assert st["tokens_trained"] == 9 * 4096
    assert st["global_version"] == 4 and st["participants_online"] == 3
    latest = client.get("/api/v1/versions/4").json()
    assert st["latest_val_loss"] == pytest.approx(latest["metrics"]["val_loss"])
    assert st["bytes_up"] > 0 and st["bytes_down"] == 12 * 50_000


def test_participants_list_detail_and_leaderboard(env):
    _f, client, _op, _ro, _feed = env
    page = client.get("/api/v1/participants", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get("/api/v1/participants", params={"limit": 2, "offset": 2}).json()
    assert [p["id"] for p in page["items"] + rest["items"]] == [1, 2, 3]
    details = [client.get(f"/api/v1/participants/{i}").json() for i in (1, 2, 3)]
    assert sum(d["units_rejected"] for d in details) == 3
    assert all(d["columns"] for d in details)
    reasons = [d["rejected_by_reason"] for d in details if d["units_rejected"]]
    assert all(set(r) == {"NORM_OUT_OF_BOUNDS"} for r in reasons)
    board = client.get("/api/v1/participants/leaderboard").json()
    assert [p["credit"] for p in board] == sorted((d["credit"] for d in details), reverse=True)
    assert client.get("/api/v1/participants/99").status_code == 404
    bad = client.get("/api/v1/participants", params={"state": "sleeping"})
    assert bad.status_code == 422


def test_units_and_results_filters(env):
    _f, client, _op, _ro, _feed = env
    done = client.get("/api/v1/units", params={"state": "done"}).json()
    assert done["total"] == 9
    mine = client.get("/api/v1/units", params={"participant_id": 1}).json()
    assert mine["total"] == 4 and all(u["participant_id"] == 1 for u in mine["items"])
    unit = client.get(f"/api/v1/units/{mine['items'][0]['unit_id']}").json()
    assert unit["docs"] and unit["steps"] == 20
    assert client.get("/api/v1/units/no-such-unit").status_code == 404
    rejected = client.get("/api/v1/results", params={"state": "rejected"}).json()
    assert rejected["total"] == 3
    assert {r["reject_reason"] for r in rejected["items"]} == {"NORM_OUT_OF_BOUNDS"}
    assert all("norm" in r["reject_detail"] for r in rejected["items"])
    by_reason = client.get("/api/v1/results", params={"reason": "BAD_SHAPE"}).json()
    assert by_reason["total"] == 0


def test_versions_and_history(env):
    _f, client, _op, _ro, _feed = env
    page = client.get("/api/v1/versions", params={"limit": 2}).json()
    assert page["total"] == 5 and [v["version"] for v in page["items"]] == [4, 3]
    assert client.get("/api/v1/versions/77").json()["error"] == "not_found"
    hist = client.get("/api/v1/metrics/history").json()
    assert [v["version"] for v in hist["versions"]] == [0, 1, 2, 3, 4]
    cumulative = [v["tokens_cumulative"] for v in hist["versions"]]
    assert cumulative == sorted(cumulative) and cumulative[-1] == 9 * 4096
    losses = [v["val_loss"] for v in hist["versions"][1:]]
    assert losses[-1] < losses[0]
    assert len(hist["results"]) == 12


def test_blob_download_range_and_etag(env, tmp_path):
    _f, client, _op, _ro, _feed = env
    data = bytes(range(256)) * 40
    cid = BlobStore(tmp_path / "blobs").put_bytes(data)
    url = f"/api/v1/blobs/{cid}"
    full = client.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{cid}"'
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert client.get(url, headers={"If-None-Match": f'"{cid}"'}).status_code == 304
    assert client.get(url, headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
    assert client.get("/api/v1/blobs/" + "0" * 64).status_code == 404
    assert client.get("/api/v1/blobs/not-a-content-id").status_code == 422


def test_blobs_disabled_without_blob_root(tmp_path):
    factory = make_session_factory(init_db(sqlite_url(tmp_path / "c.db")))
    client = TestClient(create_app(factory, ApiSettings(), metrics=CoordinatorMetrics()))
    r = client.get("/api/v1/blobs/" + "a" * 64)
    assert r.status_code == 404 and "blob_root" in r.json()["detail"]


def test_stage_job_lifecycle_and_illegal_transitions(env):
    _f, client, op, _ro, _feed = env
    job = client.post("/api/v1/stage-jobs", json={"stage": "stage3"}, headers=op)
    assert job.status_code == 201 and job.json()["state"] == "queued"
    jid = job.json()["id"]
    # One live job per stage: serve runs the stage as that job.
    twice = client.post("/api/v1/stage-jobs", json={"stage": "stage3"}, headers=op)
    assert twice.status_code == 409 and f"already has job {jid} (queued)" in twice.json()["detail"]
    for action, state in [("start", "running"), ("pause", "paused"), ("resume", "running")]:
        r = client.post(f"/api/v1/stage-jobs/{jid}/{action}", json={"reason": "t"}, headers=op)
        assert r.status_code == 200 and r.json()["state"] == state
    again = client.post(f"/api/v1/stage-jobs/{jid}/start", headers=op)
    assert again.status_code == 409
    assert again.json() == {
        "error": "illegal_transition",
        "detail": f"cannot start stage job {jid}: it is running (start needs queued)",
    }
    assert client.post(f"/api/v1/stage-jobs/{jid}/cancel", headers=op).json()["state"] == (
        "cancelled"
    )
    assert client.post(f"/api/v1/stage-jobs/{jid}/resume", headers=op).status_code == 409
    assert client.post("/api/v1/stage-jobs/999/pause", headers=op).status_code == 404
    listed = client.get("/api/v1/stage-jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in listed["items"]] == [jid]
    bad = client.post("/api/v1/stage-jobs", json={"stage": "", "x": 1}, headers=op)
    assert bad.status_code == 422
    unknown = client.post("/api/v1/stage-jobs", json={"stage": "expert_diff"}, headers=op)
    assert unknown.status_code == 422 and "'stage3' or 'stage4'" in unknown.text


def test_events_cursor(env):
    _f, client, _op, _ro, _feed = env
    first = client.get("/api/v1/events", params={"limit": 5}).json()
    assert len(first["items"]) == 5
    nxt = client.get(
        "/api/v1/events", params={"limit": 5, "after_id": first["next_after_id"]}
    ).json()
    assert nxt["items"][0]["id"] > first["items"][-1]["id"]
    kinds = client.get("/api/v1/events", params={"kind": "result.rejected"}).json()
    assert kinds["total"] == 3


def test_enrolment_flow(env, tmp_path):
    from shared_model.identity import make_node_key

    _f, client, op, _ro, _feed = env
    tok = client.post("/api/v1/enrolment-tokens", json={"note": "alice"}, headers=op)
    assert tok.status_code == 201 and tok.json()["expires_at"] is not None
    body = {"token": tok.json()["token"], "name": "alice", "public_key": "ssh-ed25519 AAAA alice"}
    bad = client.post("/api/v1/enrol", json=body)  # not a key the SuperLink accepts
    assert bad.status_code == 422 and "neither OpenSSH nor PEM" in bad.text, bad.text
    ed25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"
    wrong_curve = client.post("/api/v1/enrol", json=body | {"public_key": ed25519})
    assert wrong_curve.status_code == 422 and "NIST curve" in wrong_curve.text, wrong_curve.text
    body["public_key"] = make_node_key(tmp_path / "alice")[1]
    enrolled = client.post("/api/v1/enrol", json=body)
    assert enrolled.status_code == 201
    assert enrolled.json()["ca_cert_pem"] == CA_PEM
    assert enrolled.json()["participant"]["state"] == "enrolled"
    replay = client.post("/api/v1/enrol", json=body)
    assert replay.status_code == 401 and "already used" in replay.json()["detail"]
    tok2 = client.post("/api/v1/enrolment-tokens", headers=op).json()["token"]
    dup = client.post("/api/v1/enrol", json=body | {"token": tok2, "name": "mallory"})
    assert dup.status_code == 409 and "alice" not in dup.json()["detail"]


def test_ca_certificate_is_public_and_absent_without_tls(env, tmp_path):
    factory, client, _op, _ro, _feed = env
    got = client.get("/api/v1/ca")  # no token: a volunteer pins it by fingerprint
    assert got.status_code == 200 and got.text == CA_PEM
    assert got.headers["content-type"].startswith("application/x-pem-file")
    with TestClient(create_app(factory, ApiSettings(blob_root=tmp_path / "b"))) as plain:
        missing = plain.get("/api/v1/ca")
    assert missing.status_code == 404 and "without a CA" in missing.json()["detail"]


def test_signed_node_report_reaches_the_event_log(tmp_path):
    from shared_model.identity import make_node_key, report_payload, sign_report

    # One report per participant and kind per hour here: the refusal of the second below
    # does not depend on how fast this machine sends it.
    engine, _f, client, op, _ro = _setup(
        sqlite_url(tmp_path / "c.db"), tmp_path, report_interval_s=3600
    )
    key, public = make_node_key(tmp_path / "node_key")
    tok = client.post("/api/v1/enrolment-tokens", headers=op).json()["token"]
    body = {"token": tok, "name": "bob", "public_key": public}
    pid = client.post("/api/v1/enrol", json=body).json()["participant"]["id"]
    at = time.time()

    def report(reason: str, at: float, signed_reason: str | None = None) -> dict:
        payload = report_payload(pid, "participant.refused", signed_reason or reason, "m", at)
        return {"kind": "participant.refused", "reason": reason, "message": "m", "at": at,
                "signature": sign_report(key, payload)}  # fmt: skip

    ok = client.post(f"/api/v1/participants/{pid}/reports", json=report("tls_untrusted", at))
    assert ok.status_code == 201, ok.text
    assert ok.json()["participant_state"] == "enrolled"
    again = client.post(f"/api/v1/participants/{pid}/reports", json=report("x", at + 0.5))
    assert again.status_code == 429  # one report per participant and interval: floods bounded
    assert again.json()["error"] == "too_many_requests"
    assert 3500 <= int(again.headers["retry-after"]) <= 3600
    events = client.get("/api/v1/events", params={"kind": "participant.refused"}).json()["items"]
    assert [(e["participant_id"], e["data"]["reason"]) for e in events] == [(pid, "tls_untrusted")]
    forged = report("unauthorized", at, signed_reason="tls_untrusted")  # body altered after signing
    assert client.post(f"/api/v1/participants/{pid}/reports", json=forged).status_code == 401
    stale = client.post(f"/api/v1/participants/{pid}/reports", json=report("x", at - 3600))
    assert stale.status_code == 401 and "clock" in stale.json()["detail"]
    # A captured report replayed once the rate limit has passed: its signed timestamp is
    # its sequence number, and it is not newer than the last accepted one.
    from coordinator.db.models import Event

    with _f.begin() as s:  # the rate limit's interval passes (the event is dated back)
        for e in s.query(Event).filter_by(kind="participant.refused"):
            e.ts = e.ts - dt.timedelta(seconds=7200)
    replay = client.post(f"/api/v1/participants/{pid}/reports", json=report("tls_untrusted", at))
    assert replay.status_code == 401 and "replay" in replay.json()["detail"], replay.text
    newer = client.post(f"/api/v1/participants/{pid}/reports", json=report("x", at + 1))
    assert newer.status_code == 201, newer.text
    # A revoked participant's report is refused and not recorded; the answer tells its
    # daemon why (it then stops for good). Forged ones learn nothing: the signature first.
    assert client.post(f"/api/v1/participants/{pid}/revoke", headers=op).status_code == 200
    at = time.time() + 2
    payload = report_payload(pid, "participant.disconnected", "unauthorized", "m", at)
    body = {"kind": "participant.disconnected", "reason": "unauthorized", "message": "m",
            "at": at, "signature": sign_report(key, payload)}  # fmt: skip
    told = client.post(f"/api/v1/participants/{pid}/reports", json=body)
    assert told.status_code == 409 and told.json()["error"] == "participant_revoked", told.text
    forged = client.post(f"/api/v1/participants/{pid}/reports", json={**body, "reason": "x"})
    assert forged.status_code == 401
    kinds = ("participant.refused", "participant.disconnected")
    logged = [e for k in kinds for e in client.get("/api/v1/events", params={"kind": k})
              .json()["items"] if e["participant_id"] == pid]  # fmt: skip
    assert len(logged) == 2, logged  # the two accepted before the revocation
    engine.dispose()


def test_token_management(env):
    _f, client, op, _ro, _feed = env
    created = client.post("/api/v1/tokens", json={"name": "grafana", "role": "read"}, headers=op)
    assert created.status_code == 201
    secret, tid = created.json()["token"], created.json()["id"]
    listed = client.get("/api/v1/tokens", headers=op).json()
    assert tid in [t["id"] for t in listed] and all("token" not in t for t in listed)
    assert client.delete(f"/api/v1/tokens/{tid}", headers=op).json()["revoked_at"] is not None
    r = client.post(
        "/api/v1/stage-jobs", json={"stage": "stage3"}, headers={"Authorization": secret}
    )
    assert r.status_code == 401


def test_read_requires_token(tmp_path):
    engine, _factory, client, op, ro = _setup(
        sqlite_url(tmp_path / "c.db"), tmp_path, read_requires_token=True
    )
    r = client.get("/api/v1/status")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/v1/status", headers=ro).status_code == 200
    assert client.get("/api/v1/participants", headers=op).status_code == 200
    bad = {"Authorization": "Bearer pspk_wrong"}
    assert client.get("/api/v1/status", headers=bad).status_code == 401
    # Pages are shells without data; the script asks for a token.
    assert client.get("/").status_code == 200
    engine.dispose()


def test_prometheus_metrics_are_the_database_totals(env):
    """Totals are read from the database on scrape (the loop-driven check is in
    tests/test_metrics.py); gauges too, and statement latency is timed."""
    from collections import Counter

    from coordinator.db.models import Participant, Result

    factory, _client, _op, _ro, _feed = env
    client = TestClient(create_app(factory, ApiSettings(), metrics=CoordinatorMetrics()))
    text = client.get("/metrics").text
    with factory() as s:
        results = s.query(Result).all()
        up = sum(p.bytes_up for p in s.query(Participant).all())
    tokens = sum(r.tokens for r in results if r.state == "accepted")
    assert f"perspective_tokens_trained_total {float(tokens)}" in text and tokens > 0
    reasons = Counter(r.reject_reason for r in results if r.state == "rejected")
    assert reasons
    for reason, n in reasons.items():
        assert f'perspective_units_rejected_total{{reason="{reason}"}} {float(n)}' in text
    assert f'perspective_bytes_total{{direction="in"}} {float(up)}' in text
    assert 'perspective_participants{state="online"} 3.0' in text
    assert "perspective_global_version 4.0" in text
    assert "perspective_db_query_seconds_count" in text


def test_dashboard_pages_and_assets_are_local(env):
    _f, client, _op, _ro, _feed = env
    for path in ("/", "/participants", "/participants/1", "/stages", "/rejected", "/events"):
        html = client.get(path).text
        assert "app.js" in html and "https://" not in html and "http://" not in html
    for asset in ("app.js", "charts.js", "style.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "/static-offline-docs/swagger-ui-bundle.js" in docs


def test_settings_validation(tmp_path):
    with pytest.raises(ApiSettingsError, match="PEM"):
        ApiSettings(ca_cert_pem="not a cert")
    with pytest.raises(ApiSettingsError, match="not a readable file"):
        ApiSettings(ca_cert_path=tmp_path / "missing.pem")
    with pytest.raises(ApiSettingsError, match="poll_interval_s"):
        ApiSettings(poll_interval_s=0)


def test_api_server_thread(tmp_path):
    factory = make_session_factory(init_db(sqlite_url(tmp_path / "c.db")))
    app = create_app(factory, ApiSettings(), metrics=CoordinatorMetrics())
    with ApiServer(app, port=0) as server:
        assert httpx.get(server.url + "/api/v1/status").json()["global_version"] is None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            clash = ApiServer(app, port=sock.getsockname()[1]).start()
            with pytest.raises(ApiServerError, match="failed to start"):
                clash.wait_until_ready(timeout=10)
            clash.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/api/v1/status", timeout=2)


def test_postgres_api(pg_url, tmp_path):  # noqa: F811 - fixture imported from test_db
    engine, factory, client, op, _ro = _setup(pg_url, tmp_path)
    try:
        NetworkFeed(factory, FeedConfig(participants=2, reject_every=3)).run(3)
        st = client.get("/api/v1/status").json()
        assert st["global_version"] == 3 and st["results"] == {"accepted": 4, "rejected": 2}
        assert client.get("/api/v1/participants/1").json()["rejected_by_reason"]
        jid = client.post("/api/v1/stage-jobs", json={"stage": "stage4", "start": True}, headers=op)
        assert client.post(f"/api/v1/stage-jobs/{jid.json()['id']}/pause", headers=op).is_success
        assert client.get("/api/v1/metrics/history").json()["versions"][-1]["version"] == 3
    finally:
        client.close()
        engine.dispose()


def test_api_edges_answer_in_the_documented_error_format(env, tmp_path):
    """Framework errors, body size, strict types, terminal-safe names, blob HEAD and
    conditional GET: every error body carries the documented ``error`` field."""
    _f, client, op, _ro, _feed = env
    unknown = client.get("/api/v1/no-such-route")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    wrong = client.put("/api/v1/tokens", headers=op)
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["allow"] == "GET, POST"  # every route at the path, not the first
    assert client.delete("/api/v1/stage-jobs").headers["allow"] == "GET, POST"
    # A 100 MB unauthenticated body is refused before anything parses it ...
    huge = client.post("/api/v1/enrol", content=b"x" * (100 << 20),
                       headers={"content-type": "application/json"})  # fmt: skip
    assert huge.status_code == 413 and huge.json()["error"] == "payload_too_large"
    bad_length = {"content-type": "application/json", "content-length": "abc"}
    lying = client.post("/api/v1/enrol", content=b"{}", headers=bad_length)
    assert lying.status_code == 400 and lying.json()["error"] == "bad_request"
    # ... and types are exactly the schema's: no true for a number, no NaN, no "5".
    for body in (b'{"ttl_hours": true}', b'{"ttl_hours": NaN}', b'{"ttl_hours": Infinity}',
                 b'{"ttl_hours": "5"}'):  # fmt: skip
        r = client.post("/api/v1/enrolment-tokens", content=body, headers={**op,
                        "content-type": "application/json"})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"] == "validation_error", (body, r.text)
    assert client.post("/api/v1/enrolment-tokens", json={"ttl_hours": 2}, headers=op).is_success
    # Names reach operators' terminals: escape sequences are refused with the reason.
    tok = client.post("/api/v1/enrolment-tokens", headers=op).json()["token"]
    evil = {"token": tok, "name": "eve\x1b[2J\x1b]0;pwned\x07", "public_key": "ssh-x y"}
    refused = client.post("/api/v1/enrol", json=evil)
    assert refused.status_code == 422 and "U+001B" in refused.text
    # Blobs: HEAD, and If-None-Match with the strong tag, a weak one and *.
    cid = BlobStore(tmp_path / "blobs").put_bytes(b"blob bytes")
    head = client.head(f"/api/v1/blobs/{cid}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "10" and head.headers["etag"] == f'"{cid}"'
    for tag in (f'"{cid}"', f'W/"{cid}"', "*", f'"other", W/"{cid}"'):
        r = client.get(f"/api/v1/blobs/{cid}", headers={"If-None-Match": tag})
        assert r.status_code == 304, tag
    assert client.get(f"/api/v1/blobs/{cid}", headers={"If-None-Match": '"x"'}).content == (
        b"blob bytes"
    )
