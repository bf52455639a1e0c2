"""``perspective participant join``: enrol this machine with a coordinator.

Steps:

1. make (or reuse) this node's ECDSA P-384 key pair in OpenSSH format
   (``<state>/node_key`` + ``node_key.pub``) — its identity, kept across restarts;
2. ``POST /api/v1/enrol`` with the one-time enrolment token from the operator, a name,
   the public key and the machine's capability report (threads, device, max columns);
3. store what came back — the network's CA certificate and the fleet address — plus our
   limits in ``<state>/participant.json`` and ``<state>/ca.crt`` (temp + rename).

The coordinator then registers the key on its SuperLink
(:func:`coordinator.security.sync_participant_keys`); ``perspective participant run``
starts the SuperNode with that key and CA.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from participant.hardware import detect
from participant.limits import Limits
from shared_model.files import write_text_atomic
from shared_model.identity import SecurityError, ca_fingerprint, make_node_key

ENROL_PATH = "/api/v1/enrol"
CA_PATH = "/api/v1/ca"


class JoinError(RuntimeError):
    """Enrolment failed (says why and what to do)."""


@dataclass(frozen=True)
class Enrolment:
    """What a participant needs to connect, as stored in ``participant.json``.

    Attributes:
        participant_id: Id in the coordinator's database.
        name: Name given at enrolment.
        fleet_address: ``host:port`` of the coordinator's Fleet API (through its proxy).
        ca_cert: Path of the CA certificate (``None`` if the coordinator runs without TLS).
        key: Path of this node's private key.
        coordinator_url: Where we enrolled.
    """

    participant_id: int
    name: str
    fleet_address: str
    ca_cert: str | None
    key: str
    coordinator_url: str

    @classmethod
    def load(cls, state_dir: Path) -> Enrolment:
        """Read ``participant.json``.

        Raises:
            JoinError: When this machine has not joined yet.
        """
        path = Path(state_dir) / "participant.json"
        if not path.is_file():
            raise JoinError(
                f"{path} not found: run 'perspective participant join' first "
                "(the operator gives you the coordinator URL and an enrolment token)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**data["enrolment"])


def join(
    coordinator_url: str,
    token: str,
    name: str,
    state_dir: Path,
    *,
    limits: Limits | None = None,
    device: str | None = None,
    api_ca: str | bool = True,
    fleet_address: str | None = None,
    pinned_fingerprint: str | None = None,
) -> Enrolment:
    """Enrol this machine and store the connection details.

    Args:
        coordinator_url: Base URL of the coordinator REST API (``https://host``).
        token: One-time enrolment token from the operator.
        name: How this node appears on the dashboard.
        state_dir: Directory for keys, CA, limits and state.
        limits: Resource limits (saved to ``limits.json``).
        device: Device override (``cpu``/``cuda``/``mps``), saved with the limits so the
            worker uses it; ``None`` lets the worker pick the best device at each start.
        api_ca: TLS verification of the REST API (``True``: system CAs, or a CA file).
        fleet_address: Override the fleet address the coordinator returns.
        pinned_fingerprint: SHA-256 fingerprint of the network CA published by the operator:
            the CA is fetched, checked against it and then used to verify the coordinator
            (for a coordinator whose certificate is signed by its own CA).

    Raises:
        JoinError: If the coordinator refuses (bad/used token, key already enrolled) or
            gives no fleet address. Nothing this call wrote is left behind then (no fresh
            key, no CA): the state directory is as it was, or gone if we created it.
    """
    state = Path(state_dir)
    created = not state.exists()
    before = set(state.iterdir()) if not created else set()
    try:
        return _enrol(coordinator_url, token, name, state, limits, device, api_ca,
                      fleet_address, pinned_fingerprint)  # fmt: skip
    except BaseException:
        if created:
            shutil.rmtree(state, ignore_errors=True)
        else:
            for path in set(state.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def _enrol(coordinator_url, token, name, state, limits, device, api_ca, fleet_address,
           pinned_fingerprint) -> Enrolment:  # fmt: skip
    import httpx

    state.mkdir(parents=True, exist_ok=True)
    limits = limits or Limits()
    device = device or limits.device
    report = detect(state, device)
    if device is not None:  # an explicit choice is kept so that 'run' honours it
        limits = replace(limits, device=device)
    key_path, public_key = make_node_key(state / "node_key")
    body = {
        "token": token,
        "name": name,
        "public_key": public_key,
        "max_columns": limits.max_columns,
        "threads": limits.threads,
        "device": report.device,
    }
    if pinned_fingerprint is not None:
        api_ca = str(fetch_pinned_ca(coordinator_url, pinned_fingerprint, state / "ca.crt"))
    url = coordinator_url.rstrip("/") + ENROL_PATH
    try:
        resp = httpx.post(url, json=body, timeout=30.0, verify=api_ca)
    except httpx.HTTPError as err:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in str(err) and pinned_fingerprint is None:
            hint = (
                ": this machine does not trust the coordinator's certificate. If your operator "
                "runs the network's own CA, give --ca-fingerprint with the SHA-256 fingerprint "
                "they published (or --api-ca FILE)"
            )
        raise JoinError(f"cannot reach the coordinator at {url}: {err}{hint}") from err
    if resp.status_code != 201:
        raise JoinError(f"enrolment refused ({resp.status_code}): {_detail(resp)}")
    out: dict[str, Any] = resp.json()
    address = fleet_address or out.get("fleet_address")
    if not address:
        raise JoinError("the coordinator has no fleet address configured; pass --fleet-address")
    ca_path = None
    if out.get("ca_cert_pem"):
        ca_path = state / "ca.crt"
        write_text_atomic(ca_path, out["ca_cert_pem"])
    enrolment = Enrolment(
        participant_id=int(out["participant"]["id"]),
        name=name,
        fleet_address=address,
        ca_cert=None if ca_path is None else str(ca_path),
        key=str(key_path),
        coordinator_url=coordinator_url,
    )
    limits.save(state / "limits.json")
    doc = {"enrolment": asdict(enrolment), "hardware": report.as_dict()}
    write_text_atomic(state / "participant.json", json.dumps(doc, indent=2))
    return enrolment


def _normal(fingerprint: str) -> str:
    return "".join(ch for ch in fingerprint.upper() if ch in "0123456789ABCDEF")


def fetch_pinned_ca(coordinator_url: str, fingerprint: str, dest: Path) -> Path:
    """Download the network CA and keep it only if its SHA-256 fingerprint is ``fingerprint``.

    The download itself is not verified (we do not trust anything yet); the fingerprint,
    which the volunteer got from the operator out of band, is what makes it trustworthy.

    Raises:
        JoinError: Unreachable, no CA, or a different fingerprint (nothing is written).
    """
    import httpx

    if len(_normal(fingerprint)) != 64:
        raise JoinError(
            f"--ca-fingerprint {fingerprint!r} is not a SHA-256 fingerprint "
            "(64 hex digits, colons allowed, as 'perspective coordinator init' prints it)"
        )
    url = coordinator_url.rstrip("/") + CA_PATH
    try:
        resp = httpx.get(url, timeout=30.0, verify=False)  # noqa: S501 - pinned below
    except httpx.HTTPError as err:
        raise JoinError(f"cannot reach the coordinator at {url}: {err}") from err
    if resp.status_code != 200:
        raise JoinError(f"the coordinator gave no CA certificate ({resp.status_code})")
    try:
        got = ca_fingerprint(resp.content)
    except SecurityError as err:
        raise JoinError(f"the coordinator's CA is unusable: {err}") from err
    if _normal(got) != _normal(fingerprint):
        raise JoinError(
            f"the coordinator's CA fingerprint is {got}, not the {fingerprint} you were given: "
            "do not enrol (wrong address, or someone in between); ask your operator"
        )
    write_text_atomic(dest, resp.text)
    return dest


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    return str(body.get("detail") or body.get("message") or body)[:300]
