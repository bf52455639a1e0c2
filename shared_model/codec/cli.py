"""``perspective codec encode|decode|stats``: the wire codec on files (docs/wire-format.md).

Inputs: a ``.npy`` int8 array of trits (scale from ``--scale``) or a ``.safetensors`` file
whose tensors are each ternary (int8 trits, or floats taking only the values -s, 0, +s).
An encoded ``.ptrn`` file is one or more concatenated containers, one per tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from shared_model.files import atomic_path, write_atomic

codec_app = typer.Typer(
    help="Encode, decode and inspect ternary codec files.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the ``codec`` command group to the root CLI."""
    app.add_typer(codec_app, name="codec")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _split_ternary(name: str, arr):
    """Return ``(trits, scale)`` for a ternary array or raise ``ValueError`` saying why."""
    import numpy as np

    if arr.dtype.kind in "iu":
        return arr.astype(np.int8), 1.0
    a = arr.astype(np.float32)
    scale = float(np.abs(a).max()) if a.size else 0.0
    trits = np.rint(a / scale).astype(np.int8) if scale else np.zeros(a.shape, np.int8)
    if not np.array_equal(trits.astype(np.float32) * np.float32(scale), a):
        raise ValueError(f"tensor {name!r} is not ternary (values other than -s, 0, +s)")
    return trits, scale


@codec_app.command()
def encode(
    src: Path = typer.Argument(..., help=".npy int8 trits or .safetensors of ternary tensors"),
    out: Path = typer.Argument(..., help="output .ptrn file"),
    scale: float = typer.Option(1.0, help="scale for a .npy input"),
) -> None:
    """Encode ternary tensors into codec containers."""
    import numpy as np

    from shared_model.codec import CodecError, encode_ternary

    try:
        if src.suffix == ".npy":
            items = [(src.stem, np.load(src, allow_pickle=False), scale)]
        elif src.suffix == ".safetensors":
            from safetensors.numpy import load_file

            items = [(k, *_split_ternary(k, v)) for k, v in sorted(load_file(src).items())]
        else:
            _fail(f"{src}: expected a .npy or .safetensors file")
        blobs = [encode_ternary(arr, sc, name) for name, arr, sc in items]
    except (OSError, ValueError, CodecError) as exc:
        _fail(f"{src}: {exc}")
    write_atomic(out, b"".join(blobs))
    typer.echo(f"wrote {out} ({sum(map(len, blobs))} bytes, {len(blobs)} tensor(s))")


@codec_app.command()
def decode(
    src: Path = typer.Argument(..., help=".ptrn file"),
    out: Path = typer.Argument(..., help=".npy (one tensor: int8 trits) or .safetensors"),
) -> None:
    """Decode a .ptrn file: int8 trits to .npy, or trits*scale (float32) to .safetensors."""
    import numpy as np

    from shared_model.codec import CodecError, decode_ternary, split_containers

    try:
        data = src.read_bytes()
        tensors = []
        offset = 0
        for box in split_containers(data):
            tensors.append(decode_ternary(data[offset : offset + box.size]))
            offset += box.size
    except (OSError, CodecError) as exc:
        _fail(f"{src}: {exc}")
    if out.suffix == ".npy":
        if len(tensors) != 1:
            _fail(f"{src} holds {len(tensors)} tensors; decode to .safetensors instead")
        with atomic_path(out, suffix=".tmp.npy") as tmp:  # np.save would append .npy
            np.save(tmp, tensors[0][0])
        typer.echo(f"wrote {out} (scale {tensors[0][1]!r})")
    elif out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        dense = {
            n or f"tensor{i}": t.astype(np.float32) * np.float32(s)
            for i, (t, s, n) in enumerate(tensors)
        }
        with atomic_path(out) as tmp:
            save_file(dense, str(tmp))
        typer.echo(f"wrote {out} ({len(dense)} tensor(s))")
    else:
        _fail(f"{out}: expected a .npy or .safetensors output")


@codec_app.command()
def stats(src: Path = typer.Argument(..., help=".ptrn file")) -> None:
    """Print zero fraction, entropy bound, achieved bits/param and ratio to fp16."""
    from shared_model.codec import CodecError, decode_ternary, split_containers
    from shared_model.codec.container import KNOWN_CODECS
    from shared_model.codec.tensor import entropy_bits
    from shared_model.codec.trits import trit_counts

    try:
        data = src.read_bytes()
        offset = 0
        for box in split_containers(data):
            trits, _, name = decode_ternary(data[offset : offset + box.size])
            offset += box.size
            counts = trit_counts(trits)
            n = max(trits.size, 1)
            bits = box.size * 8 / n
            bound = entropy_bits(counts) / n
            typer.echo(
                f"{name or '<unnamed>'}: shape={tuple(trits.shape)} "
                f"codec={KNOWN_CODECS[box.codec]} "
                f"zeros={counts[1] / n:.4f} bound={bound:.4f} bits/param achieved={bits:.4f} "
                f"({bits / bound if bound else math.inf:.4f}x bound) fp16 ratio={16 / bits:.2f}x"
            )
    except (OSError, CodecError) as exc:
        _fail(f"{src}: {exc}")
