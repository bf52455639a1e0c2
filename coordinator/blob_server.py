"""gRPC blob service: serves a :class:`BlobStore` to participants (DESIGN §4 data plane).

``Get`` streams a blob in ~1 MiB chunks from any offset (resume), ``Put`` receives a
header (declared sha256 and size) and the bytes, and installs the blob only if both match
and the size fits the token's quota and the server cap (recording the token id — the
lease — of a blob's first upload: :mod:`coordinator.blob_uploads`), ``Stat`` says whether a blob
exists. Every call must carry ``authorization: Bearer <token>`` metadata with a token from
:func:`~shared_model.blobs.tokens.issue_token`; the mapping of errors to status codes is
documented in ``protos/perspective/v1/blobs.proto``.

The daemon follows hivemind's shape: construct, ``start()``, ``wait_until_ready()``,
``shutdown()``; it is also a context manager.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from coordinator.blob_uploads import UploadLedger
from coordinator.unit_handoff import UnitHandoff
from shared_model.blobs.channel import CHUNK_SIZE, GRPC_OPTIONS
from shared_model.blobs.errors import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    HashMismatch,
    InvalidContentId,
    InvalidRequest,
    NotAccepting,
    QuotaExceeded,
    ScopeDenied,
    TokenError,
    TokenMalformed,
)
from shared_model.blobs.store import BlobStore, check_content_id
from shared_model.blobs.tokens import Capability, verify_token
from shared_model.wire.perspective.v1 import blobs_pb2, blobs_pb2_grpc

log = logging.getLogger(__name__)

_STATUS_OF: list[tuple[type[BlobError], grpc.StatusCode]] = [
    (TokenError, grpc.StatusCode.UNAUTHENTICATED),
    (ScopeDenied, grpc.StatusCode.PERMISSION_DENIED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (HashMismatch, grpc.StatusCode.DATA_LOSS),
    (BlobCorrupt, grpc.StatusCode.DATA_LOSS),
    (BlobNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidContentId, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotAccepting, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(exc: BlobError) -> grpc.StatusCode:
    """gRPC status code for a domain exception (INTERNAL for unexpected ones)."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate chain and private key, PEM-encoded."""

    cert_chain: bytes
    private_key: bytes

    @classmethod
    def from_files(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]):
        """Read the PEM certificate chain and key from files."""
        try:
            return cls(Path(cert_path).read_bytes(), Path(key_path).read_bytes())
        except OSError as exc:
            raise BlobError(f"cannot read TLS certificate/key: {exc}") from exc


class _QuotaLedger:
    """Bytes uploaded per token id, so a token's quota is a total, not a per-Put cap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, tuple[int, int]] = {}  # token id -> (bytes, expires_at)

    def reserve(self, cap: Capability, size: int, now: float) -> None:
        with self._lock:
            self._used = {k: v for k, v in self._used.items() if v[1] >= now}
            used = self._used.get(cap.token_id, (0, cap.expires_at))[0]
            if used + size > cap.upload_quota:
                raise QuotaExceeded(
                    f"upload of {size} bytes exceeds the remaining quota of token "
                    f"{cap.token_id}: {cap.upload_quota - used} of {cap.upload_quota} bytes left"
                )
            self._used[cap.token_id] = (used + size, cap.expires_at)

    def release(self, cap: Capability, size: int) -> None:
        with self._lock:
            used, expires = self._used.get(cap.token_id, (size, cap.expires_at))
            self._used[cap.token_id] = (max(0, used - size), expires)


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count the call and turn domain exceptions into gRPC status codes with their message."""

    @functools.wraps(method)
    def unary(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        self.owner._count(method.__name__)
        try:
            return method(self, request, context)
        except BlobError as exc:
            context.abort(status_of(exc), str(exc))

    @functools.wraps(method)
    def streaming(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.owner._count(method.__name__)
        try:
            yield from method(self, request, context)
        except BlobError as exc:
            context.abort(status_of(exc), str(exc))

    return streaming if method.__name__ == "Get" else unary


class _Servicer(blobs_pb2_grpc.BlobServiceServicer):
    def __init__(self, owner: BlobServer) -> None:
        self.owner = owner

    def _authenticate(self, context: grpc.ServicerContext) -> Capability:
        header = dict(context.invocation_metadata()).get("authorization")
        if header is None or not header.startswith("Bearer "):
            raise TokenMalformed("missing 'authorization: Bearer <token>' metadata")
        return verify_token(self.owner.token_key, header[len("Bearer ") :])

    @_rpc
    def Get(self, request: blobs_pb2.GetRequest, context: grpc.ServicerContext):  # noqa: N802
        cap = self._authenticate(context)
        content_id = check_content_id(request.content_id)
        cap.check_read(content_id, self.owner.published(content_id))
        store, chunk_size = self.owner.store, self.owner.chunk_size
        with store.open(content_id) as fh:
            size = os.fstat(fh.fileno()).st_size
            pos = request.offset
            if pos > size:
                raise InvalidRequest(f"offset {pos} is past the end of {content_id} ({size} B)")
            fh.seek(pos)
            # Hash while streaming a whole blob, so corruption on disk ends in DATA_LOSS.
            digest = hashlib.sha256() if pos == 0 else None
            first = True
            while first or pos < size:
                data = fh.read(min(chunk_size, size - pos))
                if not data and pos < size:
                    raise BlobCorrupt(f"blob {content_id} was truncated on the server at {pos} B")
                if digest is not None:
                    digest.update(data)
                self.owner._count("bytes_sent", len(data))
                self.owner._count(f"bytes_sent.{self.owner.kind_of(content_id)}", len(data))
                yield blobs_pb2.Chunk(data=data, offset=pos, total_size=size)
                pos += len(data)
                first = False
        if digest is not None and digest.hexdigest() != content_id:
            store.verify(content_id)  # removes the corrupt copy and raises BlobCorrupt
            raise BlobCorrupt(f"blob {content_id} changed on the server while sent; retry")

    @_rpc
    def Put(self, request_iterator: Iterator[blobs_pb2.PutChunk], context):  # noqa: N802
        cap = self._authenticate(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("a Put stream must start with a PutHeader message")
        content_id = check_content_id(first.header.content_id)
        size = first.header.size
        cap_bytes = self.owner.max_blob_bytes
        if cap_bytes is not None and size > cap_bytes:
            raise QuotaExceeded(f"blob of {size} B exceeds the server cap of {cap_bytes} B")
        cap.check_upload(size)
        self.owner._ledger.reserve(cap, size, time.time())
        committed = False
        try:
            already = self.owner.store.has(content_id)
            with self.owner.store.open_writer(content_id, expected_size=size) as writer:
                for message in request_iterator:
                    if message.WhichOneof("part") != "data":
                        raise InvalidRequest("a Put stream has exactly one header, first")
                    writer.write(message.data)
                    self.owner._count("bytes_received", len(message.data))
            committed = True
        finally:
            if not committed:
                self.owner._ledger.release(cap, size)
        if not already:  # bound to its first uploader's lease (coordinator/blob_uploads.py)
            self.owner.uploads.record(content_id, cap.token_id)
        return blobs_pb2.PutReply(content_id=content_id, size=size, already_present=already)

    @_rpc
    def Stat(self, request: blobs_pb2.StatRequest, context):  # noqa: N802
        cap = self._authenticate(context)
        content_id = check_content_id(request.content_id)
        # An uploader may ask whether its result is already stored (deduplication).
        published = self.owner.published(content_id)
        if not (cap.can_read(content_id, published) or cap.upload_quota > 0):
            cap.check_read(content_id, published)
        try:
            info = self.owner.store.stat(content_id)
        except BlobNotFound:
            return blobs_pb2.StatReply(exists=False, size=0)
        return blobs_pb2.StatReply(exists=True, size=info.size)

    @_rpc
    def Head(self, request: blobs_pb2.HeadRequest, context):  # noqa: N802
        self._authenticate(context)  # any unit's token: the chain is what every unit reads
        if self.owner.head is None:
            raise BlobNotFound("this blob service publishes no model versions")
        version, checkpoint, chain = self.owner.head(int(request.from_version))
        return blobs_pb2.HeadReply(version=version, checkpoint=checkpoint, versions=chain)

    @_rpc
    def Submit(self, request: blobs_pb2.SubmitRequest, context):  # noqa: N802
        cap = self._authenticate(context)
        if self.owner.submit is None:
            raise NotAccepting("this blob service takes no results; send it with the reply")
        unit_id = request.result.unit_id
        # The lease's token names its unit and its node: a result goes in only under the
        # token of its own unit, so nobody submits for another node or another unit.
        if unit_id != cap.token_id:
            raise ScopeDenied(
                f"token {cap.token_id} was leased with unit {cap.token_id}, not "
                f"{unit_id[:80]!r}: submit each result with its own unit's token"
            )
        try:
            node_id = int(cap.subject)
        except ValueError:
            raise ScopeDenied(f"token {cap.token_id} names no node: it leased no unit") from None
        handoff = self.owner.handoff if request.want_units else None
        # Waiting is registered before the result is queued: the loop, handling it, must
        # find this call to hand it the units the freed slot gets (coordinator.unit_handoff).
        ticket = handoff.expect(node_id) if handoff is not None else None
        try:
            capability = request.capability if request.HasField("capability") else None
            queued = self.owner.submit(node_id, request.result, capability)
        except BaseException:
            if ticket is not None:
                handoff.cancel(ticket)
            raise
        reply = blobs_pb2.SubmitReply(queued=queued)
        units = handoff.wait(ticket) if ticket is not None else None
        if units is not None:
            reply.units.CopyFrom(units)
            if units.WhichOneof("body") == "unit":
                self.owner._count("Submit.units")
        return reply


class BlobServer:
    """The gRPC blob service daemon.

    Args:
        store: the blobs to serve and to receive uploads into.
        token_key: HMAC key that signs capability tokens (the coordinator's).
        host: interface to listen on (loopback by default).
        port: TCP port, 0 for any free port (read :attr:`port` after :meth:`start`).
        tls: certificate and key; None serves without TLS (loopback/testing only).
        max_workers: threads serving calls (each streaming call holds one).
        chunk_size: bytes per ``Get`` chunk.
        max_blob_bytes: refuse uploads larger than this regardless of token quota.
        interceptors: extra ``grpc.ServerInterceptor`` s (logging, metrics, fault injection).
        kind_of: what a blob is, for the traffic split (``bytes_sent.<kind>`` in
            :meth:`stats`): the coordinator says ``data``, ``delta``, ``checkpoint``,
            ``teacher`` (:meth:`coordinator.coordinator_process.Coordinator.blob_kind`).
        published: whether the coordinator published a blob (``read_published`` tokens
            may read it); ``None``: none is.
        head: ``head(from_version) -> (version, checkpoint, manifests)`` answers ``Head``
            (:meth:`coordinator.publishing.Publisher.head`; raises ``BlobNotFound`` when
            nothing is published); ``None``: ``Head`` is NOT_FOUND.
        submit: ``submit(node_id, result, capability) -> waiting`` takes a result (and the
            node's capability, or ``None``) ``Submit`` received
            under its unit's token (:meth:`coordinator.result_inbox.ResultInbox.put`; raises
            ``NotAccepting`` or ``QuotaExceeded`` to refuse); ``None``: FAILED_PRECONDITION.
        handoff: where a ``Submit`` with ``want_units`` waits for the units the loop
            leases its node (:mod:`coordinator.unit_handoff`); ``None``: it answers at once.
    """

    def __init__(
        self,
        store: BlobStore,
        token_key: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsConfig | None = None,
        max_workers: int = 32,
        chunk_size: int = CHUNK_SIZE,
        max_blob_bytes: int | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        kind_of: Callable[[str], str] | None = None,
        head: Callable[[int], tuple[int, Any, list[Any]]] | None = None,
        published: Callable[[str], bool] | None = None,
        submit: Callable[[int, Any, Any], int] | None = None,
        handoff: UnitHandoff | None = None,
    ) -> None:
        if not 0 < chunk_size <= 4 << 20:
            raise BlobError(f"chunk_size must be in (0, 4 MiB], got {chunk_size}")
        self.store, self.token_key, self.host, self.tls = store, bytes(token_key), host, tls
        self.chunk_size, self.max_blob_bytes = chunk_size, max_blob_bytes
        self._requested_port, self._max_workers = port, max_workers
        self._interceptors = list(interceptors)
        self._ledger = _QuotaLedger()
        self.uploads = UploadLedger.for_store(store)
        self.kind_of = kind_of or (lambda _cid: "other")
        self.published = published or (lambda _cid: False)
        self.head, self.submit, self.handoff = head, submit, handoff
        self._stats: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._ready = threading.Event()
        self.port: int | None = None

    def _count(self, key: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] = self._stats.get(key, 0) + amount

    def stats(self) -> dict[str, int]:
        """Calls per method (``Get``/``Put``/``Stat``), ``bytes_sent``/``bytes_received`` and
        ``bytes_sent.<kind>`` per kind of blob (see ``kind_of``)."""
        with self._stats_lock:
            return dict(self._stats)

    @property
    def address(self) -> str:
        """``host:port`` for clients (after :meth:`start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> BlobServer:
        """Bind the port and start serving in background threads."""
        if self._server is not None:
            raise BlobError("BlobServer.start() called twice")
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="blob-rpc"),
            interceptors=self._interceptors,
            options=GRPC_OPTIONS,
        )
        blobs_pb2_grpc.add_BlobServiceServicer_to_server(_Servicer(self), server)
        bind = f"[{self.host}]:{self._requested_port}" if ":" in self.host else None
        bind = bind or f"{self.host}:{self._requested_port}"
        try:
            if self.tls is None:
                port = server.add_insecure_port(bind)
            else:
                creds = grpc.ssl_server_credentials([(self.tls.private_key, self.tls.cert_chain)])
                port = server.add_secure_port(bind, creds)
        except RuntimeError as exc:
            raise BlobError(f"blob service cannot listen on {bind}: {exc}") from exc
        if port == 0:
            raise BlobError(f"blob service cannot listen on {bind} (port in use?)")
        server.start()
        self._server, self.port = server, port
        self._ready.set()
        log.info("blob service listening on %s (%s)", self.address, "TLS" if self.tls else "plain")
        return self

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Block until the port accepts TCP connections; raises :class:`BlobError` on timeout."""
        deadline = time.monotonic() + timeout
        if not self._ready.wait(timeout):
            raise BlobError(f"blob service not started within {timeout} s (call start())")
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1.0).close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BlobError(f"blob service on {self.address} not reachable: {exc}") from exc
                time.sleep(0.05)

    def shutdown(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then stop."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
            self._ready.clear()

    def __enter__(self) -> BlobServer:
        self.start()
        self.wait_until_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
