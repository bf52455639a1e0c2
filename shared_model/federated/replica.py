"""A participant's copy of a published version, advanced bit-identically.

The coordinator publishes version ``v`` as a :class:`VersionManifest`: one bundle for the
shared weights and one per changed column, each holding ``decode(encode(master - pub))``
updates. Both sides compute ``pub_v = pub_{v-1} + decoded`` in float32, so a replica that
applies the same chain holds exactly the coordinator's published tensors; every bundle
carries the sha256 of each resulting tensor and the replica checks it before committing.

A replica holds only the shared weights and its own columns: what makes a volunteer
machine enough at full size (DESIGN §3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from shared_model.codec import CodecError
from shared_model.federated.checkpoint_parts import column_part, read_part, safetensors_part
from shared_model.federated.updates import UpdateError, read_bundle, tensor_digest
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

State = dict[str, torch.Tensor]
Fetch = Callable[[tensor_pb2.BlobRef], bytes]
#: Unit ids a replica remembers from the versions it applied (a node's results in transit
#: are a few units old at most).
KEEP_UNITS = 4096


class SyncError(RuntimeError):
    """A version chain does not fit this replica or does not reproduce the published state."""


class Replica:
    """Published shared weights and some expert columns at one version."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.shared: State = {}
        self.columns: dict[int, State] = {}
        #: unit id -> the version that applied its result, for the versions this replica
        #: advanced through (not those a checkpoint skipped; the newest ``KEEP_UNITS``)
        self.units: dict[str, int] = {}
        #: the version of the last checkpoint loaded: what happened before it is unknown
        self.loaded_at: int | None = None

    def view(self) -> Replica:
        """A replica over the same tensors, in dicts of its own: advancing it leaves this one
        as it is (:meth:`apply` builds new tensors, it never writes into one), and it costs
        the dicts only. Another thread may advance a view while this replica is in use."""
        other = Replica()
        other.version = self.version
        other.shared = dict(self.shared)
        other.columns = {c: dict(state) for c, state in self.columns.items()}
        other.units, other.loaded_at = dict(self.units), self.loaded_at
        return other

    def may_apply_later(self, unit_id: str, sent_at: int) -> bool:
        """Whether the result of ``unit_id``, sent when we held version ``sent_at``, is known
        not to be in the versions up to ours: none of those we applied lists it, and no
        checkpoint loaded since ``sent_at`` skipped versions that might."""
        skipped = self.loaded_at is not None and self.loaded_at > sent_at
        return unit_id not in self.units and not skipped

    def load_checkpoint(
        self,
        manifest: control_pb2.CheckpointManifest,
        columns: list[int],
        fetch: Fetch,
        *,
        frozen: bool = False,
    ) -> None:
        """Replace the replica by the checkpoint's shared part and ``columns``.

        ``frozen``: a copy no chain will advance (stage 4's teacher), which may be a bf16
        checkpoint (``bf16_parts``); a replica that follows the versions must be FP32.
        """
        if manifest.bf16_parts and not frozen:
            raise SyncError(f"checkpoint {manifest.version} is bf16: not a replica's start")
        missing = [c for c in columns if c not in manifest.columns]
        if missing:
            raise SyncError(f"checkpoint {manifest.version} has no column(s) {missing}")
        shared = _read(manifest, None, fetch)
        cols = {c: _read(manifest, c, fetch) for c in columns}
        self.shared, self.columns, self.version = shared, cols, int(manifest.version)
        self.units, self.loaded_at = {}, self.version

    def add_columns(
        self, manifest: control_pb2.CheckpointManifest, columns: list[int], fetch: Fetch
    ):
        """Load columns this replica did not hold (the checkpoint must be at our version)."""
        if int(manifest.version) != self.version:
            raise SyncError("can only add columns from a checkpoint at the replica's version")
        for c in columns:
            self.columns[c] = _read(manifest, c, fetch)

    def apply(self, manifest: control_pb2.VersionManifest, fetch: Fetch) -> None:
        """Advance by one published version; all-or-nothing, digests verified."""
        if self.version is None or int(manifest.parent) != self.version:
            raise SyncError(
                f"version {manifest.version} follows {manifest.parent}, "
                f"replica is at {self.version}"
            )
        new_shared = _advance(self.shared, fetch(manifest.shared), "shared")
        new_cols = {
            c: _advance(self.columns[c], fetch(manifest.columns[c]), f"column {c}")
            for c in self.columns
            if c in manifest.columns
        }
        self.shared.update(new_shared)
        for c, state in new_cols.items():
            self.columns[c].update(state)
        self.version = int(manifest.version)
        self.units.update((u, self.version) for u in manifest.units)
        while len(self.units) > KEEP_UNITS:  # oldest first: dicts keep insertion order
            del self.units[next(iter(self.units))]

    def sync(
        self,
        checkpoint: control_pb2.CheckpointManifest,
        chain: list[control_pb2.VersionManifest],
        columns: list[int],
        fetch: Fetch,
    ) -> int:
        """Bring the replica to the end of ``chain`` holding at least ``columns``.

        Uses the local copy when the chain continues from it, else the checkpoint.

        Returns:
            The number of versions applied.
        """
        start = int(checkpoint.version)
        target = int(chain[-1].version) if chain else start
        usable = self.version is not None and start <= self.version <= target
        if usable and any(c not in self.columns for c in columns):
            usable = self.version == start
            if usable:
                self.add_columns(checkpoint, [c for c in columns if c not in self.columns], fetch)
        if not usable:
            self.load_checkpoint(checkpoint, columns, fetch)
        todo = [m for m in chain if int(m.version) > self.version]
        for m in todo:
            self.apply(m, fetch)
        if self.version != target:
            raise SyncError(f"chain ended at {self.version}, expected {target}")
        return len(todo)

    def copy_if_checkpoint(
        self,
        manifest: control_pb2.CheckpointManifest,
        columns: list[int],
        dtype: torch.dtype = torch.float32,
    ) -> Replica | None:
        """This replica's shared part and ``columns`` (:meth:`cast` to ``dtype``) if they
        are, byte for byte, the parts of checkpoint ``manifest`` (each part's content id is
        the sha256 of its bytes, which the coordinator wrote from the same published
        tensors with the same :mod:`~shared_model.federated.checkpoint_parts` functions);
        else ``None``. Stage 4's teacher is the published state at the stage
        boundary, so a participant that synced through that version builds it without
        downloading it.
        """
        if self.version != int(manifest.version) or any(c not in self.columns for c in columns):
            return None
        if any(c not in manifest.columns for c in columns):
            return None
        # A part of the other kind (trits against FP32) has other bytes: no check of its own.
        # A bf16 manifest (stage 4's teacher) holds our tensors rounded to bf16, the same
        # bytes exactly when ours are the published ones.
        bf16 = manifest.bf16_parts
        parts = [(safetensors_part(self.shared, bf16=bf16), manifest.shared)]
        parts += [
            (column_part(self.columns[c], bf16=bf16)[0], manifest.columns[c]) for c in columns
        ]
        for data, ref in parts:
            if hashlib.sha256(data).hexdigest() != ref.content_id:
                return None
        return self.cast(dtype, columns)

    def cast(self, dtype: torch.dtype, columns: list[int] | None = None) -> Replica:
        """A replica of our version, shared part and ``columns`` (default: all we hold) in
        ``dtype``. A tensor already in ``dtype`` is shared, not copied: no replica writes
        into a tensor (:meth:`apply` builds new ones, which :meth:`view` relies on too). In
        another dtype than FP32 it is a frozen copy that no chain can advance (stage 4's
        teacher, in bf16)."""
        copy = Replica()
        copy.version = self.version
        kept = list(self.columns) if columns is None else columns
        copy.shared = {k: v.to(dtype) for k, v in self.shared.items()}
        copy.columns = {c: {k: v.to(dtype) for k, v in self.columns[c].items()} for c in kept}
        return copy


def _advance(state: State, data: bytes, what: str) -> State:
    try:
        bundle, deltas = read_bundle(
            data,
            kind="version",
            expected={k: tuple(v.shape) for k, v in state.items()},
            base=state,
        )
    except (UpdateError, CodecError) as exc:  # a malformed payload names its part too
        raise SyncError(f"{what}: {exc}") from exc
    digests = {t.name: t.sha256 for t in bundle.tensors}
    out: State = {}
    for name, delta in deltas.items():
        new = state[name] + delta
        if digests[name] and tensor_digest(new) != digests[name]:
            raise SyncError(f"{what}: {name} does not match the published checksum")
        out[name] = new
    return out


def _read(manifest: control_pb2.CheckpointManifest, column: int | None, fetch: Fetch) -> State:
    """One part of a checkpoint: the shared layers (``column`` None) or a column."""
    if column is None:
        ref, ternary, what = manifest.shared, False, "shared layers"
    else:
        ref, ternary = manifest.columns[column], column in manifest.ternary_columns
        what = f"column {column}"
    try:
        return read_part(fetch(ref), ternary=ternary, bf16=manifest.bf16_parts)
    except (UpdateError, CodecError) as exc:
        raise SyncError(f"checkpoint {manifest.version}, {what}: {exc}") from exc
