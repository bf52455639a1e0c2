"""Tests for the tokenizer, shards and the prepared-corpus dataset (real stdlib text)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared_model import tokenizer as tk
from shared_model.data import DataError, load_corpus, prepare_corpus, split_of
from shared_model.shards import decode_shard, encode_shard, read_shard, sha256_bytes

TINY_BYTES = 600_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus("stdlib", 512, tmp_path_factory.mktemp("data"), max_bytes=TINY_BYTES)


def test_tokenizer_round_trip_and_determinism():
    docs = load_corpus("stdlib", max_bytes=300_000)
    texts = [d.text for d in docs]
    a = tk.train_tokenizer(texts, 400)
    b = tk.train_tokenizer(texts, 400)
    assert a.to_str() == b.to_str()
    sample = texts[0][:2000] + "\n# ünïcödé ✓\n"
    ids = a.encode(sample).ids
    assert a.decode(ids) == sample
    assert max(ids) < 400


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(tk.TokenizerError, match="too small"):
        tk.train_tokenizer(["abc"], 100)


def test_prepare_is_cached_and_deterministic(corpus, tmp_path):
    again = prepare_corpus("stdlib", 512, corpus.root.parent, max_bytes=TINY_BYTES)
    assert again.root == corpus.root
    fresh = prepare_corpus("stdlib", 512, tmp_path, max_bytes=TINY_BYTES)
    assert fresh.manifest["splits"] == corpus.manifest["splits"]
    assert fresh.manifest["tokenizer_sha256"] == corpus.manifest["tokenizer_sha256"]


def test_shard_content_id_is_sha256_of_bytes(corpus):
    for cid in corpus.shard_ids("train") + corpus.shard_ids("val"):
        data = (corpus.root / "shards" / f"{cid}.shard").read_bytes()
        assert sha256_bytes(data) == cid
        shard = decode_shard(data, cid)
        assert int(shard.offsets[-1]) == shard.tokens.size


def test_corrupted_shard_is_rejected(corpus, tmp_path):
    cid = corpus.shard_ids("train")[0]
    data = bytearray((corpus.root / "shards" / f"{cid}.shard").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / f"{cid}.shard").write_bytes(bytes(data))
    with pytest.raises(DataError, match="content id mismatch"):
        read_shard(tmp_path, cid)
    with pytest.raises(DataError, match="zstd|size|magic|offsets"):
        decode_shard(bytes(data))


def test_shard_round_trip_and_range_check():
    data = encode_shard([7, 3], [[1, 2, 3], [65535]], np.dtype(np.uint16))
    shard = decode_shard(data)
    assert shard.doc_ids.tolist() == [7, 3]
    assert shard.document(0).tolist() == [1, 2, 3]
    assert shard.document(1).tolist() == [65535]
    with pytest.raises(DataError, match="out of range"):
        encode_shard([0], [[70000]], np.dtype(np.uint16))


def test_train_val_split_disjoint(corpus):
    train = {d["name"] for d in corpus.documents("train")}
    val = {d["name"] for d in corpus.documents("val")}
    assert train and val and not train & val
    assert all(split_of(n) == "train" for n in train if n not in val) or len(val) == 1
    ids_train = set(corpus.dataset("train").doc_ids.tolist())
    ids_val = set(corpus.dataset("val").doc_ids.tolist())
    assert not ids_train & ids_val


def test_batches_deterministic_and_in_range(corpus):
    ds = corpus.dataset("train")
    a = ds.batch(5, 4, 32, seed=1)
    assert a.shape == (4, 33)
    assert a.dtype.is_floating_point is False
    assert ds.batch(5, 4, 32, seed=1).equal(a)
    assert not ds.batch(6, 4, 32, seed=1).equal(a)
    assert int(a.max()) < 512


def test_document_subset(corpus):
    ds = corpus.dataset("train")
    docs = list(ds.iter_documents())
    chosen = [docs[2][0], docs[0][0]]
    sub = corpus.dataset("train", doc_ids=chosen)
    assert [i for i, _ in sub.iter_documents()] == sorted(chosen)
    expected = sum(len(t) + 1 for i, t in docs if i in chosen)
    assert sub.n_tokens == expected
    with pytest.raises(DataError, match="not in this dataset"):
        ds.subset([10**9])


def test_jsonl_and_txt_directory(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("hello world " * 200)
    lines = [json.dumps({"text": f"document number {i} " * 50}) for i in range(30)]
    (src / "b.jsonl").write_text("\n".join(lines))
    docs = load_corpus(src)
    assert len(docs) == 31 and docs[0].name == "a.txt" and docs[1].name == "b.jsonl:1"
    prepared = prepare_corpus(src, 300, tmp_path / "cache")
    assert prepared.dataset("val").n_tokens > 0
    (src / "bad.jsonl").write_text('{"nottext": 1}\n')
    with pytest.raises(DataError, match="'text'"):
        load_corpus(src)


def test_missing_corpus_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist: give 'stdlib', a directory"):
        load_corpus(tmp_path / "nope")
