"""``.trd`` files: ternary deltas between an expert and its manifold neighbours (stage 5).

One file per ordered pair (layer ``i``, source expert ``e``, target expert ``f``) holds the
three codec deltas (docs/wire-format.md §4) that turn the ternary ``w1, w2, w3`` of ``e``
into those of ``f``. Layout (little-endian)::

    b"TRD1" | u32 header length | header JSON (UTF-8) | delta 0 | delta 1 | delta 2

The header lists ``layer, source, target`` and per tensor ``{name, offset, length}``
(offsets relative to the end of the header). ``index.json`` next to the files lists every
file with its sha256, size, bits per parameter and torus distance, plus the sha256 of each
base expert tensor's :func:`encode_ternary` bytes so a consumer can verify its base first.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shared_model.codec import CodecError, apply_delta, encode_delta, encode_ternary
from shared_model.files import write_atomic
from shared_model.moe import EXPERT_WEIGHTS
from shared_model.ternary import ternary_round

MAGIC = b"TRD1"
INDEX_FORMAT = 1


class TrdError(ValueError):
    """A ``.trd`` file or index is malformed or does not match its base expert."""


Trits = dict[str, tuple[np.ndarray, float]]


def ternary_experts(model: torch.nn.Module, layer: int, threshold_factor: float) -> list[Trits]:
    """Ternarise every expert of ``layer``: per expert ``{w1|w2|w3: (trits, scale)}``."""
    moe = model.layers[layer].ffn
    out = []
    for e in range(moe.n_experts):
        ex = moe.expert(e)
        entry = {}
        for w in EXPERT_WEIGHTS:
            trits, scale = ternary_round(getattr(ex, w).weight, threshold_factor)
            entry[w] = (trits.numpy(), float(np.float32(scale)))
        out.append(entry)
    return out


def encode_trd(layer: int, source: int, target: int, src: Trits, dst: Trits) -> bytes:
    """Bytes of the ``.trd`` file turning expert ``src`` into ``dst``."""
    blobs, tensors, offset = [], [], 0
    for w in EXPERT_WEIGHTS:
        (t0, s0), (t1, s1) = src[w], dst[w]
        blob = encode_delta(t0, t1, s0, s1)
        tensors.append({"name": w, "offset": offset, "length": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps(
        {"layer": layer, "source": source, "target": target, "tensors": tensors},
        sort_keys=True,
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def read_trd(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse a ``.trd`` file into ``(header, {tensor name: delta bytes})``.

    Raises:
        TrdError: bad magic, truncated data or an inconsistent header.
    """
    if len(data) < 8 or data[:4] != MAGIC:
        raise TrdError("not a .trd file (bad magic); expected it to start with b'TRD1'")
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen > len(data):
        raise TrdError(f".trd header length {hlen} runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + hlen])
        body = data[8 + hlen :]
        parts = {}
        for t in header["tensors"]:
            start, length = int(t["offset"]), int(t["length"])
            if start < 0 or length < 0 or start + length > len(body):
                raise TrdError(f".trd tensor {t['name']} lies outside the file")
            parts[str(t["name"])] = body[start : start + length]
    except (ValueError, KeyError, TypeError) as exc:
        raise TrdError(f".trd header is malformed: {exc}") from exc
    if sorted(parts) != sorted(EXPERT_WEIGHTS):
        raise TrdError(f".trd holds tensors {sorted(parts)}, expected {list(EXPERT_WEIGHTS)}")
    return header, parts


def apply_trd(base: Trits, data: bytes) -> Trits:
    """Apply a ``.trd`` file to the base expert's trits: the target expert's trits and scales.

    Raises:
        TrdError: malformed file, or ``base`` is not the expert the file was made against.
    """
    _, parts = read_trd(data)
    out = {}
    for w, blob in parts.items():
        try:
            out[w] = apply_delta(base[w][0], blob)
        except CodecError as exc:
            raise TrdError(f".trd delta for {w} does not apply: {exc}") from exc
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_trd_set(
    model: torch.nn.Module,
    positions: dict[int, Tensor],
    out_dir: str | Path,
    neighbours: int = 3,
    threshold_factor: float = 0.7,
) -> dict[str, Any]:
    """Write ``.trd`` files from each expert to its ``neighbours`` nearest on the torus.

    Args:
        model: MoE model (stage 5 output) holding every expert.
        positions: per PDR layer ``[E, 3]`` torus positions.
        out_dir: directory for ``layer{i}/e{src}-e{dst}.trd`` and ``index.json``.
        neighbours: k nearest experts per expert.
        threshold_factor: ternarisation threshold (``cfg.ternary.threshold_factor``).

    Returns:
        The index (also written as ``index.json``).
    """
    from coordinator.central.manifold import torus_neighbours, torus_sqdist

    out_dir = Path(out_dir)
    files, bases = [], {}
    for layer, pos in sorted(positions.items()):
        experts = ternary_experts(model, layer, threshold_factor)
        nbrs = torus_neighbours(pos, neighbours)
        d2 = torus_sqdist(pos, pos)
        (out_dir / f"layer{layer}").mkdir(parents=True, exist_ok=True)
        for e, ex in enumerate(experts):
            bases[f"{layer}/{e}"] = {
                w: _sha(encode_ternary(t, s, name=w)) for w, (t, s) in ex.items()
            }
            for f in nbrs[e].tolist():
                data = encode_trd(layer, e, f, ex, experts[f])
                rel = f"layer{layer}/e{e}-e{f}.trd"
                write_atomic(out_dir / rel, data)
                n_params = sum(t.size for t, _ in ex.values())
                files.append(
                    {
                        "file": rel,
                        "layer": layer,
                        "source": e,
                        "target": f,
                        "sha256": _sha(data),
                        "bytes": len(data),
                        "params": n_params,
                        "bits_per_param": 8 * len(data) / n_params,
                        "torus_distance": float(d2[e, f].sqrt()),
                    }
                )
    index = {
        "format": INDEX_FORMAT,
        "neighbours": neighbours,
        "threshold_factor": threshold_factor,
        "bases": bases,
        "files": files,
        "mean_bits_per_param": float(np.mean([f["bits_per_param"] for f in files])),
    }
    write_atomic(out_dir / "index.json", json.dumps(index, indent=1).encode())
    return index


def load_index(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``index.json``.

    Raises:
        TrdError: unreadable or of an unknown format.
    """
    try:
        index = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TrdError(f"cannot read .trd index {path}: {exc}") from exc
    if index.get("format") != INDEX_FORMAT or "files" not in index:
        raise TrdError(f"{path} is not a .trd index of format {INDEX_FORMAT}")
    return index


def verify_trd_set(model: torch.nn.Module, out_dir: str | Path) -> int:
    """Check every indexed file's hash and that it turns its source into its target exactly.

    Returns:
        Number of files verified.

    Raises:
        TrdError: any mismatch.
    """
    out_dir = Path(out_dir)
    index = load_index(out_dir / "index.json")
    cache: dict[int, list[Trits]] = {}
    for entry in index["files"]:
        layer = int(entry["layer"])
        if layer not in cache:
            cache[layer] = ternary_experts(model, layer, index["threshold_factor"])
        data = (out_dir / entry["file"]).read_bytes()
        if _sha(data) != entry["sha256"]:
            raise TrdError(f"{entry['file']}: sha256 differs from the index")
        got = apply_trd(cache[layer][entry["source"]], data)
        want = cache[layer][entry["target"]]
        for w in EXPERT_WEIGHTS:
            if not np.array_equal(got[w][0], want[w][0]) or got[w][1] != want[w][1]:
                raise TrdError(f"{entry['file']}: {w} does not reproduce the target expert")
    return len(index["files"])
