"""Update bundles: tensors travel unnamed, in sorted-name order; named bundles still read."""

from __future__ import annotations

import pytest
import torch

from shared_model.federated.updates import (
    BundleShapeError,
    UpdateError,
    encode_bundle,
    make_bundle,
    read_bundle,
)
from shared_model.wire.perspective.v1 import control_pb2

SHAPES = {"b.weight": (4, 6), "a.bias": (6,), "c.scale": (3, 2)}


def _updates() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("codec", ["ternary", "sparse"])
def test_bundles_are_sent_unnamed_in_sorted_order_and_read_back(codec) -> None:
    data, decoded = encode_bundle(_updates(), codec, kind="shared", column=-1, base_version=2)
    wire = control_pb2.TensorBundle.FromString(data)
    assert [t.name for t in wire.tensors] == ["", "", ""]
    assert [tuple(t.shape) for t in wire.tensors] == [SHAPES[n] for n in sorted(SHAPES)]
    bundle, read = read_bundle(data, kind="shared", expected=SHAPES)
    assert [t.name for t in bundle.tensors] == sorted(SHAPES)
    assert set(read) == set(SHAPES)
    assert all(torch.equal(read[n], decoded[n]) for n in SHAPES)
    named = control_pb2.TensorBundle.FromString(data)
    for t, name in zip(named.tensors, sorted(SHAPES), strict=True):
        t.name = name
    # Leaving the names out is all that changed: ~24 bytes a tensor on tiny's names.
    assert len(named.SerializeToString()) - len(data) == sum(len(n) + 2 for n in SHAPES)


def test_named_bundles_from_older_senders_still_read() -> None:
    data, decoded = encode_bundle(_updates(), "ternary", kind="column", column=1, base_version=0)
    tensors = control_pb2.TensorBundle.FromString(data).tensors
    payloads = {name: t.payload for name, t in zip(sorted(SHAPES), tensors, strict=True)}
    named = make_bundle("column", 1, 0, payloads, SHAPES, named=True)
    assert [t.name for t in control_pb2.TensorBundle.FromString(named).tensors] == sorted(SHAPES)
    _, read = read_bundle(named, kind="column", expected=SHAPES)
    assert all(torch.equal(read[n], decoded[n]) for n in SHAPES)


def test_unnamed_bundles_must_hold_every_expected_tensor() -> None:
    data, _ = encode_bundle(_updates(), "ternary", kind="shared", column=-1, base_version=0)
    fewer = {n: s for n, s in SHAPES.items() if n != "c.scale"}
    with pytest.raises(BundleShapeError, match="3 unnamed tensors, expected 2"):
        read_bundle(data, kind="shared", expected=fewer)
    more = {**SHAPES, "d.extra": (1,)}
    with pytest.raises(BundleShapeError, match="3 unnamed tensors, expected 4"):
        read_bundle(data, kind="shared", expected=more)
    # An expected set whose sorted order gives a tensor another's shape: refused by shape.
    swapped = {"a.bias": (4, 6), "b.weight": (6,), "c.scale": (3, 2)}
    with pytest.raises(BundleShapeError, match="shape"):
        read_bundle(data, kind="shared", expected=swapped)


def test_a_bundle_naming_some_of_its_tensors_is_refused() -> None:
    data, _ = encode_bundle(_updates(), "ternary", kind="shared", column=-1, base_version=0)
    partly = control_pb2.TensorBundle.FromString(data)
    partly.tensors[1].name = sorted(SHAPES)[1]
    with pytest.raises(UpdateError, match="names 1 of its 3 tensors"):
        read_bundle(partly.SerializeToString(), kind="shared", expected=SHAPES)
