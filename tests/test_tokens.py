"""Capability tokens: signature, expiry, scope and quota checks."""

from __future__ import annotations

import hashlib

import pytest

from shared_model.blobs import (
    BlobError,
    QuotaExceeded,
    ScopeDenied,
    TokenExpired,
    TokenForged,
    TokenMalformed,
    generate_key,
    issue_token,
    verify_token,
)
from shared_model.blobs.tokens import _b64d, _b64e

KEY = b"k" * 32
IDS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]


def test_roundtrip_preserves_every_field() -> None:
    token = issue_token(KEY, "node-7", IDS, upload_quota=1234, ttl_s=60, now=1000, token_id="t1")
    cap = verify_token(KEY, token, now=1030)
    assert cap.subject == "node-7" and cap.token_id == "t1"
    assert cap.blob_ids == frozenset(IDS)
    assert (cap.upload_quota, cap.issued_at, cap.expires_at) == (1234, 1000, 1060)
    assert not cap.read_all
    assert cap.can_read(IDS[0]) and not cap.can_read("f" * 64)


def test_expired_token_is_refused_with_leeway_honoured() -> None:
    token = issue_token(KEY, "n", IDS, ttl_s=10, now=1000)
    with pytest.raises(TokenExpired, match="expired"):
        verify_token(KEY, token, now=1011)
    assert verify_token(KEY, token, now=1011, leeway_s=5).subject == "n"


def test_other_key_and_altered_payload_are_forged() -> None:
    token = issue_token(KEY, "n", IDS, now=1000)
    with pytest.raises(TokenForged):
        verify_token(generate_key(), token, now=1000)
    prefix, payload, sig = token.split(".")
    raw = _b64d(payload).replace(b'"all":false', b'"all":true')
    assert raw != _b64d(payload)
    with pytest.raises(TokenForged):
        verify_token(KEY, f"{prefix}.{_b64e(raw)}.{sig}", now=1000)


@pytest.mark.parametrize("bad", ["", "Bearer x", "pv1.abc", "pv2.a.b", "pv1.a.b.c", 42])
def test_malformed_tokens(bad: object) -> None:
    with pytest.raises(TokenMalformed):
        verify_token(KEY, bad, now=0)  # type: ignore[arg-type]


def test_signed_but_unreadable_payload_is_malformed() -> None:
    import hmac

    body = "pv1." + _b64e(b'{"sub": 3}')
    sig = _b64e(hmac.new(KEY, body.encode(), hashlib.sha256).digest())
    with pytest.raises(TokenMalformed):
        verify_token(KEY, f"{body}.{sig}", now=0)


def test_scope_and_quota_checks() -> None:
    cap = verify_token(KEY, issue_token(KEY, "n", IDS[:1], upload_quota=100, now=0), now=0)
    cap.check_read(IDS[0])
    with pytest.raises(ScopeDenied, match="does not grant"):
        cap.check_read(IDS[1])
    cap.check_upload(100)
    with pytest.raises(QuotaExceeded):
        cap.check_upload(101)
    reader = verify_token(KEY, issue_token(KEY, "n", read_all=True, now=0), now=0)
    assert reader.can_read(IDS[2])
    with pytest.raises(ScopeDenied, match="no uploads"):
        reader.check_upload(1)


def test_bad_issue_arguments() -> None:
    with pytest.raises(BlobError, match="at least 16 bytes"):
        issue_token(b"short", "n")
    with pytest.raises(BlobError, match="subject"):
        issue_token(KEY, "")
    with pytest.raises(BlobError, match="content id"):
        issue_token(KEY, "n", ["not-a-hash"])


def test_token_with_many_blobs_stays_compact() -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    token = issue_token(KEY, "n", ids, now=0)
    assert len(token) < 500 * 60  # ~57 characters per blob, fits the 256 KiB metadata cap
    assert verify_token(KEY, token, now=0).blob_ids == frozenset(ids)
