"""The participant's message handler: pipelined units so Flower's polling is hidden.

A SuperNode hands its worker one message at a time and polls the SuperLink every 3 s.
If the participant trained inside the handler, every unit would pay that poll. Instead
the coordinator keeps several units in flight per participant (``max_in_flight``), and

* ``train.unit``: the handler queues the unit, waits until the trainer thread has
  *started* it (immediately when idle, else when the previous unit finishes) and replies
  with every result finished since the last reply — usually the previous unit's;
* ``query.collect``: waits until the queue is drained and replies with what is left;
  with ``drop_queued`` (the stage's time is up) it first drops the queued units, reported
  as failed, and waits only for the unit in progress.

So the trainer always has the next unit locally and never waits for the network; a
result travels one unit later, which the coordinator's staleness weights account for.

When the coordinator asks for it (``ControlRequest.submit_results``), each result goes to
the blob service's ``Submit`` the moment it is finished, under its unit's token, and a
``train.unit`` is answered as soon as it is queued: the SuperNode fetches the next message
while this one trains, and no result waits for Flower's next poll. A submitted result is
left out of replies for ``RESEND_AFTER_S`` (its ack normally comes first); one the blob
service refused goes with the next reply, as before. A separate thread encodes, uploads
and submits, so the trainer starts its next queued unit at once, and asks for units: the
``Submit`` reply
brings the units the freed slot gets (and acks), queued as a ``train.unit`` message's
would be, without waiting for Flower's next poll (:mod:`coordinator.unit_handoff`).

Delivery is acknowledged: a result stays in the outbox (:mod:`participant.outbox`) until a
later ``ControlRequest`` carries its ``WorkAck``, and a reply re-sends every result not
acknowledged yet, except one sent in the reply just before (its ack is normally on the
way: that message was pushed before the coordinator saw the result).

Limits enforced here: torch threads (set in the trainer thread, where the work runs), the
bandwidth cap (one :class:`~participant.limits.TokenBucket` shared by every blob client),
the cache cap (eviction after each unit) and the device. Progress, traffic and credit go
to ``progress.json`` (:mod:`participant.progress`) for ``perspective participant status``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from participant.limits import TokenBucket
from participant.outbox import ResultOutbox
from participant.prefetch import Round, VersionPrefetcher, prefetch_steps
from participant.progress import ProgressWriter
from participant.unit_trainer import BlobIO, TrainedUnit, UnitTrainer, expert_lr_scale
from shared_model.blobs import BlobClient, BlobError, BlobStore
from shared_model.blobs.store import sha256_hex
from shared_model.config import PerspectiveConfig
from shared_model.data import DocumentDataset
from shared_model.shards import decode_shard
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2, tensor_pb2

log = logging.getLogger(__name__)
WAIT_S = 3600.0
#: Most results one reply carries (the rest go with the next replies).
MAX_RESULTS_PER_REPLY = 64
#: A submitted result not acknowledged this long after goes with the replies again.
RESEND_AFTER_S = 30.0
#: How long :meth:`ParticipantRuntime.shutdown` waits for the last results' ``Submit``.
SUBMIT_GRACE_S = 10.0
PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class WorkerConfigError(ValueError):
    """A worker option is unusable (says which and how to fix it)."""


def load_ca_file(path: str | Path) -> bytes:
    """PEM bytes of the CA that signs the blob service's certificate.

    Raises:
        WorkerConfigError: The file cannot be read or holds no PEM certificate.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as err:
        raise WorkerConfigError(
            f"cannot read the CA file {path}: {err.strerror or err}; pass the CA from "
            "enrolment (ca.crt in the participant's state directory)"
        ) from None
    if PEM_CERT not in pem:
        raise WorkerConfigError(
            f"{path} holds no PEM certificate ('{PEM_CERT.decode()}' missing); pass the CA "
            "from enrolment (ca.crt in the participant's state directory)"
        )
    return pem


class ParticipantRuntime:
    """Queues work units and trains them in a background thread.

    Args:
        cfg: Model configuration (must match the coordinator's).
        state_dir: Cache, trainer state and ``progress.json`` live here.
        max_columns: Most expert columns to hold (reported to the scheduler).
        threads: torch threads for training.
        cache_cap_bytes: Evict the blob cache to this size after every unit.
        device: Training device (``cpu``, ``cuda``, ``mps``).
        bandwidth_mbps: Cap on blob traffic, both directions together (Mbit/s).
        tls_root_cert: PEM of the CA of the blob service's certificate (``None``: no TLS).
    """

    def __init__(
        self,
        cfg: PerspectiveConfig,
        state_dir: str | Path,
        *,
        max_columns: int = 4,
        threads: int = 1,
        cache_cap_bytes: int | None = None,
        device: str = "cpu",
        bandwidth_mbps: float | None = None,
        tls_root_cert: bytes | None = None,
    ) -> None:
        self.cfg, self.state_dir = cfg, Path(state_dir)
        self.max_columns, self.threads, self.device = max_columns, threads, device
        self.cache = BlobStore(self.state_dir / "cache")
        self.cache_cap_bytes = cache_cap_bytes
        self.rate_limiter = TokenBucket.from_mbps(bandwidth_mbps) if bandwidth_mbps else None
        self.tls_root_cert = tls_root_cert
        self.progress = ProgressWriter(self.state_dir)
        self.effective_threads: int | None = None
        self.trainer: UnitTrainer | None = None
        self._dataset_key: tuple[str, ...] = ()
        self._queue: queue.Queue[control_pb2.ControlRequest | None] = queue.Queue()
        self._cond = threading.Condition()
        self._started: set[str] = set()
        # Results finished but not acknowledged yet; the outbox keeps them across restarts.
        self.outbox = ResultOutbox(self.state_dir / "outbox")
        self._unacked = {r.unit_id: r for r in self.outbox.pending()}
        self._sent_in: dict[str, int] = {}  # unit id -> number of the reply that last carried it
        self._submitted: dict[str, float] = {}  # unit id -> monotonic time of its Submit
        self._replies = 0
        if self._unacked:
            log.info("%d result(s) of the last run go with the next reply", len(self._unacked))
        self._failures: list[tuple[str, str]] = []
        self._busy = False
        self._bytes_down = 0
        # A finished unit's blobs and result are sent from their own thread: the trainer
        # starts its next unit at once, while they upload and ``Submit`` waits for the
        # units the freed slot gets.
        self._to_send: queue.Queue[_Finished | None] = queue.Queue()
        self._sending = 0  # finished units handed to the sender and not sent yet
        self._stopping = False
        # While a unit trains, the versions published meanwhile are fetched and applied to a
        # view of the trainer's replica, which the next unit adopts: its sync waits for
        # neither the round trips nor the decoding.
        self.prefetcher = VersionPrefetcher(
            lambda address, token: self.open_blob_client(address, token, max_retries=1),
            lambda client, cid: self._fetch(client, cid),
        )
        self.prefetcher.start()
        self._thread = threading.Thread(target=self._work, name="unit-trainer", daemon=True)
        self._thread.start()
        self._sender = threading.Thread(
            target=self._send_results, name="result-sender", daemon=True
        )
        self._sender.start()

    # --- Flower handler ---------------------------------------------------------------------

    def handle(self, kind: str, payload: bytes) -> bytes:
        """Handle one Flower message; returns the serialised :class:`ControlReply`."""
        req = control_pb2.ControlRequest.FromString(payload)
        self._take_acks(req.acks)
        if kind == "train.unit" or req.credit_tokens:  # a bare collect may leave it unset
            self.progress.set_credit(req.credit_tokens)
        if kind == "train.unit" and req.WhichOneof("body") == "unit":
            uid = req.unit.unit_id
            self._enqueue(req)
            if not req.submit_results:  # else its result does not need this message's reply
                with self._cond:
                    self._cond.wait_for(lambda: uid in self._started, timeout=WAIT_S)
        elif kind == "query.collect":
            if req.drop_queued:
                self._drop_queued("stage ended: its time is up")
            with self._cond:
                self._cond.wait_for(self._idle, timeout=WAIT_S)
        else:
            raise ValueError(
                f"unsupported message kind {kind!r} with body {req.WhichOneof('body')}"
            )
        return self._reply().SerializeToString()

    def _enqueue(self, req: control_pb2.ControlRequest) -> None:
        """Queue a message's unit and the batch behind it (``more_units``), in order."""
        self._drop_orphans(req.blob_address)
        self._queue.put(req)
        for more in req.more_units:
            if more.WhichOneof("body") == "unit" and not more.more_units:
                self._queue.put(more)

    def _take_units(self, req: control_pb2.ControlRequest) -> None:
        """Units (and acks) that came in the reply to a ``Submit``, as a ``train.unit``
        message would bring them (:mod:`coordinator.unit_handoff`)."""
        self._take_acks(req.acks)
        if req.credit_tokens:
            self.progress.set_credit(req.credit_tokens)
        if req.WhichOneof("body") == "unit":
            self._enqueue(req)

    def _idle(self) -> bool:
        """Nothing queued, trained or sent (call with ``_cond`` held)."""
        return self._queue.empty() and not self._busy and not self._sending

    def _drop_orphans(self, blob_address: str) -> None:
        """Drop queued units of a coordinator process that is gone: a unit's blob service
        moved (a restarted ``serve`` on another port), so they could only fail after
        retrying a dead address. Reported as failed; the coordinator re-issued them."""
        why = f"coordinator restarted: its blob service moved to {blob_address}"
        self._drop_queued(why, lambda req: req.blob_address != blob_address)

    def _drop_queued(self, why: str, which=lambda req: True) -> None:
        """Take the queued units ``which`` selects off the queue; each is reported as a
        failed unit with ``why`` in the next reply."""
        keep, dropped = [], []
        with contextlib.suppress(queue.Empty):
            while True:
                req = self._queue.get_nowait()
                (dropped if req is not None and which(req) else keep).append(req)
        for req in keep:
            self._queue.put(req)
        if not dropped:
            return
        log.info("dropping %d queued unit(s): %s", len(dropped), why)
        with self._cond:
            self._failures.extend((req.unit.unit_id, why) for req in dropped)
            self._cond.notify_all()

    def _take_acks(self, acks) -> None:
        """Forget the results the coordinator has decided (it committed before acking)."""
        for ack in acks:
            with self._cond:
                known = self._unacked.pop(ack.unit_id, None) is not None
                self._sent_in.pop(ack.unit_id, None)
                self._submitted.pop(ack.unit_id, None)
            if known and self.outbox.acknowledged(ack) and not ack.accepted:
                log.warning(
                    "result %s refused by the coordinator: %s %s",
                    ack.unit_id,
                    ack.reason_code,
                    ack.detail,
                )

    def _results_to_send(self) -> list[federation_pb2.WorkResult]:
        """Unacknowledged results for this reply (call with ``_cond`` held)."""
        self._replies += 1
        resend = time.monotonic() - RESEND_AFTER_S
        due = [
            result
            for uid, result in self._unacked.items()
            if self._sent_in.get(uid, -2) < self._replies - 1
            and self._submitted.get(uid, -math.inf) < resend
        ][:MAX_RESULTS_PER_REPLY]
        for result in due:
            self._sent_in[result.unit_id] = self._replies
        return due

    def _reply(self) -> control_pb2.ControlReply:
        with self._cond:
            results = self._results_to_send()
            failures, self._failures = self._failures, []
            bytes_down, self._bytes_down = self._bytes_down, 0
        reply = control_pb2.ControlReply(
            results=results, queued_units=self._queue.qsize(), bytes_down=bytes_down
        )
        reply.failed_units.extend(uid for uid, _ in failures)
        reply.failure_reasons.extend(why for _, why in failures)
        reply.submits_results = True
        reply.capability.CopyFrom(self._capability())
        if self.trainer is not None:
            reply.synced_version = self.trainer.replica.version or 0
        return reply

    def _capability(self) -> control_pb2.NodeCapability:
        """What this node reports with each reply and ``Submit``: columns it holds, threads,
        device, RAM and its training speed (over its last unit's training)."""
        cap = control_pb2.NodeCapability(
            max_columns=self.max_columns,
            threads=self.threads,
            device=self.device,
            ram_bytes=psutil.virtual_memory().total,
        )
        if self.trainer is not None:
            cap.tokens_per_s = self.trainer.tokens_per_s
        return cap

    def shutdown(self, grace_s: float = WAIT_S) -> bool:
        """Stop: drop queued units, give the unit in progress ``grace_s`` seconds to finish.

        Dropped units come back from the coordinator when their leases expire; a finished
        result not acknowledged yet waits in the outbox for the first reply after the next
        start. A unit still
        running after ``grace_s`` is abandoned with the process: the local state on disk is
        that of the last finished unit (it is saved atomically), and its lease expires.

        Returns:
            Whether the trainer stopped within ``grace_s``.
        """
        dropped = []
        with contextlib.suppress(queue.Empty):
            while True:
                req = self._queue.get_nowait()
                if req is not None:
                    dropped.append(req.unit.unit_id)
        if dropped:
            log.info("stopping: dropped queued units %s (the coordinator re-issues them)", dropped)
        self._stopping = True  # the last results ask for no units
        self._queue.put(None)
        self._thread.join(timeout=grace_s)
        stopped = not self._thread.is_alive()
        self.prefetcher.shutdown()
        self._to_send.put(None)  # after the last result: it is still sent
        self._sender.join(timeout=min(grace_s, SUBMIT_GRACE_S))
        return stopped

    # --- trainer thread ------------------------------------------------------------------

    def _work(self) -> None:
        # Set in this thread: it is the one whose intra-op pool runs the training.
        torch.set_num_threads(self.threads)
        self.effective_threads = torch.get_num_threads()
        self.progress.set_worker(self.effective_threads, self.device)
        # The first torch optimizer imports torch._dynamo (1.4-2.4 s on the 2-core demo
        # machine): imported now, while Flower connects, not in the first unit's sync.
        importlib.import_module("torch._dynamo")
        while True:
            req = self._queue.get()
            if req is None:
                return
            uid = req.unit.unit_id
            with self._cond:
                self._busy = True
                self._started.add(uid)
                self._cond.notify_all()
            lr = req.unit.lr
            self.progress.start_unit(
                uid, req.unit.stage, req.unit.steps, lr, lr * expert_lr_scale(req.unit)
            )
            try:
                self._run(req)
                self.progress.finish_unit(ok=True)
            except Exception as exc:  # report the failure; the coordinator re-issues the unit
                log.exception("unit %s failed", uid)
                why = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self._failures.append((uid, why))
                self.progress.finish_unit(ok=False, error=why)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def open_blob_client(self, address: str, token: str, max_retries: int = 5) -> BlobClient:
        """A blob client with this worker's cache, bandwidth cap and TLS root."""
        return BlobClient(
            address,
            token=token,
            cache=self.cache,
            tls_root_cert=self.tls_root_cert,
            rate_limiter=self.rate_limiter,
            max_retries=max_retries,
        )

    def _run(self, req: control_pb2.ControlRequest) -> None:
        """Train the unit; the sender thread encodes it, uploads its blobs and sends its
        result (:meth:`_send_results`) while the next unit trains."""
        client = self.open_blob_client(req.blob_address, req.unit.capability_token)
        blobs: list[bytes] = []
        fetches = [0]  # blobs this unit fetched over the network
        try:
            io = BlobIO(
                fetch=lambda ref: self._fetch(client, ref.content_id, fetches),
                upload=lambda data: _deferred(data, blobs),
                head=client.head,
            )
            trainer = self._trainer_for(req, io)
            ahead = self.prefetcher.take()  # synced while the unit before trained
            if req.unit.start_from_newest:  # else the unit's base may be older than it
                trainer.adopt(ahead)
            fetches[0] = 0  # the shards' fetch is not the sync's
            trained = trainer.train(req, io, progress=self._progress_for(req, trainer))
        finally:
            client.close()
        trained.result.timings.sync_fetches = fetches[0]
        with self._cond:
            self._sending += 1
        self._to_send.put(_Finished(req, trained, blobs))
        if self.cache_cap_bytes is not None:
            keep = {s for s in req.unit.shard_ids}
            self.cache.evict_to(self.cache_cap_bytes, keep=keep)

    def _send_results(self) -> None:
        """The sender thread, trained units in order: encode, upload the blobs, keep the
        result in the outbox, ``Submit`` it (asking for units, queued when they come). A
        unit that cannot be encoded or uploaded is reported failed (its lease is re-issued)."""
        while True:
            item = self._to_send.get()
            if item is None:
                return
            uid = item.req.unit.unit_id
            try:
                self._send(item)
            except Exception as exc:  # noqa: BLE001 - report it; the lease is re-issued
                log.exception("unit %s could not be sent", uid)
                with self._cond:
                    if uid not in self._unacked:
                        self._failures.append((uid, f"not sent: {type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._sending -= 1
                    self._cond.notify_all()

    def _send(self, item: _Finished) -> None:
        req, result = item.req, item.trained.encode()  # io.upload put its blobs in item.blobs
        client = self.open_blob_client(req.blob_address, req.unit.capability_token)
        try:
            t0 = time.perf_counter()
            for data in item.blobs:
                client.put(data)
            result.timings.upload_s = time.perf_counter() - t0
            # written now: the unit's end (finish_unit) was written before its uploads
            self.progress.add_bytes(up=sum(len(d) for d in item.blobs), force=True)
            self.outbox.put(result)  # kept on disk before anyone hears of it
            with self._cond:
                self._unacked[result.unit_id] = result
                if req.submit_results:  # from now: a reply meanwhile must not carry it too
                    self._submitted[result.unit_id] = time.monotonic()
            units = self._submit(client, result) if req.submit_results else None
        finally:
            client.close()
        if units is not None:
            self._take_units(units)

    def _submit(
        self, client: BlobClient, result: federation_pb2.WorkResult
    ) -> control_pb2.ControlRequest | None:
        """Send the result to the coordinator's intake now (``Submit``), asking for the
        units its freed slot gets; returns them (``None``: none came). If the blob service
        refuses or cannot be reached, the result goes with the next reply instead."""
        uid = result.unit_id
        try:
            reply = client.submit(
                result, want_units=not self._stopping, capability=self._capability()
            )
        except BlobError as exc:
            log.info("result %s goes with the next reply: %s", uid, exc)
            with self._cond:
                self._submitted.pop(uid, None)
            return None
        with self._cond:  # the wait for its ack starts now (it may have come already)
            if uid in self._unacked:
                self._submitted[uid] = time.monotonic()
        return reply.units if reply.HasField("units") else None

    def _progress_for(self, req: control_pb2.ControlRequest, trainer: UnitTrainer):
        """The unit's progress callback: progress.json, and a prefetch round (the versions
        published meanwhile, fetched and applied to a view of the trainer's replica) at each
        of the steps :func:`~participant.prefetch.prefetch_steps` names."""
        # A unit that trains from its lease's base (no start_from_newest) could not use a
        # newer replica: it would reload a checkpoint to go back.
        marks = prefetch_steps(req.unit.steps) if req.unit.start_from_newest else set()

        def on_progress(phase: str, step: int, total: int, tokens: int) -> None:
            self.progress.on_progress(phase, step, total, tokens)
            # the replica does not change while the unit trains: a view of it is safe
            if phase == "train" and step in marks and trainer.replica.version is not None:
                view = trainer.replica.view()
                self.prefetcher.request(Round(req.blob_address, req.unit.capability_token, view))

        return on_progress

    def _fetch(self, client: BlobClient, content_id: str, count: list[int] | None = None) -> bytes:
        """A blob's bytes through ``client`` (its cache first); traffic is counted, and
        ``count[0]`` goes up by one when it was fetched over the network."""
        cached = self.cache.has(content_id)
        data = client.get_bytes(content_id)
        if not cached:
            with self._cond:
                self._bytes_down += len(data)
            self.progress.add_bytes(down=len(data))
            if count is not None:
                count[0] += 1
        return data

    def _trainer_for(self, req: control_pb2.ControlRequest, io: BlobIO) -> UnitTrainer:
        key = tuple(req.unit.shard_ids)
        if self.trainer is None or key != self._dataset_key:
            data = _dataset(req, io)
            if self.trainer is None:
                self.trainer = UnitTrainer(
                    self.cfg, data, self.state_dir / "trainer", device=self.device
                )
            else:
                self.trainer.data = data
            self._dataset_key = key
        return self.trainer


@dataclass
class _Finished:
    """A trained unit waiting for the sender: its request, the unit to encode, and the
    list its blobs go to (encoding fills it) for the upload."""

    req: control_pb2.ControlRequest
    trained: TrainedUnit
    blobs: list[bytes]


def _deferred(data: bytes, blobs: list[bytes]) -> tensor_pb2.BlobRef:
    """The ref of a blob the sender thread uploads later (its content id is its sha256)."""
    blobs.append(data)
    return tensor_pb2.BlobRef(content_id=sha256_hex(data), size=len(data))


def _dataset(req: control_pb2.ControlRequest, io: BlobIO) -> DocumentDataset:
    """The unit's training documents, from shards fetched (and cached) by content id."""
    shards = [
        decode_shard(io.fetch(tensor_pb2.BlobRef(content_id=cid)), expected_id=cid)
        for cid in req.unit.shard_ids
    ]
    return DocumentDataset.from_decoded(shards, req.eot_id)
