"""Training one work unit on a participant: sync, train columns (+ shared), compress, upload.

The participant holds only the shared layers and its own expert columns (column mode:
every token of a document goes through the document's column). Per unit it

1. syncs its :class:`~shared_model.federated.replica.Replica` to the unit's base version
   (checkpoint + version chain over the blob service, checksums verified);
2. resets the shared layers to the published ones (DiLoCo: inner steps start from the
   global weights) and keeps its own exact copy of each column ("keep-local");
3. trains ``unit.steps`` inner AdamW steps on the unit's documents (stage 4: progressive
   ternary STE on the experts and KD from the frozen teacher, kept in bf16);
4. uploads, over the blob service, ``compress(local - published)`` per column and the
   shared pseudo-gradient ``compress(published - local + residual)`` whose compression
   error stays in an error-feedback residual kept on disk across units.

Steps 1-3 are :meth:`UnitTrainer.train`; step 4 is :meth:`TrainedUnit.encode`, which the
participant runs on another thread while its next unit trains (in training order: the
residual carries over); :meth:`UnitTrainer.run` does both.

A scoring unit (``score_documents``) also reports, after training, its documents' losses
under each column held (:mod:`participant.scoring`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from participant.scoring import document_losses
from shared_model.blobs import BlobNotFound
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset
from shared_model.federated.replica import Replica
from shared_model.federated.updates import encode_bundle, send_with_feedback
from shared_model.files import atomic_path
from shared_model.model import PerspectiveModel
from shared_model.moe import expert_param_names
from shared_model.schedule import build_optimizer, set_lr
from shared_model.stage_loss import TEACHER_DTYPE, Distillation, freeze_teacher, stage_loss
from shared_model.ternary import THRESHOLD_FACTOR
from shared_model.wire.perspective.v1 import blobs_pb2, control_pb2, federation_pb2, tensor_pb2

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
#: ``progress(phase, step, total_steps, tokens)``: phase is "sync", "train" or "upload".
ProgressFn = Callable[[str, int, int, int], None]
#: The dtype of what a node keeps beside its replica to correct where a unit starts: its
#: shared pseudo-gradients in transit (eager updates) and what a column's last delta left
#: out (:attr:`_Local.unsent`). Corrections, not replicas: bf16 halves what each of those
#: copies costs (on ``full`` 27 GB of shared layers a result in transit, in FP32).
CORRECTION_DTYPE = torch.bfloat16


class UnitError(RuntimeError):
    """A work unit cannot be run as specified (bad documents, columns, stage)."""


@dataclass
class BlobIO:
    """How the trainer reaches the blob service: fetch by ref, upload bytes -> ref, and
    ``head(from_version)``: the newest version and its chain (``None``: not offered)."""

    fetch: Callable[[tensor_pb2.BlobRef], bytes]
    upload: Callable[[bytes], tensor_pb2.BlobRef]
    head: Callable[[int], blobs_pb2.HeadReply] | None = None


@dataclass
class _Capture:
    """A trained unit's state and the published state it is compared with (copies)."""

    columns: dict[int, State]
    published_columns: dict[int, State]
    shared: State
    published_shared: State
    _progress: State | None = None

    def shared_progress(self) -> State:
        """``published_shared - shared``: the unit's shared pseudo-gradient before error
        feedback, computed once (eager updates keep it; the encoder sends it)."""
        if self._progress is None:
            self._progress = {k: p - self.shared[k] for k, p in self.published_shared.items()}
        return self._progress


class TrainedUnit:
    """A unit trained and not yet encoded (:meth:`UnitTrainer.train`)."""

    def __init__(self, trainer: UnitTrainer, req, io: BlobIO, base: int, capture: _Capture):
        self.trainer, self.req, self.io, self.base = trainer, req, io, base
        self.capture = capture
        self.local = trainer.local  # the state this unit trained in (its network's)
        self.result = federation_pb2.WorkResult(unit_id=req.unit.unit_id, base_version=base)

    def encode(self) -> federation_pb2.WorkResult:
        """Encode the updates (``io.upload`` takes the blobs) and save the local state;
        returns the finished result. Call once, in the order the units were trained."""
        t0 = time.perf_counter()
        trainer = self.trainer
        trainer._encode(self.req, self.io, self.base, self.capture, self.result, self.local)
        trainer._save_local(self.local)
        self.result.timings.encode_s = time.perf_counter() - t0
        return self.result


@dataclass
class _InTransit:
    """A shared pseudo-gradient this node sent (or is sending) that may not be applied yet."""

    unit_id: str
    base: int  # the version its unit trained from: only later versions can apply it
    pseudo: State  # in CORRECTION_DTYPE


@dataclass
class _Local:
    """What survives between units: the local columns and the shared EF residual, and the
    network they belong to (``ControlRequest.network_id``; empty: not known)."""

    columns: dict[int, State] = field(default_factory=dict)
    residual: State = field(default_factory=dict)
    network: str = ""
    #: per column, the local copy last sent and what its delta's coding left out of it
    #: (``copy - published - decoded``, in ``CORRECTION_DTYPE``): kept if the column
    #: restarts from the published weights before it trains again
    #: (:meth:`UnitTrainer._start_columns`); not saved.
    unsent: dict[int, tuple[State, State]] = field(default_factory=dict)


class UnitTrainer:
    """Runs work units for one participant; state persists under ``state_dir``.

    Models and batches live on ``device``; everything that is saved, compared with the
    published weights or encoded (local columns, EF residual, deltas) stays on the CPU,
    so results are the same bytes whatever device trained them.
    """

    def __init__(
        self,
        cfg: PerspectiveConfig,
        train_data: DocumentDataset,
        state_dir: str | Path,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.data = train_data
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.replica = Replica()
        # stage 4's teacher: the boundary's shared layers and our columns, frozen, in bf16
        self.teacher_replica = Replica()
        self.local = self._load_local()
        self._local_lock = threading.Lock()
        self.model: PerspectiveModel | None = None
        # stage 4's teacher model, kept across units: ((teacher version, columns), model)
        self._teacher: tuple[tuple, PerspectiveModel] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokens_per_s = 0.0
        # eager updates: our results on their way, and the shared state a unit started from
        self._in_transit: list[_InTransit] = []
        self._start_shared: State | None = None
        self._eager_results = 0  # in-transit results the current unit started from

    # --- persistence -----------------------------------------------------------------------

    def _local_path(self) -> Path:
        return self.state_dir / "local.safetensors"

    def _load_local(self) -> _Local:
        path = self._local_path()
        if not path.exists():
            return _Local()
        flat = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            local = _Local(network=(f.metadata() or {}).get("network", ""))
        for key, value in flat.items():
            kind, _, rest = key.partition("/")
            if kind == "residual":
                local.residual[rest] = value
            else:
                col, _, name = rest.partition("/")
                local.columns.setdefault(int(col), {})[name] = value
        return local

    def _save_local(self, local: _Local | None = None) -> None:
        """Write ``local`` (default: ours) to disk; the state of a network this node has
        left (:meth:`_join`) is not written over the new one's."""
        with self._local_lock:  # the next unit may keep its columns meanwhile
            local = local or self.local
            if local is not self.local:
                return
            residual, columns = dict(local.residual), dict(local.columns)
        flat = {f"residual/{k}": v.contiguous() for k, v in residual.items()}
        for col, state in columns.items():
            flat.update({f"column/{col}/{k}": v.contiguous() for k, v in state.items()})
        with atomic_path(self._local_path()) as tmp:
            save_file(flat, str(tmp), metadata={"network": local.network})

    def _join(self, network: str) -> None:
        """Hold state of ``network`` only (``ControlRequest.network_id``).

        A node that trained for another network (a coordinator started on a fresh
        database, from the same seed: the same version numbers, other weights) drops its
        replicas, local columns, EF residual, optimizer and results in transit, and syncs
        from the new network's checkpoint. Carried over, its replica failed the digests of
        the first delta it applied, and its local columns would have gone up as deltas
        against weights they never came from. State saved without a network (or none yet)
        is taken as the new network's.
        """
        if not network or network == self.local.network:
            return
        if self.local.network:
            log.warning(
                "a unit of network %s; this node holds state of network %s: dropping it "
                "and syncing from the new network's checkpoint", network, self.local.network,
            )  # fmt: skip
            self.replica, self.teacher_replica, self._teacher = Replica(), Replica(), None
            self.model, self.optimizer, self._in_transit = None, None, []
            with self._local_lock:
                self.local = _Local(network=network)
        else:
            self.local.network = network

    # --- one unit ---------------------------------------------------------------------------

    def adopt(self, replica: Replica | None) -> bool:
        """Take ``replica`` as this trainer's if it is newer and holds every column ours does:
        a :meth:`Replica.view` of ours that another thread advanced, every digest checked
        (:mod:`participant.prefetch`), while a unit trained. Call between units only."""
        held = self.replica.version
        if replica is None or replica.version is None or held is None:
            return False
        if replica.version <= held or not set(self.replica.columns) <= set(replica.columns):
            return False
        self.replica = replica
        return True

    def run(
        self, req: control_pb2.ControlRequest, io: BlobIO, progress: ProgressFn | None = None
    ) -> federation_pb2.WorkResult:
        """Run the unit in ``req`` and return its result (blobs already uploaded).

        Args:
            req: The control request carrying the unit.
            io: Blob fetch/upload.
            progress: Called at each phase change and after every inner step.
        """
        return self.train(req, io, progress).encode()

    def train(
        self, req: control_pb2.ControlRequest, io: BlobIO, progress: ProgressFn | None = None
    ) -> TrainedUnit:
        """Sync and train the unit in ``req``; returns it trained, to be encoded
        (:meth:`TrainedUnit.encode`, on any thread: the next unit may train meanwhile).

        Encoding applies the EF residual in order: encode the units in the order they
        were trained.
        """
        unit = req.unit
        columns = sorted(int(c) for c in unit.columns)
        if not columns:
            raise UnitError(f"unit {unit.unit_id} names no columns")
        report = progress or (lambda *_: None)
        t0 = time.perf_counter()
        report("sync", 0, unit.steps, 0)
        self._join(req.network_id)
        base, applied = self._sync(req, columns, io)
        restarted = self._start_columns(columns, set(unit.fresh_columns))
        model, teacher = self._prepare_models(req, columns, io, restarted)
        t_sync = time.perf_counter() - t0
        batches = self._batches(unit, columns, req.batch_size, req.seq_len)
        train_loss, tokens = self._train(model, teacher, unit, batches, report)
        t_train = time.perf_counter() - t0 - t_sync
        scores = self._score(model, unit, columns, req) if unit.score_documents else []
        t_score = time.perf_counter() - t0 - t_sync - t_train
        report("upload", unit.steps, unit.steps, tokens)
        trained = TrainedUnit(self, req, io, base, self._capture(model, columns))
        if req.eager_scale > 0:
            progress = trained.capture.shared_progress()
            progress = {k: v.to(CORRECTION_DTYPE) for k, v in progress.items()}
            self._in_transit.append(_InTransit(unit.unit_id, base, progress))
        self.tokens_per_s = tokens / max(t_train, 1e-9)
        result = trained.result
        result.tokens, result.train_loss = tokens, train_loss
        result.document_losses.extend(scores)
        result.timings.sync_s, result.timings.train_s = t_sync, t_train
        result.timings.sync_versions = applied
        result.timings.eager_results = self._eager_results
        result.timings.score_s = t_score
        result.timings.total_s = time.perf_counter() - t0
        return trained

    def _sync(
        self, req: control_pb2.ControlRequest, columns: list[int], io: BlobIO
    ) -> tuple[int, int]:
        """Bring the replica to the unit's base (or the newest version); returns it and the
        number of versions applied to get there."""
        checkpoint, versions, base = self._chain(req, io)
        applied = 0
        if not self._synced_ahead(req, base, columns, io):
            ckpt = control_pb2.CheckpointManifest.FromString(io.fetch(checkpoint))
            chain = [control_pb2.VersionManifest.FromString(io.fetch(r)) for r in versions]
            if req.HasField("teacher"):
                applied = self._teacher_on_the_way(req, ckpt, chain, columns, io)
            applied += self.replica.sync(ckpt, chain, columns, io.fetch)
        if self.replica.version != base:
            raise UnitError(f"synced to version {self.replica.version}, unit needs {base}")
        return base, applied

    def _start_columns(self, columns: list[int], fresh: set[int]) -> list[int]:
        """Local copies of ``columns`` to train: ours, carried over from our last unit on
        them, except where we hold none or the unit says another node trained the column
        since (``WorkUnit.fresh_columns``): those start from the published weights, plus
        what our last delta of the column did not carry (its coding left it out; the rest
        of our copy is in the published weights, or another node's training replaced it).
        Returns the columns whose copy of ours was dropped for the published one."""
        dropped = sorted(c for c in fresh.intersection(columns) if c in self.local.columns)
        if dropped:
            log.info("columns %s were trained by another node since: starting them from "
                     "the published weights and what our last delta left out", dropped)  # fmt: skip
        with self._local_lock:
            for c in columns:
                if c not in self.local.columns or c in fresh:
                    start = {k: v.clone() for k, v in self.replica.columns[c].items()}
                    sent, unsent = self.local.unsent.pop(c, (None, {}))
                    if sent is not None and sent is self.local.columns.get(c):
                        for k, v in unsent.items():  # nothing trained since that delta
                            start[k] += v.to(start[k].dtype)
                    self.local.columns[c] = start
        return dropped

    def _synced_ahead(self, req, base: int, columns: list[int], io: BlobIO) -> bool:
        """Whether the replica holds ``base`` and the unit's columns (and teacher) already:
        a replica advanced while the unit before trained (:meth:`adopt`) needs nothing,
        not even the chain's checkpoint manifest."""
        if self.replica.version != base or not set(columns) <= set(self.replica.columns):
            return False
        if not req.HasField("teacher"):
            return True
        teacher = control_pb2.CheckpointManifest.FromString(io.fetch(req.teacher))
        return self._holds_teacher(teacher, columns)

    def _chain(self, req: control_pb2.ControlRequest, io: BlobIO):
        """``(checkpoint, manifests, base)``: the lease's chain, or with
        ``start_from_newest`` the chain to the newest version from the one we hold."""
        lease = (req.checkpoint, list(req.versions), int(req.unit.base_version))
        if not req.unit.start_from_newest or io.head is None:
            return lease
        held = self.replica.version
        try:
            head = io.head(held if held is not None else lease[2])
        except BlobNotFound:  # a blob service that publishes no versions: the lease's chain
            return lease
        if head.version < lease[2]:  # a coordinator that restarted behind its lease
            return lease
        return head.checkpoint, list(head.versions), int(head.version)

    def _teacher_on_the_way(self, req, ckpt, chain, columns: list[int], io: BlobIO) -> int:
        """Stage 4: take the teacher from our own replica when the sync passes its version.

        The teacher is the published state at the stage boundary: a replica that holds it,
        or reaches it on the way to the unit's base, copies it (digest-checked against the
        teacher checkpoint's parts) in bf16 instead of downloading the FP32 checkpoint.
        Returns the versions applied on the way.
        """
        manifest = control_pb2.CheckpointManifest.FromString(io.fetch(req.teacher))
        if self._holds_teacher(manifest, columns):
            return 0
        prefix = [m for m in chain if int(m.version) <= manifest.version]
        reaches = int(prefix[-1].version) if prefix else int(ckpt.version)
        held = self.replica.version
        if reaches != manifest.version or (held is not None and held > manifest.version):
            return 0
        applied = self.replica.sync(ckpt, prefix, columns, io.fetch)
        copy = self.replica.copy_if_checkpoint(manifest, columns, TEACHER_DTYPE)
        if copy is not None:
            self.teacher_replica, self._teacher = copy, None
        return applied

    def _holds_teacher(self, manifest, columns: list[int]) -> bool:
        return self.teacher_replica.version == manifest.version and all(
            c in self.teacher_replica.columns for c in columns
        )

    def _prepare_models(self, req, columns: list[int], io: BlobIO, restarted: list[int]):
        self._start_shared = self._eager_start(req.eager_scale, req.max_staleness)
        shared = self._start_shared or self.replica.shared
        held = {c: self.local.columns[c] for c in columns}
        model = self.model
        if model is None or sorted(model_columns(model)) != columns:
            model = PerspectiveModel.from_weights(self.cfg, shared, held, device=self.device)
            # Expert groups apart: the coordinator's unit says how their lr is scaled.
            optimizer = build_optimizer(model, self.cfg.optim, split_experts=True)
            self.model, self.optimizer = model, optimizer
        else:
            self._forget_moments(restarted)
            model.load_weights(shared, held)
        teacher = None
        if req.unit.stage == federation_pb2.STAGE_TERNARY_DISTILLATION:
            if not req.HasField("teacher"):
                raise UnitError("a stage-4 unit needs a teacher checkpoint")
            manifest = control_pb2.CheckpointManifest.FromString(io.fetch(req.teacher))
            if not self._holds_teacher(manifest, columns):
                loaded = Replica()
                loaded.load_checkpoint(manifest, columns, io.fetch, frozen=True)
                self.teacher_replica, self._teacher = loaded.cast(TEACHER_DTYPE), None
            teacher = self._teacher_model(columns)
        fraction = req.unit.ternary_fraction if teacher is not None else None
        model.set_ternary_fraction(fraction if fraction and fraction > 0 else None)
        return model, teacher

    def _forget_moments(self, columns: list[int]) -> None:
        """Drop the optimiser state of ``columns``, restarted from the published weights:
        their moments follow our own copy's abandoned trajectory (the first step after a
        hand-over would carry on in its direction); AdamW starts them afresh, its bias
        correction included."""
        assert self.model is not None and self.optimizer is not None
        params = dict(self.model.named_parameters())
        for c in columns:
            for name in expert_param_names(self.cfg, c):
                self.optimizer.state.pop(params[name], None)

    def _eager_start(self, scale: float, max_age: int) -> State | None:
        """Eager updates: the synced shared layers minus ``scale`` × each of our shared
        pseudo-gradients the synced versions do not apply yet (``None``: nothing to add).

        Over a real network a node starts its next unit while its last result is encoded
        and sent, so that unit cannot start from a version that applies it; starting from
        its own expected share of the outer step instead recovers most of what that costs
        (Kale et al. 2025). A result the versions apply, one a checkpoint load may have
        skipped, and one the coordinator refuses as too stale (its base more than
        ``max_age`` versions back: ``ControlRequest.max_staleness``) are forgotten.
        """
        version = self.replica.version or 0
        self._in_transit = [
            t
            for t in self._in_transit
            if self.replica.may_apply_later(t.unit_id, t.base) and version - t.base <= max_age
        ]
        self._eager_results = len(self._in_transit) if scale > 0 else 0
        if not self._eager_results:
            return None
        start = dict(self.replica.shared)
        for t in self._in_transit:
            start = {k: v - scale * t.pseudo[k].to(v.dtype) for k, v in start.items()}
        return start

    def _teacher_model(self, columns: list[int]) -> PerspectiveModel:
        """Stage 4's frozen teacher over ``columns`` (bf16, as the teacher replica), built
        once and kept while the teacher and the columns stay the same (it never trains)."""
        key = (self.teacher_replica.version, tuple(columns))
        if self._teacher is not None and self._teacher[0] == key:
            return self._teacher[1]
        held = {c: self.teacher_replica.columns[c] for c in columns}
        teacher = PerspectiveModel.from_weights(
            self.cfg, self.teacher_replica.shared, held, device=self.device, dtype=TEACHER_DTYPE
        )
        freeze_teacher(teacher, self.device)  # runs in FP32 on a CPU (teacher_run_dtype)
        self._teacher = (key, teacher)
        return teacher

    def _batches(self, unit, columns: list[int], batch_size: int, seq_len: int):
        """Deterministic batches: each sequence is drawn from one column's documents.

        A column whose documents in this unit hold less than one sequence is not trained in
        it (its delta is zero): with many columns per unit a column may get one short
        document, and the unit's other columns must not fail with it.
        """
        by_column = _documents_by_column(unit, columns)
        subsets = {c: self.data.subset(ids) for c, ids in by_column.items() if ids}
        datasets = {c: d for c, d in subsets.items() if d.n_tokens > seq_len}
        if not datasets:
            raise UnitError(
                f"unit {unit.unit_id} has no column with a sequence's worth of documents "
                f"({seq_len + 1} tokens) among columns {columns}: the coordinator must send "
                "more documents per unit or a shorter seq_len"
            )
        order = sorted(datasets)
        for step in range(unit.steps):
            rows, cols = [], []
            for b in range(batch_size):
                col = order[(step * batch_size + b) % len(order)]
                rows.append(datasets[col].batch(step * batch_size + b, 1, seq_len, unit.seed))
                cols.append(col)
            yield torch.cat(rows), torch.tensor(cols, dtype=torch.long)

    def _train(self, model, teacher, unit, batches, report: ProgressFn) -> tuple[float, int]:
        model.train()
        assert self.optimizer is not None
        set_lr(self.optimizer, unit.lr, expert_lr_scale(unit))
        losses, tokens = [], 0
        distill = Distillation(teacher, unit.kd_weight) if teacher is not None else None
        report("train", 0, unit.steps, 0)
        for batch, cols in batches:
            batch, cols = batch.to(self.device), cols.to(self.device)
            x, y = batch[:, :-1], batch[:, 1:]
            # Column mode: no router balance; diversity is the coordinator's master step.
            loss, _ = stage_loss(model, x, y, columns=cols, distill=distill)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            losses.append(loss.item())
            tokens += x.numel()
            report("train", len(losses), unit.steps, tokens)
        return float(np.mean(losses)) if losses else float("nan"), tokens

    def _score(self, model, unit, columns: list[int], req) -> list[federation_pb2.DocumentLoss]:
        """Scoring unit: every unit document's loss under each column held, after training."""
        docs = [d for ids in _documents_by_column(unit, columns).values() for d in ids]
        return document_losses(
            model, self.data, docs, columns,
            seq_len=req.seq_len, batch_size=req.batch_size, device=self.device,
        )  # fmt: skip

    def _capture(self, model, columns: list[int]) -> _Capture:
        """The trained state the unit's result describes, and the published state it is
        compared with, as copies: the next unit trains on the model and syncs the replica
        while the result is encoded. The local columns are kept now (the next unit trains
        on from them; stage 4: the FP latent stays here)."""
        shared = set(self.replica.shared)
        capture = _Capture(
            columns={
                c: {k: v.detach().to("cpu", copy=True) for k, v in model.expert_state(c).items()}
                for c in columns
            },
            published_columns={c: dict(self.replica.columns[c]) for c in columns},
            shared={
                k: v.detach().to("cpu", copy=True)
                for k, v in model.state_dict().items()
                if k in shared
            },
            # what the unit started from: the pseudo-gradient is the unit's own progress
            published_shared=dict(self._start_shared or self.replica.shared),
        )
        with self._local_lock:
            self.local.columns.update(capture.columns)
        return capture

    def _encode(self, req, io: BlobIO, base: int, capture: _Capture, result, local: _Local) -> None:
        """Encode and upload the column deltas and the shared pseudo-gradient against the
        version the unit trained from (``base``) into ``result``; ``local``'s EF residual
        (the state the unit trained in) moves on. A part that holds its columns
        (``hold_columns``) sends the shared pseudo-gradient only: its columns' training
        stays in the local columns and goes up with a later unit's deltas."""
        columns = {} if req.unit.hold_columns else capture.columns
        for c, trained in columns.items():
            published = capture.published_columns[c]
            delta = {k: trained[k] - published[k] for k in trained}
            codec = req.column_codec or "ternary"
            # trits (stage 4): ternarize(local) as flips from the published trits
            blob, decoded = encode_bundle(
                delta, codec, kind="column", column=c, base_version=base, base=published,
                digests=False,
            )  # fmt: skip
            if codec != "trits":  # an FP latent is not what its trits leave out
                left_out = {k: (delta[k] - decoded[k]).to(CORRECTION_DTYPE) for k in delta}
                with self._local_lock:  # the trainer thread's next unit may read it
                    local.unsent[c] = (trained, left_out)
            result.column_deltas.add(column=c, delta=io.upload(blob))
        sent = send_with_feedback(
            capture.shared_progress(),
            local.residual,
            req.shared_codec or "ternary",
            kind="shared",
            column=-1,
            base_version=base,
            threshold=req.shared_threshold or THRESHOLD_FACTOR,
        )
        with self._local_lock:
            local.residual = sent.residual
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in sent.pending.values())))
        result.shared_update.blob.CopyFrom(io.upload(sent.bundle))
        result.shared_update.norm = norm
        result.shared_update.base_version = base


def expert_lr_scale(unit: federation_pb2.WorkUnit) -> float:
    """The factor on ``unit.lr`` its expert columns train at. 0 (unset) comes from a
    coordinator older than ``WorkUnit.expert_lr_scale``, whose experts trained at the lr."""
    return unit.expert_lr_scale or 1.0


def model_columns(model: PerspectiveModel) -> list[int]:
    """Expert columns a (possibly partial) MoE model holds."""
    for layer in model.layers:
        experts = getattr(getattr(layer, "ffn", None), "experts", None)
        if experts is not None:
            return [int(k) for k in experts]
    return []


def _documents_by_column(unit, columns: list[int]) -> dict[int, list[int]]:
    """The unit's document ids per column (``WorkUnit.documents``), in the unit's order."""
    out: dict[int, list[int]] = {c: [] for c in columns}
    for ref in unit.documents:
        if ref.column not in out:
            raise UnitError(
                f"document {ref.doc} is routed to column {ref.column}, not one of {columns}"
            )
        out[ref.column].append(int(ref.doc))
    return out
