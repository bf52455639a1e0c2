"""The participant's message handler: pipelined units so Flower's polling is hidden.

A SuperNode hands its worker one message at a time and polls the SuperLink every 3 s.
If the participant trained inside the handler, every unit would pay that poll. Instead
the coordinator keeps two units in flight per participant, and

* ``train.unit``: the handler queues the unit, waits until the trainer thread has
  *started* it (immediately when idle, else when the previous unit finishes) and replies
  with every result finished since the last reply — usually the previous unit's;
* ``query.collect``: waits until the queue is drained and replies with what is left.

So the trainer always has the next unit locally and never waits for the network; a
result travels one unit later, which the coordinator's staleness weights account for.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import torch

from participant.unit_trainer import BlobIO, UnitTrainer
from shared_model.blobs import BlobClient, BlobStore
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset
from shared_model.shards import decode_shard
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2, tensor_pb2

log = logging.getLogger(__name__)
WAIT_S = 3600.0


class ParticipantRuntime:
    """Queues work units and trains them in a background thread."""

    def __init__(
        self,
        cfg: PerspectiveConfig,
        state_dir: str | Path,
        *,
        max_columns: int = 4,
        threads: int = 1,
        cache_cap_bytes: int | None = None,
    ) -> None:
        self.cfg, self.state_dir = cfg, Path(state_dir)
        self.max_columns, self.threads = max_columns, threads
        self.cache = BlobStore(self.state_dir / "cache")
        self.cache_cap_bytes = cache_cap_bytes
        self.trainer: UnitTrainer | None = None
        self._dataset_key: tuple[str, ...] = ()
        self._queue: queue.Queue[control_pb2.ControlRequest | None] = queue.Queue()
        self._cond = threading.Condition()
        self._started: set[str] = set()
        self._results: list[federation_pb2.WorkResult] = []
        self._failures: list[tuple[str, str]] = []
        self._busy = False
        self._bytes_down = 0
        self._thread = threading.Thread(target=self._work, name="unit-trainer", daemon=True)
        self._thread.start()

    # --- Flower handler ---------------------------------------------------------------------

    def handle(self, kind: str, payload: bytes) -> bytes:
        """Handle one Flower message; returns the serialised :class:`ControlReply`."""
        req = control_pb2.ControlRequest.FromString(payload)
        if kind == "train.unit" and req.WhichOneof("body") == "unit":
            uid = req.unit.unit_id
            self._queue.put(req)
            with self._cond:
                self._cond.wait_for(lambda: uid in self._started, timeout=WAIT_S)
        elif kind == "query.collect":
            with self._cond:
                self._cond.wait_for(lambda: self._queue.empty() and not self._busy, timeout=WAIT_S)
        else:
            raise ValueError(
                f"unsupported message kind {kind!r} with body {req.WhichOneof('body')}"
            )
        return self._reply().SerializeToString()

    def _reply(self) -> control_pb2.ControlReply:
        with self._cond:
            results, self._results = self._results, []
            failures, self._failures = self._failures, []
            bytes_down, self._bytes_down = self._bytes_down, 0
        reply = control_pb2.ControlReply(
            results=results, queued_units=self._queue.qsize(), bytes_down=bytes_down
        )
        reply.failed_units.extend(uid for uid, _ in failures)
        reply.failure_reasons.extend(why for _, why in failures)
        reply.capability.max_columns = self.max_columns
        reply.capability.threads = self.threads
        reply.capability.device = "cpu"
        if self.trainer is not None:
            reply.capability.tokens_per_s = self.trainer.tokens_per_s
            reply.synced_version = self.trainer.replica.version or 0
        return reply

    def shutdown(self) -> None:
        """Stop the trainer thread after the unit in progress."""
        self._queue.put(None)
        self._thread.join(timeout=WAIT_S)

    # --- trainer thread ------------------------------------------------------------------

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            req = self._queue.get()
            if req is None:
                return
            uid = req.unit.unit_id
            with self._cond:
                self._busy = True
                self._started.add(uid)
                self._cond.notify_all()
            try:
                result = self._run(req)
                with self._cond:
                    self._results.append(result)
            except Exception as exc:  # report the failure; the coordinator re-issues the unit
                log.exception("unit %s failed", uid)
                with self._cond:
                    self._failures.append((uid, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, req: control_pb2.ControlRequest) -> federation_pb2.WorkResult:
        client = BlobClient(req.blob_address, token=req.unit.capability_token, cache=self.cache)
        try:
            io = BlobIO(
                fetch=lambda ref: self._fetch(client, ref.content_id),
                upload=lambda data: tensor_pb2.BlobRef(content_id=client.put(data), size=len(data)),
            )
            trainer = self._trainer_for(req, io)
            result = trainer.run(req, io)
        finally:
            client.close()
        if self.cache_cap_bytes is not None:
            keep = {s for s in req.unit.shard_ids}
            self.cache.evict_to(self.cache_cap_bytes, keep=keep)
        return result

    def _fetch(self, client: BlobClient, content_id: str) -> bytes:
        cached = self.cache.has(content_id)
        data = client.get_bytes(content_id)
        if not cached:
            with self._cond:
                self._bytes_down += len(data)
        return data

    def _trainer_for(self, req: control_pb2.ControlRequest, io: BlobIO) -> UnitTrainer:
        key = tuple(req.unit.shard_ids)
        if self.trainer is None or key != self._dataset_key:
            data = _dataset(req, io)
            if self.trainer is None:
                self.trainer = UnitTrainer(self.cfg, data, self.state_dir / "trainer")
            else:
                self.trainer.data = data
            self._dataset_key = key
        return self.trainer


def _dataset(req: control_pb2.ControlRequest, io: BlobIO) -> DocumentDataset:
    """The unit's training documents, from shards fetched (and cached) by content id."""
    shards = [
        decode_shard(io.fetch(tensor_pb2.BlobRef(content_id=cid)), expected_id=cid)
        for cid in req.unit.shard_ids
    ]
    return DocumentDataset.from_decoded(shards, req.eot_id)
