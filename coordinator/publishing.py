"""Publishing versions: the only place the coordinator encodes its masters (DESIGN §3).

Participants never see the FP masters, only the *published* state, advanced one version
at a time by ``published += decode(encode(master - published))`` (error feedback,
:mod:`shared_model.federated.feedback`). A version is a :class:`VersionManifest` in the
blob store: one bundle for the shared layers and one per changed column, each tensor
carrying the sha256 of its new published value. Every ``checkpoint_every`` versions a full
:class:`CheckpointManifest` (one safetensors blob per part) lets a new or lost participant
start without replaying the whole chain.

Versions are deterministic: no timestamp in a manifest, so replaying the result log after
a restart recreates the same bytes, hence the same content ids (the DB row has the time).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save

from coordinator.aggregation import ColumnAggregator, SharedAggregator
from shared_model.blobs import BlobStore
from shared_model.federated.feedback import send_with_feedback
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

State = dict[str, torch.Tensor]


class Publisher:
    """Encodes the aggregators' masters into the version chain and checkpoints."""

    def __init__(
        self,
        store: BlobStore,
        columns: ColumnAggregator,
        shared: SharedAggregator,
        *,
        version: int,
        codec: str,
        checkpoint_every: int,
    ) -> None:
        self.store, self.columns, self.shared = store, columns, shared
        self.codec, self.checkpoint_every = codec, checkpoint_every
        self.version = version
        self.manifests: dict[int, tensor_pb2.BlobRef] = {}
        self.checkpoints: dict[int, tensor_pb2.BlobRef] = {version: self._write_checkpoint()}

    def publish(self) -> int:
        """Publish the masters as the next version; returns the new version number."""
        parent, version = self.version, self.version + 1
        manifest = control_pb2.VersionManifest(version=version, parent=parent)
        blob, published = self._advance(self.shared.master, self.shared.published, -1, parent)
        self.shared.advance(published)
        manifest.shared.CopyFrom(self._put(blob))
        for column in self.columns.changed():
            blob, published = self._advance(
                self.columns.masters[column], self.columns.published(column), column, parent
            )
            self.columns.advance(column, version, published)
            manifest.columns[column].CopyFrom(self._put(blob))
        self.manifests[version] = self._put(manifest.SerializeToString())
        self.version = version
        if version % self.checkpoint_every == 0:
            self.checkpoints[version] = self._write_checkpoint()
        return version

    def _advance(
        self, master: State, published: State, column: int, parent: int
    ) -> tuple[bytes, State]:
        """One part's bundle and its new published state, ``published + decoded``."""
        sent = send_with_feedback(
            {name: m - published[name] for name, m in master.items()},
            {},  # the residual is master - published itself
            self.codec,
            kind="version",
            column=column,
            base_version=parent,
            base=published,
        )
        return sent.bundle, {name: published[name] + d for name, d in sent.decoded.items()}

    def teacher_checkpoint(self) -> tensor_pb2.BlobRef:
        """A full checkpoint of the published weights now (stage 4's frozen FP teacher)."""
        return self._write_checkpoint()

    def chain_for(self, base_version: int) -> tuple[tensor_pb2.BlobRef, list[tensor_pb2.BlobRef]]:
        """The newest checkpoint at or before ``base_version`` and the manifests after it."""
        start = max(v for v in self.checkpoints if v <= base_version)
        chain = [self.manifests[v] for v in range(start + 1, base_version + 1)]
        return self.checkpoints[start], chain

    def metadata(self) -> dict[str, str]:
        """The chain's bookkeeping as strings (saved with the coordinator state)."""
        return {
            "version": str(self.version),
            "manifests": json.dumps({v: r.content_id for v, r in self.manifests.items()}),
            "checkpoints": json.dumps({v: r.content_id for v, r in self.checkpoints.items()}),
        }

    def restore(self, meta: dict[str, str]) -> None:
        """Restore what :meth:`metadata` returned (the blobs must be in the store)."""
        self.version = int(meta["version"])
        self.manifests = self._refs(json.loads(meta["manifests"]))
        self.checkpoints = self._refs(json.loads(meta["checkpoints"]))

    def _write_checkpoint(self) -> tensor_pb2.BlobRef:
        manifest = control_pb2.CheckpointManifest(version=self.version)
        manifest.shared.CopyFrom(self._put(save(_contiguous(self.shared.published))))
        for column in sorted(self.columns.masters):
            part = save(_contiguous(self.columns.published(column)))
            manifest.columns[column].CopyFrom(self._put(part))
        return self._put(manifest.SerializeToString())

    def _put(self, data: bytes) -> tensor_pb2.BlobRef:
        cid = self.store.put_bytes(data)
        return tensor_pb2.BlobRef(content_id=cid, size=len(data))

    def _refs(self, mapping: dict[str, str]) -> dict[int, tensor_pb2.BlobRef]:
        return {
            int(v): tensor_pb2.BlobRef(content_id=cid, size=self.store.stat(cid).size)
            for v, cid in mapping.items()
        }


def _contiguous(state: State) -> State:
    return {k: v.detach().contiguous() for k, v in state.items()}
