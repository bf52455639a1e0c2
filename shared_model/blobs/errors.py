"""Domain exceptions of the blob store, the capability tokens and the blob service.

Every failure is one :class:`BlobError` subclass whose message says what is wrong and
how to fix it. The client maps gRPC status codes back onto the same classes, so code
using :class:`~shared_model.blobs.client.BlobClient` catches the same exceptions as code
using a local :class:`~shared_model.blobs.store.BlobStore`.
"""

from __future__ import annotations


class BlobError(Exception):
    """Base class of every blob store / blob service error."""


class InvalidContentId(BlobError, ValueError):
    """A content id is not 64 lowercase hex characters (a sha256 digest)."""


class BlobNotFound(BlobError, KeyError):
    """No blob with this content id exists."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "blob not found"


class BlobCorrupt(BlobError):
    """A stored blob's bytes no longer hash to its content id."""


class HashMismatch(BlobError):
    """Written or received bytes do not match the declared sha256 or size."""


class QuotaExceeded(BlobError):
    """An upload is larger than the allowed size cap or the token's remaining quota."""


class BlobUnavailable(BlobError):
    """The blob service could not be reached after the bounded number of retries."""


class InvalidRequest(BlobError, ValueError):
    """A request to the blob service is malformed (bad framing, offset past the end)."""


class TokenError(BlobError):
    """Base class of capability-token failures (gRPC UNAUTHENTICATED)."""


class TokenMalformed(TokenError):
    """A token is not in the ``pv1.<payload>.<signature>`` encoding or has bad fields."""


class TokenForged(TokenError):
    """A token's signature does not match the coordinator key."""


class TokenExpired(TokenError):
    """A token's expiry time has passed."""


class ScopeDenied(BlobError, PermissionError):
    """A valid token does not grant this operation (blob not in scope, no upload quota)."""


class NotAccepting(BlobError):
    """The blob service takes no results now (``Submit``: no federated stage is running);
    the participant sends the result with its next reply instead."""
