"""The operator dashboard in headless Chromium (Debian's package) driven by Playwright.

A live coordinator API serves a database that a background writer keeps filling through
the real CRUD layer (:class:`tests.coordinator_feed.NetworkFeed`; a real federated run can
replace it: the ``network`` fixture only needs ``start()``/``stop()``). The browser must
see the loss chart and the participant table grow, log in with an operator token, and pause
and resume a stage job. Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import re

import pytest

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

from coordinator.api import ApiSettings, create_app  # noqa: E402
from coordinator.db import TokenRole, init_db, make_session_factory, sqlite_url  # noqa: E402
from coordinator.db.stage_jobs import create_stage_job, transition_stage_job  # noqa: E402
from coordinator.db.tokens import create_api_token  # noqa: E402
from coordinator.metrics import CoordinatorMetrics  # noqa: E402
from coordinator.serve_api import ApiServer  # noqa: E402
from tests.conftest import ARTIFACTS  # noqa: E402
from tests.coordinator_feed import FeedConfig, NetworkFeed  # noqa: E402

expect = playwright_api.expect


@pytest.fixture
def coordinator(tmp_path):
    """A live coordinator (API + dashboard) over a database with one running stage job."""
    engine = init_db(sqlite_url(tmp_path / "c.db"))
    factory = make_session_factory(engine)
    with factory.begin() as s:
        token, _ = create_api_token(s, name="operator", role=TokenRole.OPERATOR)
        job = create_stage_job(s, stage="expert_diff", config={"columns": 8})
        transition_stage_job(s, job_id=job.id, to="running")
    settings = ApiSettings(poll_interval_s=0.5, title="Perspective (test network)")
    app = create_app(factory, settings, metrics=CoordinatorMetrics())
    with ApiServer(app, port=0) as server:
        yield server, factory, token, job.id
    engine.dispose()


@pytest.fixture
def network(coordinator):
    """Writes participants, results and versions in the background while the test runs."""
    _server, factory, _token, _job = coordinator
    feed = NetworkFeed(factory, FeedConfig(participants=4, reject_every=5))
    feed.tick()
    feed.start(interval_s=0.4)
    yield feed
    feed.stop()


def _points(page, selector: str) -> int:
    return int(page.locator(selector).get_attribute("data-points") or 0)


def test_dashboard_live_updates_and_operator_controls(browser, coordinator, network):
    server, _factory, token, job_id = coordinator
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(server.url + "/")
    expect(page.locator("#st-version")).to_have_text(re.compile(r"^v\d+$"))
    loaded = "Number(document.querySelector('#chart-loss').dataset.points) > 0"
    page.wait_for_function(loaded, timeout=15_000)
    first = _points(page, "#chart-loss")
    page.wait_for_function(
        f"Number(document.querySelector('#chart-loss').dataset.points) > {first}", timeout=15_000
    )
    page.wait_for_timeout(1500)  # let the rate and traffic charts collect a few samples
    page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"))

    page.goto(server.url + "/participants")
    rows = page.locator("#participants-table tbody tr")
    expect(rows).to_have_count(4)
    credit = page.locator("#leaderboard-table tbody tr").first.locator("td").nth(2)
    before = credit.inner_text()
    expect(credit).not_to_have_text(before, timeout=15_000)
    expect(page.locator("#participants-table tbody tr").first.locator("td").nth(2)).to_have_text(
        "online"
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-participants.png"))

    page.goto(server.url + "/stages")
    state = page.locator(f"#jobs-table tr[data-job-id='{job_id}'] [data-testid=job-state]")
    expect(state).to_have_text("running")
    expect(page.locator("#jobs-table button")).to_have_count(0)  # read-only: no controls
    page.fill("#token-input", token)
    page.click("#token-save")
    expect(page.locator("#login-state")).to_have_text("operator")
    page.click(f"#jobs-table tr[data-job-id='{job_id}'] button[data-action=pause]")
    expect(state).to_have_text("paused")
    page.screenshot(path=str(ARTIFACTS / "dashboard-stages.png"))
    page.click(f"#jobs-table tr[data-job-id='{job_id}'] button[data-action=resume]")
    expect(state).to_have_text("running")
    # The token lives in sessionStorage only, never in the page's URL or markup.
    assert token not in page.url and token not in page.content()

    page.goto(server.url + "/rejected")
    expect(page.locator("#rejected-table tbody tr").first).to_contain_text("NORM_OUT_OF_BOUNDS")
    assert not errors, errors
    page.close()
