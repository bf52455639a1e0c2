"""Bounded-time fuzzing: random and mutated bytes never crash a decoder with a non-CodecError."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_model.codec import (
    CodecError,
    apply_delta,
    decode_sparse,
    decode_ternary,
    encode_delta,
    encode_sparse,
    encode_ternary,
    split_containers,
)
from shared_model.codec.container import PREFIX_SIZE, pack_container, parse_container

_rng = np.random.default_rng(3)
_OLD = _rng.integers(-1, 2, size=(6, 7)).astype(np.int8)
_NEW = np.where(_rng.random(_OLD.shape) < 0.2, -_OLD, _OLD).astype(np.int8)
SEEDS = [
    encode_ternary(_OLD, 0.5, "a", codec=1),
    encode_ternary(_OLD, 0.5, "a", codec=2),
    encode_delta(_OLD, _NEW, 0.5, 0.6),
    encode_sparse(_rng.normal(size=50).astype(np.float32), "g", chunk=16, k=3)[0],
]


def _decode_all(blob: bytes) -> None:
    for fn in (decode_ternary, lambda b: apply_delta(_OLD, b), decode_sparse, split_containers):
        with contextlib.suppress(CodecError):
            fn(blob)


def _reseal(blob: bytes) -> bytes:
    """Recompute the checksum so that mutations reach the codec-specific parsers."""
    try:
        box = parse_container(blob, exact=False)
    except CodecError:
        return blob
    cut = PREFIX_SIZE + len(box.header)
    return pack_container(box.codec, bytes(blob[PREFIX_SIZE:cut]), bytes(blob[cut : box.size]))


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
    resealed = _reseal(bytes(blob))
    _decode_all(resealed)
    _decode_all(resealed[: cut % (len(resealed) + 1)])
