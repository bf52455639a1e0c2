"""Building work units: which columns, which documents, which hyper-parameters.

A unit trains the participant's columns (affinity: the columns it already holds) on
documents routed to those columns, for ``steps_per_unit`` inner steps — the shared-layer
sync period H (20 in the prototype, ``notes/federated-prototype.md``). A re-queued unit
(expired or failed elsewhere) is handed out first, to any participant (it may take
columns it did not hold: they start from the published weights).

The Flower message carries only the :class:`ControlRequest`; the checkpoint, the version
chain and the training shards are blobs the participant fetches from the blob service
with the unit's capability token (read: everything published; write: a quota sized to
the expected upload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coordinator.evaluation import ColumnAssignment
from shared_model.blobs import issue_token
from shared_model.config import PerspectiveConfig
from shared_model.plan.params import count_params
from shared_model.schedule import lr_at, ternary_fraction_at
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2, tensor_pb2

STAGES = {
    3: federation_pb2.STAGE_EXPERT_DIFFERENTIATION,
    4: federation_pb2.STAGE_TERNARY_DISTILLATION,
}


@dataclass
class UnitFactory:
    """Creates leases and the control messages that carry them."""

    cfg: PerspectiveConfig
    stage: int
    steps_per_unit: int
    docs_per_unit: int
    assignment: ColumnAssignment
    shards: list[tensor_pb2.BlobRef]
    eot_id: int
    blob_address: str
    token_key: bytes
    lease_seconds: float
    column_codec: str = "ternary"
    shared_codec: str = "ternary"
    teacher: tensor_pb2.BlobRef | None = None
    total_units_hint: int = 1000
    _counter: int = 0

    def lease(self, session, scheduler, participant, state, progress: float):
        """A unit for ``participant``: a re-queued one if any, else a new one."""
        queued = scheduler.next_queued(session, participant=participant, allow_foreign=True)
        if queued is not None:
            # Redone from the current version: the same columns, documents and steps.
            queued.base_version = state.version
            return queued
        columns = scheduler.assign_columns(
            session, participant=participant, n_columns=self.cfg.moe.n_experts
        )
        self._counter += 1
        seed = self._counter
        return scheduler.create_lease(
            session,
            participant=participant,
            stage=f"stage{self.stage}",
            base_version=state.version,
            columns=columns,
            docs=self._documents(columns, seed),
            steps=self.steps_per_unit,
            params=self._params(progress, seed),
        )

    def _documents(self, columns: list[int], seed: int) -> list[str]:
        rng = np.random.default_rng([seed, 17])
        per_column = max(1, math.ceil(self.docs_per_unit / len(columns)))
        docs = []
        for c in columns:
            pool = self.assignment.documents(c)
            if pool:
                pick = rng.choice(pool, size=min(per_column, len(pool)), replace=False)
                docs += [f"{c}:{int(d)}" for d in sorted(pick)]
        return docs

    def _params(self, progress: float, seed: int) -> dict:
        steps = self.total_units_hint
        step = min(int(progress * steps), steps - 1)
        params = {"lr": lr_at(step, self.cfg.optim, steps), "seed": seed}
        if self.stage == 4:
            params["ternary_fraction"] = ternary_fraction_at(step, steps, self.cfg.ternary.schedule)
            params["kd_weight"] = self.cfg.ternary.kd_weight
        return params

    def request(self, unit, state, node_id: int) -> control_pb2.ControlRequest:
        """The control message for a leased unit."""
        params = unit.params or {}
        work = federation_pb2.WorkUnit(
            unit_id=unit.unit_id,
            base_version=unit.base_version,
            columns=list(unit.columns),
            document_ids=list(unit.docs),
            shard_ids=[s.content_id for s in self.shards],
            steps=unit.steps,
            lr=float(params.get("lr", self.cfg.optim.lr)),
            stage=STAGES[self.stage],
            ternary_fraction=float(params.get("ternary_fraction", 0.0)),
            kd_weight=float(params.get("kd_weight", 0.0)),
            shared_sync_every=unit.steps,
            train_shared=True,
            deadline_unix=int(unit.deadline.timestamp()),
            seed=int(params.get("seed", 0)),
        )
        quota = self._upload_quota(len(unit.columns))
        work.upload_quota_bytes = quota
        work.capability_token = issue_token(
            self.token_key,
            str(node_id),
            read_all=True,
            upload_quota=quota,
            ttl_s=2 * self.lease_seconds,
        )
        checkpoint, chain = state.chain_for(unit.base_version)
        req = control_pb2.ControlRequest(
            unit=work,
            checkpoint=checkpoint,
            versions=chain,
            blob_address=self.blob_address,
            batch_size=self.cfg.train.batch_size,
            seq_len=self.cfg.train.seq_len,
            column_codec=self.column_codec,
            shared_codec=self.shared_codec,
            eot_id=self.eot_id,
        )
        if self.teacher is not None:
            req.teacher.CopyFrom(self.teacher)
        return req

    def _upload_quota(self, n_columns: int) -> int:
        # Dense ternary is ~1.6 bits/param; allow 1 byte/param plus container overhead.
        counts = count_params(self.cfg)
        return n_columns * counts.column + counts.shared + counts.routers + (1 << 20)
