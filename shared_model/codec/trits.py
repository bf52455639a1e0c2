"""Base-3 packing of trits, 5 per byte (3^5 = 243 <= 256), vectorised with numpy.

A trit t in {-1, 0, +1} is stored as the digit t + 1 in {0, 1, 2}; five digits
d0..d4 (d0 first in the flat order) make the byte 81*d0 + 27*d1 + 9*d2 + 3*d3 + d4.
A tail shorter than 5 is padded with zero trits (digit 1).
"""

from __future__ import annotations

import numpy as np

from shared_model.codec.errors import CodecError, MalformedError

PAD_DIGIT = 1  # the zero trit
# LUT64[b] holds the 5 trits of byte b in its first 5 bytes; gathering 8-byte words and
# slicing is ~2x faster in numpy than a (256, 5) int8 gather.
_DIGITS = np.array([[(b // 3 ** (4 - i)) % 3 for i in range(5)] for b in range(256)], np.int8)
_LUT64 = np.zeros(256, np.uint64)
_LUT64.view(np.uint8).reshape(256, 8)[:, :5] = (_DIGITS - 1).view(np.uint8)
# Digits of every valid symbol, used to build product models (entropy.py).
SYMBOL_DIGITS = _DIGITS[:243].astype(np.intp)


def as_trits(trits: np.ndarray) -> np.ndarray:
    """Return ``trits`` as a contiguous int8 array, or raise if a value is not -1/0/+1."""
    arr = np.asarray(trits)
    if arr.dtype.kind not in "iub":
        raise CodecError(f"trits must be an integer array, got dtype {arr.dtype}")
    if arr.size and (arr.min() < -1 or arr.max() > 1):
        raise CodecError("trits must only contain -1, 0 and +1 (found values outside)")
    # astype(order="C") keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    return arr.astype(np.int8, order="C", copy=not arr.flags.c_contiguous)


def pack5(trits: np.ndarray) -> np.ndarray:
    """Pack a flat int8 trit array into uint8 symbols 0..242 (ceil(n/5) of them)."""
    flat = trits.reshape(-1)
    n = flat.size
    n_sym = -(-n // 5)
    digits = np.full(n_sym * 5, PAD_DIGIT, np.uint8)
    np.add(flat.view(np.uint8), np.uint8(1), out=digits[:n])  # -1 wraps to 255, +1 -> 0
    cols = digits.reshape(n_sym, 5).T.copy()  # contiguous columns vectorise better
    out = cols[0] * np.uint8(81)
    out += cols[1] * np.uint8(27)
    out += cols[2] * np.uint8(9)
    out += cols[3] * np.uint8(3)
    out += cols[4]
    return out


def unpack5(symbols: np.ndarray, n: int) -> np.ndarray:
    """Unpack ``symbols`` into ``n`` int8 trits; raises on bytes > 242 or non-zero padding."""
    if symbols.size != -(-n // 5):
        raise MalformedError(f"{symbols.size} packed bytes cannot hold exactly {n} trits")
    if symbols.size and int(symbols.max()) > 242:
        bad = int(np.argmax(symbols > 242))
        raise MalformedError(f"packed byte {int(symbols[bad])} at index {bad} exceeds 242")
    out = _LUT64[symbols].view(np.int8).reshape(-1, 8)[:, :5].reshape(-1)
    if out.size != n:
        if np.any(out[n:] != 0):
            raise MalformedError("padding trits after the last element must be 0")
        out = out[:n]
    return np.ascontiguousarray(out)


def trit_counts(trits: np.ndarray) -> tuple[int, int, int]:
    """Return ``(count(-1), count(0), count(+1))`` of a flat int8 trit array."""
    flat = trits.reshape(-1)
    pos = int(np.count_nonzero(flat > 0))
    nonzero = int(np.count_nonzero(flat))
    return nonzero - pos, flat.size - nonzero, pos
