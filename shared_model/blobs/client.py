"""Client of the gRPC blob service, with a local cache and resumable downloads.

``get`` never downloads a blob the cache already holds; a broken download keeps its bytes
in a partial file of the cache (``tmp/<content id>.partial``) and continues from there with
``Get(offset=...)`` — within the same call after a reconnect, or in a later call or process.
Every download is checked against its sha256 before it becomes visible in the cache.
Transient failures (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED) are retried with exponential
back-off; the retry budget is reset whenever a retry made progress, so a flaky link still
finishes a large blob while a dead server fails after ``max_retries`` attempts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from shared_model.blobs.channel import CHUNK_SIZE, GRPC_OPTIONS
from shared_model.blobs.errors import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    BlobUnavailable,
    HashMismatch,
    InvalidRequest,
    NotAccepting,
    QuotaExceeded,
    ScopeDenied,
    TokenError,
)
from shared_model.blobs.store import BlobStore, check_content_id, sha256_file, sha256_hex
from shared_model.wire.perspective.v1 import blobs_pb2, blobs_pb2_grpc, control_pb2, federation_pb2

TokenSource = str | Callable[[], str] | None

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
_ERROR_OF = {
    grpc.StatusCode.UNAUTHENTICATED: TokenError,
    grpc.StatusCode.PERMISSION_DENIED: ScopeDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
    grpc.StatusCode.NOT_FOUND: BlobNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: BlobUnavailable,
    grpc.StatusCode.FAILED_PRECONDITION: NotAccepting,
}
# Reconnect quickly after a cut: the default first back-off is a full second.
_CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class RemoteStat:
    """Answer of :meth:`BlobClient.stat`."""

    exists: bool
    size: int


class RateLimiter(Protocol):
    """Anything that throttles transfers: ``consume(n)`` blocks until ``n`` bytes may pass.

    :class:`participant.limits.TokenBucket` is the implementation a participant uses.
    """

    def consume(self, n_bytes: int) -> object: ...


class _Sink(Protocol):
    size: int
    max_size: int | None

    def write(self, data: bytes) -> None: ...
    def reset(self) -> None: ...


class _MemorySink:
    """Download target when there is no cache."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.max_size: int | None = None

    @property
    def size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        if self.max_size is not None and len(self.buffer) + len(data) > self.max_size:
            raise BlobCorrupt("the server sent more bytes than the blob's announced size")
        self.buffer += data

    def reset(self) -> None:
        self.buffer = bytearray()


class BlobClient:
    """Fetch and upload blobs from a :class:`~coordinator.blob_server.BlobServer`.

    Args:
        address: ``host:port`` of the blob service.
        token: capability token, or a callable returning the current one (called per RPC).
        cache: local store; downloads land here and cached blobs are never fetched again.
        tls_root_cert: PEM bytes (or a path to them) of the CA that signed the server
            certificate; None connects without TLS (loopback only).
        tls_server_name: expected name in the server certificate if it differs from the host.
        max_retries: consecutive failed attempts without progress before giving up.
        backoff_s: first retry delay; doubles per failure up to 5 s.
        chunk_size: bytes per uploaded message.
        rate_limiter: throttles every chunk received and sent (bandwidth cap); shared by
            several clients it caps their sum. None: no cap.
    """

    def __init__(
        self,
        address: str,
        token: TokenSource = None,
        cache: BlobStore | None = None,
        tls_root_cert: bytes | str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.1,
        chunk_size: int = CHUNK_SIZE,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.address, self.cache = address, cache
        self.rate_limiter = rate_limiter
        self.max_retries, self.backoff_s, self.chunk_size = max_retries, backoff_s, chunk_size
        self._token = token
        options = list(_CHANNEL_OPTIONS)
        if tls_root_cert is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if not isinstance(tls_root_cert, bytes):
                try:
                    tls_root_cert = Path(tls_root_cert).read_bytes()
                except OSError as exc:
                    raise BlobError(f"cannot read TLS root certificate: {exc}") from exc
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = blobs_pb2_grpc.BlobServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> BlobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _error(self, exc: grpc.RpcError, default: type[BlobError]) -> BlobError:
        code = exc.code()
        cls = default if code == grpc.StatusCode.DATA_LOSS else _ERROR_OF.get(code, BlobError)
        return cls(f"blob service {self.address}: {code.name}: {exc.details()}")

    def _backoff(self, failures: int, exc: grpc.RpcError, what: str) -> None:
        """Sleep before retry number ``failures`` or raise once the budget is spent."""
        if exc.code() not in _RETRYABLE:
            raise self._error(exc, BlobCorrupt) from None
        if failures > self.max_retries:
            raise BlobUnavailable(
                f"{what} failed {failures} times in a row on {self.address} "
                f"({exc.code().name}: {exc.details()}); is the blob service running?"
            ) from None
        time.sleep(min(5.0, self.backoff_s * 2 ** (failures - 1)))

    def _unary(self, method: Callable[..., Any], request: Any, what: str) -> Any:
        """One unary call with this client's token, retried on transient failures."""
        failures = 0
        while True:
            try:
                return method(request, metadata=self._metadata())
            except grpc.RpcError as exc:
                failures += 1
                self._backoff(failures, exc, what)

    # ---------------------------------------------------------------- reading
    def get(self, content_id: str) -> Path:
        """Path of the blob in the cache, downloading (and verifying) it if missing.

        Raises:
            BlobError: no cache configured; :class:`BlobNotFound`, :class:`ScopeDenied`,
                :class:`TokenError`, :class:`BlobUnavailable`, :class:`BlobCorrupt` or
                :class:`HashMismatch` for the corresponding remote failures.
        """
        check_content_id(content_id)
        if self.cache is None:
            raise BlobError("BlobClient.get() needs a cache store; use get_bytes() without one")
        if self.cache.has(content_id):
            return self.cache.path(content_id)
        for fresh in (False, True):
            writer = self.cache.open_writer(content_id, resume=True)
            resumed = writer.size > 0
            if fresh:
                writer.reset()
            try:
                self._download(content_id, writer)
                writer.commit()
                return self.cache.path(content_id)
            except HashMismatch:
                if fresh or not resumed:  # bad bytes from the server itself
                    raise
                # else the kept partial prefix was bad: try once more from scratch
            except BlobCorrupt:
                writer.abort()  # what we received is unusable: keep nothing
                raise
            except BaseException:
                writer.abort(keep_partial=True)
                raise
        raise AssertionError("unreachable")

    def get_bytes(self, content_id: str) -> bytes:
        """The blob's bytes (from the cache when there is one), verified against its sha256."""
        if self.cache is not None:
            return self.get(content_id).read_bytes()
        check_content_id(content_id)
        sink = _MemorySink()
        self._download(content_id, sink)
        if sha256_hex(bytes(sink.buffer)) != content_id:
            raise HashMismatch(f"bytes from {self.address} do not hash to {content_id}")
        return bytes(sink.buffer)

    def _download(self, content_id: str, sink: _Sink) -> None:
        """Fill ``sink`` with the blob from ``sink.size`` on, reconnecting on cuts."""
        failures, restarted = 0, False
        while True:
            offset = sink.size
            request = blobs_pb2.GetRequest(content_id=content_id, offset=offset)
            try:
                total = self._stream_into(self._stub.Get(request, metadata=self._metadata()), sink)
                if sink.size == total:
                    return
                failures += 1  # stream ended early without an error: retry the rest
                if failures > self.max_retries:
                    raise BlobUnavailable(f"{self.address} keeps ending {content_id} early")
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and offset > 0 and not restarted:
                    sink.reset()  # our partial file is longer than the blob: start over
                    restarted = True
                    continue
                failures = 0 if sink.size > offset else failures
                failures += 1
                self._backoff(failures, exc, f"download of {content_id}")

    def _stream_into(self, chunks: Iterator[blobs_pb2.Chunk], sink: _Sink) -> int | None:
        total = None
        for chunk in chunks:
            if chunk.offset != sink.size:
                raise BlobCorrupt(f"server sent bytes at {chunk.offset}, expected {sink.size}")
            total = chunk.total_size
            sink.max_size = total
            sink.write(chunk.data)
            if self.rate_limiter is not None:
                # Sleeping before reading the next chunk lets gRPC flow control push back
                # on the server, so the link itself carries no more than the cap.
                self.rate_limiter.consume(len(chunk.data))
        return total

    def stat(self, content_id: str) -> RemoteStat:
        """Whether the service holds the blob, and its size."""
        request = blobs_pb2.StatRequest(content_id=check_content_id(content_id))
        reply = self._unary(self._stub.Stat, request, f"stat of {content_id}")
        return RemoteStat(reply.exists, reply.size)

    def head(self, from_version: int) -> blobs_pb2.HeadReply:
        """The newest published version and its chain from ``from_version`` (``Head``)."""
        request = blobs_pb2.HeadRequest(from_version=from_version)
        return self._unary(self._stub.Head, request, "head of the version chain")

    def submit(
        self,
        result: federation_pb2.WorkResult,
        *,
        want_units: bool = False,
        capability: control_pb2.NodeCapability | None = None,
    ) -> blobs_pb2.SubmitReply:
        """Send a finished unit's result to the coordinator's intake (``Submit``; the token
        must be the unit's own). The reply says how many of this node's results wait there
        (``queued``); with ``want_units`` the call waits (about 2 s at most) for the units
        the freed slot gets, and the reply carries them (``units``, unset if none came).
        ``capability``: what the node reports of itself, as with a Flower reply.

        Raises:
            NotAccepting: no federated stage takes results now.
            QuotaExceeded: too many of this node's results wait already.
            ScopeDenied: the token is not this unit's.
        """
        request = blobs_pb2.SubmitRequest(
            result=result, want_units=want_units, capability=capability
        )
        what = f"submit of the result of {result.unit_id}"
        return self._unary(self._stub.Submit, request, what)

    # ---------------------------------------------------------------- writing
    def put(self, data: bytes | str | os.PathLike[str]) -> str:
        """Upload bytes or a file; returns its content id once the server has verified it.

        Raises:
            QuotaExceeded: larger than the token's remaining quota or the server cap.
            HashMismatch: the server received other bytes than were hashed (file changed).
            TokenError, ScopeDenied, BlobUnavailable: as for :meth:`get`.
        """
        if isinstance(data, bytes | bytearray | memoryview):
            payload = bytes(data)
            content_id, size = sha256_hex(payload), len(payload)
            pieces: Callable[[], Iterator[bytes]] = lambda: self._memory_pieces(payload)  # noqa: E731
        else:
            path = Path(data)
            try:
                content_id, size = sha256_file(path)
            except OSError as exc:
                raise BlobError(f"cannot read {path} to upload it: {exc}") from exc
            pieces = lambda: self._file_pieces(path)  # noqa: E731
        failures = 0
        while True:
            try:
                stream = self._put_stream(content_id, size, pieces())
                self._stub.Put(stream, metadata=self._metadata())
                return content_id
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DATA_LOSS:
                    raise self._error(exc, HashMismatch) from None
                failures += 1
                self._backoff(failures, exc, f"upload of {content_id}")

    def _put_stream(self, content_id: str, size: int, pieces: Iterator[bytes]) -> Iterator:
        header = blobs_pb2.PutHeader(content_id=content_id, size=size)
        yield blobs_pb2.PutChunk(header=header)
        for piece in pieces:
            if self.rate_limiter is not None:
                self.rate_limiter.consume(len(piece))  # before sending: the cap is on the wire
            yield blobs_pb2.PutChunk(data=piece)

    def _memory_pieces(self, payload: bytes) -> Iterator[bytes]:
        view = memoryview(payload)
        for start in range(0, len(view), self.chunk_size):
            yield bytes(view[start : start + self.chunk_size])

    def _file_pieces(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while piece := fh.read(self.chunk_size):
                yield piece
