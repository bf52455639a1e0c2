"""A node's identity, the same on both sides: keys, CA fingerprints, signed reports.

* ECDSA P-384 node keys in OpenSSH format, which is what ``flower-supernode
  --auth-supernode-private-key`` reads (Flower note §6); the volunteer makes one at
  ``join``, the coordinator registers its public half on the SuperLink.
* The SHA-256 fingerprint of the network CA, which the operator prints at ``init`` and a
  volunteer pins at ``join``.
* Signed node reports: the canonical payload a volunteer's daemon signs with its node key
  and the coordinator verifies against the enrolled public key.

Files are written to a temp name and renamed, private keys with mode 0600.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared_model.files import write_atomic

#: Kinds of signed report a participant's daemon may send.
REPORT_KINDS = ("participant.refused", "participant.disconnected")
#: A report whose timestamp is further than this from the receiver's clock is refused.
MAX_SKEW_S = 300.0


class SecurityError(ValueError):
    """Bad key/certificate material or a refused registration (says how to fix it)."""


def ca_fingerprint(cert: Path | bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``AB:CD:...`` (what ``openssl x509
    -fingerprint -sha256`` prints), for a volunteer to compare with the operator's.

    Raises:
        SecurityError: If the bytes are not a PEM certificate.
    """
    data = cert if isinstance(cert, bytes) else Path(cert).read_bytes()
    try:
        parsed = x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise SecurityError(f"not a PEM certificate: {err}") from err
    return parsed.fingerprint(hashes.SHA256()).hex(":").upper()


def make_node_key(path: Path) -> tuple[Path, str]:
    """Create an ECDSA P-384 key pair in OpenSSH format (``path`` and ``path.pub``).

    An existing key is kept (a node's identity must survive restarts).

    Returns:
        ``(private_key_path, public_key_openssh_text)``.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if not path.is_file():
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        write_atomic(path, private, 0o600)
        write_atomic(pub_path, public + b"\n")
    return path, pub_path.read_text(encoding="ascii").strip()


def public_key_pem(public_key: str) -> bytes:
    """Normalise an OpenSSH or PEM EC public key to the PEM bytes Flower stores.

    Raises:
        SecurityError: If it is not an EC key on a NIST curve.
    """
    data = public_key.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # UnsupportedAlgorithm: an OpenSSH line naming a key type cryptography does not know
        raise SecurityError(f"public key is neither OpenSSH nor PEM: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise SecurityError(
            "SuperNode keys must be ECDSA on a NIST curve (ssh-keygen -t ecdsa -b 384)"
        )
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def report_payload(participant_id: int, kind: str, reason: str, message: str, at: float) -> bytes:
    """The exact bytes that are signed (canonical JSON)."""
    body = {"at": round(float(at), 3), "kind": kind, "message": message,
            "participant_id": int(participant_id), "reason": reason}  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_report(private_key_path: str | Path, payload: bytes) -> str:
    """Base64 ECDSA signature of ``payload`` with an OpenSSH node key (``node_key``)."""
    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("node keys are ECDSA (see make_node_key)")
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA384()))).decode()


def verify_signature(public_key: str, payload: bytes, signature: str) -> None:
    """Check a base64 ECDSA-SHA384 ``signature`` of ``payload`` against a public key.

    Raises:
        SecurityError: Malformed key or signature, or a signature that does not match.
    """
    try:
        key = serialization.load_pem_public_key(public_key_pem(public_key))
        key.verify(base64.b64decode(signature, validate=True), payload, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError) as err:
        raise SecurityError("signature does not match the key") from err
