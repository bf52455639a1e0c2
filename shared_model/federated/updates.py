"""FP tensor updates on the wire: encoding, bundling into one blob, error feedback.

Two update codecs, both from :mod:`shared_model.codec`:

* ``ternary`` — dense ternary: ``sign × scale`` where ``|v| > threshold·mean|v|``, the
  ternariser of :mod:`shared_model.ternary`; what the prototype found nearly free in
  quality. The sender picks the threshold (the receiver only reads trits and a scale): at
  0.7 (TWN's) ≈ 1.58 bits/param after entropy coding, at 1.0 ≈ 1.4;
* ``sparse`` — SparseLoCo-style top-k per chunk with 2-bit values (≈0.3 bits/param),
  cheaper on the wire, costlier in quality for the shared layers;
* ``trits`` — stage 4's expert columns: not the update but the tensor's new *ternary
  value* ``ternarize(base + update)``, sent as the trit flips from ``ternarize(base)``
  (the delta codec, codec 3; ≈ h(f) + f bits/param at flip rate f). Both sides need the
  base: the sender to encode, the receiver to decode. The decoded update is
  ``trits·scale − base``, so ``base + update`` is the ternary value (within an ulp where
  the float subtraction rounds) and a version's digests hold as for the other codecs.

A :class:`~shared_model.wire.perspective.v1.control_pb2.TensorBundle` carries every
update its receiver expects, in sorted-name order (names left out: the receiver knows
them), plus, per tensor, the sha256 of the float32 tensor the receiver must end up
with, so a replica can prove it is bit-identical to the coordinator's published state.
:func:`encode_bundle` is the one sender (participant uploads and coordinator versions);
:func:`read_bundle` the one receiver. A bundle travels as a content-addressed blob (its
sha256 checked on store and on fetch), so its tensors' containers go unhashed
(docs/wire-format.md §2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from shared_model import codec as wire
from shared_model.codec.container import (
    CODEC_DELTA,
    CODEC_SPARSE_2BIT,
    CODEC_TRITS_ANS,
    CODEC_TRITS_ZSTD,
    parse_container,
)
from shared_model.ternary import THRESHOLD_FACTOR, ternarize
from shared_model.wire.perspective.v1 import control_pb2

UPDATE_CODECS = ("ternary", "sparse", "trits")
#: The container codec ids each update codec writes (docs/wire-format.md §2).
CODEC_IDS = {
    "ternary": (CODEC_TRITS_ZSTD, CODEC_TRITS_ANS),
    "sparse": (CODEC_SPARSE_2BIT,),
    "trits": (CODEC_DELTA,),
}
State = dict[str, torch.Tensor]


class UpdateError(ValueError):
    """An update bundle is malformed or does not fit the receiver's tensors."""


class BundleShapeError(UpdateError):
    """A bundle names unexpected tensors or has the wrong shapes for the receiver."""


def tensor_digest(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's float32 little-endian bytes (row-major)."""
    arr = t.detach().to(torch.float32).contiguous().numpy()
    return hashlib.sha256(arr.astype("<f4", copy=False).tobytes()).hexdigest()


def encode_update(
    t: torch.Tensor,
    codec: str = "ternary",
    name: str = "",
    base: torch.Tensor | None = None,
    *,
    threshold: float = THRESHOLD_FACTOR,
) -> tuple[bytes, torch.Tensor]:
    """Compress one FP update (error feedback is :mod:`shared_model.federated.updates`'s).

    Args:
        base: the tensor the update applies to; the ``trits`` codec needs it (it sends the
            new ternary value as trit flips from ``ternarize(base)``), the others ignore it.
        threshold: the ``ternary`` codec's threshold factor (``tau = threshold ·
            mean|t|``, 0 < threshold < 2; :func:`check_threshold`); the others ignore it.

    Returns:
        ``(payload, decoded)`` where ``decoded`` is bit-exactly what the receiver decodes.

    Raises:
        CodecError: the update holds NaN or Inf.
        UpdateError: unknown codec, ``trits`` without a base of the update's shape, or a
            threshold out of range.
    """
    check_threshold(threshold)
    flat = t.detach().to(torch.float32).contiguous().reshape(1, -1)
    if not torch.isfinite(flat).all():
        raise wire.CodecError(f"update {name!r} contains NaN or Inf")
    if codec == "ternary":
        trits, scale = ternarize(flat, threshold)
        trits8 = trits.to(torch.int8)  # int8 first: a -0.0 trit must decode as +0.0
        trits_np = trits8.numpy().reshape(-1)
        payload = wire.encode_ternary(trits_np, float(scale[0]), name, hashed=False)
        values = trits8.to(torch.float32) * scale[0]
    elif codec == "sparse":
        payload, sparse = wire.encode_sparse(flat.numpy().reshape(-1), name, hashed=False)
        values = torch.from_numpy(np.ascontiguousarray(sparse, np.float32))
    elif codec == "trits":
        payload, values = _encode_trits(flat, _flat_base(base, t.shape, name))
    else:
        raise UpdateError(f"unknown update codec {codec!r}: allowed {', '.join(UPDATE_CODECS)}")
    return payload, values.reshape(t.shape)


def check_threshold(threshold: float) -> float:
    """``threshold`` if it is a valid ternary threshold factor (0 < threshold < 2: at 2 a
    Gaussian update keeps 4 % of its values), else :class:`UpdateError`."""
    if not 0.0 < float(threshold) < 2.0:
        raise UpdateError(f"ternary threshold = {threshold!r} is invalid: allowed 0 < value < 2")
    return float(threshold)


def _flat_base(base: torch.Tensor | None, shape, name: str) -> torch.Tensor:
    if base is None or tuple(base.shape) != tuple(shape):
        got = "none" if base is None else tuple(base.shape)
        raise UpdateError(
            f"{name or 'tensor'}: the trits codec codes a new value against its base tensor;"
            f" needs a base of shape {tuple(shape)}, got {got}"
        )
    return base.detach().to(torch.float32).contiguous().reshape(1, -1)


def _base_trits(base: torch.Tensor) -> tuple[np.ndarray, float]:
    """``ternarize(base)`` as int8 trits and its scale: what a trit-flip delta starts from."""
    trits, scale = ternarize(base)
    return trits.to(torch.int8).numpy().reshape(-1), float(scale[0])


def _trits_update(trits: np.ndarray, scale: float, base: torch.Tensor) -> torch.Tensor:
    """``trits·scale − base`` in float32: the one computation both sides of ``trits`` run."""
    value = torch.from_numpy(trits.astype(np.float32)) * torch.tensor(scale, dtype=torch.float32)
    return value - base.reshape(-1)


def _encode_trits(flat: torch.Tensor, base: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    old, old_scale = _base_trits(base)
    trits, scale = ternarize(base + flat)
    new = trits.to(torch.int8).numpy().reshape(-1)
    # The scale is float32 already (base's dtype), so the header's f32 holds it exactly.
    payload = wire.encode_delta(old, new, old_scale, float(scale[0]), hashed=False)
    return payload, _trits_update(new, float(scale[0]), base)


def decode_update(
    payload: bytes,
    shape: Iterable[int],
    base: torch.Tensor | None = None,
    *,
    codec: str | None = None,
    name: str = "",
) -> torch.Tensor:
    """Decode an update payload (any update codec) into a float32 tensor of ``shape``.

    ``base`` (the tensor the update applies to) is needed for a trit-flip delta (the
    ``trits`` codec) and ignored otherwise. ``codec`` (one of :data:`UPDATE_CODECS`) is
    the codec the receiver asked for: a payload coded otherwise is refused undecoded.

    Raises:
        UpdateError: wrong element count, a trit-flip delta without a base, or another
            codec than ``codec``. Malformed
            payloads raise ``CodecError`` (also a container of another element count:
            refused before it is decoded; a delta made against another base).
    """
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    coded = parse_container(payload).codec
    if codec is not None and coded not in CODEC_IDS[codec]:
        raise UpdateError(
            f"{name or 'tensor'}: coded with container codec {coded}, not the {codec} codec"
            " the unit asked for"
        )
    if coded == CODEC_SPARSE_2BIT:
        values, _ = wire.decode_sparse(payload, expected=n)
    elif coded == CODEC_DELTA:
        flat_base = _flat_base(base, shape, "trit-flip delta")
        trits, scale = wire.apply_delta(_base_trits(flat_base)[0], payload)
        return _trits_update(trits, scale, flat_base).reshape(shape)
    else:
        trits, scale, _ = wire.decode_ternary(payload, expected=n)
        values = trits.astype(np.float32) * np.float32(scale)
    if values.size != n:
        raise UpdateError(f"update has {values.size} values, expected shape {shape}")
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def encode_bundle(
    updates: State,
    codec: str,
    *,
    kind: str,
    column: int,
    base_version: int,
    base: State | None = None,
    digests: bool = True,
    threshold: float = THRESHOLD_FACTOR,
) -> tuple[bytes, State]:
    """Encode every tensor of ``updates`` and bundle them: the one way updates are sent.

    Args:
        updates: ``{name: FP update}``.
        codec: one of :data:`UPDATE_CODECS`.
        kind: ``"column"``/``"shared"`` (participant uploads) or ``"version"``.
        column: the column the bundle is about, -1 for the shared layers.
        base_version: the version the updates are relative to.
        base: the receiver's tensors before applying (the ``trits`` codec codes against
            them); with ``digests`` each tensor then carries the sha256 of
            ``base + decoded``, which a replica must reproduce (versions).
        digests: add those digests (an upload to the coordinator passes ``False``).
        threshold: the ``ternary`` codec's threshold factor (:func:`encode_update`).

    Returns:
        ``(bundle bytes, {name: decoded update})``, the latter bit-exactly what the
        receiver decodes.
    """
    payloads, decoded = {}, {}
    for name, update in updates.items():
        # The bundle names each tensor; a second copy in its container costs ~0.04
        # bits/param on tiny's small tensors, so the containers go unnamed.
        ref = None if base is None else base[name]
        payloads[name], decoded[name] = encode_update(update, codec, base=ref, threshold=threshold)
    shapes = {name: tuple(t.shape) for name, t in updates.items()}
    results = None
    if base is not None and digests:
        results = {name: base[name] + d for name, d in decoded.items()}
    return make_bundle(kind, column, base_version, payloads, shapes, results), decoded


def make_bundle(
    kind: str,
    column: int,
    base_version: int,
    payloads: dict[str, bytes],
    shapes: dict[str, tuple[int, ...]],
    results: dict[str, torch.Tensor] | None = None,
    *,
    named: bool = False,
) -> bytes:
    """Serialise a bundle of payloads, in sorted-name order; ``results`` adds per-tensor
    target digests.

    A bundle always holds every tensor its receiver expects (a whole column, all the
    shared layers), and the receiver knows their names, so by default the names are left
    out and the position in sorted-name order says which tensor is which: on ``tiny``
    the names were ~2 % of a shared upload and 7 % of a sparse column upload.
    ``named=True`` writes them (what older senders did; :func:`read_bundle` reads both).
    """
    bundle = control_pb2.TensorBundle(kind=kind, column=column, base_version=base_version)
    for name in sorted(payloads):
        bundle.tensors.add(
            name=name if named else "",
            shape=list(shapes[name]),
            payload=payloads[name],
            sha256=tensor_digest(results[name]) if results is not None else "",
        )
    return bundle.SerializeToString()


def read_bundle(
    data: bytes,
    *,
    kind: str,
    expected: dict[str, tuple[int, ...]],
    base: State | None = None,
    codec: str | None = None,
) -> tuple[control_pb2.TensorBundle, dict[str, torch.Tensor]]:
    """Parse and decode a bundle, checking names and shapes against ``expected``.

    ``base`` holds the receiver's tensors the updates apply to (what a trit-flip delta of
    the ``trits`` codec decodes against; a bundle of the other codecs does not need it).
    ``codec`` (one of :data:`UPDATE_CODECS`) is the codec the receiver asked for: a tensor
    coded otherwise is refused before it is decoded.

    Unnamed tensors (what :func:`make_bundle` writes) are the expected ones in sorted-name
    order; the names are filled in on the returned bundle.

    Returns:
        ``(bundle, {name: decoded float32 tensor})``.

    Raises:
        UpdateError: not a bundle, wrong kind, unknown/missing names, wrong shapes.
    """
    bundle = control_pb2.TensorBundle()
    try:
        bundle.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError (a plain Exception subclass)
        raise UpdateError(f"not a TensorBundle: {exc}") from exc
    if bundle.kind != kind:
        raise UpdateError(f"bundle kind {bundle.kind!r}, expected {kind!r}")
    _name_positional(bundle, expected)
    names = [t.name for t in bundle.tensors]
    if len(set(names)) != len(names):
        raise UpdateError("bundle names a tensor twice")
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise BundleShapeError(f"bundle has unexpected tensors {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    for t in bundle.tensors:
        shape = tuple(int(s) for s in t.shape)
        if shape != tuple(expected[t.name]):
            raise BundleShapeError(f"{t.name}: shape {shape} != expected {tuple(expected[t.name])}")
        ref = None if base is None else base[t.name]
        out[t.name] = decode_update(t.payload, shape, ref, codec=codec, name=t.name)
    return bundle, out


def _name_positional(bundle: control_pb2.TensorBundle, expected: dict) -> None:
    """Give unnamed tensors their names: the expected ones, in sorted order, all of them."""
    unnamed = sum(1 for t in bundle.tensors if not t.name)
    if unnamed == 0:
        return
    if unnamed != len(bundle.tensors):
        raise UpdateError(
            f"bundle names {len(bundle.tensors) - unnamed} of its {len(bundle.tensors)} tensors:"
            " a bundle names all of its tensors or none"
        )
    if unnamed != len(expected):
        raise BundleShapeError(
            f"bundle has {unnamed} unnamed tensors, expected {len(expected)} (an unnamed"
            " bundle holds every expected tensor, in sorted-name order)"
        )
    for t, name in zip(bundle.tensors, sorted(expected), strict=True):
        t.name = name


# --- error feedback ------------------------------------------------------------------
# Compressing an update drops most of it; error feedback keeps what was dropped and adds it
# to the next update, so nothing is lost, only delayed. Both sides use this one step: a
# participant's shared pseudo-gradient (its residual is kept on disk across units) and the
# coordinator's versions (update = master - published; the residual is implicit: what is
# not sent now stays in master - published for the next version).


@dataclass(frozen=True)
class Sent:
    """One error-feedback step."""

    bundle: bytes
    #: ``residual + update``: what was owed to the receiver before this send.
    pending: State
    #: What the receiver decodes (bit-exact).
    decoded: State
    #: ``pending - decoded``: the residual owed with the next send.
    residual: State


def send_with_feedback(
    update: State,
    residual: State,
    codec: str,
    *,
    kind: str,
    column: int,
    base_version: int,
    base: State | None = None,
    threshold: float = THRESHOLD_FACTOR,
) -> Sent:
    """Encode ``residual + update`` into a bundle and keep what the codec dropped.

    ``residual`` may lack tensors (nothing owed yet). The bundle arguments are those of
    :func:`~shared_model.federated.updates.encode_bundle`.
    """
    pending = {k: v + residual[k] if k in residual else v for k, v in update.items()}
    bundle, decoded = encode_bundle(
        pending,
        codec,
        kind=kind,
        column=column,
        base_version=base_version,
        base=base,
        threshold=threshold,
    )
    rest = {k: pending[k] - decoded[k] for k in pending}
    return Sent(bundle=bundle, pending=pending, decoded=decoded, residual=rest)
