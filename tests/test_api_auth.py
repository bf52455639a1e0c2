"""Every state-changing route refuses a missing, revoked or read-only token.

Routes are enumerated from the app's OpenAPI document, so a route added later is covered without
editing this file; the only state-changing routes without an operator token are ``/enrol``
(the one-time enrolment token in its body is the credential) and a participant's signed
``/reports`` (the signature by its enrolled node key is the credential).
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from coordinator.api import ApiSettings, create_app
from coordinator.db import TokenRole, init_db, make_session_factory, sqlite_url
from coordinator.db.tokens import create_api_token, revoke_api_token
from coordinator.metrics import CoordinatorMetrics

PUBLIC_WRITES = {
    ("POST", "/api/v1/enrol"),
    ("POST", "/api/v1/participants/{participant_id}/reports"),
}
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
# The network CA is public: a volunteer fetches it (and pins it) before it has anything else.
PUBLIC_READS = {("GET", "/api/v1/ca")}


def _fill(path: str) -> str:
    # Any well-formed value will do: auth is checked before the row is looked up.
    return re.sub(r"\{content_id\}", "a" * 64, re.sub(r"\{(?!content_id)\w+\}", "1", path))


def _routes(app, writes: bool) -> list[tuple[str, str]]:
    # From the OpenAPI document, which lists every API route however routers are nested.
    out = []
    for path, operations in app.openapi()["paths"].items():
        for method in sorted(m.upper() for m in operations):
            if (method not in READ_METHODS) == writes:
                out.append((method, path))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    engine = init_db(sqlite_url(tmp / "c.db"))
    factory = make_session_factory(engine)
    with factory.begin() as s:
        op, _ = create_api_token(s, name="op", role=TokenRole.OPERATOR)
        ro, _ = create_api_token(s, name="ro", role=TokenRole.READ)
        gone, row = create_api_token(s, name="old-op", role=TokenRole.OPERATOR)
        revoke_api_token(s, token_id=row.id)
    yield factory, {"operator": op, "read": ro, "revoked": gone}
    engine.dispose()


def _client(factory, **settings) -> TestClient:
    return TestClient(create_app(factory, ApiSettings(**settings), metrics=CoordinatorMetrics()))


def test_route_enumeration_finds_the_write_routes(setup):
    factory, _tokens = setup
    writes = _routes(_client(factory).app, writes=True)
    assert ("POST", "/api/v1/stage-jobs/{job_id}/pause") in writes
    assert ("DELETE", "/api/v1/tokens/{token_id}") in writes
    assert len(writes) >= 10


def test_every_write_route_needs_an_operator_token(setup):
    factory, tokens = setup
    client = _client(factory)
    cases = [
        (None, 401, "missing bearer token"),
        (tokens["revoked"], 401, "unknown or revoked"),
        ("pspk_" + "x" * 43, 401, "unknown or revoked"),
        (tokens["read"], 403, "needs operator"),
    ]
    checked = 0
    for method, path in _routes(client.app, writes=True):
        if (method, path) in PUBLIC_WRITES:
            continue
        for token, status, words in cases:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            r = client.request(method, _fill(path), headers=headers, json={})
            assert r.status_code == status, (method, path, token is None, r.text)
            body = r.json()
            assert words in body["detail"] and body["error"] in ("invalid_token", "forbidden")
            assert token is None or token not in r.text  # never echo a secret
        checked += 1
    assert checked >= 10


def test_unauthenticated_writes_check_their_own_credential(setup, tmp_path):
    from shared_model.identity import make_node_key

    factory, _tokens = setup
    client = _client(factory)
    key = make_node_key(tmp_path / "k")[1]
    r = client.post("/api/v1/enrol", json={"token": "pspe_nope", "name": "x", "public_key": key})
    assert r.status_code == 401 and "enrolment token" in r.json()["detail"]
    report = {"kind": "participant.refused", "reason": "x", "message": "m", "at": 0.0,
              "signature": "AAAA"}  # fmt: skip
    r = client.post("/api/v1/participants/1/reports", json=report)
    assert r.status_code in (401, 404), r.text  # no such participant, or a bad signature
    assert set(_routes(client.app, writes=True)) >= PUBLIC_WRITES


def test_reads_need_a_token_when_configured(setup):
    factory, tokens = setup
    open_client = _client(factory)
    locked = _client(factory, read_requires_token=True)
    read = {"Authorization": f"Bearer {tokens['read']}"}
    for method, path in _routes(locked.app, writes=False):
        url = _fill(path)
        if path.startswith("/api/v1/tokens"):
            assert locked.request(method, url, headers=read).status_code == 403
            continue
        if (method, path) in PUBLIC_READS:
            assert locked.request(method, url).status_code not in (401, 403)
            continue
        r = locked.request(method, url)
        assert r.status_code == 401, (method, path, r.text)
        assert locked.request(method, url, headers=read).status_code != 401
        assert open_client.request(method, url).status_code not in (401, 403), (method, path)


def test_openapi_declares_what_reads_need(setup):
    """The OpenAPI document tells clients the truth: reads are public (security optional)
    unless ``read_requires_token``; writes always need the operator's bearer token."""
    factory, _ = setup
    for required in (False, True):
        paths = _client(factory, read_requires_token=required).app.openapi()["paths"]
        reads = [(m, p) for m, p in _routes(_client(factory).app, writes=False)
                 if (m, p) not in PUBLIC_READS and not p.startswith("/api/v1/tokens")]  # fmt: skip
        assert reads
        for method, path in reads:
            security = paths[path][method.lower()]["security"]
            assert security == ([{"ReadToken": []}] if required else [{}, {"ReadToken": []}])
        for method, path in _routes(_client(factory).app, writes=True):
            security = paths[path][method.lower()].get("security")
            assert security == (None if (method, path) in PUBLIC_WRITES else [{"HTTPBearer": []}])
