"""BlobStore: atomic content-addressed writes, verification, gc and LRU eviction."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from shared_model.blobs import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    BlobStore,
    HashMismatch,
    InvalidContentId,
    QuotaExceeded,
    sha256_hex,
)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def test_put_get_sharded_layout(store: BlobStore) -> None:
    data = b"perspective" * 1000
    cid = store.put_bytes(data)
    assert cid == hashlib.sha256(data).hexdigest()
    assert store.path(cid) == store.root / "blobs" / cid[:2] / cid[2:4] / cid
    assert store.get(cid, verify=True) == data
    with store.open(cid) as fh:
        assert fh.read() == data
    assert store.has(cid) and store.stat(cid).size == len(data)
    assert store.put_bytes(data) == cid  # idempotent
    assert list(store.iter_ids()) == [cid] and store.total_bytes() == len(data)
    assert store.temp_files() == []


def test_put_file_and_empty_blob(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    assert store.get(store.put_file(src)) == src.read_bytes()
    assert store.get(store.put_bytes(b"")) == b""
    with pytest.raises(BlobError, match="cannot read"):
        store.put_file(tmp_path / "missing")


def test_writer_invisible_until_commit(store: BlobStore) -> None:
    data = os.urandom(1000)
    cid = sha256_hex(data)
    writer = store.open_writer(expected_id=cid, expected_size=len(data))
    writer.write(data[:500])
    assert not store.has(cid) and len(store.temp_files()) == 1
    writer.write(data[500:])
    assert writer.commit() == cid and store.get(cid) == data
    assert store.temp_files() == []


def test_writer_rejects_wrong_hash_size_and_cap(store: BlobStore) -> None:
    data = b"x" * 100
    with (
        pytest.raises(HashMismatch, match="hash to"),
        store.open_writer(expected_id=sha256_hex(b"other")) as writer,
    ):
        writer.write(data)
    with (
        pytest.raises(HashMismatch, match="49 bytes received, 99 declared"),
        store.open_writer(expected_size=99) as writer,
    ):
        writer.write(data[:49])  # sender stopped early
    with (
        pytest.raises(QuotaExceeded, match="declared size of 99"),
        store.open_writer(expected_size=99) as writer,
    ):
        writer.write(data)
    with (
        pytest.raises(QuotaExceeded, match="size cap of 10"),
        store.open_writer(max_size=10) as writer,
    ):
        writer.write(data)
    assert list(store.iter_ids()) == [] and store.temp_files() == []


def test_exception_in_writer_leaves_nothing(store: BlobStore) -> None:
    with pytest.raises(RuntimeError), store.open_writer() as writer:
        writer.write(b"half")
        raise RuntimeError("sender died")
    assert store.temp_files() == [] and list(store.iter_ids()) == []
    with pytest.raises(BlobError, match="already"):
        writer.write(b"more")


def test_resumable_writer_keeps_partial(store: BlobStore) -> None:
    data = os.urandom(10_000)
    cid = sha256_hex(data)
    with pytest.raises(ConnectionError), store.open_writer(cid, resume=True) as writer:
        writer.write(data[:4000])
        raise ConnectionError("cut")
    assert [p.name for p in store.temp_files()] == [f"{cid}.partial"]
    writer = store.open_writer(cid, resume=True)
    assert writer.size == 4000  # where to resume
    # A concurrent writer for the same blob does not share the locked partial file.
    other = store.open_writer(cid, resume=True)
    assert other.size == 0 and not other.resumable
    other.abort()
    writer.write(data[4000:])
    assert writer.commit() == cid and store.get(cid, verify=True) == data
    assert store.temp_files() == []
    with pytest.raises(BlobError, match="expected_id"):
        store.open_writer(resume=True)


def test_invalid_and_missing_ids(store: BlobStore) -> None:
    for bad in ["abc", "G" * 64, "A" * 64, 5]:
        with pytest.raises(InvalidContentId):
            store.has(bad)  # type: ignore[arg-type]
    missing = sha256_hex(b"missing")
    for call in (store.get, store.path, store.stat, store.verify, store.open):
        with pytest.raises(BlobNotFound, match=missing):
            call(missing)
    assert store.delete(missing) is False


def test_verify_detects_and_removes_corruption(store: BlobStore) -> None:
    cid = store.put_bytes(b"a" * 4096)
    assert store.verify(cid).size == 4096
    path = store.blob_path(cid)
    path.write_bytes(b"b" * 4096)
    with pytest.raises(BlobCorrupt):
        store.get(cid, verify=True)
    with pytest.raises(BlobCorrupt, match="removed"):
        store.verify(cid)
    assert not store.has(cid)


def test_gc_removes_unreferenced_and_stale_temp(store: BlobStore) -> None:
    keep, drop = store.put_bytes(b"keep"), store.put_bytes(b"drop")
    stale = store.open_writer()
    stale.write(b"abandoned")
    old = time.time() - 7200
    os.utime(stale.tmp_path, (old, old))
    fresh = store.open_writer()
    fresh.write(b"in progress")
    report = store.gc({keep}, tmp_max_age_s=3600)
    assert report.removed == [drop] and report.freed_bytes == 4 and report.removed_temp == 1
    assert store.has(keep) and store.temp_files() == [fresh.tmp_path]
    fresh.abort()


def test_evict_to_is_lru_by_recorded_access(store: BlobStore) -> None:
    ids = [store.put_bytes(bytes([i]) * 1000) for i in range(4)]
    for age, cid in zip((400, 300, 200, 100), ids, strict=True):
        t = time.time() - age
        os.utime(store.blob_path(cid), (t, t))
    store.get(ids[0])  # a read makes ids[0] the most recently used
    evicted = store.evict_to(2000, keep={ids[1]})
    assert evicted == [ids[2], ids[3]]
    assert store.total_bytes() == 2000 and store.has(ids[0]) and store.has(ids[1])
    assert store.evict_to(0, keep={ids[1]}) == [ids[0]] and store.total_bytes() == 1000


def test_concurrent_writers_of_same_and_different_blobs(store: BlobStore) -> None:
    payloads = [os.urandom(50_000) for _ in range(4)] * 3
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(store.put_bytes(p))) for p in payloads
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(results)) == sorted({sha256_hex(p) for p in payloads})
    assert all(store.get(c, verify=True) for c in results) and store.temp_files() == []


def test_evict_to_keeps_disk_under_cap_and_the_kept_blobs(tmp_path) -> None:
    store = BlobStore(tmp_path / "cache")
    cap = 300_000
    ids = [store.put_bytes(os.urandom(100_000)) for _ in range(8)]
    store.evict_to(cap, keep=[ids[0]])
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert on_disk <= cap and store.has(ids[0])
