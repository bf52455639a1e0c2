"""Bounded-time fuzzing: random and mutated bytes never crash a decoder with a non-CodecError,
and a container's header cannot make a decoder allocate or work beyond what the receiver
expects (issue 16). The longer run is ``benchmarks/codec_fuzz_bench.py``."""

from __future__ import annotations

import contextlib
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_model.codec import (
    CodecError,
    ShapeMismatchError,
    TruncatedError,
    apply_delta,
    decode_sparse,
    decode_ternary,
    encode_delta,
    encode_sparse,
    encode_ternary,
    split_containers,
)
from shared_model.codec.container import (
    CODEC_SPARSE_2BIT,
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    PREFIX_SIZE,
    pack_container,
    reseal,
    write_shape,
)
from shared_model.federated.updates import UpdateError, decode_update

_rng = np.random.default_rng(3)
_OLD = _rng.integers(-1, 2, size=(6, 7)).astype(np.int8)
_NEW = np.where(_rng.random(_OLD.shape) < 0.2, -_OLD, _OLD).astype(np.int8)
SEEDS = [
    encode_ternary(_OLD, 0.5, "a", codec=1),
    encode_ternary(_OLD, 0.5, "a", codec=2),
    encode_delta(_OLD, _NEW, 0.5, 0.6),
    encode_delta(_OLD.reshape(-1), _NEW.reshape(-1), 0.5, 0.6, hashed=False),  # as in bundles
    encode_sparse(_rng.normal(size=50).astype(np.float32), "g", chunk=16, k=3)[0],
    # Unhashed, as bundles carry them: mutations reach the parsers without a reseal.
    encode_ternary(_OLD, 0.5, "a", codec=2, hashed=False),
    encode_sparse(_rng.normal(size=50).astype(np.float32), "g", chunk=16, k=3, hashed=False)[0],
]


def _decode_all(blob: bytes) -> None:
    for fn in (decode_ternary, lambda b: apply_delta(_OLD, b), decode_sparse, split_containers):
        with contextlib.suppress(CodecError):
            fn(blob)


@settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
def test_random_bytes(blob: bytes) -> None:
    _decode_all(blob)
    _decode_all(b"PTRN\x01\x02\x00\x00" + blob)


mutation = st.tuples(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10_000),
)


@settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck))
@given(mutation)
def test_mutated_containers(case) -> None:
    which, edits, cut = case
    blob = bytearray(SEEDS[which])
    for pos, val in edits:
        # Mostly inside header and payload (after the 52-byte prefix), sometimes anywhere.
        blob[pos % len(blob)] = val
    resealed = reseal(bytes(blob))
    _decode_all(resealed)
    _decode_all(resealed[: cut % (len(resealed) + 1)])


# --- the receiver's element count: header lies are refused before anything is allocated ---

_N = _OLD.size


def _decode_expected(blob: bytes) -> None:
    """The coordinator's path: every decoder told the element count it expects."""
    for fn in (
        lambda b: decode_ternary(b, expected=_N),
        lambda b: decode_sparse(b, expected=50),
        lambda b: decode_update(b, (50,)),
        lambda b: decode_update(b, _OLD.shape),
        # a trit-flip delta (stage 4's trits columns) decodes against the receiver's base
        lambda b: decode_update(b, _OLD.shape, torch.from_numpy(_OLD.astype(np.float32))),
    ):
        with contextlib.suppress(CodecError, UpdateError):
            fn(blob)


@settings(max_examples=200, deadline=2000, suppress_health_check=list(HealthCheck))
@given(mutation, st.sampled_from([0, 1 << 31, (1 << 31) - 1, 1 << 32, (1 << 64) - 1]))
def test_mutated_containers_with_expected_counts(case, lie) -> None:
    """Mutations plus a lying u64 header field (an element count, a trit count, a chunk
    size...) only ever raise CodecError/UpdateError, within the deadline."""
    which, edits, at = case
    blob = bytearray(SEEDS[which])
    for pos, val in edits:
        blob[pos % len(blob)] = val
    box_end = len(blob) - 8
    struct.pack_into("<Q", blob, PREFIX_SIZE + at % max(1, box_end - PREFIX_SIZE), lie)
    _decode_expected(reseal(bytes(blob)))


def _claims(codec: int, n: int, payload: bytes) -> bytes:
    """A container whose header claims ``n`` elements, around ``payload``."""
    if codec == CODEC_SPARSE_2BIT:  # chunk 1, keep 1: one chunk table entry per element
        header = struct.pack("<H", 0) + write_shape((n,)) + struct.pack("<II", 1, 1)
    else:  # near-degenerate trit counts: rANS decodes ~0 bits per symbol
        header = struct.pack("<HB", 0, 0) + write_shape((n,)) + struct.pack("<f3Q", 1, 1, n - 2, 1)
    return pack_container(codec, header, payload)


@pytest.mark.parametrize("codec", [CODEC_SPARSE_2BIT, CODEC_TRITS_ZSTD, CODEC_TRITS_ANS])
def test_header_lies_are_refused_before_allocating(codec) -> None:
    """Tiny containers claiming 2^31 elements: refused by the expected count with
    (almost) nothing allocated — they asked for 16 GiB, 3 GiB and 50 s of rANS before."""
    blob = _claims(codec, (1 << 31) - 5, bytes(96))
    decode = decode_sparse if codec == CODEC_SPARSE_2BIT else decode_ternary
    tracemalloc.start()
    start = time.process_time()  # this process's CPU time: other load does not count
    with pytest.raises(ShapeMismatchError, match="expects 42"):
        decode(blob, expected=42)
    cpu = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cpu < 0.5 and peak < 1 << 20, (cpu, peak)


def test_sparse_payload_length_is_checked_before_chunk_tables() -> None:
    """Without an expected count, a sparse header's chunk count must still be paid for
    in payload bytes before any per-chunk array exists."""
    tracemalloc.start()
    with pytest.raises(TruncatedError, match="need"):
        decode_sparse(_claims(CODEC_SPARSE_2BIT, 1 << 31, struct.pack("<Q", 0)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_sparse_decodes_in_blocks_exactly(monkeypatch) -> None:
    """Block-wise decoding (bounded temporaries) gives exactly the encoder's array."""
    from shared_model.codec import pseudograd

    x = _rng.normal(size=1001).astype(np.float32)
    blob, recon = encode_sparse(x, "g", chunk=16, k=5)
    monkeypatch.setattr(pseudograd, "BLOCK_VALUES", 7)  # many blocks, one odd last chunk
    assert np.array_equal(decode_sparse(blob, expected=1001)[0], recon)
