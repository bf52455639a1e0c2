"""Wire codec for ternary tensors, their deltas and compressed updates (docs/wire-format.md).

Public API::

    encode_ternary(trits, scale, name="") -> bytes
    decode_ternary(data) -> (trits, scale, name)
    encode_delta(old_trits, new_trits, old_scale, new_scale) -> bytes
    apply_delta(old_trits, data) -> (new_trits, new_scale)
    ErrorFeedbackCompressor().encode(name, update) -> bytes; .decode(bytes) -> float32
    PseudoGradientCompressor().encode(name, grad) -> bytes; .decode(bytes) -> float32

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
from shared_model.codec.feedback import ErrorFeedbackCompressor, ternarize
from shared_model.codec.pseudograd import PseudoGradientCompressor, decode_sparse, encode_sparse
from shared_model.codec.tensor import decode_ternary, encode_ternary

__all__ = [
    "BadMagicError",
    "ChecksumError",
    "CodecError",
    "ErrorFeedbackCompressor",
    "LimitError",
    "MalformedError",
    "PseudoGradientCompressor",
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
    "ternarize",
]
