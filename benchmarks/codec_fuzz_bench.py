"""Codec fuzz run: hostile containers against the decoders the coordinator uses (issue 16).

Mutates honest containers of every codec (byte flips, cuts, extensions, and lying u64
header fields such as element or trit counts, re-checksummed so they reach the codec
parsers) plus hand-made bombs (tiny containers claiming 2^31 elements; a full-size sparse
container keeping every element), and decodes each the way intake does: told the element
count it expects (``decode_update``), and ``apply_delta`` against its base.

Counts exceptions other than ``CodecError``/``UpdateError`` (must be 0), decodes slower
than 1 s (must be 0) and the process's peak RSS. Writes
``benchmarks/results/codec_fuzz_bench.json``.
Run: ``.venv/bin/python benchmarks/codec_fuzz_bench.py [--cases N] [--elements N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared_model.codec import CodecError, apply_delta, encode_delta, encode_ternary  # noqa: E402
from shared_model.codec.container import (  # noqa: E402
    CODEC_SPARSE_2BIT,
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    PREFIX_SIZE,
    pack_container,
    reseal,
    write_shape,
)
from shared_model.codec.entropy import zstd_compress  # noqa: E402
from shared_model.codec.pseudograd import encode_sparse  # noqa: E402
from shared_model.federated.updates import UpdateError, decode_update  # noqa: E402

OUT = Path(__file__).parent / "results"
LIES = (0, 1, 5, 1 << 16, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 63), (1 << 64) - 1)
SLOW_S = 1.0


def seeds(n: int, rng: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
    """Honest containers of ``n`` elements (every codec) and the delta's base."""
    old = rng.integers(-1, 2, size=n).astype(np.int8)
    new = np.where(rng.random(n) < 0.05, -old, old).astype(np.int8)
    sparse_zero = np.zeros(n, np.int8)
    sparse_zero[::997] = 1
    g = rng.normal(size=n).astype(np.float32)
    out = [
        encode_ternary(old, 0.5, "w", codec=CODEC_TRITS_ZSTD),
        encode_ternary(old, 0.5, "w", codec=CODEC_TRITS_ANS),
        encode_ternary(sparse_zero, 0.5, "w", codec=CODEC_TRITS_ANS),
        encode_delta(old, new, 0.5, 0.6),
        encode_sparse(g, "g")[0],
        encode_sparse(g, "g", chunk=64, k=32)[0],
    ]
    return out, old


def bombs(n: int) -> list[bytes]:
    """Hand-made containers that claim far more than ``n`` elements, and one of exactly
    ``n`` elements asking for the most work a right-sized sparse container can."""
    big = (1 << 31) - 5
    sparse_hdr = struct.pack("<H", 0) + write_shape((1 << 31,)) + struct.pack("<II", 1, 1)
    rans_hdr = (
        struct.pack("<HB", 0, 0) + write_shape((big,)) + struct.pack("<f3Q", 1, 1, big - 2, 1)
    )
    zstd_n = 5 << 24
    zstd_hdr = (
        struct.pack("<HB", 0, 0) + write_shape((zstd_n,)) + struct.pack("<f3Q", 1, 0, zstd_n, 0)
    )
    dense_hdr = struct.pack("<H", 0) + write_shape((n,)) + struct.pack("<II", 1, 1)
    gaps = zstd_compress(np.ones(n, "<u2").tobytes())
    dense = (
        struct.pack("<Q", len(gaps)) + gaps + np.ones(2 * n, "<f4").tobytes() + bytes(-(-n // 4))
    )
    return [
        pack_container(CODEC_SPARSE_2BIT, sparse_hdr, struct.pack("<Q", 0)),
        pack_container(CODEC_TRITS_ANS, rans_hdr, bytes(96)),
        pack_container(CODEC_TRITS_ZSTD, zstd_hdr, zstd_compress(bytes([121]) * (zstd_n // 5))),
        pack_container(CODEC_SPARSE_2BIT, dense_hdr, dense),
    ]  # fmt: skip


def mutate(blob: bytes, rnd: random.Random) -> bytes:
    """One hostile variant of ``blob``."""
    out = bytearray(blob)
    kind = rnd.randrange(4)
    if kind == 0:  # byte flips, mostly in the codec header
        for _ in range(rnd.randint(1, 6)):
            out[rnd.randrange(PREFIX_SIZE, min(len(out), PREFIX_SIZE + 96))] = rnd.randrange(256)
    elif kind == 1:  # a lying u64 (element count, trit count, chunk, section length...)
        at = rnd.randrange(PREFIX_SIZE, max(PREFIX_SIZE + 1, len(out) - 8))
        struct.pack_into("<Q", out, at, rnd.choice(LIES))
    elif kind == 2:  # anywhere
        for _ in range(rnd.randint(1, 4)):
            out[rnd.randrange(len(out))] = rnd.randrange(256)
    else:
        out += bytes(rnd.randrange(1, 64))
    resealed = reseal(bytes(out))
    if rnd.random() < 0.2:
        resealed = resealed[: rnd.randrange(len(resealed) + 1)]
    return resealed


def decode_all(blob: bytes, n: int, old: np.ndarray, stats: dict) -> None:
    """Decode ``blob`` every way intake and a replica would; record outcome and time."""
    base = old.astype(np.float32)
    for name, fn in (
        # with the base a trits column decodes against (ternarize(old) = old's trits)
        ("decode_update", lambda: decode_update(blob, (n,), torch.from_numpy(base))),
        ("apply_delta", lambda: apply_delta(old, blob)),
    ):
        start = time.perf_counter()
        try:
            fn()
            outcome = "ok"
        except (CodecError, UpdateError) as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - what the run counts
            outcome = f"UNEXPECTED {type(exc).__name__}: {exc}"[:200]
            stats["unexpected"].append(outcome)
        elapsed = time.perf_counter() - start
        stats["outcomes"][outcome.split(":")[0]] += 1
        stats["max_s"] = max(stats["max_s"], elapsed)
        if elapsed > SLOW_S:
            stats["slow"].append(f"{name} {elapsed:.2f}s {len(blob)} B")
        stats["decodes"] += 1


def run(cases: int, n: int, seed: int) -> dict:
    """Fuzz ``cases`` mutated containers of ``n`` elements plus the bombs."""
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    honest, old = seeds(n, rng)
    stats = {"decodes": 0, "outcomes": Counter(), "unexpected": [], "slow": [], "max_s": 0.0}
    start = time.perf_counter()
    for blob in bombs(n):
        decode_all(blob, n, old, stats)
    for _ in range(cases):
        decode_all(mutate(rnd.choice(honest), rnd), n, old, stats)
    return {
        "cases": cases,
        "elements": n,
        "seed": seed,
        "decodes": stats["decodes"],
        "exceptions_other_than_codec_error": len(stats["unexpected"]),
        "unexpected": stats["unexpected"][:20],
        "decodes_over_1s": len(stats["slow"]),
        "slow": stats["slow"][:20],
        "max_decode_s": round(stats["max_s"], 4),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "wall_s": round(time.perf_counter() - start, 1),
        "outcomes": dict(stats["outcomes"].most_common()),
    }


def main() -> None:
    """Run the fuzz and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--elements", type=int, default=1 << 20, help="tensor size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.cases, args.elements, args.seed)
    OUT.mkdir(exist_ok=True)
    (OUT / "codec_fuzz_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
