"""/metrics is driven by the federation loop and intake: its totals equal the database's.

A tiny stage runs in-process through the real loop (`FederationLoop.receive` → intake →
aggregation → publishing, the same path Flower replies take), then the REST app's
/metrics is scraped.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from coordinator.api import create_app
from coordinator.api.settings import ApiSettings
from coordinator.db.models import Result
from coordinator.metrics import METRICS
from tests.test_federation_intake import NODE, corpus, lease_and_train, make_loop  # noqa: F401


def _value(text: str, metric: str) -> float:
    match = re.search(rf"^{re.escape(metric)} ([0-9.e+]+)$", text, re.M)
    assert match, f"{metric} not in /metrics"
    return float(match.group(1))


def test_metrics_equal_the_database_totals_after_a_real_stage(tmp_path, corpus):  # noqa: F811
    loop, train = make_loop(tmp_path, corpus)
    applied_before = _count(METRICS, "perspective_result_staleness_versions_count")
    published_before = _count(METRICS, "perspective_aggregation_seconds_count")
    for _ in range(4):
        _, result = lease_and_train(loop, train, tmp_path)
        assert loop.receive(NODE, result).accepted
    _, bad = lease_and_train(loop, train, tmp_path)
    bad.shared_update.blob.content_id = "0" * 64  # names a blob nobody uploaded
    assert loop.receive(NODE, bad).reason == "MISSING_BLOB"

    text = TestClient(create_app(loop.factory, ApiSettings(), metrics=METRICS)).get("/metrics").text
    with loop.factory() as s:
        rows = s.query(Result).all()
    accepted = [r for r in rows if r.state == "accepted"]
    assert _value(text, "perspective_tokens_trained_total") == sum(r.tokens for r in accepted) > 0
    assert _value(text, 'perspective_units_completed_total{stage="stage3"}') == 4
    assert _value(text, 'perspective_units_leased_total{stage="stage3"}') == 5
    assert _value(text, 'perspective_units_rejected_total{reason="MISSING_BLOB"}') == 1
    assert (
        _value(text, 'perspective_bytes_total{direction="in"}') == sum(r.bytes_up for r in rows) > 0
    )
    assert _value(text, "perspective_global_version") == loop.state.version == 2
    # What the database does not hold is observed by the loop and intake as it happens.
    assert _count(METRICS, "perspective_result_staleness_versions_count") == applied_before + 4
    assert _count(METRICS, "perspective_aggregation_seconds_count") == published_before + 2
    assert loop.stats.tokens == _value(text, "perspective_tokens_trained_total")


def test_the_loop_times_its_leases_steps_and_intake(tmp_path, corpus):  # noqa: F811
    """Through the loop's own step (one node on the replay driver): a lease, the reply's
    intake and every step land in their histograms."""
    from benchmarks.federation_replay import ReplayDriver

    loop, train = make_loop(tmp_path, corpus)
    driver = ReplayDriver(loop.state.cfg, loop.state.store, train, tmp_path / "n", [1.0])
    driver.nodes = {NODE: driver.nodes.pop(1)}  # the replay node speaks as NODE
    loop.driver = driver
    names = ("perspective_lease_seconds_count", "perspective_intake_seconds_count",
             "perspective_loop_step_seconds_count")  # fmt: skip
    before = [_count(METRICS, n) for n in names]
    loop.step(wait=0)  # leases (and the replay node trains and replies) ...
    loop.step(wait=0)  # ... the reply is taken
    leases, intakes, steps = (_count(METRICS, n) - b for n, b in zip(names, before, strict=True))
    with loop.factory() as s:
        taken = s.query(Result).count()
    assert steps == 2 and leases >= 1 and intakes == taken >= 1, (leases, intakes, steps, taken)


def _count(metrics, sample: str) -> float:
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == sample:
                return s.value
    raise AssertionError(f"{sample} not collected")
