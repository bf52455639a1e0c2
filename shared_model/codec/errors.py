"""Exceptions raised by the codec. Every decode failure is a :class:`CodecError`."""

from __future__ import annotations


class CodecError(ValueError):
    """Base class: bytes or arrays given to the codec are not acceptable."""


class TruncatedError(CodecError):
    """The buffer is shorter than its header says (cut off in transfer or storage)."""


class BadMagicError(CodecError):
    """The buffer does not start with the container magic: it is not a codec container."""


class VersionError(CodecError):
    """Unknown container format version or codec id (written by a newer/other program)."""


class ChecksumError(CodecError):
    """The sha256 in the container header does not match its contents (corrupted bytes)."""


class MalformedError(CodecError):
    """The container is well-framed but its contents are inconsistent or out of range."""


class LimitError(CodecError):
    """The container claims more elements or bytes than this decoder is allowed to allocate."""


class ShapeMismatchError(CodecError):
    """A delta does not fit the tensor it is applied to."""
