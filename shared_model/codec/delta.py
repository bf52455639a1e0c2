"""Deltas between two ternary tensors of the same shape (docs/wire-format.md §4).

A delta lists the changed positions and, per change, one bit for the new value. The
gaps between changed positions are split Golomb-style, ``gap = q*M + r``, with ``M``
chosen so that ``(1-f)^M ~ 1/2``; ``q`` is rANS-coded with its empirical histogram and
``r`` with a uniform model over ``0..M-1``. For flips at rate f this costs within ~0.5 %
of the entropy bound h(f) + f bits per parameter (measured in the docs).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from shared_model.codec.container import (
    CODEC_DELTA,
    Reader,
    pack_container,
    parse_container,
    read_shape,
    write_shape,
)
from shared_model.codec.entropy import ans_decode, ans_encode
from shared_model.codec.errors import CodecError, MalformedError, ShapeMismatchError
from shared_model.codec.trits import as_trits, trit_counts

ESCAPE = 255  # q symbols >= ESCAPE carry q - ESCAPE as an extra u64
MAX_M = 1 << 16


def golomb_m(k: int, n: int) -> int:
    """Golomb divisor for ``k`` changes among ``n`` positions: ``(1-k/n)^M ~ 1/2``."""
    if k == 0 or 2 * k >= n:
        return 1
    theta = 1.0 - k / n
    return int(min(MAX_M, max(1, round(-1.0 / math.log2(theta)))))


def encode_delta(
    old_trits: np.ndarray,
    new_trits: np.ndarray,
    old_scale: float,
    new_scale: float,
    *,
    hashed: bool = True,
) -> bytes:
    """Encode the change from ``old_trits*old_scale`` to ``new_trits*new_scale``.

    ``hashed=False`` leaves out the container's sha256 (a bundle's tensors: the blob that
    carries them is content-addressed; docs/wire-format.md §2).

    Returns:
        Container bytes; :func:`apply_delta` on ``old_trits`` reproduces the target exactly.
    """
    old = as_trits(old_trits)
    new = as_trits(new_trits)
    if old.shape != new.shape:
        raise ShapeMismatchError(f"old shape {old.shape} differs from new shape {new.shape}")
    scales = np.array([old_scale, new_scale], np.float32)
    if not np.all(np.isfinite(scales)):
        raise CodecError(f"scales must be finite in float32, got {old_scale!r}, {new_scale!r}")
    flat_old, flat_new = old.reshape(-1), new.reshape(-1)
    pos = np.flatnonzero(flat_old != flat_new)
    n, k = flat_old.size, pos.size
    m = golomb_m(k, n)
    gaps = np.diff(pos, prepend=-1) - 1
    q, r = np.divmod(gaps, m)
    q_sym = np.minimum(q, ESCAPE)
    alphabet = int(q_sym.max()) + 1 if k else 1
    q_counts = np.bincount(q_sym, minlength=alphabet).astype(np.int64)
    escapes = (q[q >= ESCAPE] - ESCAPE).astype("<u8")
    # New value bit: (new - old) mod 3 is 1 or 2 at a changed position.
    bits = ((flat_new[pos].astype(np.int16) - flat_old[pos] + 3) % 3 - 1).astype(np.uint8)
    header = b"".join(
        (
            write_shape(old.shape),
            struct.pack("<2f", *scales.tolist()),
            struct.pack("<3Q", *trit_counts(old)),
            struct.pack("<3Q", *trit_counts(new)),
            struct.pack("<QIH", k, m, alphabet),
            q_counts.astype("<u4").tobytes(),
            struct.pack("<I", escapes.size),
        )
    )
    words = ans_encode([(q_sym, q_counts / max(k, 1)), (r, m)])
    payload = b"".join(
        (struct.pack("<Q", len(words)), words, escapes.tobytes(), np.packbits(bits).tobytes())
    )
    return pack_container(CODEC_DELTA, header, payload, hashed=hashed)


def _read_header(rd: Reader):
    shape, n = read_shape(rd)
    old_scale, new_scale = rd.unpack("2f")
    old_counts = rd.unpack("3Q")
    new_counts = rd.unpack("3Q")
    k, m, alphabet = rd.unpack("QIH")
    if k > n:
        raise MalformedError(f"delta header: {k} changes in a tensor of {n} elements")
    if not 1 <= m <= MAX_M:
        raise MalformedError(f"delta header: Golomb divisor {m} outside 1..{MAX_M}")
    if not 1 <= alphabet <= ESCAPE + 1:
        raise MalformedError(f"delta header: q alphabet {alphabet} outside 1..{ESCAPE + 1}")
    q_counts = np.frombuffer(rd.take(4 * alphabet), "<u4").astype(np.int64)
    (n_esc,) = rd.unpack("I")
    rd.done()
    if int(q_counts.sum()) != k:
        raise MalformedError(f"delta header: q histogram sums to {q_counts.sum()}, not {k}")
    if alphabet == ESCAPE + 1 and n_esc != q_counts[ESCAPE] or alphabet <= ESCAPE and n_esc:
        raise MalformedError(f"delta header: {n_esc} escapes do not match the q histogram")
    if sum(old_counts) != n or sum(new_counts) != n:
        raise MalformedError("delta header: trit counts do not sum to the element count")
    if not (math.isfinite(old_scale) and math.isfinite(new_scale)):
        raise MalformedError("delta header: scales must be finite")
    return shape, n, new_scale, old_counts, new_counts, k, m, q_counts, n_esc


def apply_delta(old_trits: np.ndarray, data: bytes | memoryview) -> tuple[np.ndarray, float]:
    """Apply a delta from :func:`encode_delta` to ``old_trits`` (not modified).

    Returns:
        ``(new_trits, new_scale)``.

    Raises:
        ShapeMismatchError: ``old_trits`` is not the tensor the delta was made against.
        CodecError: another subclass when ``data`` is malformed.
    """
    box = parse_container(data)
    if box.codec != CODEC_DELTA:
        raise MalformedError(f"container holds codec {box.codec}, not a ternary delta")
    shape, n, new_scale, old_counts, new_counts, k, m, q_counts, n_esc = _read_header(
        Reader(box.header, "delta header")
    )
    old = as_trits(old_trits)
    if old.shape != shape:
        raise ShapeMismatchError(f"delta is for shape {shape}, base tensor has {old.shape}")
    if trit_counts(old) != old_counts:
        raise ShapeMismatchError(
            "base tensor's trit counts differ from the delta's: it was made against another base"
        )
    q, r, bits = _read_payload(Reader(box.payload, "delta payload"), k, m, q_counts, n_esc)
    gaps = q * m + r + 1
    if k and int(gaps.max()) > n:
        raise MalformedError("delta payload: a gap runs past the end of the tensor")
    pos = np.cumsum(gaps) - 1
    if k and int(pos[-1]) >= n:
        raise MalformedError(f"delta payload: change at position {pos[-1]} beyond {n} elements")
    new = old.reshape(-1).copy()
    new[pos] = (new[pos] + 2 + bits.astype(np.int8)) % 3 - 1
    if trit_counts(new) != new_counts:
        raise MalformedError("delta result's trit counts differ from the header: corrupt delta")
    return new.reshape(shape), float(new_scale)


def _read_payload(rd: Reader, k: int, m: int, q_counts: np.ndarray, n_esc: int):
    (n_words,) = rd.unpack("Q")
    words = rd.take(n_words)
    escapes = np.frombuffer(rd.take(8 * n_esc), "<u8")
    bits = np.unpackbits(np.frombuffer(rd.take(-(-k // 8)), np.uint8))
    rd.done()
    if k and np.any(bits[k:]):
        raise MalformedError("delta payload: padding bits after the last value must be 0")
    q_model = q_counts / max(k, 1)
    q, r = ans_decode(words, [(k, q_model), (k, m)], "delta payload")
    q = q.astype(np.int64)
    if n_esc:
        if int(escapes.max()) > (1 << 40):
            raise MalformedError("delta payload: escaped gap quotient is absurdly large")
        q[q == ESCAPE] += escapes.astype(np.int64)
    if k and int(r.max()) >= m:
        raise MalformedError("delta payload: remainder not below the Golomb divisor")
    return q, r.astype(np.int64), bits[:k]
