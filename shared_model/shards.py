"""Token shards: zstd-compressed token arrays with document boundaries, content-addressed.

Byte layout of a shard before compression (all little-endian), version 1::

    magic      8 bytes   b"PSHARD1\\0"
    itemsize   uint32    2 (uint16 tokens) or 4 (uint32 tokens)
    n_docs     uint32
    n_tokens   uint64
    doc_ids    uint64[n_docs]      global document ids, in storage order
    offsets    uint64[n_docs + 1]  token offset of each document; offsets[-1] == n_tokens
    tokens     uint{16,32}[n_tokens]

The file on disk is ``zstd(layout)`` and its content id is the sha256 of those file
bytes, so a shard fetched from anywhere can be verified before use.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from shared_model.files import write_atomic

MAGIC = b"PSHARD1\x00"
_HEADER = struct.Struct("<8sIIQ")
_ZSTD_LEVEL = 10
# Refuse absurd decompressed sizes from a hostile shard before allocating them.
MAX_SHARD_BYTES = 1 << 31


class DataError(ValueError):
    """Corpus, shard or dataset problem; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Shard:
    """Decoded shard contents."""

    doc_ids: np.ndarray  # uint64[n_docs]
    offsets: np.ndarray  # uint64[n_docs + 1]
    tokens: np.ndarray  # uint16 or uint32 [n_tokens]

    def document(self, i: int) -> np.ndarray:
        """Tokens of the i-th document stored in this shard."""
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (the content id of a shard or blob)."""
    return hashlib.sha256(data).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id of ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_shard(doc_ids: Sequence[int], docs: Sequence[Sequence[int]], dtype: np.dtype) -> bytes:
    """Serialise documents into compressed shard bytes (deterministic).

    Raises:
        DataError: lengths differ or a token id does not fit ``dtype``.
    """
    if len(doc_ids) != len(docs):
        raise DataError(f"{len(doc_ids)} document ids for {len(docs)} documents")
    dtype = np.dtype(dtype).newbyteorder("<")
    lengths = np.array([len(d) for d in docs], dtype=np.uint64)
    offsets = np.zeros(len(docs) + 1, dtype="<u8")
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
        raise DataError(f"token ids out of range for {dtype.name}: use a wider token dtype")
    header = _HEADER.pack(MAGIC, dtype.itemsize, len(docs), int(offsets[-1]))
    raw = b"".join(
        [
            header,
            np.asarray(doc_ids, dtype="<u8").tobytes(),
            offsets.tobytes(),
            flat.astype(dtype).tobytes(),
        ]
    )
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(raw)


def decode_shard(data: bytes, expected_id: str | None = None) -> Shard:
    """Verify and decode compressed shard bytes.

    Args:
        data: the file bytes.
        expected_id: content id the bytes must hash to (sha256 hex), if known.

    Raises:
        DataError: hash mismatch, bad compression, bad magic or inconsistent sizes.
    """
    if expected_id is not None and sha256_bytes(data) != expected_id:
        raise DataError(
            f"shard content id mismatch: expected {expected_id}, got {sha256_bytes(data)}; "
            "the shard is corrupt or truncated, delete it and re-prepare or re-download it"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_SHARD_BYTES)
    except zstandard.ZstdError as exc:
        raise DataError(f"shard is not valid zstd data ({exc}); re-download it") from exc
    if len(raw) < _HEADER.size:
        raise DataError("shard is truncated: shorter than its header")
    magic, itemsize, n_docs, n_tokens = _HEADER.unpack_from(raw)
    if magic != MAGIC or itemsize not in (2, 4):
        raise DataError("not a Perspective shard (bad magic or token width)")
    expected = _HEADER.size + 8 * n_docs + 8 * (n_docs + 1) + itemsize * n_tokens
    if len(raw) != expected:
        raise DataError(f"shard size {len(raw)} != {expected} implied by its header")
    pos = _HEADER.size
    doc_ids = np.frombuffer(raw, dtype="<u8", count=n_docs, offset=pos)
    pos += 8 * n_docs
    offsets = np.frombuffer(raw, dtype="<u8", count=n_docs + 1, offset=pos)
    pos += 8 * (n_docs + 1)
    tokens = np.frombuffer(raw, dtype=f"<u{itemsize}", count=n_tokens, offset=pos)
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise DataError("shard document offsets are not monotonic from 0 to n_tokens")
    return Shard(doc_ids=doc_ids, offsets=offsets, tokens=tokens)


def write_shard(directory: str | Path, data: bytes) -> str:
    """Store shard bytes as ``<content id>.shard`` (atomic); return the content id."""
    cid = sha256_bytes(data)
    path = Path(directory) / f"{cid}.shard"
    if not path.exists():
        write_atomic(path, data)
    return cid


def read_shard(directory: str | Path, content_id: str) -> Shard:
    """Read, verify and decode the shard with ``content_id`` from ``directory``.

    Raises:
        DataError: the file is missing or does not match its content id.
    """
    path = Path(directory) / f"{content_id}.shard"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"shard {content_id} not found at {path}: {exc.strerror}") from exc
    return decode_shard(data, expected_id=content_id)
