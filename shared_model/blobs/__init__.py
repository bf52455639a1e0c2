"""Content-addressed blobs: local store, capability tokens and the gRPC blob service.

The data plane of DESIGN §4: checkpoints, deltas and shards travel as blobs named by
their sha256, served by :class:`BlobServer` and fetched (with resume and a local cache)
by :class:`BlobClient`. Access is granted by HMAC capability tokens
(:func:`issue_token` / :func:`verify_token`).
"""

from shared_model.blobs.errors import (
    BlobCorrupt,
    BlobError,
    BlobNotFound,
    BlobUnavailable,
    HashMismatch,
    InvalidContentId,
    InvalidRequest,
    NotAccepting,
    QuotaExceeded,
    ScopeDenied,
    TokenError,
    TokenExpired,
    TokenForged,
    TokenMalformed,
)
from shared_model.blobs.store import BlobInfo, BlobStore, GcReport, check_content_id, sha256_hex
from shared_model.blobs.tokens import Capability, generate_key, issue_token, verify_token
from shared_model.blobs.writer import BlobWriter

__all__ = [
    "BlobClient",
    "BlobCorrupt",
    "BlobError",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobUnavailable",
    "BlobWriter",
    "Capability",
    "GcReport",
    "HashMismatch",
    "InvalidContentId",
    "InvalidRequest",
    "NotAccepting",
    "QuotaExceeded",
    "ScopeDenied",
    "TokenError",
    "TokenExpired",
    "TokenForged",
    "TokenMalformed",
    "check_content_id",
    "generate_key",
    "issue_token",
    "sha256_hex",
    "verify_token",
]


def __getattr__(name: str) -> object:
    # The gRPC server/client import grpc; load them lazily so importing the store stays cheap.
    if name == "BlobClient":
        from shared_model.blobs.client import BlobClient

        return BlobClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
