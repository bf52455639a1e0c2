"""Round trips, malformed input and golden bytes for shared_model.codec."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_model.codec import (
    BadMagicError,
    ChecksumError,
    CodecError,
    LimitError,
    MalformedError,
    ShapeMismatchError,
    TruncatedError,
    VersionError,
    apply_delta,
    decode_sparse,
    decode_ternary,
    encode_delta,
    encode_sparse,
    encode_ternary,
)
from shared_model.codec.container import (
    BASE,
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    FLAG_UNHASHED,
    PREFIX_SIZE,
    pack_container,
    parse_container,
)

GOLDEN = Path(__file__).parent / "golden"
shapes = st.lists(st.integers(0, 13), min_size=0, max_size=3).map(tuple)


def _trits(rng: np.random.Generator, shape: tuple[int, ...], p0: float) -> np.ndarray:
    p = [(1 - p0) / 2, p0, (1 - p0) / 2]
    return rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=p)


@settings(max_examples=80, deadline=None)
@given(shapes, st.floats(0, 1), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2]))
def test_ternary_round_trip(shape, p0, seed, codec) -> None:
    trits = _trits(np.random.default_rng(seed), shape, p0)
    blob = encode_ternary(trits, 0.25, "layer.0.w1", codec=codec)
    out, scale, name = decode_ternary(blob)
    assert out.shape == trits.shape and out.dtype == np.int8
    assert np.array_equal(out, trits) and scale == 0.25 and name == "layer.0.w1"


@settings(max_examples=80, deadline=None)
@given(shapes, st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_delta_round_trip(shape, p0, flip, seed) -> None:
    rng = np.random.default_rng(seed)
    old = _trits(rng, shape, p0)
    mask = rng.random(shape) < flip
    new = old.copy()
    new[mask] = (old[mask] + 1 + rng.integers(1, 3, size=int(mask.sum()))) % 3 - 1
    out, scale = apply_delta(old, encode_delta(old, new, 0.5, 0.75))
    assert np.array_equal(out, new) and scale == 0.75


def test_large_gaps_use_escapes() -> None:
    old = np.zeros(3_000_000, np.int8)
    new = old.copy()
    new[[5, 6, 2_999_999]] = [1, -1, 1]  # huge gap -> q beyond the escape symbol
    out, _ = apply_delta(old, encode_delta(old, new, 1.0, 1.0))
    assert np.array_equal(out, new)


def test_compression_near_entropy_bound() -> None:
    rng = np.random.default_rng(0)
    trits = _trits(rng, (400_000,), 0.42)
    c = np.bincount(trits + 1, minlength=3) / trits.size
    bound = -sum(p * np.log2(p) for p in c if p)
    assert len(encode_ternary(trits, 1.0)) * 8 / trits.size < bound * 1.01
    new = trits.copy()
    flips = rng.random(trits.size) < 0.02
    new[flips] = (trits[flips] + 2) % 3 - 1
    f = flips.mean()
    hf = -(f * np.log2(f) + (1 - f) * np.log2(1 - f)) + f
    assert len(encode_delta(trits, new, 1.0, 1.0)) * 8 / trits.size < hf * 1.05


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 9000), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_pseudograd_decoder_is_exact(n, chunk, seed) -> None:
    x = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    k = max(1, chunk // 8)
    blob, recon = encode_sparse(x, "g", chunk=chunk, k=k)
    assert np.array_equal(decode_sparse(blob)[0], recon)
    assert np.count_nonzero(recon) <= -(-n // chunk) * k


def _sample() -> bytes:
    return encode_ternary(np.array([1, 0, -1, 0, 1, 1, 0], np.int8), 0.5, "t")


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda b: b[:30], TruncatedError, "prefix"),
        (lambda b: b[:-1], TruncatedError, "needs"),
        (lambda b: b"XXXX" + b[4:], BadMagicError, "magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], VersionError, "version"),
        (lambda b: b[:5] + b"\x63" + b[6:], VersionError, "codec"),
        (lambda b: b[:6] + b"\x02\x00" + b[8:], MalformedError, "unknown container flags"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), ChecksumError, "sha256"),
        (lambda b: b + b"\x00", MalformedError, "trailing"),
    ],
)
def test_malformed_containers(mutate, error, message) -> None:
    with pytest.raises(error, match=message):
        decode_ternary(mutate(_sample()))


@pytest.mark.parametrize("codec", [CODEC_TRITS_ZSTD, CODEC_TRITS_ANS, "sparse"])
def test_unhashed_container_is_the_hashed_one_without_its_digest(codec) -> None:
    """Byte-exact: flag 0x1 set and the 32 digest bytes left out, nothing else changes;
    both decode to the same tensor. (Bundles carry these: the blob is content-addressed.)"""
    rng = np.random.default_rng(5)
    if codec == "sparse":
        values = rng.normal(size=300).astype(np.float32)
        hashed, _ = encode_sparse(values, "g", chunk=64, k=8)
        unhashed, _ = encode_sparse(values, "g", chunk=64, k=8, hashed=False)
        decode = decode_sparse
    else:
        trits = _trits(rng, (7, 9), 0.6)
        hashed = encode_ternary(trits, 0.25, "w", codec=codec)
        unhashed = encode_ternary(trits, 0.25, "w", codec=codec, hashed=False)
        decode = decode_ternary
    flags = struct.pack("<H", FLAG_UNHASHED)
    assert unhashed == hashed[:6] + flags + hashed[8 : BASE.size] + hashed[PREFIX_SIZE:]
    assert len(hashed) - len(unhashed) == 32
    for a, b in zip(decode(hashed), decode(unhashed), strict=True):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    assert parse_container(unhashed).size == len(unhashed)
    with pytest.raises(TruncatedError, match="needs"):
        decode(unhashed[:-1])


def _ternary_header(shape, counts, scale=1.0) -> bytes:
    dims = struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
    return struct.pack("<H", 0) + b"\x00" + dims + struct.pack("<f3Q", scale, *counts)


def test_bad_payloads_rejected_with_clear_errors() -> None:
    import zstandard

    bad_byte = zstandard.ZstdCompressor().compress(bytes([243]))
    blob = pack_container(CODEC_TRITS_ZSTD, _ternary_header((5,), (0, 5, 0)), bad_byte)
    with pytest.raises(MalformedError, match="exceeds 242"):
        decode_ternary(blob)
    huge = pack_container(CODEC_TRITS_ANS, _ternary_header((10**6, 10**6), (0, 10**12, 0)), b"")
    with pytest.raises(LimitError, match="more than"):
        decode_ternary(huge)
    lying = pack_container(CODEC_TRITS_ZSTD, _ternary_header((7,), (0, 7, 0)), bad_byte)
    with pytest.raises(MalformedError, match="declares"):
        decode_ternary(lying)
    counts = pack_container(CODEC_TRITS_ZSTD, _ternary_header((7,), (1, 7, 0)), bad_byte)
    with pytest.raises(MalformedError, match="sum"):
        decode_ternary(counts)
    with pytest.raises(CodecError, match="-1, 0 and \\+1"):
        encode_ternary(np.array([2], np.int8), 1.0)


def test_delta_shape_and_base_mismatch() -> None:
    old = np.array([[1, 0], [0, -1]], np.int8)
    new = np.array([[1, 1], [0, -1]], np.int8)
    blob = encode_delta(old, new, 1.0, 1.0)
    with pytest.raises(ShapeMismatchError, match="shape"):
        apply_delta(old.reshape(-1), blob)
    with pytest.raises(ShapeMismatchError, match="another base"):
        apply_delta(np.zeros((2, 2), np.int8), blob)
    with pytest.raises(MalformedError, match="not a ternary delta"):
        apply_delta(old, _sample())
    with pytest.raises(ShapeMismatchError):
        encode_delta(old, new.reshape(-1), 1.0, 1.0)


GOLDEN_CASES = {
    "ternary_zstd.ptrn": lambda: encode_ternary(
        np.array([[1, 0, -1], [0, 0, 1]], np.int8), 0.125, "w1", codec=CODEC_TRITS_ZSTD
    ),
    "ternary_ans.ptrn": lambda: encode_ternary(
        np.array([1, 0, -1, 0, 0, 1, 1, -1, 0, 0, 0], np.int8), 2.0, "w2", codec=CODEC_TRITS_ANS
    ),
    "delta.ptrn": lambda: encode_delta(
        np.array([1, 0, -1, 0, 0, 1, 1, -1, 0, 0, 0, 1], np.int8),
        np.array([1, 1, -1, 0, 0, 1, -1, -1, 0, 0, 0, 0], np.int8),
        1.0,
        1.5,
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_bytes(name) -> None:
    """The byte format is pinned: an intentional change needs a new format version."""
    assert GOLDEN_CASES[name]() == (GOLDEN / name).read_bytes()


def test_cli_encode_stats_decode(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file
    from typer.testing import CliRunner

    from shared_model.cli import build_app

    app = build_app(["codec"])
    rng = np.random.default_rng(4)
    weights = {"w": rng.integers(-1, 2, size=(20, 7)).astype(np.float32) * 0.5}
    save_file(weights, str(tmp_path / "in.safetensors"))
    run = CliRunner().invoke
    res = run(app, ["codec", "encode", str(tmp_path / "in.safetensors"), str(tmp_path / "x.ptrn")])
    assert res.exit_code == 0, res.output
    res = run(app, ["codec", "stats", str(tmp_path / "x.ptrn")])
    assert res.exit_code == 0 and "bits/param" in res.output and "zeros=" in res.output
    out = tmp_path / "out.safetensors"
    assert run(app, ["codec", "decode", str(tmp_path / "x.ptrn"), str(out)]).exit_code == 0
    assert np.array_equal(load_file(str(out))["w"], weights["w"])
    bad = run(app, ["codec", "stats", str(tmp_path / "in.safetensors")])
    assert bad.exit_code == 2 and "not a codec container" in bad.output
