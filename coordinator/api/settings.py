"""Settings of the coordinator's REST API and dashboard."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path


class ApiSettingsError(ValueError):
    """The API settings are unusable (says which field and how to fix it)."""


@dataclass(frozen=True)
class ApiSettings:
    """How the REST API and dashboard behave.

    Attributes:
        blob_root: directory of the coordinator's content-addressed blob store
            (``GET /api/v1/blobs/{id}`` serves from it); ``None`` disables blob downloads.
        read_requires_token: read endpoints need a bearer token too (role read or operator).
        ca_cert_pem: PEM of the network's CA certificate, handed to enrolling volunteers.
        ca_cert_path: file to read the CA certificate from instead of ``ca_cert_pem``.
        fleet_address: public address of the Flower fleet API, handed to enrolling volunteers.
        enrolment_ttl: default lifetime of enrolment tokens.
        poll_interval_s: how often dashboard pages poll the JSON API.
        title: name shown in the dashboard header.
        metrics_from_db: refresh the database-mirroring Prometheus gauges on each scrape.
        max_body_bytes: larger request bodies are refused (413) before they are parsed.
        report_interval_s: a participant's node reports of one kind at most this often
            (429 with ``Retry-After`` otherwise).
    """

    blob_root: Path | None = None
    read_requires_token: bool = False
    ca_cert_pem: str | None = None
    ca_cert_path: Path | None = None
    fleet_address: str | None = None
    enrolment_ttl: dt.timedelta = field(default_factory=lambda: dt.timedelta(days=7))
    poll_interval_s: float = 3.0
    title: str = "Perspective coordinator"
    metrics_from_db: bool = True
    max_body_bytes: int = 64 * 1024
    report_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.ca_cert_pem is not None and self.ca_cert_path is not None:
            raise ApiSettingsError("give ca_cert_pem or ca_cert_path, not both")
        if self.ca_cert_pem is not None and "BEGIN CERTIFICATE" not in self.ca_cert_pem:
            raise ApiSettingsError("ca_cert_pem is not a PEM certificate (no BEGIN CERTIFICATE)")
        if self.ca_cert_path is not None and not Path(self.ca_cert_path).is_file():
            raise ApiSettingsError(f"ca_cert_path {self.ca_cert_path} is not a readable file")
        if not self.poll_interval_s > 0:
            raise ApiSettingsError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        if not self.max_body_bytes > 0:
            raise ApiSettingsError(f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        if self.enrolment_ttl.total_seconds() <= 0:
            raise ApiSettingsError("enrolment_ttl must be positive")

    def ca_certificate(self) -> str | None:
        """The CA certificate PEM, read from ``ca_cert_path`` when that is set."""
        if self.ca_cert_path is not None:
            return Path(self.ca_cert_path).read_text(encoding="utf-8")
        return self.ca_cert_pem
