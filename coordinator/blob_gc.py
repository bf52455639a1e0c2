"""Garbage collection of the coordinator's blob store (run after each state checkpoint).

Without it every published version, checkpoint and result upload stays on disk forever.
A blob is *referenced*, and kept, when someone may still need it:

* **Participants' syncs.** A result whose base is more than ``max_staleness`` versions old
  is refused, so no participant needs to sync to an older base. A sync to base ``b``
  starts from the newest checkpoint at or before ``b`` and applies the version manifests
  after it (:meth:`~coordinator.publishing.Publisher.chain_for`). So the newest checkpoint
  at or before ``version - max_staleness``, every later checkpoint and every manifest
  after it are kept, with the parts and bundles they name.
* **Restart.** The state file names every checkpoint and manifest the state held when it
  was saved, and loading it needs them. Collection therefore runs right after a save and
  keeps all of those; only then are the older entries dropped from the state (in memory),
  so they leave the next saved file and are deleted by the next collection. Accepted
  results not yet applied, or applied after the saved version, are replayed on restart
  (:meth:`FederationLoop.recover`): their uploads are kept.
* **The stage's inputs**: the training shards and stage 4's teacher checkpoint (pinned).
* **Uploads in transit.** A participant uploads a result before the reply that names it
  arrives; such a reply counts only within the unit's lease. Blobs written or read within
  two lease periods are never deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf.message import DecodeError, Message

from coordinator.db import results as db_results
from coordinator.publishing import CoordinatorState
from shared_model.blobs import BlobNotFound, GcReport
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

log = logging.getLogger(__name__)
_CONTENT_ID = re.compile(r"^[0-9a-f]{64}$")


def oldest_needed_checkpoint(checkpoints: Iterable[int], version: int, max_staleness: int) -> int:
    """The checkpoint the oldest base a participant may still sync to starts from."""
    versions = sorted(checkpoints)
    floor = version - max_staleness
    at_or_before = [v for v in versions if v <= floor]
    return at_or_before[-1] if at_or_before else versions[0]


def referenced_blobs(
    state: CoordinatorState,
    session_factory,
    *,
    saved_version: int,
    pinned: Iterable[str] = (),
    pinned_checkpoints: Iterable[tensor_pb2.BlobRef] = (),
) -> set[str]:
    """Content ids still needed: the state's chain, results to replay, pinned inputs."""
    keep: set[str] = set(pinned)
    for ref in [*state.publisher.checkpoints.values(), *pinned_checkpoints]:
        keep |= _manifest_and_parts(state, ref, control_pb2.CheckpointManifest)
    for ref in state.publisher.manifests.values():
        keep |= _manifest_and_parts(state, ref, control_pb2.VersionManifest)
    with session_factory() as s:
        rows = db_results.pending_results(s) + db_results.applied_results_after(
            s, version=saved_version
        )
        for row in rows:
            keep |= set(_content_ids(row.blob_ids))
    return keep


def forget_old_versions(state: CoordinatorState, max_staleness: int) -> int:
    """Drop checkpoints and manifests no participant needs from the state; returns the count.

    Only the in-memory tables change: the blobs stay until the next collection, after
    the next save has stopped naming them.
    """
    start = oldest_needed_checkpoint(state.publisher.checkpoints, state.version, max_staleness)
    with state.publisher.lock:  # the blob service reads the chain (Head) meanwhile
        old_checkpoints = [v for v in state.publisher.checkpoints if v < start]
        old_manifests = [v for v in state.publisher.manifests if v <= start]
        for v in old_checkpoints:
            del state.publisher.checkpoints[v]
        for v in old_manifests:
            del state.publisher.manifests[v]
    return len(old_checkpoints) + len(old_manifests)


def collect_blobs(
    state: CoordinatorState,
    session_factory,
    *,
    max_staleness: int,
    min_age_s: float,
    pinned: Iterable[str] = (),
    pinned_checkpoints: Iterable[tensor_pb2.BlobRef] = (),
) -> GcReport:
    """Delete unreferenced blobs, then forget versions nobody needs (call right after a save).

    Args:
        state: the coordinator state, just saved at ``state.version``.
        session_factory: the coordinator database (results to replay).
        max_staleness: oldest base, in versions back, a result may have.
        min_age_s: blobs written or read more recently are kept (uploads in transit).
        pinned: content ids kept as they are (the training shards).
        pinned_checkpoints: checkpoint manifests kept with their parts (stage 4's teacher).
    """
    keep = referenced_blobs(
        state,
        session_factory,
        saved_version=state.version,
        pinned=pinned,
        pinned_checkpoints=pinned_checkpoints,
    )
    report = state.store.gc(keep, min_age_s=min_age_s)
    forgotten = forget_old_versions(state, max_staleness)
    log.info(
        "blob gc at version %d: %d blobs (%.1f MB) and %d temp files removed, %d kept; "
        "%d old checkpoints/manifests forgotten",
        state.version,
        len(report.removed),
        report.freed_bytes / 1e6,
        report.removed_temp,
        len(keep),
        forgotten,
    )
    return report


def _manifest_and_parts(state: CoordinatorState, ref: tensor_pb2.BlobRef, kind) -> set[str]:
    """A blob and, when it parses as a ``kind`` manifest, every blob it names."""
    ids = {ref.content_id}
    try:
        manifest = kind.FromString(state.store.get(ref.content_id))
    except (BlobNotFound, DecodeError):  # gone already, or not a manifest: nothing it names
        return ids
    ids.update(_refs_in(manifest))
    return ids


def _refs_in(message: Message) -> Iterator[str]:
    """Content ids of every ``BlobRef`` inside ``message`` (nested, repeated and maps)."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if not descriptor.is_repeated:
            items = [value]
        elif descriptor.message_type.GetOptions().map_entry:
            items = list(value.values())
        else:
            items = list(value)
        for item in items:
            if isinstance(item, tensor_pb2.BlobRef):
                yield item.content_id
            elif isinstance(item, Message):
                yield from _refs_in(item)


def _content_ids(value: Any) -> Iterator[str]:
    """Every content id in a result's stored ``blob_ids`` (whatever its nesting)."""
    if isinstance(value, str) and _CONTENT_ID.match(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _content_ids(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _content_ids(item)
