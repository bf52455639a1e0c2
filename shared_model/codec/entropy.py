"""Entropy coders used by the codecs: zstd frames and rANS (constriction's ``AnsCoder``).

The rANS bitstream is that of ``constriction.stream.stack.AnsCoder`` (constriction 0.5:
64-bit state, 32-bit words, 24-bit probability precision) with models built by
``constriction.stream.model.Categorical(probabilities, perfect=False)`` from float64
probabilities that both sides compute identically from integer counts in the header.
"""

from __future__ import annotations

import numpy as np
import zstandard

from shared_model.codec.errors import MalformedError
from shared_model.codec.trits import SYMBOL_DIGITS

ZSTD_LEVEL = 1  # measured: higher levels compress ternary bytes no better (docs)


def zstd_compress(raw: bytes | np.ndarray) -> bytes:
    """One zstd frame with its content size recorded (the decoder checks it)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)


def zstd_decompress(payload: memoryview | bytes, expected: int, what: str) -> bytes:
    """Decompress exactly ``expected`` bytes; the frame must declare that size itself."""
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise MalformedError(f"{what}: not a zstd frame ({exc})") from None
    if params.content_size != expected:
        raise MalformedError(
            f"{what}: zstd frame declares {params.content_size} bytes, header says {expected}"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise MalformedError(f"{what}: corrupt zstd frame ({exc})") from None
    if len(raw) != expected:
        raise MalformedError(f"{what}: zstd frame gave {len(raw)} bytes, expected {expected}")
    return raw


def product_model(counts: tuple[int, int, int], n_padded: int) -> np.ndarray:
    """Probabilities of the 243 packed symbols when the 5 trits are i.i.d.

    ``p[d] = counts[d] / n_padded`` (float64, correctly rounded division) and
    ``P(s) = p[d0] * p[d1] * p[d2] * p[d3] * p[d4]`` evaluated left to right.
    """
    p = np.array(counts, np.float64) / float(n_padded)
    d = SYMBOL_DIGITS
    return p[d[:, 0]] * p[d[:, 1]] * p[d[:, 2]] * p[d[:, 3]] * p[d[:, 4]]


def _categorical(probs: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(probs, perfect=False)


def ans_encode(streams: list[tuple[np.ndarray, object]]) -> bytes:
    """rANS-encode ``[(symbols, model), ...]``; the decoder reads them in the same order.

    ``model`` is a float64 probability vector (categorical) or an int ``m`` (uniform over
    ``0..m-1``). Streams with an alphabet of one symbol carry no information and are skipped.
    """
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, model in reversed(streams):  # a stack: encode last stream first
        if symbols.size == 0 or _alphabet(model) == 1:
            continue
        coder.encode_reverse(symbols.astype(np.int32, copy=False), _model(model))
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(payload: memoryview | bytes, streams: list[tuple[int, object]], what: str):
    """Decode ``[(count, model), ...]`` written by :func:`ans_encode`; returns int32 arrays."""
    import constriction

    if len(payload) % 4:
        raise MalformedError(f"{what}: rANS payload of {len(payload)} bytes is not whole words")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    out = []
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for count, model in streams:
            if count == 0 or _alphabet(model) == 1:
                out.append(np.zeros(count, np.int32))
                continue
            out.append(np.asarray(coder.decode(_model(model), count), dtype=np.int32))
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise MalformedError(f"{what}: rANS decoding failed ({exc})") from None
    if not empty:
        raise MalformedError(f"{what}: rANS payload has data left after the declared symbols")
    return out


def _alphabet(model: object) -> int:
    return int(model) if isinstance(model, int) else int(np.asarray(model).size)


def _model(model: object):
    import constriction

    if isinstance(model, int):
        return constriction.stream.model.Uniform(model)
    return _categorical(np.asarray(model, np.float64))
