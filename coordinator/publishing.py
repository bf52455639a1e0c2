"""The coordinator's model state and the only place it encodes versions (DESIGN §3).

The masters (shared layers + every expert column, FP32) are what the aggregators
(:mod:`coordinator.aggregation`) update; :class:`CoordinatorState` holds them together with
the :class:`Publisher`. Participants never see the masters, only the *published* state,
advanced one version at a time by ``published += decode(encode(master - published))``
(error feedback, :func:`shared_model.federated.updates.send_with_feedback`). A version is a
:class:`VersionManifest` in the blob store: one bundle for the shared layers and one per
changed column, each tensor carrying the sha256 of its new published value. Every
``checkpoint_every`` versions a full :class:`CheckpointManifest` (one blob per part: FP32
safetensors, or trits for a ternary column, :mod:`shared_model.federated.checkpoint_parts`)
lets a new or lost participant start without replaying the whole chain.

Versions are deterministic: no timestamp in a manifest, so replaying the result log after
a restart recreates the same bytes, hence the same content ids (the DB row has the time).

Durability: :meth:`CoordinatorState.save` writes masters, published state, optimiser
buffers and the version to one safetensors file (temp + rename); on restart the loop
reloads it and re-applies the accepted results recorded after it (DB:
``applied_in_version`` is NULL).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coordinator.aggregation import ColumnAggregator, OuterOptimizer, SharedAggregator
from coordinator.aggregation.diversity import apply_diversity
from coordinator.federation_settings import FederationSettings
from shared_model.blobs import BlobStore
from shared_model.config import PerspectiveConfig
from shared_model.federated.checkpoint_parts import column_part, safetensors_part
from shared_model.federated.updates import send_with_feedback
from shared_model.files import atomic_path
from shared_model.model import PerspectiveModel, expert_param_names
from shared_model.ternary import THRESHOLD_FACTOR, is_ternary
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
        column_codec: str,
        shared_threshold: float,
        checkpoint_every: int,
    ) -> None:
        self.store, self.columns, self.shared = store, columns, shared
        self.codec, self.column_codec = codec, column_codec
        self.shared_threshold = shared_threshold
        self.checkpoint_every = checkpoint_every
        self.version = version
        #: content id → "delta" (version manifests and bundles) or "checkpoint" (checkpoint
        #: manifests and parts): the blob service's traffic split.
        self.kinds: dict[str, str] = {}
        # Held while the chain changes: the blob service answers Head from its threads.
        self.lock = threading.Lock()
        self.manifests: dict[int, tensor_pb2.BlobRef] = {}
        self.checkpoints: dict[int, tensor_pb2.BlobRef] = {version: self._write_checkpoint()}
        #: stage 4's teacher once written (:meth:`teacher_checkpoint`); a stage-3 loop
        #: forgets it, so the next stage 4 distils from its own boundary
        self.teacher: tensor_pb2.BlobRef | None = None

    def publish(self, units: Sequence[str] = ()) -> int:
        """Publish the masters as the next version, which applies the results of ``units``;
        returns the new version number."""
        parent, version = self.version, self.version + 1
        manifest = control_pb2.VersionManifest(version=version, parent=parent)
        manifest.units.extend(sorted(units))
        blob, published = self._advance(self.shared.master, self.shared.published, -1, parent)
        self.shared.advance(published)
        manifest.shared.CopyFrom(self._put(blob, "delta"))
        for column in self.columns.changed():
            blob, published = self._advance(
                self.columns.masters[column], self.columns.published(column), column, parent
            )
            self.columns.advance(column, version, published)
            manifest.columns[column].CopyFrom(self._put(blob, "delta"))
        manifest_ref = self._put(manifest.SerializeToString(), "delta")
        due = version % self.checkpoint_every == 0
        checkpoint = self._write_checkpoint(version) if due else None
        with self.lock:
            self.manifests[version] = manifest_ref
            self.version = version
            if checkpoint is not None:
                self.checkpoints[version] = checkpoint
        return version

    def head(self, from_version: int) -> tuple[int, tensor_pb2.BlobRef, list[tensor_pb2.BlobRef]]:
        """The newest version and its chain for a replica holding ``from_version`` (the
        blob service's ``Head``; thread-safe)."""
        with self.lock:
            checkpoint, chain = self.chain_for(self.version, held=from_version)
            return self.version, checkpoint, chain

    def _advance(
        self, master: State, published: State, column: int, parent: int
    ) -> tuple[bytes, State]:
        """One part's bundle and its new published state, ``published + decoded``."""
        sent = send_with_feedback(
            {name: m - published[name] for name, m in master.items()},
            {},  # the residual is master - published itself
            self.codec if column < 0 else self.column_codec,
            kind="version",
            column=column,
            base_version=parent,
            base=published,
            threshold=self.shared_threshold if column < 0 else THRESHOLD_FACTOR,
        )
        return sent.bundle, {name: published[name] + d for name, d in sent.decoded.items()}

    def teacher_checkpoint(self) -> tensor_pb2.BlobRef:
        """Stage 4's frozen teacher: a full checkpoint of the published weights the first
        time it is asked for (the stage's boundary), then that one. It is saved with the
        state, so a coordinator restarted in stage 4 keeps distilling from the boundary,
        not from its partly trained (by then ternary) student. Its parts are bf16
        (``bf16_parts``): the participants keep and run the teacher so, and a node that
        joins later downloads half of FP32."""
        if self.teacher is None:
            self.teacher = self._write_checkpoint(bf16=True)
        return self.teacher

    def chain_for(
        self, base_version: int, held: int | None = None
    ) -> tuple[tensor_pb2.BlobRef, list[tensor_pb2.BlobRef]]:
        """A checkpoint and the manifests after it up to ``base_version``.

        ``held`` is the version the participant's replica will hold when it starts the
        unit (the base of its previous unit). The checkpoint is then the newest one at or
        before ``held``: the replica continues from its own copy through the deltas
        (:meth:`~shared_model.federated.replica.Replica.sync`) and never downloads the
        checkpoint's parts. Starting at the newest checkpoint before the *base* made a
        replica that held an older version reload a whole FP32 checkpoint (44 % of the
        demo's stage-3 download). Without ``held``, or when its chain is no longer kept,
        the newest checkpoint at or before ``base_version``.
        """
        for floor in (held, base_version):
            if floor is None or floor > base_version:
                continue
            starts = [v for v in self.checkpoints if v <= floor]
            if not starts:
                continue
            start = max(starts)
            if all(v in self.manifests for v in range(start + 1, base_version + 1)):
                chain = [self.manifests[v] for v in range(start + 1, base_version + 1)]
                return self.checkpoints[start], chain
        raise KeyError(f"no kept checkpoint and chain lead to version {base_version}")

    def metadata(self) -> dict[str, str]:
        """The chain's bookkeeping as strings (saved with the coordinator state)."""
        return {
            "version": str(self.version),
            "manifests": json.dumps({v: r.content_id for v, r in self.manifests.items()}),
            "checkpoints": json.dumps({v: r.content_id for v, r in self.checkpoints.items()}),
            "column_codec": self.column_codec,
            "teacher": self.teacher.content_id if self.teacher is not None else "",
        }

    def restore(self, meta: dict[str, str]) -> None:
        """Restore what :meth:`metadata` returned (the blobs must be in the store)."""
        with self.lock:
            self.version = int(meta["version"])
            self.manifests = self._refs(json.loads(meta["manifests"]))
            self.checkpoints = self._refs(json.loads(meta["checkpoints"]))
            # Ternary columns stay trits after a restart (a state saved before: as built).
            self.column_codec = meta.get("column_codec", self.column_codec)
            teacher = meta.get("teacher", "")  # absent in a state saved before: none yet
            self.teacher = self._refs({0: teacher})[0] if teacher else None
            self._remember_kinds()

    def _remember_kinds(self) -> None:
        """Classify the restored chain's blobs as a publishing process would have: they are
        what participants may read (``Coordinator.is_published``) and count in the traffic
        split."""
        for kind, refs, message in (
            ("delta", self.manifests, control_pb2.VersionManifest),
            ("checkpoint", self.checkpoints, control_pb2.CheckpointManifest),
        ):
            for ref in refs.values():
                manifest = message.FromString(self.store.get(ref.content_id))
                for part in (ref, manifest.shared, *manifest.columns.values()):
                    self.kinds.setdefault(part.content_id, kind)

    def _write_checkpoint(
        self, version: int | None = None, *, bf16: bool = False
    ) -> tensor_pb2.BlobRef:
        version = self.version if version is None else version
        manifest = control_pb2.CheckpointManifest(version=version, bf16_parts=bf16)
        shared = safetensors_part(self.shared.published, bf16=bf16)
        manifest.shared.CopyFrom(self._put(shared, "checkpoint"))
        for column in sorted(self.columns.masters):
            part, ternary = column_part(self.columns.published(column), bf16=bf16)
            manifest.columns[column].CopyFrom(self._put(part, "checkpoint"))
            if ternary:  # stage 4's experts: trits, not FP32 (checkpoint_parts)
                manifest.ternary_columns.append(column)
        return self._put(manifest.SerializeToString(), "checkpoint")

    def _put(self, data: bytes, kind: str) -> tensor_pb2.BlobRef:
        cid = self.store.put_bytes(data)
        self.kinds.setdefault(cid, kind)
        return tensor_pb2.BlobRef(content_id=cid, size=len(data))

    def _refs(self, mapping: dict[str, str]) -> dict[int, tensor_pb2.BlobRef]:
        return {
            int(v): tensor_pb2.BlobRef(content_id=cid, size=self.store.stat(cid).size)
            for v, cid in mapping.items()
        }


class CoordinatorState:
    """Masters, aggregators and the published version chain of one federated stage."""

    def __init__(
        self,
        cfg: PerspectiveConfig,
        model: PerspectiveModel,
        store: BlobStore,
        settings: FederationSettings,
        *,
        version: int = 0,
    ) -> None:
        """Masters from ``model``; codec, buffer, staleness, checkpoint period, outer
        optimiser, trim and diversity lr from ``settings`` (they have no defaults here)."""
        self.cfg, self.store = cfg, store
        self.diversity_lr = settings.diversity_lr
        n = cfg.moe.n_experts
        self.columns = ColumnAggregator(
            {c: model.expert_state(c) for c in range(n)}, version, settings.max_staleness,
            staleness_grace=settings.staleness_grace,
        )  # fmt: skip
        self.shared = SharedAggregator(
            model.shared_state(),
            buffer_size=settings.buffer_size,
            outer=OuterOptimizer(settings.outer_lr, settings.outer_momentum),
            trim=settings.trim,
            staleness_grace=settings.staleness_grace,
        )
        self.publisher = Publisher(
            store,
            self.columns,
            self.shared,
            version=version,
            codec=settings.shared_codec,
            column_codec=settings.column_codec,
            shared_threshold=settings.shared_threshold,
            checkpoint_every=settings.checkpoint_every,
        )
        #: the update bounds saved with the state :meth:`load` read (``None``: none); the
        #: stage's loop restores them (:class:`~coordinator.aggregation.bounds.UpdateBounds`)
        self.saved_bounds: dict | None = None

    @property
    def version(self) -> int:
        """The newest published version."""
        return self.publisher.version

    def use_column_codec(self, codec: str) -> bool:
        """Publish expert columns with ``codec`` from the next version on.

        The intake switches to ``trits`` with the first result of an all-ternary unit
        (stage 4 at fraction 1); a restart's replay applies the same results in the same
        order, so it switches at the same version. From then on a published column is its
        ternary value: every column not ternary yet is marked for the next version, which
        publishes all of them as trits.

        Returns:
            Whether columns were marked.
        """
        if codec == self.publisher.column_codec:
            return False
        self.publisher.column_codec = codec
        if codec != "trits":
            return False
        fp = [
            c
            for c in sorted(self.columns.masters)
            if not all(is_ternary(t) for t in self.columns.published(c).values())
        ]
        self.columns.mark_dirty(fp)
        return bool(fp)

    def publish(self, units: Sequence[str] = ()) -> int:
        """Take the diversity step (if any) and publish the masters as the next version
        (which applies the results of ``units``)."""
        if self.diversity_lr > 0:
            self._diversity_step()
        return self.publisher.publish(units)

    def _diversity_step(self) -> None:
        beta = self.cfg.moe.diversity_beta
        columns = sorted(self.columns.masters)
        # Parameter names carry the expert index, so the same weight of every column is
        # found by position in each column's (identically ordered) name list.
        names = {c: expert_param_names(self.cfg, c) for c in columns}
        for i in range(len(names[columns[0]])):
            apply_diversity(
                [self.columns.masters[c][names[c][i]] for c in columns], beta, self.diversity_lr
            )
        self.columns.mark_dirty(self.columns.masters)

    def published_model(self) -> PerspectiveModel:
        """A full MoE model holding the current published weights (for evaluation)."""
        columns = {c: self.columns.published(c) for c in self.columns.masters}
        return PerspectiveModel.from_weights(self.cfg, self.shared.published, columns).eval()

    # --- durability ------------------------------------------------------------------------

    def save(self, path: str | Path, *, bounds: dict | None = None) -> None:
        """Write the whole state to ``path`` atomically, with the stage's update ``bounds``
        (JSON-able, read back as :attr:`saved_bounds`) if given."""
        flat: State = {}
        for prefix, state in (
            ("shared.master", self.shared.master),
            ("shared.published", self.shared.published),
            ("shared.momentum", self.shared.outer.buffers),
        ):
            flat.update({f"{prefix}/{k}": v for k, v in state.items()})
        for c, state in self.columns.masters.items():
            flat.update({f"column.master/{c}/{k}": v for k, v in state.items()})
            for v, pub in self.columns.history(c):
                flat.update({f"column.published/{c}/{v}/{k}": t for k, t in pub.items()})
        contiguous = {k: v.detach().contiguous() for k, v in flat.items()}
        meta = self.publisher.metadata()
        if bounds is not None:
            meta[_BOUNDS_KEY] = json.dumps(bounds)
        with atomic_path(path) as tmp:
            save_file(contiguous, str(tmp), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote (the config must match)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        flat = load_file(str(path))
        self.saved_bounds = _saved_bounds(path, meta)
        self.publisher.restore(meta)
        self.shared.master = _section(flat, "shared.master")
        self.shared.published = _section(flat, "shared.published")
        self.shared.outer.buffers = _section(flat, "shared.momentum")
        for c in list(self.columns.masters):
            self.columns.masters[c] = _section(flat, f"column.master/{c}")
            prefix = f"column.published/{c}/"
            versions = {
                int(k[len(prefix) :].split("/", 1)[0]) for k in flat if k.startswith(prefix)
            }
            self.columns.restore_history(
                c, [(v, _section(flat, f"{prefix}{v}")) for v in sorted(versions)]
            )


_BOUNDS_KEY = "update_bounds"


def _saved_bounds(path: str | Path, meta: dict[str, str]) -> dict | None:
    if _BOUNDS_KEY not in meta:  # saved before the bounds were, or by a test
        return None
    try:
        saved = json.loads(meta[_BOUNDS_KEY])
        problem = None if isinstance(saved, dict) else f"a {type(saved).__name__}, not an object"
    except json.JSONDecodeError as exc:
        problem = f"not JSON ({exc})"
    if problem is not None:
        raise ValueError(
            f"{path}: its {_BOUNDS_KEY!r} metadata is {problem}; restore the state file from "
            "a backup, or delete the key to restart the bounds' history"
        )
    return saved


def _section(flat: State, prefix: str) -> State:
    head = prefix + "/"
    return {k[len(head) :]: v for k, v in flat.items() if k.startswith(head)}
