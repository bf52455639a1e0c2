"""Result intake: validate a participant's upload, store it durably, apply it to the masters.

Volunteers are untrusted (DESIGN §6). Before a result may touch the masters it must
pass, in order: the lease checks of :func:`coordinator.db.results.record_result`
(unit exists, belongs to this node, not answered before, not expired, same base), and
the payload checks here — the referenced blobs exist, decode, name exactly the unit's
columns and the model's tensors with the right shapes, contain only finite values, and
have norms within a bound. The result row (with its blob ids) is committed before the
result is applied or acknowledged; a rejected result stores its reason and changes
nothing else. Application is deterministic given the order of results, which is what
lets a restarted coordinator replay the log exactly (:mod:`coordinator.federation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from coordinator.aggregation.columns import StaleResultError
from coordinator.db import results as db_results
from coordinator.db.types import RejectReason
from coordinator.state import CoordinatorState
from shared_model.blobs import BlobCorrupt, BlobError, HashMismatch
from shared_model.codec import CodecError
from shared_model.federated.updates import BundleShapeError, UpdateError, read_bundle
from shared_model.wire.perspective.v1 import federation_pb2

State = dict[str, torch.Tensor]


class Rejected(Exception):
    """Payload validation failed; carries the reason code stored with the result."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class DecodedResult:
    """A validated result's decoded updates."""

    base_version: int
    columns: dict[int, State] = field(default_factory=dict)
    shared: State = field(default_factory=dict)


def blob_ids(result: federation_pb2.WorkResult) -> dict:
    """The blob references of a result, as stored in the results table."""
    return {
        "columns": {str(d.column): d.delta.content_id for d in result.column_deltas},
        "shared": result.shared_update.blob.content_id,
    }


def decode_result(
    state: CoordinatorState, ids: dict, base_version: int, unit_columns: list[int], max_norm: float
) -> DecodedResult:
    """Fetch and decode a result's blobs from the coordinator's store, validating everything.

    Raises:
        Rejected: with the reason code to store.
    """
    cols = {int(c): cid for c, cid in ids.get("columns", {}).items()}
    if sorted(cols) != sorted(unit_columns):
        raise Rejected(
            RejectReason.BAD_SHAPE, f"result has columns {sorted(cols)}, unit has {unit_columns}"
        )
    out = DecodedResult(base_version)
    for column, cid in cols.items():
        expected = {k: tuple(v.shape) for k, v in state.columns.masters[column].items()}
        out.columns[column] = _decode(state, cid, "column", expected, max_norm)
    expected = {k: tuple(v.shape) for k, v in state.shared.master.items()}
    out.shared = _decode(state, ids.get("shared", ""), "shared", expected, max_norm)
    return out


def _decode(state: CoordinatorState, cid: str, kind: str, expected: dict, max_norm: float) -> State:
    try:
        data = state.store.get(cid, verify=True)
    except (BlobCorrupt, HashMismatch) as exc:
        raise Rejected(RejectReason.BAD_CHECKSUM, f"{kind} blob {cid[:12]}: {exc}") from exc
    except BlobError as exc:
        raise Rejected(RejectReason.MISSING_BLOB, f"{kind} blob {cid[:12]}: {exc}") from exc
    try:
        _, tensors = read_bundle(data, kind=kind, expected=expected)
    except BundleShapeError as exc:
        raise Rejected(RejectReason.BAD_SHAPE, f"{kind} bundle: {exc}") from exc
    except (UpdateError, CodecError) as exc:
        raise Rejected(RejectReason.MALFORMED, f"{kind} bundle: {exc}") from exc
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise Rejected(RejectReason.BAD_SHAPE, f"{kind} bundle lacks {missing[:3]}")
    sq = 0.0
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise Rejected(RejectReason.NON_FINITE, f"{kind} tensor {name} has NaN/Inf")
        sq += float((t.double() ** 2).sum())
    if math.sqrt(sq) > max_norm:
        raise Rejected(
            RejectReason.NORM_OUT_OF_BOUNDS,
            f"{kind} update norm {math.sqrt(sq):.3g} exceeds the bound {max_norm:.3g}",
        )
    return tensors


def apply_result(state: CoordinatorState, decoded: DecodedResult, step: bool = True) -> bool:
    """Apply a validated result to the masters; returns True if an outer step was taken.

    Args:
        step: take the outer step when the buffer is full (False: only buffer, for replay).

    Raises:
        Rejected: the base version is older than the aggregator remembers.
    """
    try:
        for column, delta in decoded.columns.items():
            state.columns.apply(column, delta, decoded.base_version, state.version)
    except StaleResultError as exc:
        raise Rejected(RejectReason.STALE_BASE, str(exc)) from exc
    return state.shared.add(decoded.shared, decoded.base_version, state.version, step=step)


def payload_of(result: federation_pb2.WorkResult, bytes_up: int) -> db_results.ResultPayload:
    """The DB summary of a result."""
    t = result.timings
    return db_results.ResultPayload(
        tokens=int(result.tokens),
        train_loss=_finite(result.train_loss),
        val_loss=_finite(result.val_loss) if result.val_loss else None,
        blob_ids=blob_ids(result),
        timings={
            "sync_s": t.sync_s,
            "train_s": t.train_s,
            "encode_s": t.encode_s,
            "total_s": t.total_s,
            "score_s": t.score_s,
        },
        base_version=int(result.base_version),
        bytes_up=bytes_up,
    )


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
