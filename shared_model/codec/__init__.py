"""Wire codec for ternary tensors, their deltas and compressed updates (docs/wire-format.md).

Public API::

    encode_ternary(trits, scale, name="") -> bytes
    decode_ternary(data) -> (trits, scale, name)
    encode_delta(old_trits, new_trits, old_scale, new_scale) -> bytes
    apply_delta(old_trits, data) -> (new_trits, new_scale)
    encode_sparse(values, name="") -> (bytes, decoded float32)
    decode_sparse(data) -> (values float32, name)

Ternarising FP values is :func:`shared_model.ternary.ternarize`; compressing FP updates
(with error feedback) is :mod:`shared_model.federated`.

Every decoder raises a :class:`CodecError` subclass on malformed input.
"""

from shared_model.codec.container import split_containers
from shared_model.codec.delta import apply_delta, encode_delta
from shared_model.codec.errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    LimitError,
    MalformedError,
    ShapeMismatchError,
    TruncatedError,
    VersionError,
)
from shared_model.codec.pseudograd import decode_sparse, encode_sparse
from shared_model.codec.tensor import decode_ternary, encode_ternary

__all__ = [
    "BadMagicError",
    "ChecksumError",
    "CodecError",
    "LimitError",
    "MalformedError",
    "ShapeMismatchError",
    "TruncatedError",
    "VersionError",
    "apply_delta",
    "decode_sparse",
    "decode_ternary",
    "encode_delta",
    "encode_sparse",
    "encode_ternary",
    "split_containers",
]
