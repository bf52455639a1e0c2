"""Full ternary tensors: ``encode_ternary`` / ``decode_ternary`` (docs/wire-format.md §3)."""

from __future__ import annotations

import math
import struct

import numpy as np

from shared_model.codec.container import (
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    Reader,
    pack_container,
    parse_container,
    read_shape,
    write_shape,
)
from shared_model.codec.entropy import (
    ans_decode,
    ans_encode,
    product_model,
    zstd_compress,
    zstd_decompress,
)
from shared_model.codec.errors import CodecError, MalformedError
from shared_model.codec.trits import as_trits, pack5, trit_counts, unpack5

DTYPES = {0: "float32", 1: "float16", 2: "bfloat16"}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_NAME = 1024
# zstd is kept when it is within this factor of the i.i.d. entropy bound; otherwise rANS
# (within ~0.01 % of the bound, but ~5x slower to decode). Measured in docs/wire-format.md.
ZSTD_SLACK = 1.008


def entropy_bits(counts: tuple[int, int, int]) -> float:
    """Empirical order-0 entropy of a trit array with these counts, in bits (total)."""
    n = sum(counts)
    return -sum(c * math.log2(c / n) for c in counts if c)


def _header(name: str, dtype: str, shape: tuple[int, ...], scale: float, counts) -> bytes:
    raw_name = name.encode("utf-8")
    if len(raw_name) > MAX_NAME:
        raise CodecError(f"tensor name is {len(raw_name)} bytes; at most {MAX_NAME}")
    if dtype not in DTYPE_CODES:
        raise CodecError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    return b"".join(
        (
            struct.pack("<H", len(raw_name)),
            raw_name,
            struct.pack("<B", DTYPE_CODES[dtype]),
            write_shape(shape),
            struct.pack("<f3Q", scale, *counts),
        )
    )


def encode_ternary(
    trits: np.ndarray,
    scale: float,
    name: str = "",
    *,
    dtype: str = "float32",
    codec: int = 0,
    hashed: bool = True,
) -> bytes:
    """Encode a ternary tensor ``trits * scale`` into one container.

    Args:
        trits: integer array of -1/0/+1, any shape (including empty).
        scale: the per-tensor scale; must be finite.
        name: tensor name stored in the header (UTF-8, at most 1024 bytes).
        dtype: dtype the dense tensor stands for (float32, float16, bfloat16).
        codec: 0 = choose (zstd if within 0.8 % of the entropy bound, else rANS),
            or force ``CODEC_TRITS_ZSTD`` / ``CODEC_TRITS_ANS``.
        hashed: carry the container's sha256; ``False`` only inside a content-addressed
            blob (:func:`~shared_model.codec.container.pack_container`).

    Returns:
        Container bytes.
    """
    arr = as_trits(trits)
    scale32 = np.float32(scale)
    if not np.isfinite(scale32):
        raise CodecError(f"scale must be finite in float32, got {scale!r}")
    counts = trit_counts(arr)
    header = _header(name, dtype, tuple(arr.shape), float(scale32), counts)
    symbols = pack5(arr)
    if codec not in (0, CODEC_TRITS_ZSTD, CODEC_TRITS_ANS):
        raise CodecError(f"codec must be 0, {CODEC_TRITS_ZSTD} or {CODEC_TRITS_ANS}, got {codec}")
    if codec in (0, CODEC_TRITS_ZSTD):
        payload = zstd_compress(symbols)
        bound = entropy_bits(counts) / 8 + 64  # 64 bytes: frame + rANS state overhead
        if codec == CODEC_TRITS_ZSTD or len(payload) <= ZSTD_SLACK * bound:
            return pack_container(CODEC_TRITS_ZSTD, header, payload, hashed=hashed)
    n_pad = symbols.size * 5
    model = product_model((counts[0], counts[1] + n_pad - arr.size, counts[2]), max(n_pad, 1))
    payload = ans_encode([(symbols, model)])
    return pack_container(CODEC_TRITS_ANS, header, payload, hashed=hashed)


def decode_ternary(
    data: bytes | memoryview, *, expected: int | None = None
) -> tuple[np.ndarray, float, str]:
    """Decode a container written by :func:`encode_ternary`.

    Args:
        data: the container.
        expected: the element count the receiver expects (checked before anything is
            allocated or decoded; ``None``: any count up to ``MAX_ELEMENTS``).

    Returns:
        ``(trits int8 array of the stored shape, scale, name)``.

    Raises:
        CodecError: a subclass naming what is wrong with ``data``.
    """
    trits, scale, name, _ = decode_ternary_full(data, expected=expected)
    return trits, scale, name


def decode_ternary_full(
    data: bytes | memoryview, *, expected: int | None = None
) -> tuple[np.ndarray, float, str, str]:
    """Like :func:`decode_ternary` but also returns the stored dtype name."""
    box = parse_container(data)
    if box.codec not in (CODEC_TRITS_ZSTD, CODEC_TRITS_ANS):
        raise MalformedError(f"container holds codec {box.codec}, not a ternary tensor")
    rd = Reader(box.header, "ternary header")
    (name_len,) = rd.unpack("H")
    try:
        name = bytes(rd.take(name_len)).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("ternary header: tensor name is not valid UTF-8") from None
    (dtype_code,) = rd.unpack("B")
    if dtype_code not in DTYPES:
        raise MalformedError(f"ternary header: unknown dtype code {dtype_code}")
    shape, n = read_shape(rd, expected)
    scale, *counts = rd.unpack("f3Q")
    rd.done()
    if sum(counts) != n:
        raise MalformedError(f"ternary header: trit counts {counts} do not sum to {n} elements")
    if not math.isfinite(scale):
        raise MalformedError(f"ternary header: scale {scale} is not finite")
    n_sym = -(-n // 5)
    if box.codec == CODEC_TRITS_ZSTD:
        raw = zstd_decompress(box.payload, n_sym, "ternary payload")
        symbols = np.frombuffer(raw, np.uint8)
    else:
        model = product_model((counts[0], counts[1] + n_sym * 5 - n, counts[2]), max(n_sym * 5, 1))
        (sym32,) = ans_decode(box.payload, [(n_sym, model)], "ternary payload")
        symbols = sym32.astype(np.uint8)
    trits = unpack5(symbols, n)
    if trit_counts(trits) != tuple(counts):
        raise MalformedError(
            f"decoded trit counts {trit_counts(trits)} differ from header counts {tuple(counts)}"
        )
    return trits.reshape(shape), float(scale), name, DTYPES[dtype_code]
