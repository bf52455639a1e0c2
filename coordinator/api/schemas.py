"""Pydantic models of the REST API's requests and responses (the OpenAPI schema)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")

# Request bodies: exactly the JSON types the schema states ("5" is not 5, true is not 1.0),
# finite numbers only (NaN/Infinity refused, not stored as null), no unknown fields.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _printable(text: str | None) -> str | None:
    """Refuse control characters: names and notes end up in operators' terminals."""
    bad = next((c for c in text or "" if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(
            f"must be printable text (it is shown in terminals): no control characters or "
            f"escape sequences; found U+{ord(bad):04X}"
        )
    return text


Printable = AfterValidator(_printable)


class Orm(BaseModel):
    """Base of response models read from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


class PageOut(BaseModel, Generic[T]):
    """One page of a listing."""

    items: list[T]
    total: int = Field(description="rows matching the filters, over all pages")
    offset: int
    limit: int


class ErrorOut(BaseModel):
    """Body of every error response."""

    error: str = Field(description="machine-readable code, e.g. not_found, illegal_transition")
    detail: Any = Field(description="what is wrong and how to fix it")


class StatusOut(BaseModel):
    """The network at a glance."""

    stage: str | None
    stage_job_id: int | None
    stage_job_state: str | None
    global_version: int | None
    version_created_at: dt.datetime | None
    tokens_trained: int
    latest_val_loss: float | None
    latest_train_loss: float | None
    participants_online: int
    participants: dict[str, int]
    units: dict[str, int]
    results: dict[str, int]
    bytes_up: int
    bytes_down: int
    busy_participants: int


class ParticipantOut(Orm):
    """A participant as listed."""

    id: int
    node_id: int | None
    name: str
    state: str
    max_columns: int
    device: str | None
    threads: int | None
    tokens_per_s: float | None
    created_at: dt.datetime
    last_seen: dt.datetime | None
    credit: int
    bytes_up: int
    bytes_down: int
    units_done: int
    units_rejected: int


class ParticipantDetailOut(ParticipantOut):
    """A participant with its columns, rejection reasons and recent units."""

    max_params: int | None
    columns: list[int]
    rejected_by_reason: dict[str, int]
    units_in_flight: int


class UnitOut(Orm):
    """A work unit (lease)."""

    unit_id: str
    participant_id: int | None
    stage: str
    base_version: int
    columns: list[int]
    steps: int
    state: str
    state_reason: str | None
    attempt: int
    reissued_from: str | None
    created_at: dt.datetime
    leased_at: dt.datetime | None
    deadline: dt.datetime | None
    finished_at: dt.datetime | None


class UnitDetailOut(UnitOut):
    """A work unit with its documents and stage parameters."""

    docs: list[Any]
    params: dict[str, Any]


class ResultOut(Orm):
    """A stored result."""

    id: int
    unit_id: str
    participant_id: int | None
    base_version: int
    state: str
    reject_reason: str | None
    reject_detail: str | None
    tokens: int
    train_loss: float | None
    val_loss: float | None
    received_at: dt.datetime
    applied_in_version: int | None


class VersionOut(Orm):
    """A published model version."""

    version: int
    parent: int | None
    stage: str | None
    checksum: str
    checkpoint_id: str | None
    delta_blobs: list[str]
    created_at: dt.datetime
    metrics: dict[str, Any]


class StageJobOut(Orm):
    """A stage job."""

    id: int
    stage: str
    config: dict[str, Any]
    state: str
    reason: str | None
    progress: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


class StageJobCreate(BaseModel):
    """Queue a stage job, optionally starting it at once."""

    model_config = STRICT

    stage: Literal["stage3", "stage4"] = Field(
        examples=["stage3"],
        description="the federated stage 'coordinator serve' runs (it reads this job's state)",
    )
    config: dict[str, Any] = Field(default_factory=dict)
    start: bool = Field(default=False, description="move the new job to running at once")


class ReasonIn(BaseModel):
    """Optional reason recorded with a transition."""

    model_config = STRICT

    reason: Annotated[str | None, Printable] = Field(default=None, max_length=1000)


class EventOut(Orm):
    """One line of the audit log."""

    id: int
    ts: dt.datetime
    kind: str
    participant_id: int | None
    unit_id: str | None
    message: str
    data: dict[str, Any]


class EventPageOut(PageOut[EventOut]):
    """Events plus the cursor to pass as ``after_id`` for the next page."""

    next_after_id: int | None


class EnrolmentTokenCreate(BaseModel):
    """Ask for a one-time enrolment token."""

    model_config = STRICT

    note: Annotated[str, Printable] = Field(
        default="", max_length=256, description="who the token is for"
    )
    ttl_hours: float | None = Field(default=None, gt=0, le=24 * 365)


class EnrolmentTokenOut(BaseModel):
    """A new enrolment token; the plaintext is shown only here."""

    id: int
    token: str
    note: str
    expires_at: dt.datetime | None


class EnrolRequest(BaseModel):
    """A volunteer enrols with a one-time token, a name and its public key."""

    model_config = STRICT

    token: str = Field(min_length=1, max_length=256)
    name: Annotated[str, Printable] = Field(min_length=1, max_length=128)
    public_key: str = Field(min_length=1, max_length=8192, description="PEM or OpenSSH key")
    max_columns: int = Field(default=1, ge=1, le=1024)
    threads: int | None = Field(default=None, ge=1, le=4096)
    device: Annotated[str | None, Printable] = Field(default=None, max_length=64)

    @field_validator("public_key")
    @classmethod
    def _node_key(cls, value: str) -> str:
        """The key must be one the SuperLink accepts (parsed, ECDSA on a NIST curve):
        a bad one would otherwise be refused by key sync on every pass (issue 16)."""
        from shared_model.identity import SecurityError, public_key_pem

        try:
            public_key_pem(value)
        except SecurityError as err:
            raise ValueError(f"{err}; 'perspective participant join' makes a valid key") from None
        return value


class EnrolOut(BaseModel):
    """What an enrolled volunteer needs to connect."""

    participant: ParticipantOut
    ca_cert_pem: str | None
    fleet_address: str | None


class ApiTokenCreate(BaseModel):
    """Create an API bearer token."""

    model_config = STRICT

    name: Annotated[str, Printable] = Field(min_length=1, max_length=128)
    role: Literal["operator", "read"] = "read"


class ApiTokenOut(Orm):
    """An API token (never its secret)."""

    id: int
    name: str
    role: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class ApiTokenCreatedOut(ApiTokenOut):
    """A new API token; the plaintext is shown only here."""

    token: str


class VersionPointOut(BaseModel):
    """One version on the charts' time axis."""

    version: int
    created_at: dt.datetime
    stage: str | None
    val_loss: float | None
    train_loss: float | None
    tokens_applied: int
    tokens_cumulative: int
    metrics: dict[str, Any]


class ResultPointOut(BaseModel):
    """One result on the charts' time axis."""

    received_at: dt.datetime
    participant_id: int | None
    state: str
    reject_reason: str | None
    tokens: int
    train_loss: float | None
    val_loss: float | None


class MetricsHistoryOut(BaseModel):
    """Series for the dashboard charts."""

    versions: list[VersionPointOut]
    results: list[ResultPointOut]
    tokens_per_s: float | None = Field(description="accepted tokens per second over the window")
    window_s: float | None


class ParticipantActionOut(BaseModel):
    """Outcome of an operator action on a participant."""

    participant: ParticipantOut


class NodeReportIn(BaseModel):
    """A volunteer daemon's signed report (see :mod:`coordinator.node_reports`)."""

    model_config = STRICT

    kind: str = Field(max_length=64)
    reason: str = Field(max_length=64)
    message: Annotated[str, Printable] = Field(max_length=1000)
    at: float = Field(description="UNIX time the node made the report")
    signature: str = Field(max_length=512, description="base64 ECDSA-SHA384 by the node key")


class NodeReportOut(BaseModel):
    """The event a report became, and the participant's state (a daemon told ``revoked``
    stops for good instead of retrying)."""

    event_id: int
    participant_state: str = Field(description="enrolled | online | offline | revoked")
