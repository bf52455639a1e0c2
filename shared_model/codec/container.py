"""The versioned container that frames every encoded object (docs/wire-format.md §2).

Layout (little-endian)::

    0   4  magic b"PTRN"
    4   1  format version (1)
    5   1  codec id
    6   2  flags: bit 0 = unhashed (no digest field), other bits must be 0
    8   4  header length H
    12  8  payload length P
    20 32  sha256(header || payload), absent when unhashed
    D   H  codec header (D = 52, or 20 when unhashed)
    D+H P  payload

Parsing checks every length against the real buffer before anything is allocated.
Unhashed containers are for content-addressed transport only (the tensors of a
``TensorBundle``, whose blob digest is checked by the blob service on upload and
download): there a second digest per tensor is 32 bytes of pure overhead.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from shared_model.codec.errors import (
    BadMagicError,
    ChecksumError,
    LimitError,
    MalformedError,
    ShapeMismatchError,
    TruncatedError,
    VersionError,
)

MAGIC = b"PTRN"
FORMAT_VERSION = 1
BASE = struct.Struct("<4sBBHIQ")  # magic, version, codec, flags, H, P: 20 bytes
DIGEST_SIZE = 32
PREFIX_SIZE = BASE.size + DIGEST_SIZE  # 52: the prefix of a hashed container
FLAG_UNHASHED = 0x0001
KNOWN_FLAGS = FLAG_UNHASHED

CODEC_TRITS_ZSTD = 1
CODEC_TRITS_ANS = 2
CODEC_DELTA = 3
CODEC_SPARSE_2BIT = 4
KNOWN_CODECS = {
    CODEC_TRITS_ZSTD: "trits-zstd",
    CODEC_TRITS_ANS: "trits-ans",
    CODEC_DELTA: "delta-golomb-ans",
    CODEC_SPARSE_2BIT: "sparse-2bit",
}

# Largest tensor any decoder will materialise (elements). Full-size expert matrices are
# 45M elements; 2^31 leaves room while refusing absurd headers before allocating.
MAX_ELEMENTS = 1 << 31
MAX_NDIM = 8
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Container:
    """A parsed container: codec id, codec header bytes and payload (views, no copies)."""

    codec: int
    header: memoryview
    payload: memoryview
    size: int  # total bytes this container occupies


def pack_container(codec: int, header: bytes, payload: bytes, *, hashed: bool = True) -> bytes:
    """Frame ``header`` and ``payload`` for ``codec``; returns the container bytes.

    Args:
        hashed: carry sha256(header || payload). Pass ``False`` only for containers whose
            transport already checks a digest over them (the tensors of a bundle blob).
    """
    if codec not in KNOWN_CODECS:
        raise VersionError(f"unknown codec id {codec}")
    flags = 0 if hashed else FLAG_UNHASHED
    parts = [BASE.pack(MAGIC, FORMAT_VERSION, codec, flags, len(header), len(payload))]
    if hashed:
        digest = hashlib.sha256(header)
        digest.update(payload)
        parts.append(digest.digest())
    return b"".join((*parts, header, payload))


def parse_container(data: bytes | bytearray | memoryview, *, exact: bool = True) -> Container:
    """Validate framing and checksum; with ``exact`` the buffer must hold one container only.

    Raises:
        TruncatedError, BadMagicError, VersionError, ChecksumError, MalformedError.
    """
    view = memoryview(data).cast("B")
    if len(view) < BASE.size:
        if bytes(view[:4]) != MAGIC[: len(view[:4])]:
            raise BadMagicError(f"not a codec container: starts with {bytes(view[:4])!r}")
        raise TruncatedError(f"container prefix needs {BASE.size} bytes, got {len(view)}")
    magic, version, codec, flags, hlen, plen = BASE.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagicError(f"not a codec container: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise VersionError(
            f"container format version {version}; this decoder reads version {FORMAT_VERSION}"
        )
    if codec not in KNOWN_CODECS:
        raise VersionError(f"unknown codec id {codec} (known: {sorted(KNOWN_CODECS)})")
    if flags & ~KNOWN_FLAGS:
        raise MalformedError(f"unknown container flags {flags & ~KNOWN_FLAGS:#x} (known: 0x1)")
    if hlen > MAX_HEADER:
        raise LimitError(f"codec header claims {hlen} bytes (limit {MAX_HEADER})")
    hashed = not flags & FLAG_UNHASHED
    start = PREFIX_SIZE if hashed else BASE.size
    if len(view) < start:
        raise TruncatedError(f"container prefix needs {start} bytes, got {len(view)}")
    total = start + hlen + plen
    if len(view) < total:
        raise TruncatedError(
            f"container needs {total} bytes (header {hlen}, payload {plen}), got {len(view)}"
        )
    if exact and len(view) != total:
        raise MalformedError(f"{len(view) - total} trailing bytes after the container")
    header = view[start : start + hlen]
    payload = view[start + hlen : total]
    if hashed:
        check = hashlib.sha256(header)
        check.update(payload)
        if check.digest() != bytes(view[BASE.size : PREFIX_SIZE]):
            raise ChecksumError("sha256 of container contents does not match its header")
    return Container(codec=codec, header=header, payload=payload, size=total)


def split_containers(data: bytes | bytearray | memoryview) -> list[Container]:
    """Parse a file made of one or more concatenated containers."""
    view = memoryview(data).cast("B")
    out: list[Container] = []
    offset = 0
    while offset < len(view) or not out:
        item = parse_container(view[offset:], exact=False)
        out.append(item)
        offset += item.size
    return out


class Reader:
    """Bounds-checked sequential reader over a codec header."""

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        """Return the next ``n`` bytes or raise :class:`TruncatedError`."""
        if n < 0 or self.pos + n > len(self.buf):
            raise TruncatedError(
                f"{self.what}: needs {n} more bytes at offset {self.pos}, "
                f"only {len(self.buf) - self.pos} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        """Unpack a little-endian struct format (without the ``<``)."""
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size))

    def done(self) -> None:
        """Require that the whole buffer was consumed."""
        if self.pos != len(self.buf):
            raise MalformedError(f"{self.what}: {len(self.buf) - self.pos} unexpected bytes")


def write_shape(shape: tuple[int, ...]) -> bytes:
    """Encode a shape as ``u8 ndim`` then ``u64`` per dimension."""
    if len(shape) > MAX_NDIM:
        raise MalformedError(f"tensor has {len(shape)} dims; at most {MAX_NDIM} supported")
    return struct.pack(f"<B{len(shape)}Q", len(shape), *shape)


def read_shape(reader: Reader, expected: int | None = None) -> tuple[tuple[int, ...], int]:
    """Read a shape, reject it if its element count exceeds :data:`MAX_ELEMENTS` or differs
    from ``expected`` (the receiver's own element count, when it has one).

    Decoders call this before they allocate anything, so what they allocate and the work
    they do are bounded by what the receiver expects, never by what the container claims.

    Raises:
        LimitError: more than :data:`MAX_ELEMENTS` elements.
        ShapeMismatchError: not ``expected`` elements.
    """
    (ndim,) = reader.unpack("B")
    if ndim > MAX_NDIM:
        raise MalformedError(f"{reader.what}: {ndim} dims (at most {MAX_NDIM})")
    shape = reader.unpack(f"{ndim}Q")
    n = 1
    for d in shape:
        if d > MAX_ELEMENTS:
            raise LimitError(f"{reader.what}: dimension {d} exceeds {MAX_ELEMENTS}")
        n *= d
        if n > MAX_ELEMENTS:
            raise LimitError(
                f"{reader.what}: shape {shape} has more than {MAX_ELEMENTS} elements; refusing"
            )
    if expected is not None and n != expected:
        raise ShapeMismatchError(
            f"{reader.what}: shape {tuple(shape)} has {n} elements; the receiver expects {expected}"
        )
    return tuple(shape), n


def reseal(blob: bytes) -> bytes:
    """``blob`` with its checksum recomputed over the header and payload its prefix frames
    (fuzzing: mutations then reach the codec-specific parsers instead of stopping at the
    checksum). Blobs too short for a prefix, of an unknown codec or unhashed (nothing to
    recompute) come back unchanged."""
    if len(blob) < PREFIX_SIZE:
        return blob
    _, _, codec, flags, hlen, plen = BASE.unpack_from(blob, 0)
    if codec not in KNOWN_CODECS or flags & FLAG_UNHASHED:
        return blob
    header = blob[PREFIX_SIZE : PREFIX_SIZE + hlen]
    return pack_container(codec, header, blob[PREFIX_SIZE + hlen : PREFIX_SIZE + hlen + plen])
