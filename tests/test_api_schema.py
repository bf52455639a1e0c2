"""Property-based contract test of the REST API against its own OpenAPI document.

Schemathesis generates requests for every operation from the schema (with an operator
token, so state-changing routes run for real on a filled SQLite database) and checks that
no response is a 500, and that status codes, content types, headers and bodies match what
the schema promises. Bounded: a few examples per operation, well under a minute.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (dev extra)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.api import ApiSettings, create_app  # noqa: E402
from coordinator.db import TokenRole, init_db, make_session_factory, sqlite_url  # noqa: E402
from coordinator.db.tokens import create_api_token  # noqa: E402
from coordinator.metrics import CoordinatorMetrics  # noqa: E402
from tests.coordinator_feed import FeedConfig, NetworkFeed  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    factory = make_session_factory(init_db(sqlite_url(tmp / "c.db")))
    NetworkFeed(factory, FeedConfig(participants=2, reject_every=3)).run(2)
    with factory.begin() as s:
        for i in range(5):  # decoys, so a generated DELETE /tokens/{id} rarely hits ours
            create_api_token(s, name=f"decoy-{i}", role=TokenRole.READ)
        token, _ = create_api_token(s, name="schemathesis", role=TokenRole.OPERATOR)
    app = create_app(factory, ApiSettings(blob_root=tmp / "blobs"), metrics=CoordinatorMetrics())
    return app, token


SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.slow
def test_api_matches_its_schema(tmp_path_factory):
    # One test looping over the operations (rather than schemathesis' pytest plugin, whose
    # fixture mode does not run on pytest 9): every operation is tried, failures collected.
    app, token = _app(tmp_path_factory)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {token}"}
    failures, operations, calls = [], 0, [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @SETTINGS
        def run(case) -> None:
            calls[0] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - reported together below
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 20 and calls[0] >= 3 * operations
    assert not failures, "\n\n".join(failures)
