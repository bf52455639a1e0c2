"""Network security material and SuperNode key registration.

* A private CA and a server certificate whose SubjectAltName covers the host names and
  IPs volunteers dial (Flower's SuperLink and the blob service verify against it; there
  is no mTLS in Flower 1.42, node identity comes from SuperNode authentication).
* ECDSA P-384 node keys in OpenSSH format, which is what ``flower-supernode
  --auth-supernode-private-key`` reads (Flower note §6).
* Registering / unregistering a node's public key on the SuperLink Control API: the
  Python equivalent of ``flwr supernode register|unregister``
  (``flwr/cli/supernode/register.py``). The Control API has no authentication in Flower
  OSS, so these calls must be made on the coordinator host (loopback), never through
  the public proxy.
* :func:`sync_participant_keys` keeps the SuperLink's registrations in step with the
  coordinator database: enrolled participants get registered (their Flower node id is
  stored), revoked ones are unregistered, and every change is an audit event.

All files are written to a temp name and renamed, private keys with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.files import write_atomic
from shared_model.identity import SecurityError, public_key_pem


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of a CA and one server certificate signed by it."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or " " in host:
                raise SecurityError(f"invalid host name {host!r} for the certificate") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls(out_dir: Path, hosts: list[str], *, days: int = 825) -> TlsMaterial:
    """Create ``ca.crt``/``ca.key`` (kept if present) and a fresh ``server.crt``/``server.key``.

    Args:
        out_dir: Directory for the four PEM files.
        hosts: DNS names and IP addresses clients dial (every one goes in the SAN).
        days: Validity of the server certificate.

    Returns:
        The file paths.

    Raises:
        SecurityError: If ``hosts`` is empty or holds an invalid name.
    """
    if not hosts:
        raise SecurityError("give at least one host name or IP (e.g. --host fleet.example.org)")
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    if ca_cert_path.is_file() and ca_key_path.is_file():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Perspective network CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(*[False] * 5, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA384())
        )
        write_atomic(ca_key_path, _key_pem(ca_key), 0o600)
        write_atomic(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    write_atomic(out / "server.key", _key_pem(key), 0o600)
    write_atomic(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    return TlsMaterial(ca_cert_path, ca_key_path, out / "server.crt", out / "server.key")


def _control(address: str, root_certificates: bytes | None) -> Any:
    from coordinator.flower.run import _control_client  # one place builds Control clients

    return _control_client(address, root_certificates is None, root_certificates)


def register_node_key(
    address: str, public_key: str, *, root_certificates: bytes | None, name: str | None = None
) -> int:
    """Register a SuperNode public key on the SuperLink (``flwr supernode register``).

    Args:
        address: Loopback ``host:port`` of the SuperLink Control API.
        public_key: OpenSSH or PEM ECDSA public key.
        root_certificates: CA bytes (node auth needs TLS).
        name: Label shown by ``flwr supernode ls``.

    Returns:
        The Flower node id (stable across the node's restarts).

    Raises:
        SecurityError: If the SuperLink refuses (e.g. "Public key already in use").
    """
    import httpx
    from flwr.proto.control_pb2 import RegisterNodeRequest

    client = _control(address, root_certificates)
    try:
        res = client.RegisterNode(
            RegisterNodeRequest(public_key=public_key_pem(public_key), name=name)
        )
    except httpx.HTTPStatusError as err:
        raise SecurityError(f"SuperLink refused the key: {err.response.text[:300]}") from err
    finally:
        client.close()
    if not res.node_id:
        raise SecurityError("SuperLink returned no node id for the key")
    return int(res.node_id)


def unregister_node(address: str, node_id: int, *, root_certificates: bytes | None) -> None:
    """Unregister a node (``flwr supernode unregister``); its key can never register again."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    client = _control(address, root_certificates)
    try:
        client.UnregisterNode(UnregisterNodeRequest(node_id=int(node_id)))
    finally:
        client.close()


def list_nodes(address: str, *, root_certificates: bytes | None) -> dict[int, str]:
    """The nodes the SuperLink knows (``flwr supernode ls``): node id -> status
    (``registered``, ``online``, ``offline``; unregistered ones are left out)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = _control(address, root_certificates)
    try:
        res = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return {int(n.node_id): n.status for n in res.nodes_info if n.status != "unregistered"}


def sync_participant_keys(
    session_factory: Any, address: str, *, root_certificates: bytes | None
) -> dict[str, list[int]]:
    """Make the SuperLink's node keys exactly those of the database (issue 16): the
    database is the only source of truth. Enrolled, unrevoked participants' keys are
    registered (again, if unregistered by hand: Flower refuses a key it has seen, which is
    logged with the fix); revoked participants' nodes and every node no such participant
    owns (e.g. a key added with ``flwr supernode register``) are unregistered. No
    participant is ever created from a node.

    Args:
        session_factory: Coordinator DB session factory (``make_session_factory``).
        address: Loopback SuperLink address.
        root_certificates: CA bytes.

    Returns:
        ``{"registered": [participant ids], "unregistered": [...], "failed": [...],
        "foreign": [Flower node ids unregistered]}``.
    """
    from sqlalchemy import select

    from coordinator.db.events import log_event
    from coordinator.db.models import Participant

    out: dict[str, list[int]] = {"registered": [], "unregistered": [], "failed": [], "foreign": []}
    nodes = list_nodes(address, root_certificates=root_certificates)
    owned: set[int] = set()
    with session_factory.begin() as session:
        rows = session.scalars(select(Participant).where(Participant.public_key.is_not(None)))
        for row in rows:
            try:
                _sync_row(session, row, nodes, address, root_certificates, out)
            except SecurityError as err:
                _log_key_problem(session, row, "participant.key_refused", f"{row.name}: {err}")
                out["failed"].append(row.id)
            if row.state != "revoked" and row.node_id is not None:
                owned.add(int(row.node_id))
        for node_id in sorted(set(nodes) - owned):
            unregister_node(address, node_id, root_certificates=root_certificates)
            log_event(
                session,
                kind="participant.key_foreign",
                message=f"node {node_id} is registered on the SuperLink but belongs to no "
                "enrolled participant: unregistered",
                data={"node_id": node_id},
            )
            out["foreign"].append(node_id)
    return out


def _sync_row(session, row, nodes: dict[int, str], address: str, certs, out) -> None:
    """One participant's key: unregister if revoked, (re-)register if missing."""
    from coordinator.db.events import log_event

    if row.state == "revoked":
        if row.node_id is not None:
            if nodes.pop(int(row.node_id), None) is not None:
                unregister_node(address, row.node_id, root_certificates=certs)
            log_event(
                session,
                kind="participant.key_unregistered",
                message=f"{row.name}: node {row.node_id} unregistered (revoked)",
                participant_id=row.id,
            )
            row.node_id = None
            out["unregistered"].append(row.id)
        return
    if row.node_id is not None and int(row.node_id) in nodes:
        return
    if row.node_id is not None:  # unregistered on the SuperLink by hand
        _log_key_problem(
            session, row, "participant.key_missing",
            f"{row.name}: node {row.node_id} is not registered on the SuperLink; registering "
            "its key again (Flower 1.42 refuses a key it has seen: then the volunteer must "
            "enrol again with a new key)",
        )  # fmt: skip
    row.node_id = register_node_key(address, row.public_key, root_certificates=certs, name=row.name)
    log_event(
        session,
        kind="participant.key_registered",
        message=f"{row.name}: key registered as Flower node {row.node_id}",
        participant_id=row.id,
        data={"node_id": row.node_id},
    )
    out["registered"].append(row.id)


def _log_key_problem(session, row, kind: str, message: str) -> None:
    """Log a key problem once, not at every pass: again only after the key was registered
    since, or when the problem changes. (A key Flower refuses for good, e.g. one it has
    seen before, would otherwise log two events every ``period_s`` forever.)"""
    from sqlalchemy import select

    from coordinator.db.events import log_event
    from coordinator.db.models import Event

    last = session.scalars(
        select(Event)
        .where(Event.participant_id == row.id, Event.kind.in_([kind, "participant.key_registered"]))
        .order_by(Event.id.desc())
        .limit(1)
    ).first()
    if last is None or last.kind != kind or last.message != message:
        log_event(session, kind=kind, message=message, participant_id=row.id)
