"""A fleet's cost per loop step does not grow with the fleet (issue 17's scale soak found it
did: at 700 online nodes every 0.2 s step took 2.5 s).

The real coordinator (blob store, SQLite, leases, intake) with
:class:`benchmarks.fleet_soak.FleetDriver`'s simulated nodes in place of Flower: each unit
takes longer than the test, so after the first step every node holds all the units it may
and needs nothing but a liveness touch now and then.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy
import torch

from benchmarks.fleet_soak import FleetDriver
from coordinator.central.checkpoint import save_checkpoint
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db import participants as db_participants
from coordinator.federation_settings import FederationSettings
from coordinator.node_status import TOUCH_EVERY_S
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel

N = 150


@pytest.fixture
def fleet(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["train.batch_size=4", "train.seq_len=32"])
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=3_000_000)
    seed = tmp_path / "stage2.safetensors"
    save_checkpoint(seed, PerspectiveModel(cfg, moe=True), cfg, stage=2, step=0)
    settings = FederationSettings(
        stage=3, steps_per_unit=2, min_steps_per_unit=1, max_in_flight=1, lease_seconds=3600,
        eval_every=10**6,
    )  # fmt: skip
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    driver = None
    try:
        coord.prepare(seed, settings)
        driver = FleetDriver(cfg, coord.store, corpus.dataset("train"), tmp_path / "pool", N,
                             unit_seconds=3600, churn=0.0, session_s=3600)  # fmt: skip
        loop = coord.federated_stage(driver, StageBudget(minutes=60), settings)
        yield coord, loop
    finally:
        if driver is not None:
            driver.close()
        coord.shutdown()


def test_a_busy_fleet_costs_a_few_transactions_per_step_not_one_per_node(fleet):
    coord, loop = fleet
    loop.step(wait=0)  # every node gets its unit
    assert len(loop.driver.pending) == N
    transactions = []
    sqlalchemy.event.listen(coord.engine, "begin", lambda conn: transactions.append(1))
    t0 = time.monotonic()
    steps = 0
    while time.monotonic() - t0 < TOUCH_EVERY_S + 1:  # one liveness touch of every node
        loop.step(wait=0.05)
        steps += 1
    assert len(loop.driver.pending) == N  # nothing leased twice, no collect asked
    # A handful per step (lease expiry, one batch of touches), not N: the fleet is the
    # same, every node still online and seen within TOUCH_EVERY_S.
    assert len(transactions) < 4 * steps, (len(transactions), steps)
    with coord.session_factory() as s:
        rows = s.scalars(sqlalchemy.select(db_participants.Participant)).all()
    assert len(rows) == N and {r.state for r in rows} == {"online"}
    newest = max(r.last_seen for r in rows)
    assert all((newest - r.last_seen).total_seconds() < TOUCH_EVERY_S + 1 for r in rows)
