"""Liveness, revocation and the status' validation loss, on a real SQLite database through
the real REST API (the loop's side: :class:`coordinator.liveness.Liveness`, which
``coordinator serve`` runs after every step)."""

from __future__ import annotations

from coordinator.db import sqlite_url
from coordinator.db.leases import create_lease
from coordinator.db.participants import Capability, get_participant, touch_participant
from coordinator.db.versions import publish_version
from coordinator.liveness import Liveness
from tests.conftest import wait_for
from tests.test_api import _setup


def test_participant_goes_offline_after_the_stated_silence(tmp_path):
    engine, factory, client, _op, _ro = _setup(sqlite_url(tmp_path / "c.db"), tmp_path)
    with factory.begin() as s:
        pid = touch_participant(s, node_id=11, capability=Capability(max_columns=1)).id
    liveness = Liveness(factory, silence_s=1.0, poll_s=0.0)
    assert liveness.tick() == []  # just seen: still online
    assert wait_for(liveness.tick, 30, "the silence to pass", every=0.2) == [pid]
    row = client.get(f"/api/v1/participants/{pid}").json()
    assert row["state"] == "offline"
    assert client.get("/api/v1/status").json()["participants_online"] == 0
    with factory.begin() as s:  # seen again (a lease or a reply): online again
        touch_participant(s, node_id=11)
    assert client.get(f"/api/v1/participants/{pid}").json()["state"] == "online"
    client.close()
    engine.dispose()


def test_revocation_expires_the_nodes_leases_at_once(tmp_path):
    engine, factory, client, op, _ro = _setup(sqlite_url(tmp_path / "c.db"), tmp_path)
    with factory.begin() as s:
        pid = touch_participant(s, node_id=12, capability=Capability(max_columns=2)).id
        unit = create_lease(s, participant_id=pid, stage="stage3", base_version=0, columns=[0],
                            docs=[], steps=4, params={}, lease_seconds=3600).unit_id  # fmt: skip
    r = client.post(f"/api/v1/participants/{pid}/revoke", json={"reason": "t"}, headers=op)
    assert r.status_code == 200 and r.json()["participant"]["state"] == "revoked"
    units = {u["unit_id"]: u for u in client.get("/api/v1/units").json()["items"]}
    assert units[unit]["state"] == "expired" and units[unit]["state_reason"] == "revoked"
    (copy,) = [u for u in units.values() if u["reissued_from"] == unit]
    assert copy["state"] == "queued" and copy["participant_id"] is None
    with factory() as s:
        assert get_participant(s, participant_id=pid).state == "revoked"
    client.close()
    engine.dispose()


def test_status_val_loss_is_the_newest_evaluated_versions(tmp_path):
    engine, factory, client, _op, _ro = _setup(sqlite_url(tmp_path / "c.db"), tmp_path)
    with factory.begin() as s:
        publish_version(s, parent=None, checksum="v0", metrics={})
        publish_version(s, parent=0, checksum="v1", metrics={"val_loss": 4.5, "train_loss": 5})
        publish_version(s, parent=1, checksum="v2", metrics={"val_loss": 3.25})
        publish_version(s, parent=2, checksum="v3", metrics={"train_loss": 3.0})  # not evaluated
    status = client.get("/api/v1/status").json()
    assert status["global_version"] == 3
    assert status["latest_val_loss"] == 3.25 and status["latest_train_loss"] == 3.0
    client.close()
    engine.dispose()
