"""The coordinator process: database, blob store and service, stage set-up, federation.

:class:`Coordinator` owns what one coordinator host runs (DESIGN §5): the SQLAlchemy
database, the content-addressed blob store served by the gRPC blob service, and the
federated stages, which it drives through a Flower driver. It is used by
``perspective coordinator serve`` and by ``perspective demo``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from coordinator.blob_gc import collect_blobs
from coordinator.blob_server import BlobServer, TlsConfig
from coordinator.central.checkpoint import check_corpus_tokenizer, load_checkpoint
from coordinator.db import init_db, make_session_factory
from coordinator.db import leases as db_leases
from coordinator.db import versions as db_versions
from coordinator.db.leases import StageRate
from coordinator.federation import FederationLoop
from coordinator.federation_settings import FederationSettings, FederationSettingsError, LoopStats
from coordinator.leasing import UnitFactory
from coordinator.publishing import CoordinatorState
from coordinator.result_inbox import ResultInbox
from coordinator.routing.assignment import ColumnAssignment, initial_assignment
from coordinator.routing.rescoring import restore_labels
from coordinator.unit_handoff import UnitHandoff
from shared_model.blobs import BlobNotFound, BlobStore, GcReport, NotAccepting
from shared_model.config import PerspectiveConfig
from shared_model.data import PreparedCorpus
from shared_model.files import write_json_atomic
from shared_model.model import PerspectiveModel
from shared_model.processes import write_secret_file
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

log = logging.getLogger(__name__)
NETWORK_FILE = "network.json"  # written by prepare(), read by the export


@dataclass
class StageBudget:
    """When a federated stage ends: whichever of tokens or minutes comes first."""

    tokens: int | None = None
    minutes: float | None = None
    started: float = field(default_factory=time.monotonic)
    #: monotonic seconds (``started`` is on it; a replay of recorded stages passes its own)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def progress(self, stats: LoopStats) -> float:
        """Fraction of the budget used, in [0, 1+]."""
        parts = []
        if self.tokens:
            parts.append(stats.tokens / self.tokens)
        if self.minutes:
            parts.append((self.clock() - self.started) / (60 * self.minutes))
        return max(parts) if parts else 0.0

    def schedule_steps(
        self,
        tokens_per_step: int,
        settings: FederationSettings,
        prior_steps_per_minute: float | None = None,
    ) -> int | Callable[[int, StageRate | None], int]:
        """Length of the stage's lr / ternary schedules in inner optimiser steps.

        With a token budget: its steps (the central trainer's schedule over the same
        tokens). With only minutes: a function of the unit's position (steps leased before
        it) and the stage's :class:`~coordinator.db.leases.StageRate`, estimating the steps
        the stage will have trained when it ends: those no longer in flight, plus what the
        recent answer rate answers in the time left, plus the unit each node is training
        then (the end finishes it and drops the rest). Replayed on 14 stages of 7 recorded
        demos against the steps they did train (``benchmarks/schedule_replay.py``), this
        places a unit 0.049 of a stage from its right place on average, against 0.073 for
        the rate since the first answer, whose schedule ended early in 13 of the 14 stages
        (the finishing units uncounted; on ``small`` stage 4's units sped up twofold). A
        unit's place in the schedule never goes back: a rate that rises lengthens the
        schedule, and the next unit keeps at least the last one's share. Until as many
        steps are answered as are in flight for the first time, or before two answers, the
        fallback holds: the minutes at ``prior_steps_per_minute`` (the previous stage's
        measured rate), else, as with neither budget, ``units_hint`` units of
        ``steps_per_unit``.
        """
        if self.tokens:
            return max(1, math.ceil(self.tokens / tokens_per_step))
        fallback = settings.units_hint * settings.steps_per_unit
        if not self.minutes:
            return fallback
        if prior_steps_per_minute:
            fallback = max(1, round(prior_steps_per_minute * self.minutes))
        started_up = False  # the start-up guard has let the extrapolation in
        reached = 0.0  # the furthest share of the schedule a unit was placed at

        def extrapolated(position: int, rate: StageRate | None = None) -> int:
            nonlocal started_up, reached
            total = fallback
            done = position - rate.in_flight if rate else 0  # answered, refused, given up
            # Past the start-up for good: a batch of leases later raises in_flight above
            # the steps answered again, and falling back then sent the schedule backwards
            # (a small demo's stage 4 went 1.0 -> 0.75 -> 1.0 ternary).
            if rate and rate.per_s and done > 0 and (started_up or done >= rate.in_flight):
                started_up = True
                left = max(0.0, self.started + 60 * self.minutes - self.clock())
                total = max(position + 1, round(done + rate.per_s * left + rate.finishing))
            if reached > 0:
                total = min(total, max(1, math.floor(position / reached)))
            reached = max(reached, min(1.0, position / total))
            return total

        return extrapolated


class Coordinator:
    """Database + blob service + federated stages of one coordinator."""

    def __init__(
        self,
        cfg: PerspectiveConfig,
        work_dir: str | Path,
        corpus: PreparedCorpus,
        *,
        db_url: str | None = None,
        blob_host: str = "127.0.0.1",
        blob_port: int = 0,
        blob_tls: TlsConfig | None = None,
        blob_public_host: str | None = None,
        token_key: bytes | None = None,
    ) -> None:
        """Open the database and blob store (nothing listens before :meth:`start`).

        Args:
            cfg: Model/training configuration (must match the participants').
            work_dir: Blob store, state checkpoint and (default) SQLite database.
            corpus: Prepared training corpus (shards are published as blobs).
            db_url: SQLAlchemy URL (SQLite or PostgreSQL); default ``work_dir/coordinator.db``.
            blob_host: Interface the blob service binds.
            blob_port: Its port (0: any free port).
            blob_tls: Certificate and key of the blob service (``None``: plain, loopback).
            blob_public_host: Host name participants dial for blobs (must be in the
                certificate); default: ``blob_host``.
            token_key: Key signing blob capability tokens; default ``work_dir/token.key``.
        """
        self.cfg, self.corpus = cfg, corpus
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{self.work_dir / 'coordinator.db'}"
        self.engine = init_db(self.db_url)
        self.session_factory = make_session_factory(self.engine)
        self.store = BlobStore(self.work_dir / "blobs")
        self.token_key = token_key or write_secret_file(self.work_dir / "token.key").read_bytes()
        # A Submit waits here for the units its freed slot gets (coordinator.unit_handoff).
        self.handoff = UnitHandoff()
        self.blob_server = BlobServer(
            self.store,
            self.token_key,
            host=blob_host,
            port=blob_port,
            tls=blob_tls,
            kind_of=self.blob_kind,
            head=self.head,
            published=self.is_published,
            submit=self.submit,
            handoff=self.handoff,
        )
        self.inbox = ResultInbox()  # results from Submit, for the running stage's loop
        self._pinned_kinds: dict[str, str] = {}  # shards ("data"), stage 4's teacher
        self.blob_public_host = blob_public_host
        self.api = None
        self.state: CoordinatorState | None = None
        self.state_settings: FederationSettings | None = None
        self.assignment: ColumnAssignment | None = None
        self.loop: FederationLoop | None = None

    def blob_kind(self, content_id: str) -> str:
        """What a blob is, for the traffic split: ``data`` (training shards), ``teacher``
        (stage 4's teacher checkpoint), ``delta`` (versions), ``checkpoint``, ``other``."""
        kind = self._pinned_kinds.get(content_id)
        if kind is None and self.state is not None:
            kind = self.state.publisher.kinds.get(content_id)
        return kind or "other"

    def is_published(self, content_id: str) -> bool:
        """Whether participants may read the blob with their units' tokens: the versions
        and checkpoints the coordinator published, the training shards and stage 4's
        teacher; never another participant's upload."""
        return self.blob_kind(content_id) != "other"

    def head(self, from_version: int) -> tuple[int, tensor_pb2.BlobRef, list[tensor_pb2.BlobRef]]:
        """The blob service's ``Head``: the newest version and its chain from
        ``from_version`` (:meth:`~coordinator.publishing.Publisher.head`)."""
        if self.state is None:
            raise BlobNotFound("no federated stage is prepared: nothing is published yet")
        return self.state.publisher.head(from_version)

    def submit(self, node_id: int, result, capability=None) -> int:
        """The blob service's ``Submit``: queue a result (and the capability the node
        reported with it) for the running stage's intake (:mod:`coordinator.result_inbox`);
        returns the node's results waiting there."""
        if self.loop is None or self.loop.ended:
            raise NotAccepting("no federated stage runs: send the result with the reply")
        return self.inbox.put(node_id, result, capability)  # InboxFull: RESOURCE_EXHAUSTED

    def traffic(self) -> dict[str, int]:
        """Bytes the blob service sent per kind of blob (:meth:`blob_kind`) and received
        (``up``), since this process started."""
        stats = self.blob_server.stats()
        out = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("bytes_sent.")}
        out["up"] = stats.get("bytes_received", 0)
        return out

    def start(self) -> None:
        """Start the blob service."""
        self.blob_server.start()
        self.blob_server.wait_until_ready()

    @property
    def blob_address(self) -> str:
        """``host:port`` participants dial for blobs (after :meth:`start`)."""
        if self.blob_public_host is None:
            return self.blob_server.address
        return f"{self.blob_public_host}:{self.blob_server.port}"

    def start_api(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ca_cert: Path | None = None,
        fleet_address: str | None = None,
        ssl_files: tuple[Path, Path] | None = None,
        read_requires_token: bool = False,
    ) -> str:
        """Serve the REST API and dashboard on the same database; returns its URL.

        Args:
            host: Interface to bind.
            port: Port (0: any free port).
            ca_cert: The network's CA, handed to enrolling volunteers.
            fleet_address: Public Fleet API address handed to enrolling volunteers.
            ssl_files: ``(certificate, key)`` to serve HTTPS; ``None``: plain HTTP.
            read_requires_token: reads (API, blobs, ``/metrics``) need a read/operator token.
        """
        from coordinator.api import ApiSettings, create_app
        from coordinator.serve_api import ApiServer

        settings = ApiSettings(
            blob_root=self.store.root, ca_cert_path=ca_cert, fleet_address=fleet_address,
            read_requires_token=read_requires_token,
        )  # fmt: skip
        cert, key = ssl_files or (None, None)
        app = create_app(self.session_factory, settings, blob_published=self.is_published)
        self.api = ApiServer(app, host=host, port=port, ssl_certfile=cert, ssl_keyfile=key)
        self.api.start()
        self.api.wait_until_ready()
        return self.api.url

    def shutdown(self) -> None:
        """Stop the API, the blob service and release the database."""
        if self.api is not None:
            self.api.shutdown()
        self.blob_server.shutdown()
        self.engine.dispose()

    # --- stages ------------------------------------------------------------------------------

    def prepare(self, moe_checkpoint: str | Path, settings: FederationSettings) -> None:
        """Load the stage-2 (or later) MoE checkpoint, shards and the initial routing.

        The coordinator state (aggregators, publishing) takes its knobs from ``settings``;
        every later :meth:`federated_stage` must agree with them (:data:`STATE_KNOBS`).
        """
        ckpt = load_checkpoint(moe_checkpoint)
        check_corpus_tokenizer(ckpt, self.corpus, checkpoint=moe_checkpoint)
        model = PerspectiveModel(self.cfg, moe=True)
        model.load_state_dict(ckpt.model_state, strict=True)
        train = self.corpus.dataset("train")
        self.val = self.corpus.dataset("val")
        n = self.cfg.moe.n_experts
        self.assignment = initial_assignment(model, train, n, seed=self.cfg.train.seed)
        with self.session_factory() as s:  # a restart continues with the re-scored routing
            epoch = restore_labels(s, self.assignment)
        if epoch is not None:
            log.info("document routing: re-scored epoch %d restored", epoch)
        self.shards = [self._put_file(p) for p in self._shard_files("train")]
        self._pinned_kinds.update({s.content_id: "data" for s in self.shards})
        state_path = self._state_path(settings)
        self.state = CoordinatorState(self.cfg, model, self.store, settings)
        self.state_settings = settings
        if state_path.exists():
            self.state.load(state_path)
        self._record_initial_version()
        self._record_network()

    def _record_network(self) -> None:
        """``work_dir/network.json``: the model config and corpus of this network, what
        ``perspective coordinator export`` needs to turn a version into a checkpoint."""
        record = {
            "config": self.cfg.to_dict(),
            "corpus": {
                "source": self.corpus.manifest.get("source"),
                "root": str(self.corpus.root),
                "tokenizer_sha256": self.corpus.tokenizer_sha256,
            },
        }
        path = self.work_dir / NETWORK_FILE
        write_json_atomic(path, record)

    def _state_path(self, settings: FederationSettings) -> Path:
        return settings.state_path or self.work_dir / "state.safetensors"

    def _record_initial_version(self) -> None:
        """Version 0 (the stage-2 weights) exists in the database before any unit is leased."""
        with self.session_factory.begin() as s:
            if db_versions.lock_latest_version(s) is not None:
                return
            ckpt = self.state.publisher.checkpoints[0].content_id
            db_versions.publish_version(
                s, parent=None, checksum=ckpt, checkpoint_id=ckpt, stage="stage2", metrics={}
            )

    def _shard_files(self, split: str) -> list[Path]:
        return [
            self.corpus.root / "shards" / f"{cid}.shard" for cid in self.corpus.shard_ids(split)
        ]

    def _put_file(self, path: Path) -> tensor_pb2.BlobRef:
        cid = self.store.put_file(path)
        return tensor_pb2.BlobRef(content_id=cid, size=path.stat().st_size)

    def federated_stage(
        self, driver, budget: StageBudget, settings: FederationSettings
    ) -> FederationLoop:
        """Build the loop for federated stage ``settings.stage`` (3 or 4) on the prepared state;
        units other stages still hold leased are failed first (their results would be
        refused; :func:`coordinator.db.leases.end_other_stages`).

        Raises:
            FederationSettingsError: ``settings`` disagree with :meth:`prepare`'s on a knob
                the coordinator state already holds.
        """
        assert self.state is not None and self.assignment is not None, "call prepare() first"
        _check_state_knobs(self.state_settings, settings)
        stage = settings.stage
        with self.session_factory.begin() as s:  # their results would be refused now
            db_leases.end_other_stages(s, stage=f"stage{stage}", max_attempts=settings.max_attempts)
        teacher = None
        if stage == 4:  # the boundary's weights, or after a restart the saved teacher
            teacher = self.state.publisher.teacher_checkpoint()
            self._pin_teacher(teacher)
        else:
            self.state.publisher.teacher = None
        units = self._unit_factory(settings, budget, teacher)
        settings = replace(settings, state_path=self._state_path(settings))
        self.loop = FederationLoop(
            self.state,
            settings,
            self.session_factory,
            driver,
            units,
            self.val,
            self.assignment,
            budget.progress,
            inbox=self.inbox,
            handoff=self.handoff,
        )
        self.loop.on_checkpoint = lambda: self.collect_blobs(settings, teacher)
        return self.loop

    def _unit_factory(
        self, settings: FederationSettings, budget: StageBudget, teacher
    ) -> UnitFactory:
        """The stage's units: sized, scheduled and addressed as ``settings`` and ``budget``
        say (``teacher``: stage 4's checkpoint reference, else ``None``)."""
        stage = settings.stage
        step_tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
        return UnitFactory(
            cfg=self.cfg,
            stage=stage,
            steps_per_unit=settings.steps_per_unit,
            docs_per_unit=settings.docs_per_unit,
            assignment=self.assignment,
            shards=self.shards,
            eot_id=self.corpus.eot_id,
            blob_address=self.blob_address,
            token_key=self.token_key,
            lease_seconds=settings.lease_seconds,
            column_codec=settings.column_codec,
            ternary_column_codec=settings.ternary_column_codec,
            shared_codec=settings.shared_codec,
            shared_threshold=settings.shared_threshold,
            eager_scale=settings.eager_updates * settings.outer_lr / settings.buffer_size,
            max_staleness=settings.max_staleness,
            network_id=self._network_id(),
            shared_sync_every=settings.shared_sync_every,
            teacher=teacher,
            schedule_steps=budget.schedule_steps(
                step_tokens, settings, self._previous_stage_rate(stage)
            ),
            step_budget=math.ceil(budget.tokens / step_tokens) if budget.tokens else None,
        )

    def _network_id(self) -> str:
        with self.session_factory() as s:
            return db_versions.network_id(s)

    def _previous_stage_rate(self, stage: int) -> float | None:
        """Inner steps a minute the network answered in federated stage ``stage - 1``
        (``None``: it did not run here): the prior of a time-budgeted schedule."""
        with self.session_factory() as s:
            return db_leases.stage_step_rate(s, stage=f"stage{stage - 1}")

    def _pin_teacher(self, teacher: tensor_pb2.BlobRef) -> None:
        manifest = control_pb2.CheckpointManifest.FromString(self.store.get(teacher.content_id))
        for ref in (teacher, manifest.shared, *manifest.columns.values()):
            self._pinned_kinds[ref.content_id] = "teacher"

    def collect_blobs(
        self, settings: FederationSettings, teacher: tensor_pb2.BlobRef | None = None
    ) -> GcReport:
        """Delete blobs nobody needs any more (:mod:`coordinator.blob_gc`); after a save.

        Pinned: the training shards and stage 4's teacher. Blobs younger than two leases
        are kept: an upload is named by its reply only within its unit's lease.
        """
        assert self.state is not None, "call prepare() first"
        return collect_blobs(
            self.state,
            self.session_factory,
            max_staleness=settings.max_staleness,
            min_age_s=2 * settings.lease_seconds,
            pinned=[s.content_id for s in self.shards],
            pinned_checkpoints=[teacher] if teacher is not None else [],
        )


# Knobs the coordinator state is built with in prepare(); a stage cannot change them.
STATE_KNOBS = (
    "shared_codec",
    "shared_threshold",
    "column_codec",
    "buffer_size",
    "max_staleness",
    "staleness_grace",
    "checkpoint_every",
    "outer_lr",
    "outer_momentum",
    "trim",
    "aggregator",
    "clip_factor",
    "diversity_lr",
)


def _check_state_knobs(prepared: FederationSettings, stage: FederationSettings) -> None:
    differ = [k for k in STATE_KNOBS if getattr(prepared, k) != getattr(stage, k)]
    if differ:
        raise FederationSettingsError(
            f"settings of stage {stage.stage} change {', '.join(differ)}, which the coordinator "
            "state was prepared with; use the same values (or a new coordinator)"
        )


def demo_corpus_bytes(preset: str) -> int | None:
    """How much of the stdlib corpus a preset uses (tiny: a few MB are plenty)."""
    return 3_000_000 if preset == "tiny" else None


def stage_corpus(source: str, cfg: PerspectiveConfig, work_dir: str | Path) -> PreparedCorpus:
    """The corpus a federated network trains on, as ``serve --data`` / ``demo --data`` name it.

    ``stdlib`` is the demo corpus (shared cache, a few MB for ``tiny``); anything else is
    the operator's own data (:data:`shared_model.data.SOURCE_HELP`), prepared once under
    ``work_dir/corpus`` (tokenizer, shards, held-out split by document) and reused while
    its documents are unchanged.

    Raises:
        DataError / TokenizerError: missing, unreadable, empty or unusable source.
    """
    from shared_model.data import prepare_corpus

    vocab = cfg.model.vocab_size
    if source == "stdlib":
        return prepare_corpus("stdlib", vocab, max_bytes=demo_corpus_bytes(cfg.name))
    if not source.startswith("hf:"):
        source = str(Path(source).expanduser().resolve())  # stage jobs re-read it elsewhere
    return prepare_corpus(source, vocab, data_dir=Path(work_dir) / "corpus")


def default_columns_per_participant(n_experts: int, n_participants: int) -> int:
    """Columns each participant should hold so every column is trained."""
    return max(1, math.ceil(n_experts / max(n_participants, 1)))
