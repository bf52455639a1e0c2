"""Coordinator database: migrations, durability, result intake, versions, tokens, jobs."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from coordinator.db import (
    ApiToken,
    Base,
    Conflict,
    DatabaseConfigError,
    Event,
    Forbidden,
    IllegalTransition,
    InvalidToken,
    ModelVersion,
    Participant,
    RejectReason,
    Result,
    StageJobState,
    TokenRole,
    UnitState,
    WorkUnit,
    current_revision,
    init_db,
    make_engine,
    make_session_factory,
    sqlite_url,
    utcnow,
)
from coordinator.db.errors import ParticipantUnknown
from coordinator.db.events import list_events, log_event
from coordinator.db.leases import create_lease
from coordinator.db.participants import Capability, revoke_participant, touch_participant
from coordinator.db.results import ResultPayload, mark_applied, pending_results
from coordinator.db.stage_jobs import create_stage_job, transition_stage_job
from coordinator.db.tokens import (
    create_api_token,
    create_enrolment_token,
    enrol_participant,
    hash_token,
    revoke_api_token,
    verify_api_token,
)
from coordinator.db.versions import (
    latest_version,
    list_versions,
    lock_latest_version,
    publish_version,
)
from coordinator.intake import Rejected, record_result
from tests.postgres_server import PostgresUnavailable, postgres_server


@pytest.fixture
def engine(tmp_path):
    eng = init_db(sqlite_url(tmp_path / "coord.db"))
    yield eng
    eng.dispose()


@pytest.fixture
def factory(engine):
    return make_session_factory(engine)


def _lease(factory, node_id=11, lease_seconds=60.0):
    with factory.begin() as s:
        part = touch_participant(s, node_id=node_id, capability=Capability(max_columns=2))
        unit = create_lease(
            s,
            participant_id=part.id,
            stage="expert_diff",
            base_version=0,
            columns=[0],
            docs=["d1"],
            steps=10,
            params={"lr": 1e-3},
            lease_seconds=lease_seconds,
        )
        return part.id, unit.unit_id


def test_migrations_to_head_match_models(engine):
    assert current_revision(engine) == "0004"
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == [], f"models and migrations differ; write a migration: {diff}"


def test_sqlite_settings_and_bad_urls(engine, tmp_path):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    with pytest.raises(DatabaseConfigError, match="in-memory"):
        make_engine("sqlite://")
    with pytest.raises(DatabaseConfigError, match="unsupported"):
        make_engine("mysql://x@y/z")
    # Running init_db again on an up-to-date database changes nothing.
    again = init_db(sqlite_url(tmp_path / "coord.db"))
    assert current_revision(again) == "0004"
    again.dispose()


def test_record_result_accepts_once_and_replays_idempotently(factory):
    pid, unit_id = _lease(factory)
    payload = ResultPayload(tokens=500, train_loss=2.5, blob_ids={"0": "ab" * 32}, bytes_up=900)
    with factory.begin() as s:
        first = record_result(s, unit_id=unit_id, node_id=11, payload=payload)
    assert first.accepted and first.stored and not first.duplicate
    with factory.begin() as s:
        again = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload(tokens=999999))
    assert again.duplicate and again.accepted and again.result_id == first.result_id
    with factory() as s:
        part = s.get(Participant, pid)
        assert (part.credit, part.units_done, part.bytes_up) == (500, 1, 900)
        assert s.get(WorkUnit, unit_id).state == UnitState.DONE
        assert s.scalar(select(func.count()).select_from(Result)) == 1


def test_record_result_reject_paths(factory):
    _, unit_id = _lease(factory, node_id=11)
    with factory.begin() as s:
        touch_participant(s, node_id=22)
        unknown = record_result(s, unit_id="nope", node_id=11, payload=ResultPayload())
        wrong = record_result(s, unit_id=unit_id, node_id=22, payload=ResultPayload(tokens=5))
        stranger = record_result(s, unit_id=unit_id, node_id=99, payload=ResultPayload())
        base = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload(base_version=3))
    assert unknown.reason == RejectReason.UNKNOWN_LEASE and not unknown.stored
    assert wrong.reason == RejectReason.WRONG_NODE and not wrong.stored
    assert stranger.reason == RejectReason.WRONG_NODE
    assert base.reason == RejectReason.BASE_MISMATCH and base.stored
    with factory() as s:
        assert s.get(WorkUnit, unit_id).state == UnitState.REJECTED
        owner = s.scalar(select(Participant).where(Participant.node_id == 11))
        assert (owner.credit, owner.units_done, owner.units_rejected) == (0, 0, 1)
        kinds = [e.kind for e in list_events(s, kind="result.refused").items]
        assert len(kinds) == 3


def test_caller_validation_rejection_is_one_call(factory):
    pid, unit_id = _lease(factory)

    def norm_too_large(unit):
        raise Rejected(RejectReason.NORM_OUT_OF_BOUNDS, "norm 41.0 > bound 12.3")

    with factory.begin() as s:
        out = record_result(
            s,
            unit_id=unit_id,
            node_id=11,
            payload=ResultPayload(tokens=50),
            check_payload=norm_too_large,
        )
    assert not out.accepted and out.reason == RejectReason.NORM_OUT_OF_BOUNDS
    with factory() as s:
        row = s.scalar(select(Result).where(Result.unit_id == unit_id))
        assert (row.reject_reason, row.reject_detail) == (
            "NORM_OUT_OF_BOUNDS",
            "norm 41.0 > bound 12.3",
        )
        assert s.get(Participant, pid).credit == 0
        assert pending_results(s) == []


def test_expired_lease_is_refused_and_replay_stays_refused(factory):
    """A late result that does not state its base cannot be judged (one that does is:
    tests/test_acked_delivery.py)."""
    _, unit_id = _lease(factory, lease_seconds=1.0)
    later = utcnow() + dt.timedelta(seconds=5)
    with factory.begin() as s:
        out = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload(), now=later)
    assert out.reason == RejectReason.EXPIRED_LEASE and out.stored
    with factory.begin() as s:
        replay = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload())
    assert replay.duplicate and replay.reason == RejectReason.EXPIRED_LEASE


def test_revoked_node_is_refused(factory):
    pid, unit_id = _lease(factory)
    with factory.begin() as s:
        revoke_participant(s, participant_id=pid, reason="abuse")
    with factory.begin() as s:
        out = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload())
    assert out.reason == RejectReason.WRONG_NODE


def test_pending_results_applied_exactly_once(factory):
    units = [_lease(factory, node_id=n)[1] for n in (1, 2, 3)]
    for n, unit_id in zip((1, 2, 3), units, strict=True):
        with factory.begin() as s:
            record_result(s, unit_id=unit_id, node_id=n, payload=ResultPayload(tokens=n))
    with factory.begin() as s:
        pending = [r.unit_id for r in pending_results(s)]
        assert pending == units  # oldest first
        v0 = publish_version(s, parent=None, checksum="c0")
        assert mark_applied(s, unit_ids=pending[:2], version=v0.version) == 2
    with factory.begin() as s:
        assert [r.unit_id for r in pending_results(s)] == units[2:]
        with pytest.raises(Conflict, match="already applied"):
            mark_applied(s, unit_ids=[units[0]], version=1)
        with pytest.raises(Conflict, match="no result"):
            mark_applied(s, unit_ids=["missing"], version=1)


def test_exception_inside_transaction_leaves_nothing(factory):
    _, unit_id = _lease(factory)
    with pytest.raises(RuntimeError), factory.begin() as s:
        record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload(tokens=7))
        publish_version(s, parent=None, checksum="c0")
        raise RuntimeError("crash between storing and acknowledging")
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 0
        assert s.get(WorkUnit, unit_id).state == UnitState.LEASED
        assert latest_version(s) is None
        assert s.scalar(select(Participant.credit).where(Participant.node_id == 11)) == 0
    with factory.begin() as s:  # the retry after restart is accepted normally
        assert record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload()).accepted


def test_versions_monotonic_under_concurrent_publishers(factory):
    errors: list[BaseException] = []

    def publisher(tag: str) -> None:
        try:
            for i in range(15):
                with factory.begin() as s:
                    latest = lock_latest_version(s)
                    publish_version(
                        s,
                        parent=None if latest is None else latest.version,
                        checksum=f"{tag}{i}",
                        delta_blobs=[f"{tag}{i}"],
                    )
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with factory() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
        assert [r.version for r in rows] == list(range(30))
        assert all(r.parent == r.version - 1 for r in rows[1:])
        assert list_versions(s, limit=5).items[0].version == 29
        with pytest.raises(Conflict, match="not the latest"):
            publish_version(s, parent=3, checksum="stale")


def test_stage_job_transitions(factory):
    with factory.begin() as s:
        job = create_stage_job(s, stage="expert_diff", config={"steps": 10})
        transition_stage_job(s, job_id=job.id, to=StageJobState.RUNNING)
        transition_stage_job(s, job_id=job.id, to=StageJobState.PAUSED, progress={"step": 3})
        transition_stage_job(s, job_id=job.id, to=StageJobState.RUNNING)
        done = transition_stage_job(s, job_id=job.id, to=StageJobState.DONE)
        assert done.progress == {"step": 3}
        with pytest.raises(IllegalTransition, match="from done to running"):
            transition_stage_job(s, job_id=job.id, to=StageJobState.RUNNING)
        other = create_stage_job(s, stage="seed", config={})
        with pytest.raises(IllegalTransition, match="from queued to done"):
            transition_stage_job(s, job_id=other.id, to=StageJobState.DONE)


def test_api_tokens_store_only_hashes(factory, engine):
    with factory.begin() as s:
        plain, row = create_api_token(s, name="ops", role=TokenRole.OPERATOR)
        reader, _ = create_api_token(s, name="grafana", role=TokenRole.READ)
    with engine.connect() as conn:
        dump = "\n".join(conn.connection.driver_connection.iterdump())
    assert plain not in dump and reader not in dump and hash_token(plain) in dump
    with factory.begin() as s:
        assert verify_api_token(s, token=plain, required_role=TokenRole.OPERATOR).id == row.id
        verify_api_token(s, token=reader)
        with pytest.raises(Forbidden):
            verify_api_token(s, token=reader, required_role=TokenRole.OPERATOR)
        with pytest.raises(InvalidToken):
            verify_api_token(s, token=plain + "x")
        revoke_api_token(s, token_id=row.id)
    with factory.begin() as s:
        assert s.get(ApiToken, row.id).revoked_at is not None
        with pytest.raises(InvalidToken):
            verify_api_token(s, token=plain)


def test_enrolment_token_is_one_time_and_binds_node(factory):
    with factory.begin() as s:
        plain, _ = create_enrolment_token(s, note="alice")
        part = enrol_participant(s, token=plain, name="alice", public_key="PK-A")
        with pytest.raises(InvalidToken, match="already used"):
            enrol_participant(s, token=plain, name="mallory")
        bound = touch_participant(s, node_id=777, public_key="PK-A")
        assert bound.id == part.id and bound.state == "online"
        # The same key re-registered with the SuperLink under a new node id: same participant.
        again = touch_participant(s, node_id=778, public_key="PK-A")
        assert again.id == part.id and again.node_id == 778
        changed = [e for e in s.scalars(select(Event)) if e.kind == "participant.node_changed"]
        assert [e.message for e in changed] == ["alice: node id 777 -> 778"]
        with pytest.raises(ParticipantUnknown):  # an enrolled network knows no other node
            touch_participant(s, node_id=779, public_key="PK-B", create=False)


def test_events_paginate(factory):
    with factory.begin() as s:
        for i in range(7):
            log_event(s, kind="test.tick", message=f"tick {i}", data={"i": i})
    with factory() as s:
        first = list_events(s, kind="test.tick", limit=3)
        assert first.total == 7 and [e.data["i"] for e in first.items] == [0, 1, 2]
        nxt = list_events(s, kind="test.tick", after_id=first.items[-1].id, limit=3)
        assert [e.data["i"] for e in nxt.items] == [3, 4, 5]
        assert s.scalar(select(func.count()).select_from(Event)) >= 7


# --- PostgreSQL: a throw-away server on 127.0.0.1 when the binaries are installed ---


@pytest.fixture(scope="module")
def pg_url():
    """URL of a throw-away PostgreSQL server (skips, saying why, where none can start)."""
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


def test_postgres_schema_results_and_concurrent_versions(pg_url):
    engine = init_db(pg_url)
    try:
        assert current_revision(engine) == "0004"
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        factory = make_session_factory(engine)
        pid, unit_id = _lease(factory)
        with factory.begin() as s:
            assert record_result(
                s, unit_id=unit_id, node_id=11, payload=ResultPayload(tokens=3)
            ).accepted
        with factory.begin() as s:
            again = record_result(s, unit_id=unit_id, node_id=11, payload=ResultPayload())
            assert again.duplicate
            assert s.get(WorkUnit, unit_id).deadline.tzinfo is not None
        test_versions_monotonic_under_concurrent_publishers(factory)
    finally:
        engine.dispose()
