"""The parts of a published checkpoint, as both sides write and read them.

A :class:`~shared_model.wire.perspective.v1.control_pb2.CheckpointManifest` holds one blob
per part: the shared layers and each expert column. A part is FP32 safetensors, except a
column whose tensors are all ternary (stage 4's published experts): that one travels as a
``TensorBundle`` of kind ``"checkpoint"``, each tensor as its trits and scale in the
codec's ternary container (about 1.6 bits per parameter instead of 32), and the manifest
lists the column in ``ternary_columns``. Stage 4's teacher checkpoint
(``CheckpointManifest.bf16_parts``) has bf16 safetensors instead of FP32 ones: the
participants keep and run the teacher in bf16 (``shared_model.stage_loss.TEACHER_DTYPE``).

Lossless, so a replica loaded from it is bit-identical to the published state and the
version chain's digests keep holding: the published value of a ternary tensor is
``base + (trits·scale − base)`` in float32 (:mod:`shared_model.federated.updates`), which
is ``trits·scale`` except, within an ulp, where the subtraction rounded (the first switch
from FP to ternary, a +1 → −1 flip). Those few entries travel as exact
``(index, float32)`` pairs in the tensor's ``exact`` field; a tensor with more than
:data:`MAX_EXACT_FRACTION` of them is not ternary and its column goes as safetensors.
Every tensor carries the sha256 of its float32 value, checked after it is rebuilt.

:func:`column_part` decides from the tensors alone, so the coordinator (writing) and a
participant (asking whether its replica already holds a checkpoint's part, by content id)
compute the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared_model import codec as wire
from shared_model.codec.container import MAX_ELEMENTS
from shared_model.federated.updates import UpdateError, tensor_digest
from shared_model.wire.perspective.v1 import control_pb2

State = dict[str, torch.Tensor]
#: A tensor is stored as trits when at most this fraction of it needs exact values.
MAX_EXACT_FRACTION = 1 / 8
#: How many of a tensor's first nonzero entries decide its scale (and whether it is ternary).
_PROBE = 4096
_KIND = "checkpoint"


def safetensors_part(state: State, *, bf16: bool = False) -> bytes:
    """A part as safetensors: FP32 (the shared layers; FP columns), or with ``bf16`` each
    value rounded to nearest bf16 (stage 4's teacher: ``CheckpointManifest.bf16_parts``)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return st_save({k: v.detach().to(dtype).contiguous() for k, v in state.items()})


def column_part(state: State, *, bf16: bool = False) -> tuple[bytes, bool]:
    """A column's part and whether it is the ternary kind (:func:`safetensors_part`
    otherwise)."""
    forms = {}
    for name in sorted(state):
        form = _ternary_form(state[name])
        if form is None:
            return safetensors_part(state, bf16=bf16), False
        forms[name] = form
    bundle = control_pb2.TensorBundle(kind=_KIND, column=-1, base_version=0)
    for name, (trits, scale, exact) in forms.items():
        bundle.tensors.add(
            name=name,
            shape=list(state[name].shape),
            payload=wire.encode_ternary(trits, scale, hashed=False),
            sha256=tensor_digest(state[name]),
            exact=exact,
        )
    return bundle.SerializeToString(), True


def read_part(data: bytes, *, ternary: bool, bf16: bool = False) -> State:
    """The tensors of a part written by :func:`safetensors_part` (``bf16`` says which) or
    (``ternary``) :func:`column_part`.

    Raises:
        UpdateError: not a part of that kind (safetensors of another dtype included), a
            malformed tensor, or a rebuilt tensor that does not match its digest.
    """
    if not ternary:
        try:
            state = st_load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise UpdateError(f"not a safetensors checkpoint part: {exc}") from exc
        dtype = torch.bfloat16 if bf16 else torch.float32
        wrong = sorted(k for k, v in state.items() if v.dtype != dtype)
        if wrong:
            raise UpdateError(f"part tensor(s) {wrong[:3]} are not {dtype}")
        return state
    bundle = control_pb2.TensorBundle()
    try:
        bundle.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError is a plain Exception subclass
        raise UpdateError(f"not a ternary checkpoint part: {exc}") from exc
    if bundle.kind != _KIND:
        raise UpdateError(f"part kind {bundle.kind!r}, expected {_KIND!r}")
    out: State = {}
    for t in bundle.tensors:
        if not t.name or t.name in out:
            raise UpdateError(f"ternary part names tensor {t.name!r} twice or not at all")
        out[t.name] = _rebuild(t)
    return out


def _ternary_form(tensor: torch.Tensor) -> tuple[np.ndarray, float, bytes] | None:
    """``(trits, scale, exact)`` of a tensor that is ternary but for a few entries."""
    x = tensor.detach().to(torch.float32).contiguous().numpy().reshape(-1)
    mags = np.abs(x)
    # The scale is the magnitude most of the first nonzero entries share: one pass, no sort
    # of the whole tensor (an expert matrix at full size is 45M entries). Were it not the
    # tensor's scale, the off-grid count below would refuse the tensor: never a wrong part.
    probe = _first_nonzero(mags, _PROBE)
    scale = np.float32(0.0)
    if probe.size:
        values, counts = np.unique(probe, return_counts=True)
        if counts.max() * 2 < probe.size:  # an FP tensor: no magnitude dominates
            return None
        scale = np.float32(values[np.argmax(counts)])
    trits = (np.sign(x) * (mags == scale)).astype(np.int8) if scale else np.zeros_like(x, np.int8)
    rebuilt = trits.astype(np.float32) * scale  # what the decoder computes
    where = np.flatnonzero(rebuilt.view(np.int32) != x.view(np.int32))
    if where.size > MAX_EXACT_FRACTION * x.size:
        return None
    exact = where.astype("<u4").tobytes() + x[where].astype("<f4").tobytes()
    return trits.reshape(tuple(tensor.shape)), float(scale), exact


def _first_nonzero(mags: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` nonzero entries of ``mags``, reading it a slice at a time."""
    found, have, step = [], 0, 1 << 16
    for start in range(0, mags.size, step):
        chunk = mags[start : start + step]
        found.append(chunk[chunk != 0][: k - have])
        have += found[-1].size
        if have >= k:
            break
    return np.concatenate(found) if found else mags[:0]


def _rebuild(t: control_pb2.EncodedTensor) -> torch.Tensor:
    """One tensor of a ternary part: trits·scale, the exact entries put back, digest checked."""
    shape = tuple(int(s) for s in t.shape)
    n = int(np.prod([float(s) for s in shape]))  # float: no int64 overflow; () is 1
    if n > MAX_ELEMENTS:
        raise UpdateError(f"{t.name}: shape {list(shape)} is larger than any tensor we hold")
    trits, scale, _ = wire.decode_ternary(t.payload, expected=n)
    values = trits.reshape(-1).astype(np.float32) * np.float32(scale)
    if len(t.exact) % 8 or len(t.exact) // 8 > n:
        raise UpdateError(f"{t.name}: exact entries of {len(t.exact)} bytes do not fit {n} values")
    k = len(t.exact) // 8
    index = np.frombuffer(t.exact, dtype="<u4", count=k).astype(np.int64)
    if k and (index[-1] >= n or np.any(np.diff(index) <= 0)):
        raise UpdateError(f"{t.name}: exact entries' indices are not increasing below {n}")
    values[index] = np.frombuffer(t.exact, dtype="<f4", offset=4 * k, count=k)
    tensor = torch.from_numpy(values).reshape(shape)
    if tensor_digest(tensor) != t.sha256:
        raise UpdateError(f"{t.name}: the rebuilt tensor does not match its checksum")
    return tensor
