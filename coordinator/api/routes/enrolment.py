"""Enrolment: the operator mints one-time tokens, volunteers enrol with them."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from fastapi.responses import Response

from coordinator.api.deps import DbSession, Operator, Settings
from coordinator.api.schemas import (
    EnrolmentTokenCreate,
    EnrolmentTokenOut,
    EnrolOut,
    EnrolRequest,
    ErrorOut,
    ParticipantOut,
)
from coordinator.db.errors import NotFound
from coordinator.db.participants import Capability
from coordinator.db.tokens import create_enrolment_token, enrol_participant

router = APIRouter(tags=["enrolment"])


@router.post(
    "/enrolment-tokens",
    response_model=EnrolmentTokenOut,
    status_code=201,
    dependencies=[Operator],
)
def create_token(
    session: DbSession, settings: Settings, body: EnrolmentTokenCreate | None = None
) -> EnrolmentTokenOut:
    """Create a one-time enrolment token for a volunteer (shown only in this answer)."""
    body = body or EnrolmentTokenCreate()
    ttl = settings.enrolment_ttl if body.ttl_hours is None else dt.timedelta(hours=body.ttl_hours)
    plain, row = create_enrolment_token(session, note=body.note, ttl=ttl)
    return EnrolmentTokenOut(id=row.id, token=plain, note=row.note, expires_at=row.expires_at)


@router.post(
    "/enrol",
    response_model=EnrolOut,
    status_code=201,
    responses={401: {"model": ErrorOut}, 409: {"model": ErrorOut}},
)
def enrol(session: DbSession, settings: Settings, body: EnrolRequest) -> EnrolOut:
    """Enrol a volunteer with a one-time token, its name and its public key.

    Needs no API token: the enrolment token is the credential. The answer carries the
    network's CA certificate (to verify the coordinator's TLS) and the fleet address.
    """
    capability = Capability(max_columns=body.max_columns, threads=body.threads, device=body.device)
    row = enrol_participant(
        session, token=body.token, name=body.name, public_key=body.public_key, capability=capability
    )
    return EnrolOut(
        participant=ParticipantOut.model_validate(row),
        ca_cert_pem=settings.ca_certificate(),
        fleet_address=settings.fleet_address,
    )


@router.get(
    "/ca",
    response_class=Response,
    responses={
        200: {
            "description": "The CA certificate (PEM)",
            "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
        },
        404: {"model": ErrorOut},
    },
)
def ca_certificate(settings: Settings) -> Response:
    """The network's CA certificate (PEM), public: a volunteer compares its fingerprint with
    the one the operator published before trusting it (``participant join --ca-fingerprint``).
    """
    pem = settings.ca_certificate()
    if pem is None:
        raise NotFound("this coordinator runs without a CA (insecure demo)")
    return Response(pem, media_type="application/x-pem-file")
