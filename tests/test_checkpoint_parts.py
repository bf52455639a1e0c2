"""Checkpoint parts: FP32 safetensors, or trits plus exact entries for a ternary column."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from shared_model.codec import CodecError, decode_ternary
from shared_model.federated.checkpoint_parts import (
    MAX_EXACT_FRACTION,
    column_part,
    read_part,
    safetensors_part,
)
from shared_model.federated.replica import Replica, SyncError
from shared_model.federated.updates import UpdateError, tensor_digest
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

SCALE = np.float32(0.0237)


def _ternary(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, shape, generator=g).to(torch.float32)
    return trits * torch.tensor(SCALE)


def _published_column() -> dict[str, torch.Tensor]:
    """Ternary tensors as the version chain leaves them: a few entries an ulp off the grid
    (where ``base + (trits·scale − base)`` rounded), one -0.0, one all-zero tensor."""
    w1, w2 = _ternary((16, 24), 0), _ternary((24, 16), 1)
    flat = w1.view(-1)
    flat[3] = float(np.nextafter(SCALE, np.float32(1)))
    flat[10] = -0.0
    flat[200] = -float(np.nextafter(SCALE, np.float32(0)))
    return {"w1": w1, "w2": w2, "zero": torch.zeros(5)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_a_ternary_column_round_trips_bit_exactly_through_trits_and_exact_entries():
    state = _published_column()
    data, ternary = column_part(state)
    assert ternary and len(data) < len(safetensors_part(state)) / 4  # small tensors: digests weigh
    back = read_part(data, ternary=True)
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert back[name].shape == t.shape and torch.equal(_bits(back[name]), _bits(t)), name


def test_the_part_layout_is_a_checkpoint_bundle_of_trits_with_exact_pairs():
    """Byte layout: a TensorBundle of kind "checkpoint", tensors in sorted-name order, each
    a ternary container (trits, scale) plus ``exact`` = k u32 indices then k float32."""
    state = _published_column()
    data, _ = column_part(state)
    bundle = control_pb2.TensorBundle.FromString(data)
    assert bundle.kind == "checkpoint" and [t.name for t in bundle.tensors] == ["w1", "w2", "zero"]
    w1 = bundle.tensors[0]
    trits, scale, _ = decode_ternary(w1.payload, expected=16 * 24)
    assert np.float32(scale) == SCALE and list(w1.shape) == [16, 24]
    index = np.frombuffer(w1.exact, dtype="<u4", count=3)
    values = np.frombuffer(w1.exact, dtype="<f4", offset=12)
    assert index.tolist() == [3, 10, 200] and len(w1.exact) == 24
    assert (
        values.view(np.int32).tolist()
        == state["w1"].view(-1)[[3, 10, 200]].view(torch.int32).tolist()
    )
    assert trits.reshape(-1)[[3, 10, 200]].tolist() == [0, 0, 0]
    assert w1.sha256 == tensor_digest(state["w1"]) and bundle.tensors[1].exact == b""
    assert column_part(state)[0] == data  # deterministic: content ids agree on both sides


def test_fp_columns_and_too_many_off_grid_entries_stay_fp32():
    fp = {"w": torch.randn(32, 32)}
    assert column_part(fp) == (safetensors_part(fp), False)
    mostly = _ternary((64, 64), 2)
    off = int(MAX_EXACT_FRACTION * mostly.numel()) + 1
    mostly.view(-1)[:off] = torch.linspace(0.001, 0.002, off)
    data, ternary = column_part({"w": mostly, "t": _ternary((8,), 3)})
    assert not ternary and torch.equal(read_part(data, ternary=False)["w"], mostly)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: setattr(t, "sha256", "0" * 64), "does not match its checksum"),
        (lambda t: setattr(t, "exact", t.exact[::-1][:8] + t.exact[8:]), "not increasing"),
        (lambda t: setattr(t, "exact", t.exact[:-1]), "do not fit"),
        (lambda t: setattr(t, "name", ""), "twice or not at all"),
    ],
)
def test_a_damaged_part_is_refused_with_what_is_wrong(damage, message):
    bundle = control_pb2.TensorBundle.FromString(column_part(_published_column())[0])
    damage(bundle.tensors[0])
    with pytest.raises(UpdateError, match=message):
        read_part(bundle.SerializeToString(), ternary=True)
    with pytest.raises(UpdateError, match="not a ternary checkpoint part"):
        read_part(b"\xff" * 10, ternary=True)
    with pytest.raises(UpdateError, match="not a safetensors checkpoint part"):
        read_part(b"\xff" * 10, ternary=False)


def test_a_replica_loads_a_ternary_checkpoint_and_names_a_damaged_part():
    shared, column = {"s": torch.randn(4, 4)}, _published_column()
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> tensor_pb2.BlobRef:
        ref = tensor_pb2.BlobRef(content_id=f"b{len(blobs)}", size=len(data))
        blobs[ref.content_id] = data
        return ref

    manifest = control_pb2.CheckpointManifest(version=7, ternary_columns=[2])
    manifest.shared.CopyFrom(put(safetensors_part(shared)))
    manifest.columns[2].CopyFrom(put(column_part(column)[0]))
    replica = Replica()
    replica.load_checkpoint(manifest, [2], lambda ref: blobs[ref.content_id])
    assert replica.version == 7 and torch.equal(
        _bits(replica.columns[2]["w1"]), _bits(column["w1"])
    )
    blobs[manifest.columns[2].content_id] = safetensors_part(column)  # not what the manifest says
    with pytest.raises(SyncError, match="checkpoint 7, column 2: not a ternary checkpoint part"):
        Replica().load_checkpoint(manifest, [2], lambda ref: blobs[ref.content_id])


def test_a_bf16_part_is_safetensors_of_the_values_rounded_to_nearest():
    """Stage 4's teacher parts (``bf16_parts``): byte for byte the safetensors of each
    tensor in bf16; read back only as what the manifest says."""
    state = {"b": torch.randn(3, 5), "a": torch.tensor([1.0, 1 + 2**-9, -(2**-130), 3e38])}
    data = safetensors_part(state, bf16=True)
    rounded = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert data == save(rounded)  # safetensors' own layout: header, then a then b
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert {header[k]["dtype"] for k in state} == {"BF16"}
    back = read_part(data, ternary=False, bf16=True)
    assert all(torch.equal(_bits16(back[k]), _bits16(rounded[k])) for k in state)
    assert column_part(state, bf16=True) == (data, False)
    ternary = _published_column()  # trits stay trits: lossless either way
    assert column_part(ternary, bf16=True) == column_part(ternary)
    with pytest.raises(UpdateError, match="are not torch.float32"):
        read_part(data, ternary=False)
    with pytest.raises(UpdateError, match="are not torch.bfloat16"):
        read_part(safetensors_part(state), ternary=False, bf16=True)


def test_a_replica_that_follows_the_versions_refuses_a_bf16_checkpoint():
    """Only a frozen copy (the teacher) may start from a bf16 checkpoint: the version
    chain's FP32 digests could never hold on it."""
    blob = safetensors_part({"s": torch.randn(4, 4)}, bf16=True)
    manifest = control_pb2.CheckpointManifest(version=3, bf16_parts=True)
    manifest.shared.CopyFrom(tensor_pb2.BlobRef(content_id="s", size=len(blob)))
    with pytest.raises(SyncError, match="checkpoint 3 is bf16"):
        Replica().load_checkpoint(manifest, [], lambda ref: blob)
    teacher = Replica()
    teacher.load_checkpoint(manifest, [], lambda ref: blob, frozen=True)
    assert teacher.version == 3 and teacher.shared["s"].dtype == torch.bfloat16


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


_PART = column_part(_published_column())[0]


@settings(max_examples=200, deadline=2000, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10_000),
)
def test_a_mutated_ternary_part_only_raises_what_the_replica_reports(edits, cut) -> None:
    """Damaged bytes raise UpdateError or CodecError (the replica turns them into a
    SyncError naming the part), or rebuild tensors whose values are exactly the written
    ones (their digests). A changed name or a reshaped dimension keeps the values and
    their digest: as for a safetensors part, the blob's content id, checked on every
    fetch, is what catches those in transit."""
    blob = bytearray(_PART)
    for pos, val in edits:
        blob[pos % len(blob)] = val
    written = {tensor_digest(v) for v in _published_column().values()}
    for data in (bytes(blob), bytes(blob[: cut % (len(blob) + 1)])):
        try:
            back = read_part(data, ternary=True)
        except (UpdateError, CodecError):
            continue
        assert all(tensor_digest(t) in written for t in back.values())


def test_a_part_claiming_a_huge_shape_is_refused_before_decoding():
    bundle = control_pb2.TensorBundle.FromString(_PART)
    del bundle.tensors[0].shape[:]
    bundle.tensors[0].shape.extend([1 << 20, 1 << 20])
    with pytest.raises(UpdateError, match="larger than any tensor"):
        read_part(bundle.SerializeToString(), ternary=True)
