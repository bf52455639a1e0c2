"""The real federation loop with its participants in this process, on a virtual clock.

:class:`ReplayDriver` stands in for :class:`~coordinator.flower.driver.FlowerDriver` (the only
part of the loop that is replaced): every pushed unit is trained by the participant's own
:class:`~participant.unit_trainer.UnitTrainer` on the coordinator's blob store, and its reply
goes back through the loop's own intake and publishing. Time is virtual: a participant
trains its queued units one after another, each taking ``steps × step_time`` (+ a fixed
overhead for sync and upload), and replies come back in the order of their arrival times:
a unit's result arrives ``latency`` after its training ended (encode, upload and Submit)
while the node already trains its next unit, which therefore cannot start from the
version its own last result completes (over Flower it never can).
So the loop sees the same leases, the same staleness and the same publishing boundaries as
over Flower with equally fast participants, deterministically and without Flower's polling
(about 10× faster than the real thing on this machine). Benchmarks use it for sweeps; the
winners are confirmed over real Flower (``federation_bench.py --mode flower``).

Traffic is counted per participant and per kind, as the participant's cache would: a blob
already fetched costs nothing the second time. Kinds: ``data`` (training shards), ``join``
(checkpoint parts fetched by a participant that held nothing), ``checkpoint`` (checkpoint
parts fetched by one that held an older version: what the delta chain should avoid),
``delta`` (version manifests and bundles), ``teacher`` (stage 4's frozen teacher) and
``up`` (uploads).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.blob_uploads import UploadLedger
from coordinator.coordinator_process import default_columns_per_participant
from coordinator.flower.driver import Reply
from participant.unit_trainer import BlobIO, UnitTrainer
from shared_model.blobs import BlobStore
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset
from shared_model.wire.perspective.v1 import blobs_pb2, control_pb2, tensor_pb2


@dataclass
class _Node:
    trainer: UnitTrainer
    step_time: float
    queue: list[tuple[str, str, bytes, float]] = field(default_factory=list)
    free_at: float = 0.0
    seen: set[str] = field(default_factory=set)
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    train_time: float = 0.0
    down: int = 0  # bytes fetched since the last reply


class ReplayDriver:
    """Flower's place in the loop, taken by in-process participants on a virtual clock.

    Args:
        cfg: the model configuration.
        store: the coordinator's blob store (fetch and upload go straight to it).
        train: the training documents (the participants' shards hold the same).
        work_dir: each participant's trainer state lives under ``work_dir/node-<id>``.
        step_times: virtual seconds per inner step, one per participant (its speed).
        overhead: virtual seconds per unit before its training (sync).
        latency: virtual seconds from the end of a unit's training to its result reaching
            the coordinator; the node starts its next unit at once. 0: at once (a unit
            then starts from the version its predecessor's result completed, which no
            real network does: ``tiny`` over Flower measured about one version more
            staleness than the replay at 0, benchmarks/federation_bench.py).
        publisher: the coordinator's :class:`~coordinator.publishing.Publisher`: units then
            start from the newest version published by the time they *start* on the virtual
            clock, as with the real blob service's ``Head``; ``None``: from the lease's.
        max_columns: the columns each participant offers to hold; default what ``serve``'s
            local network and the demo give theirs (every column trained, no more), so the
            columns per unit, and with them the traffic mix, are the real network's.
    """

    def __init__(
        self,
        cfg: PerspectiveConfig,
        store: BlobStore,
        train: DocumentDataset,
        work_dir: Path,
        step_times: list[float],
        overhead: float = 0.0,
        latency: float = 0.0,
        publisher=None,
        max_columns: int | None = None,
    ) -> None:
        if latency < 0 or overhead < 0:
            raise ValueError(f"overhead and latency must be >= 0, got {overhead}, {latency}")
        self.store, self.overhead, self.publisher = store, overhead, publisher
        self.latency = latency
        if max_columns is None:
            max_columns = default_columns_per_participant(cfg.moe.n_experts, len(step_times))
        self.max_columns = max_columns
        # (virtual time, version) whenever the published version changed: a unit is
        # trained when it *finishes* on the virtual clock, so Head must answer with the
        # version as of its start, not the coordinator's newest at that moment.
        self._versions: list[tuple[float, int]] = []
        self.uploads = UploadLedger.for_store(store)  # what the blob service's Put records
        self._cfg, self._train, self._work_dir = cfg, train, Path(work_dir)
        self.clock = 0.0
        self.nodes: dict[int, _Node] = {}
        for t in step_times:
            self.add_node(t)
        self.unit_columns: list[int] = []  # columns of every unit trained, in order
        self._ids = itertools.count()

    def add_node(self, step_time: float) -> int:
        """A participant that comes online now on the virtual clock (a join mid-stage, when
        called from the loop's ``should_stop``); returns its node id."""
        nid = max(self.nodes, default=0) + 1
        trainer = UnitTrainer(self._cfg, self._train, self._work_dir / f"node-{nid}")
        self.nodes[nid] = _Node(trainer, step_time, free_at=self.clock)
        return nid

    # --- the FlowerDriver interface the loop uses -------------------------------------------

    def node_ids(self) -> list[int]:
        """Every participant is always online."""
        return list(self.nodes)

    def push(self, node_id: int, payload: bytes, kind: str, ttl: float) -> str:
        """Queue a message on the node; it is handled when the node gets to it."""
        mid = f"m{next(self._ids)}"
        self.nodes[node_id].queue.append((mid, kind, payload, self.clock))
        return mid

    @property
    def pending(self) -> dict[str, int]:
        """Message id → node id of every message not answered yet."""
        return {m[0]: nid for nid, n in self.nodes.items() for m in n.queue}

    def wait_any(self, timeout: float) -> list[Reply]:
        """Handle the message whose reply arrives first on the virtual clock; its reply."""
        if self.publisher is not None and (
            not self._versions or self._versions[-1][1] != self.publisher.version
        ):
            self._versions.append((self.clock, self.publisher.version))
        heads = [(self._arrival_time(n), nid) for nid, n in self.nodes.items() if n.queue]
        if not heads:
            return []
        _, nid = min(heads)
        return [self._handle(nid)]

    def close(self, failed: bool = False, details: str = "") -> None:
        """Nothing to release."""

    # --- the virtual participants ------------------------------------------------------------

    def _finish_time(self, node: _Node) -> float:
        _, kind, payload, pushed = node.queue[0]
        start = max(node.free_at, pushed)
        if kind != "train.unit":
            return start
        steps = control_pb2.ControlRequest.FromString(payload).unit.steps
        return start + self.overhead + steps * node.step_time

    def _arrival_time(self, node: _Node) -> float:
        """When the reply to the node's next message reaches the coordinator."""
        finish = self._finish_time(node)
        return finish + self.latency if node.queue[0][1] == "train.unit" else finish

    def _handle(self, nid: int) -> Reply:
        node = self.nodes[nid]
        finish, arrival = self._finish_time(node), self._arrival_time(node)
        start = max(node.free_at, node.queue[0][3])
        mid, kind, payload, _ = node.queue.pop(0)
        self.clock = max(self.clock, arrival)
        node.free_at = finish  # its next unit trains while this result travels
        req = control_pb2.ControlRequest.FromString(payload)
        reply = control_pb2.ControlReply()
        if kind == "train.unit":
            result = node.trainer.run(req, self._io(node, req, start))
            node.train_time += req.unit.steps * node.step_time
            self.unit_columns.append(len(req.unit.columns))
            reply.results.append(result)
            reply.bytes_down, node.down = node.down, 0
            reply.synced_version = node.trainer.replica.version or 0
        reply.capability.max_columns = self.max_columns
        return Reply(mid, nid, kind, reply.SerializeToString(), None, None, 0.0)

    def _io(self, node: _Node, req: control_pb2.ControlRequest, start: float) -> BlobIO:
        kinds = self._kinds(req, node)

        def fetch(ref: tensor_pb2.BlobRef) -> bytes:
            data = self.store.get(ref.content_id)
            if ref.content_id not in node.seen:
                node.seen.add(ref.content_id)
                node.bytes[kinds.get(ref.content_id, "delta")] += len(data)
                node.down += len(data)
            return data

        def upload(data: bytes) -> tensor_pb2.BlobRef:
            node.bytes["up"] += len(data)
            content_id = self.store.put_bytes(data)
            self.uploads.record(content_id, req.unit.unit_id)  # as the blob service's Put
            return tensor_pb2.BlobRef(content_id=content_id, size=len(data))

        def head(from_version: int) -> blobs_pb2.HeadReply:
            version = max(v for t, v in self._versions if t <= start)
            checkpoint, chain = self.publisher.chain_for(version, held=from_version)
            return blobs_pb2.HeadReply(version=version, checkpoint=checkpoint, versions=chain)

        return BlobIO(fetch=fetch, upload=upload, head=head if self.publisher else None)

    def _kinds(self, req: control_pb2.ControlRequest, node: _Node) -> dict[str, str]:
        """Content id → traffic kind for the blobs this request may make the node fetch.

        A checkpoint part is a ``join`` when the node never held that part (its first
        sync, or a column it takes on), else a ``checkpoint`` reload; a teacher part that is
        also such a part (a stage-4 join at the teacher's version) counts as that.
        """
        kinds = {cid: "data" for cid in req.unit.shard_ids}
        replica = node.trainer.replica
        if req.checkpoint.content_id:
            manifest = self._checkpoint(req.checkpoint)
            kinds[req.checkpoint.content_id] = "delta"  # the manifest: a few hundred bytes
            kinds[manifest.shared.content_id] = "join" if replica.version is None else "checkpoint"
            for c, ref in manifest.columns.items():
                kinds[ref.content_id] = "checkpoint" if c in replica.columns else "join"
        if req.teacher.content_id:
            manifest = self._checkpoint(req.teacher)
            for ref in (manifest.shared, *manifest.columns.values()):
                # a node that joins at the teacher's version fetches those parts as its join
                kinds.setdefault(ref.content_id, "teacher")
            kinds.setdefault(req.teacher.content_id, "delta")  # the manifest
        return kinds

    def _checkpoint(self, ref: tensor_pb2.BlobRef) -> control_pb2.CheckpointManifest:
        return control_pb2.CheckpointManifest.FromString(self.store.get(ref.content_id))

    # --- what the benchmark reports ------------------------------------------------------------

    def traffic(self) -> dict[str, int]:
        """Bytes per kind, summed over participants."""
        total: dict[str, int] = defaultdict(int)
        for node in self.nodes.values():
            for kind, n in node.bytes.items():
                total[kind] += n
        return dict(total)

    def utilisation(self) -> dict[str, float]:
        """Virtual training time / virtual wall time per participant."""
        wall = max(self.clock, 1e-9)
        return {str(nid): n.train_time / wall for nid, n in self.nodes.items()}
