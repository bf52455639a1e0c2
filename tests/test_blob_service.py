"""gRPC blob service on 127.0.0.1: resume after real cuts, refusals, concurrency, TLS, cache."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.blob_server import BlobServer, TlsConfig
from coordinator.result_inbox import ResultInbox
from coordinator.unit_handoff import UnitHandoff
from shared_model.blobs import (
    BlobClient,
    BlobCorrupt,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    HashMismatch,
    InvalidRequest,
    NotAccepting,
    QuotaExceeded,
    ScopeDenied,
    TokenError,
    issue_token,
    sha256_hex,
)
from shared_model.wire.perspective.v1 import (
    blobs_pb2,
    blobs_pb2_grpc,
    control_pb2,
    federation_pb2,
    tensor_pb2,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
KEY = b"coordinator-test-key-0123456789"
CHUNK = 64 << 10


def _token(ids=(), **kw) -> str:
    return issue_token(KEY, "node-1", ids, **kw)


class CutGet(grpc.ServerInterceptor):
    """Aborts the first ``cuts`` Get streams with UNAVAILABLE after ``after`` chunks."""

    def __init__(self, after: int, cuts: int = 1) -> None:
        self.after, self.cuts, self.offsets = after, cuts, []

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if not details.method.endswith("/Get"):
            return handler
        inner = handler.unary_stream

        def cut_stream(request, context):
            self.offsets.append(request.offset)
            cut, self.cuts = self.cuts > 0, self.cuts - 1
            for i, chunk in enumerate(inner(request, context)):
                if cut and i == self.after:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut by test")
                yield chunk

        return grpc.unary_stream_rpc_method_handler(
            cut_stream, handler.request_deserializer, handler.response_serializer
        )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BlobServer, BlobStore]]:
    store = BlobStore(tmp_path / "server")
    with BlobServer(store, KEY, chunk_size=CHUNK) as server:
        yield server, store


def _client(server: BlobServer, tmp_path: Path, token: str, name: str = "cache") -> BlobClient:
    return BlobClient(server.address, token, cache=BlobStore(tmp_path / name), backoff_s=0.01)


def test_put_get_stat_and_cache_hit_makes_no_rpc(served, tmp_path: Path) -> None:
    server, store = served
    data = os.urandom(300_000)
    cid = sha256_hex(data)
    with _client(server, tmp_path, _token([cid], upload_quota=1 << 20)) as client:
        assert client.stat(cid).exists is False
        assert client.put(data) == cid and store.get(cid, verify=True) == data
        assert client.stat(cid).size == len(data)
        assert client.get(cid).read_bytes() == data
        before = server.stats()
        assert client.get(cid).read_bytes() == data and client.get_bytes(cid) == data
        assert server.stats() == before  # served from the cache: no RPC at all
    no_cache = BlobClient(server.address, _token([cid]))
    assert no_cache.get_bytes(cid) == data and server.stats()["Get"] == before["Get"] + 1


def test_cut_stream_resumes_from_received_bytes(tmp_path: Path) -> None:
    cutter = CutGet(after=5, cuts=2)
    data = os.urandom(20 * CHUNK + 123)
    store = BlobStore(tmp_path / "server")
    cid = store.put_bytes(data)
    with BlobServer(store, KEY, chunk_size=CHUNK, interceptors=[cutter]) as server:
        client = _client(server, tmp_path, _token([cid]))
        assert client.get(cid).read_bytes() == data
    assert cutter.offsets == [0, 5 * CHUNK, 10 * CHUNK]  # each retry resumed, none restarted
    assert client.cache.temp_files() == []


def test_broken_download_resumes_in_a_later_call(tmp_path: Path) -> None:
    cutter = CutGet(after=3, cuts=2)
    data = os.urandom(8 * CHUNK)
    store = BlobStore(tmp_path / "server")
    cid = store.put_bytes(data)
    with BlobServer(store, KEY, chunk_size=CHUNK, interceptors=[cutter]) as server:
        client = BlobClient(server.address, _token([cid]), BlobStore(tmp_path / "c"), max_retries=0)
        with pytest.raises(BlobUnavailable, match="cut by test"):
            client.get(cid)
        assert [p.name for p in client.cache.temp_files()] == [f"{cid}.partial"]
        assert not client.cache.has(cid)
        with pytest.raises(BlobUnavailable):  # a second process-like attempt, cut again
            client.get(cid)
        assert client.get(cid).read_bytes() == data
    assert cutter.offsets == [0, 3 * CHUNK, 6 * CHUNK]


class CuttingProxy:
    """TCP proxy that closes its first connection after relaying ``cut_after`` bytes down."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port, self.cut_after, self.connections = target_port, cut_after, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    break  # the cut: drop both directions of the TCP connection
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_real_tcp_cut_resumes(served, tmp_path: Path) -> None:
    server, store = served
    data = os.urandom(4 << 20)
    cid = store.put_bytes(data)
    proxy = CuttingProxy(server.port, cut_after=1 << 20)
    try:
        client = BlobClient(f"127.0.0.1:{proxy.port}", _token([cid]), BlobStore(tmp_path / "c"))
        assert client.get(cid).read_bytes() == data
    finally:
        proxy.close()
    assert proxy.connections >= 2 and server.stats()["Get"] >= 2
    assert server.stats()["bytes_sent"] < 2 * len(data)  # resumed, not restarted from zero


def _raw_put(server: BlobServer, token: str | None, messages) -> grpc.RpcError:
    stub = blobs_pb2_grpc.BlobServiceStub(grpc.insecure_channel(server.address))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(iter(messages), metadata=metadata)
    return info.value


def _put_messages(cid: str, size: int, data: bytes) -> list[blobs_pb2.PutChunk]:
    header = blobs_pb2.PutChunk(header=blobs_pb2.PutHeader(content_id=cid, size=size))
    return [
        header,
        *(blobs_pb2.PutChunk(data=data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)),
    ]


def test_refused_puts_leave_nothing_behind(served) -> None:
    server, store = served
    data = os.urandom(200_000)
    cid, good = sha256_hex(data), _token(upload_quota=1 << 20)
    expired = _token(upload_quota=1 << 20, ttl_s=1, now=time.time() - 10)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = [
        (good, _put_messages(sha256_hex(b"x"), len(data), data), grpc.StatusCode.DATA_LOSS),
        (good, _put_messages(cid, len(data) - 1, data), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (good, _put_messages(cid, len(data) + 1, data), grpc.StatusCode.DATA_LOSS),
        (_token(upload_quota=1000), _put_messages(cid, len(data), data), "RESOURCE_EXHAUSTED"),
        (expired, _put_messages(cid, len(data), data), grpc.StatusCode.UNAUTHENTICATED),
        (forged, _put_messages(cid, len(data), data), grpc.StatusCode.UNAUTHENTICATED),
        (None, _put_messages(cid, len(data), data), grpc.StatusCode.UNAUTHENTICATED),
        (_token([cid]), _put_messages(cid, len(data), data), grpc.StatusCode.PERMISSION_DENIED),
        (good, _put_messages(cid, len(data), data)[1:], grpc.StatusCode.INVALID_ARGUMENT),
        (good, _put_messages("nothex", 1, b"a"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for token, messages, code in cases:
        error = _raw_put(server, token, messages)
        assert error.code().name == getattr(code, "name", code), error.details()
        assert error.details()  # a message saying what is wrong
        assert list(store.iter_ids()) == [] and store.temp_files() == []
    assert "expired" in _raw_put(server, expired, cases[0][1]).details()


def test_quota_is_a_total_per_token_and_refunded_on_failure(served, tmp_path: Path) -> None:
    server, store = served
    token = _token(upload_quota=250_000)
    client = _client(server, tmp_path, token)
    client.put(os.urandom(100_000))
    bad = _put_messages(sha256_hex(b"other"), 100_000, os.urandom(100_000))
    assert _raw_put(server, token, bad).code() == grpc.StatusCode.DATA_LOSS  # refunded
    client.put(os.urandom(100_000))
    with pytest.raises(QuotaExceeded, match="remaining quota"):
        client.put(os.urandom(100_000))
    assert len(list(store.iter_ids())) == 2 and store.temp_files() == []


def test_get_errors_map_to_domain_exceptions(served, tmp_path: Path) -> None:
    server, store = served
    cid, other = store.put_bytes(b"in scope"), store.put_bytes(b"out of scope")
    missing = sha256_hex(b"missing")
    client = _client(server, tmp_path, _token([cid, missing]))
    with pytest.raises(ScopeDenied, match="PERMISSION_DENIED"):
        client.get(other)
    with pytest.raises(ScopeDenied):
        client.stat(other)
    with pytest.raises(BlobNotFound, match="NOT_FOUND"):
        client.get(missing)
    with pytest.raises(TokenError, match="UNAUTHENTICATED.*missing"):
        BlobClient(server.address, None).get_bytes(cid)
    stub = blobs_pb2_grpc.BlobServiceStub(grpc.insecure_channel(server.address))
    request = blobs_pb2.GetRequest(content_id=cid, offset=10**6)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(request, metadata=(("authorization", f"Bearer {_token([cid])}"),)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.cache.temp_files() == []
    with pytest.raises(InvalidRequest):
        raise client._error(info.value, BlobCorrupt)


def test_corrupt_blob_on_server_is_data_loss(served, tmp_path: Path) -> None:
    server, store = served
    data = os.urandom(5 * CHUNK)
    cid = store.put_bytes(data)
    store.blob_path(cid).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    client = _client(server, tmp_path, _token([cid]))
    with pytest.raises(BlobCorrupt, match="DATA_LOSS"):
        client.get(cid)
    assert not client.cache.has(cid) and client.cache.temp_files() == []
    assert not store.has(cid)  # the server dropped its corrupt copy


def test_data_loss_on_put_is_hash_mismatch_for_the_client(served, tmp_path: Path) -> None:
    server, store = served
    client = _client(server, tmp_path, _token(upload_quota=1 << 20))
    error = _raw_put(server, client._token, _put_messages(sha256_hex(b"a"), 1, b"b"))
    with pytest.raises(HashMismatch, match="DATA_LOSS.*hash to"):
        raise client._error(error, HashMismatch)
    assert list(store.iter_ids()) == [] and store.temp_files() == []


def test_twenty_concurrent_clients(served, tmp_path: Path) -> None:
    server, store = served
    shared = os.urandom(400_000)
    shared_id = store.put_bytes(shared)
    errors: list[BaseException] = []

    def participant(i: int) -> None:
        try:
            own = os.urandom(50_000 + i)
            client = _client(server, tmp_path, _token([shared_id], upload_quota=1 << 20), f"c{i}")
            assert client.get(shared_id).read_bytes() == shared
            assert store.get(client.put(own)) == own
            client.close()
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=participant, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(list(store.iter_ids())) == 21
    assert server.stats()["Get"] == 20 and server.stats()["Put"] == 20


def _make_certs(tmp_path: Path) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def test_tls_roundtrip_and_plaintext_client_refused(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    ca_pem, cert_pem, key_pem = _make_certs(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    store = BlobStore(tmp_path / "server")
    tls = TlsConfig(cert_chain=cert_pem, private_key=key_pem)
    with BlobServer(store, KEY, tls=tls) as server:
        token = _token(read_all=True, upload_quota=1 << 20)
        client = BlobClient(
            server.address, token, BlobStore(tmp_path / "c"), tls_root_cert=tmp_path / "ca.pem"
        )
        data = os.urandom(100_000)
        cid = client.put(data)
        assert client.get(cid).read_bytes() == data and store.get(cid) == data
        plain = BlobClient(server.address, token, max_retries=1, backoff_s=0.01)
        with pytest.raises(BlobUnavailable):
            plain.stat(cid)


def test_client_dying_mid_put_leaves_nothing(served) -> None:
    server, store = served
    data = os.urandom(10 * CHUNK)
    messages = _put_messages(sha256_hex(data), len(data), data)

    seen_partial = []

    def dies_halfway():
        yield from messages[:5]
        # Die only once the server has really written part of the upload to a temp file.
        seen_partial.append(wait_for(store.temp_files, 10, "the server's temp file"))
        raise ConnectionError("participant killed")

    stub = blobs_pb2_grpc.BlobServiceStub(grpc.insecure_channel(server.address))
    token = _token(upload_quota=1 << 20)
    with pytest.raises(grpc.RpcError):
        stub.Put(dies_halfway(), metadata=(("authorization", f"Bearer {token}"),))
    assert seen_partial, "the upload never reached the server"
    # The server notices the cancellation asynchronously.
    wait_for(lambda: store.temp_files() == [], 5, "the temp file to be removed")
    assert list(store.iter_ids()) == []
    assert BlobClient(server.address, token).put(data) == sha256_hex(data)  # quota refunded


def test_head_answers_the_newest_version_and_counts_traffic_per_kind(tmp_path: Path) -> None:
    """``Head`` returns what the coordinator's head callback says (the newest version and
    its chain from the caller's); bytes sent are split by the kind the coordinator names;
    a service without versions answers NOT_FOUND, which the client raises as such."""
    store = BlobStore(tmp_path / "server")
    data = os.urandom(1000)
    cid = store.put_bytes(data)
    refs = [tensor_pb2.BlobRef(content_id=cid, size=len(data))]
    asked = []

    def head(from_version: int):
        asked.append(from_version)
        return 7, refs[0], refs * 2

    with BlobServer(store, KEY, head=head, kind_of=lambda c: "delta") as server:
        with BlobClient(server.address, _token([cid])) as client:
            reply = client.head(5)
            assert asked == [5] and reply.version == 7
            assert list(reply.versions) == refs * 2 and reply.checkpoint == refs[0]
            client.get_bytes(cid)
        assert server.stats()["bytes_sent.delta"] == len(data)
    with (
        BlobServer(store, KEY) as server,
        BlobClient(server.address, _token()) as client,
        pytest.raises(BlobNotFound),
    ):
        client.head(0)


def test_submit_takes_a_result_only_under_its_units_token(tmp_path: Path) -> None:
    """``Submit`` queues a result for the coordinator's intake under the token leased with
    that unit (node = the token's subject); another unit's token, no token, an oversized
    result, a service that takes no results and a node with too many results waiting are
    refused, each with its own status, and nothing is queued for them."""
    inbox = ResultInbox(per_node=2)
    result = federation_pb2.WorkResult(unit_id="unit-a", tokens=128)
    store = BlobStore(tmp_path / "server")
    with BlobServer(store, KEY, submit=inbox.put) as server:

        def client(subject: str, unit: str, **kw) -> BlobClient:
            return BlobClient(server.address, issue_token(KEY, subject, token_id=unit, **kw))

        with client("7", "unit-a") as mine:
            assert mine.submit(result).queued == 1
            assert mine.submit(result).queued == 2  # a retried call: the intake is idempotent
            with pytest.raises(QuotaExceeded, match="node 7 has 2 results waiting"):
                mine.submit(result)
        with client("8", "unit-b") as other, pytest.raises(ScopeDenied, match="not 'unit-a'"):
            other.submit(result)  # a valid token, but leased with another unit
        with client("publisher", "unit-a") as nobody, pytest.raises(ScopeDenied):
            nobody.submit(result)  # a token that names no node
        with BlobClient(server.address, None) as anonymous, pytest.raises(TokenError):
            anonymous.submit(result)
        big = federation_pb2.WorkResult(unit_id="unit-c", train_loss=1.0)
        big.document_losses.add(doc=1, column=0, loss=1.0)
        big.document_losses.extend([big.document_losses[0]] * 200_000)  # ~2 MiB
        with client("7", "unit-c") as hostile, pytest.raises(InvalidRequest, match="over the"):
            hostile.submit(big)
        assert [(s.node_id, s.result.unit_id) for s in inbox.drain()] == [(7, "unit-a")] * 2
        assert len(inbox) == 0 and server.stats()["Submit"] == 7
    with (
        BlobServer(store, KEY) as server,
        BlobClient(server.address, issue_token(KEY, "7", token_id="unit-a")) as mine,
        pytest.raises(NotAccepting, match="takes no results"),
    ):
        mine.submit(result)


def test_submit_brings_the_units_the_loop_hands_over(tmp_path: Path) -> None:
    """A ``Submit`` with ``want_units`` waits while the loop (here a thread playing it)
    takes the result (and the capability sent with it) from the inbox and leases: the reply
    carries what it hands over.
    One waits per node (a second call answers at once, without units), a wait ends empty
    after ``wait_s`` or when the stage closes, and a call the inbox refuses leaves no
    wait behind."""
    inbox, handoff = ResultInbox(per_node=1), UnitHandoff(wait_s=0.5)
    handoff.open()
    units = control_pb2.ControlRequest(unit=federation_pb2.WorkUnit(unit_id="next", steps=3))
    store = BlobStore(tmp_path / "server")

    def loop() -> None:  # hand units to node 7 once its result is in the inbox
        wait_for(lambda: len(inbox) == 1, 10, "the submitted result")
        assert handoff.waiting(7) and handoff.offer(7, units)

    def result(unit: str) -> federation_pb2.WorkResult:
        return federation_pb2.WorkResult(unit_id=unit)

    def client(unit: str) -> BlobClient:
        return BlobClient(server.address, issue_token(KEY, "7", token_id=unit))

    with BlobServer(store, KEY, submit=inbox.put, handoff=handoff) as server:
        player = threading.Thread(target=loop)
        player.start()
        speed = control_pb2.NodeCapability(max_columns=2, tokens_per_s=512.0)
        with client("unit-a") as mine:
            reply = mine.submit(result("unit-a"), want_units=True, capability=speed)
        player.join()
        assert reply.units == units and handoff.handed == 1 and not handoff.waiting(7)
        assert [s.capability for s in inbox.drain()] == [speed]  # reported with the result
        with client("unit-b") as mine:  # nobody hands anything over: empty after wait_s
            t0 = time.monotonic()
            assert not mine.submit(result("unit-b"), want_units=True).HasField("units")
            assert time.monotonic() - t0 >= 0.5 and not handoff.waiting(7)
            with pytest.raises(QuotaExceeded):  # the inbox is full: no wait is left behind
                mine.submit(result("unit-b"), want_units=True)
        assert not handoff.waiting(7)
        inbox.drain()
        assert handoff.expect(7) is not None  # one Submit of node 7 waits already
        with client("unit-c") as mine:
            t0 = time.monotonic()
            assert not mine.submit(result("unit-c"), want_units=True).HasField("units")
            assert time.monotonic() - t0 < 0.5  # answered at once
        handoff.close()  # the stage ends: waits end, and new calls do not wait
        assert not handoff.waiting(7) and handoff.expect(8) is None
        assert server.stats()["Submit.units"] == 1
        assert [s.result.unit_id for s in inbox.drain()] == ["unit-c"]
