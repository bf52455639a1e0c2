"""Results that do not wait for Flower, over a real local Flower network (one participant
of its own: a participant shared with other tests' runs may still be busy with their units).

A participant submits each result through the blob service the moment it is finished
(``BlobService.Submit``) and answers a unit as soon as it is queued; so with one unit in
flight, where no next unit's reply could bring a result back, units still complete without
waiting for their leases to expire.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.federation_settings import FederationSettings
from shared_model.blobs import NotAccepting
from shared_model.wire.perspective.v1 import federation_pb2
from tests.test_federation_flower import _db, _leased_units, step_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def stage3(tiny_moe_seed, network, tmp_path, max_in_flight: int):
    """A coordinator running stage 3 on ``network`` (4-step units); yields it and its loop."""
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        settings = FederationSettings(
            stage=3, steps_per_unit=4, lease_seconds=120, max_in_flight=max_in_flight,
            eval_every=1000, buffer_size=2, units_hint=60,
        )  # fmt: skip
        coord.prepare(ckpt, settings)
        driver = network.open_driver()
        try:
            yield coord, coord.federated_stage(driver, StageBudget(minutes=30), settings)
        finally:
            driver.close()
    finally:
        coord.shutdown()


def test_one_unit_in_flight_still_completes_units(tiny_moe_seed, network_of_one, tmp_path):
    """``max_in_flight = 1``: with no next unit whose reply would bring a result back,
    units complete without waiting for their leases to expire."""
    with stage3(tiny_moe_seed, network_of_one, tmp_path, max_in_flight=1) as (coord, loop):
        most = []

        def enough() -> bool:
            most.append(max(len(_leased_units(coord, n)) for n in loop.driver.node_ids()))
            return loop.totals().accepted >= 3

        step_until(loop, enough, 240, "3 accepted results")
        with _db(coord) as db:
            (reissued,) = db.execute(
                "select count(*) from work_units where reissued_from is not null"
            ).fetchone()
        assert max(most) == 1 and reissued == 0  # no unit waited for its lease to expire


def test_results_come_through_submit_and_units_in_batches(tiny_moe_seed, network_of_one, tmp_path):
    """Every accepted result reached the intake through the blob service's ``Submit`` (the
    coordinator's inbox), not with a Flower reply; and once the node said it submits, its
    units came in batches, several in one message, and the batches that refilled the slots
    its results freed came in the replies to its ``Submit`` calls (without Flower's poll),
    and were trained and accepted too. When the stage's time is up, the
    node drops what it has queued and finishes the unit in progress; then the coordinator
    takes no more results (they go with the next stage's replies)."""
    with stage3(tiny_moe_seed, network_of_one, tmp_path, max_in_flight=6) as (coord, loop):
        step_until(loop, lambda: loop.totals().accepted >= 6, 240, "6 accepted results")
        accepted = loop.totals().accepted
        assert coord.inbox.received >= accepted >= 6
        assert coord.blob_server.stats()["Submit"] >= accepted
        batches = [*loop.units_per_message, *loop.units_per_submit_reply]
        assert max(batches) >= 2  # a batch travels in one message or one reply
        step_until(loop, lambda: _handed_over_accepted(coord, loop), 240, "a handed-over unit")
        (node,) = loop.driver.node_ids()
        step_until(loop, lambda: _leased_units(coord, node), 60, "the node to hold units")
        loop.collect(timeout=60)  # the stage's time is up: queued units are dropped
        assert not _leased_units(coord, node)  # each finished, or dropped and failed
        with pytest.raises(NotAccepting, match="no federated stage runs"):
            coord.submit(node, federation_pb2.WorkResult(unit_id="late"))
        _first_unit_alone_until_the_capability_came(coord)


def _handed_over_accepted(coord, loop) -> bool:
    """A unit that came with a ``Submit`` reply was trained and its result accepted."""
    if not loop.units_per_submit_reply:
        return False
    with _db(coord) as db:
        leased = {
            uid for (uid,) in db.execute("select unit_id from results where state = 'accepted'")
        }
    return bool(leased.intersection(loop.recently_handed))


def _first_unit_alone_until_the_capability_came(coord) -> None:
    """A node the loop has not heard from gets one unit at a time, with 1 column, until its
    reply says how many it can hold (``max_columns``); every unit after that is leased
    with them. (Before, its first ``max_in_flight`` units all went out with 1 column. A
    unit that fails before the node answers, e.g. one an earlier test's run left it busy
    with, is followed by another single one.)"""
    with _db(coord) as db:
        (max_columns,) = db.execute("select max_columns from participants").fetchone()
        columns = [  # as leased (the copies of units the stage's end dropped are queued)
            len(json.loads(cols))
            for (cols,) in db.execute(
                "select columns from work_units where reissued_from is null "
                "order by leased_at, rowid"
            )
        ]
    share = min(max_columns, coord.cfg.moe.n_experts)
    first = columns.index(share) if share in columns else len(columns)
    assert share > 1 and 1 <= first <= 2, (share, columns)
    assert set(columns[:first]) == {1} and set(columns[first:]) == {share}, (share, columns)
