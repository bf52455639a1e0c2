"""A hostile node on the real path: Flower, the blob service and ``serve`` (issue 16).

``tests/test_hostile_participant.py`` drives every attack through the real loop
in-process. Here a hostile node is a real SuperNode whose worker answers each unit the
real ``perspective coordinator serve`` leases it with a hostile reply: a speed of ``inf``,
2^63 downloaded bytes, another node's unit reported failed with a 10 kB reason, and a
result that is a decoder bomb uploaded through the blob service under its own lease, or
one claiming 2^64 - 1 tokens, or one replaying its earlier upload. An honest participant
trains next to it. ``serve`` must refuse each with a stored reason, credit nothing, stay
up with its peak memory under 1 GiB, keep accepting the honest results, and come back
after a kill -9 with the poisoned rows in its database (no restart loop).
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import struct
import threading
import uuid

import pytest

from participant.flower.supernode import SuperNodeProcess
from participant.flower.worker import FlowerWorker
from shared_model.blobs.client import BlobClient
from shared_model.codec.container import CODEC_SPARSE_2BIT, pack_container, write_shape
from shared_model.config_loading import load_config
from shared_model.federated.updates import make_bundle
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2
from tests.conftest import wait_for
from tests.test_federation_flower import _accepted, _last_lease, _serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GiB = 1 << 30


def _bomb(nonce: int) -> bytes:
    """~100 bytes claiming 2^31 elements in chunks of one (16 GiB of chunk tables if
    believed); ``nonce`` makes each upload new (a re-upload would name its first lease)."""
    header = struct.pack("<H", 0) + write_shape((1 << 31,)) + struct.pack("<II", 1, 1)
    return pack_container(CODEC_SPARSE_2BIT, header, struct.pack("<Q", nonce))


class HostileNode:
    """Answers every unit with one of three hostile results, in turn, plus poisoned
    reply fields; records the units it was given."""

    ATTACKS = ("bomb", "tokens", "replay")

    def __init__(self) -> None:
        model = PerspectiveModel(load_config("tiny"), moe=True)
        self.shapes = {"shared": {k: tuple(v.shape) for k, v in model.shared_state().items()}}
        for c in range(model.cfg.moe.n_experts):
            self.shapes[c] = {k: tuple(v.shape) for k, v in model.expert_state(c).items()}
        self.units: dict[str, str] = {}  # unit id -> attack
        self.first: federation_pb2.WorkResult | None = None
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, kind: str, payload: bytes) -> bytes:
        req = control_pb2.ControlRequest.FromString(payload)
        reply = control_pb2.ControlReply(bytes_down=(1 << 63) + 5)
        reply.capability.tokens_per_s = float("inf")
        reply.capability.max_columns = 4
        reply.failed_units.append(str(uuid.uuid4()))
        reply.failure_reasons.append("x" * 10_000)
        if req.WhichOneof("body") == "unit":
            with self._lock:
                attack = self.ATTACKS[len(self.units) % len(self.ATTACKS)]
                self.units[req.unit.unit_id] = attack
            reply.results.append(self._result(req, attack))
        return reply.SerializeToString()

    def _result(self, req, attack: str):
        unit = req.unit
        tokens = (1 << 64) - 1 if attack == "tokens" else req.budget_tokens
        result = federation_pb2.WorkResult(
            unit_id=unit.unit_id, base_version=unit.base_version, tokens=tokens
        )
        if attack == "replay" and self.first is not None:
            result.column_deltas.extend(self.first.column_deltas)
            result.shared_update.CopyFrom(self.first.shared_update)
            return result
        with BlobClient(req.blob_address, token=unit.capability_token) as blobs:
            for column in unit.columns:
                delta = result.column_deltas.add(column=column)
                delta.delta.content_id = blobs.put(self._bundle("column", column, unit))
            result.shared_update.blob.content_id = blobs.put(self._bundle("shared", -1, unit))
        if self.first is None:
            self.first = result
        return result

    def _bundle(self, kind: str, column: int, unit) -> bytes:
        shapes = self.shapes["shared" if column < 0 else column]
        name = max(shapes, key=lambda k: len(shapes[k]))
        return make_bundle(kind, column, unit.base_version, {name: _bomb(next(self._nonce))},
                           {name: shapes[name]}, named=True)  # fmt: skip


def _results(db_path, units) -> dict[str, tuple[str, str | None, int | None]]:
    marks = ",".join("?" * len(units))
    try:
        with sqlite3.connect(db_path) as db:
            rows = db.execute(
                "select unit_id, state, reject_reason, applied_in_version from results "
                f"where unit_id in ({marks})",
                list(units),
            ).fetchall()
    except sqlite3.OperationalError:  # serve is still creating its schema
        return {}
    return {u: (state, reason, applied) for u, state, reason, applied in rows}


def _decided(db_path, hostile: HostileNode, serve) -> dict:
    assert serve.poll() is None, "serve died"
    results = _results(db_path, hostile.units)
    return results if len(results) >= 3 else {}


def _credit_of(db_path, units) -> list[int]:
    marks = ",".join("?" * len(units))
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "select distinct p.credit from participants p join work_units u on "
            f"u.participant_id = p.id where u.unit_id in ({marks})",
            list(units),
        )
        return [c for (c,) in rows]


def _events(db_path, kind: str) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return [m for (m,) in db.execute("select message from events where kind = ?", (kind,))]


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (``VmHWM``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


def test_a_hostile_node_cannot_stop_poison_or_cheat_serve(tiny_moe_seed, network_of_one, tmp_path):
    network = network_of_one
    hostile = HostileNode()
    node = SuperNodeProcess(tmp_path / "hostile", network.superlink.address,
                            node_config={"participant": 99})  # fmt: skip
    node.start()
    node.wait_until_ready(60)
    worker = FlowerWorker(node.runtime_address, hostile, poll_interval=0.05,
                          superexec_secret=node.superexec_secret)  # fmt: skip
    worker.start()
    work = tmp_path / "coord"
    work.mkdir()
    db_path = work / "coordinator.db"
    serve = _serve(tiny_moe_seed, network, work)
    try:
        decided = wait_for(lambda: _decided(db_path, hostile, serve), 300,
                           "three hostile results decided")  # fmt: skip
        honest_before = len(_accepted(db_path))
        wait_for(lambda: len(_accepted(db_path)) >= honest_before + 2, 300,
                 "honest results accepted after the hostile ones")  # fmt: skip
        assert serve.poll() is None, "serve died"
        _judged(db_path, hostile, decided)
        peak = _peak_rss(serve.pid)
        assert peak < GiB, peak
        reasons = sorted((hostile.units[u], r) for u, (_, r, _) in decided.items())
        print(f"\nhostile results {reasons}; serve's peak RSS {peak / 2**20:.0f} MiB")
        # kill -9 and restart on the poisoned database.
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(timeout=30)
        last = _last_lease(db_path)
        serve = _serve(tiny_moe_seed, network, work)
        # It recovered from the poisoned rows and its loop leases again (a crash loop dies
        # on its first totals, before any lease).
        wait_for(lambda: _last_lease(db_path) != last, 300, "a lease after the restart")
        assert serve.poll() is None, "serve died after its restart"
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=30)
        worker.shutdown(5)
        node.shutdown(10)


def _judged(db_path, hostile: HostileNode, decided: dict) -> None:
    """Every hostile result rejected with its reason; nothing applied or credited; the
    poisoned reply fields and the foreign failure report refused with logged reasons."""
    expected = {"bomb": {"BAD_SHAPE"}, "tokens": {"MALFORMED"},
                "replay": {"FOREIGN_BLOB"}}  # fmt: skip
    for unit, (state, reason, applied) in decided.items():
        attack = hostile.units[unit]
        assert state == "rejected" and applied is None, (attack, state, reason)
        assert reason in expected[attack], (attack, reason)
    assert _credit_of(db_path, list(decided)) == [0]
    assert any("tokens_per_s" in m for m in _events(db_path, "reply.field_refused"))
    assert _events(db_path, "unit.failed.ignored") or _events(db_path, "unit.failed.refused")
