"""Capability tokens for the blob service, signed by the coordinator (HMAC-SHA256).

A token grants one node (``subject``) read access to a list of blobs, to every blob the
coordinator has published (``read_published``: model versions, checkpoints, training
shards, the stage-4 teacher; the blob service asks the coordinator which those are), or to
every blob (``read_all``), and an upload quota in bytes, until ``expires_at``.
Each work unit carries a short-lived token (DESIGN §4), so the coordinator never needs a
per-node ACL in the blob service.

Encoding (compact, URL-safe, fits in a gRPC metadata value)::

    pv1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(key, "pv1." + payload part))>

The payload keys are ``jti`` (token id), ``sub``, ``ids`` (base64url of the concatenated
32-byte sha256 digests: 43 characters per blob instead of 64 hex), ``all``, ``pub``
(optional, default false), ``quota``, ``iat`` and ``exp`` (unix seconds). Signatures are
compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from shared_model.blobs.errors import (
    BlobError,
    QuotaExceeded,
    ScopeDenied,
    TokenExpired,
    TokenForged,
    TokenMalformed,
)
from shared_model.blobs.store import check_content_id

PREFIX = "pv1."
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class Capability:
    """What a verified token allows."""

    token_id: str
    subject: str
    blob_ids: frozenset[str]
    read_all: bool
    upload_quota: int
    issued_at: int
    expires_at: int
    read_published: bool = False

    def can_read(self, content_id: str, published: bool = False) -> bool:
        """Whether the blob is in this token's read scope (``published``: the coordinator
        published it, so a ``read_published`` token may read it)."""
        return self.read_all or content_id in self.blob_ids or (self.read_published and published)

    def check_read(self, content_id: str, published: bool = False) -> None:
        """Raise :class:`ScopeDenied` unless the blob is readable with this token."""
        if not self.can_read(content_id, published):
            raise ScopeDenied(
                f"token {self.token_id} of {self.subject!r} does not grant read access to blob "
                f"{content_id}; ask the coordinator for a token naming it"
            )

    def check_upload(self, size: int) -> None:
        """Raise unless an upload of ``size`` bytes fits this token's total quota."""
        if self.upload_quota <= 0:
            raise ScopeDenied(f"token {self.token_id} of {self.subject!r} grants no uploads")
        if size > self.upload_quota:
            raise QuotaExceeded(
                f"upload of {size} bytes exceeds the token's quota of {self.upload_quota} bytes"
            )


def generate_key() -> bytes:
    """A fresh random 32-byte signing key for the coordinator."""
    return secrets.token_bytes(32)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise BlobError(
            f"token signing key must be at least {MIN_KEY_BYTES} bytes "
            "(use shared_model.blobs.generate_key())"
        )
    return bytes(key)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, signed_part: str) -> bytes:
    return hmac.new(key, signed_part.encode("ascii"), hashlib.sha256).digest()


def issue_token(
    key: bytes,
    subject: str,
    blob_ids: Iterable[str] = (),
    *,
    read_all: bool = False,
    read_published: bool = False,
    upload_quota: int = 0,
    ttl_s: float = 3600.0,
    now: float | None = None,
    token_id: str | None = None,
) -> str:
    """Sign a capability token.

    Args:
        key: the coordinator's signing key (>= 16 bytes).
        subject: node id the token is issued to.
        blob_ids: content ids the holder may read.
        read_all: let the holder read every blob.
        read_published: let the holder read every blob the coordinator published (not
            other participants' uploads).
        upload_quota: total bytes the holder may upload with this token (0: none).
        ttl_s: lifetime in seconds from ``now``.
        now: issue time in unix seconds (defaults to the current time).
        token_id: unique id (random if omitted); quotas are accounted per token id.

    Returns:
        The encoded token string.
    """
    key = _check_key(key)
    if not subject:
        raise BlobError("token subject (node id) must be a non-empty string")
    if upload_quota < 0 or ttl_s <= 0:
        raise BlobError(f"upload_quota must be >= 0 and ttl_s > 0 (got {upload_quota}, {ttl_s})")
    ids = sorted({check_content_id(cid) for cid in blob_ids})
    issued = int(time.time() if now is None else now)
    payload = {
        "jti": token_id or secrets.token_hex(8),
        "sub": subject,
        "ids": _b64e(b"".join(bytes.fromhex(cid) for cid in ids)),
        "all": bool(read_all),
        "pub": bool(read_published),
        "quota": int(upload_quota),
        "iat": issued,
        "exp": int(issued + ttl_s),
    }
    body = PREFIX + _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64e(_sign(key, body))}"


def verify_token(
    key: bytes, token: str, now: float | None = None, leeway_s: float = 0.0
) -> Capability:
    """Check a token's signature and expiry and return what it grants.

    Raises:
        TokenMalformed: not a ``pv1`` token or a field is missing / of the wrong type.
        TokenForged: the signature does not match ``key``.
        TokenExpired: ``now`` is past the expiry (plus ``leeway_s``).
    """
    key = _check_key(key)
    if not isinstance(token, str) or not token.startswith(PREFIX) or token.count(".") != 2:
        raise TokenMalformed("not a Perspective capability token (expected 'pv1.<payload>.<sig>')")
    body, _, sig_text = token.rpartition(".")
    try:
        signature = _b64d(sig_text)
    except (binascii.Error, ValueError):
        raise TokenMalformed("token signature is not base64url") from None
    if not hmac.compare_digest(signature, _sign(key, body)):
        raise TokenForged("token signature is invalid (forged, altered, or signed by another key)")
    cap = _decode_payload(body[len(PREFIX) :])
    current = time.time() if now is None else now
    if current > cap.expires_at + leeway_s:
        raise TokenExpired(
            f"token {cap.token_id} of {cap.subject!r} expired at {cap.expires_at} "
            f"({current - cap.expires_at:.0f} s ago); ask the coordinator for a new one"
        )
    return cap


def _decode_payload(text: str) -> Capability:
    try:
        payload = json.loads(_b64d(text))
        raw_ids = _b64d(payload["ids"])
        fields = (payload["jti"], payload["sub"], payload["quota"], payload["iat"], payload["exp"])
        published = payload.get("pub", False)
        types_ok = (
            isinstance(payload["all"], bool)
            and isinstance(published, bool)
            and all(
                isinstance(v, t) for v, t in zip(fields, (str, str, int, int, int), strict=True)
            )
        )
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise TokenMalformed(f"token payload is unreadable: {exc}") from None
    if not types_ok or len(raw_ids) % 32:
        raise TokenMalformed("token payload has fields of the wrong type")
    ids = frozenset(raw_ids[i : i + 32].hex() for i in range(0, len(raw_ids), 32))
    return Capability(
        token_id=payload["jti"],
        subject=payload["sub"],
        blob_ids=ids,
        read_all=payload["all"],
        read_published=published,
        upload_quota=payload["quota"],
        issued_at=payload["iat"],
        expires_at=payload["exp"],
    )
