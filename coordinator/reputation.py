"""Reputation and quarantine of participants whose results keep failing the defences.

A result refused because its update was out of bounds (``NORM_OUT_OF_BOUNDS``), not
finite (``NON_FINITE``) or made its column's held-out loss worse (``LOSS_INCREASE``) is a
strike: honest participants almost never get one (``docs/federated-training.md`` §3.3
has the measured rates). A participant with ``quarantine_after`` strikes among its last
``reputation_window`` results is quarantined: the loop leases it no units until
``quarantine_seconds`` after its newest strike. It is derived from the result log alone
(no extra state, so a restart keeps it); after the quarantine the participant is on
probation: one more strike within the window quarantines it again at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session

from coordinator.db import results as db_results
from coordinator.db.types import RejectReason, utcnow

#: Refusals that count against a participant (the others, e.g. an expired lease, can
#: happen to anyone).
STRIKES = frozenset(
    {RejectReason.NORM_OUT_OF_BOUNDS, RejectReason.NON_FINITE, RejectReason.LOSS_INCREASE}
)


@dataclass(frozen=True)
class Reputation:
    """The quarantine rule (``FederationSettings.quarantine_*``, ``reputation_window``)."""

    after: int
    window: int
    seconds: float

    @classmethod
    def from_settings(cls, settings) -> Reputation:
        """The rule of a :class:`~coordinator.federation_settings.FederationSettings`."""
        return cls(settings.quarantine_after, settings.reputation_window,
                   settings.quarantine_seconds)  # fmt: skip

    def quarantined(
        self, session: Session, *, participant_id: int, now: dt.datetime | None = None
    ) -> str | None:
        """Why the participant is quarantined now, or ``None`` (also when the rule is off)."""
        if self.after <= 0:
            return None
        rows = db_results.recent_results(session, participant_id=participant_id, limit=self.window)
        strikes = [r for r in rows if r.reject_reason in STRIKES]
        if len(strikes) < self.after:
            return None
        until = strikes[0].received_at + dt.timedelta(seconds=self.seconds)
        if (now or utcnow()) >= until:
            return None
        reasons = sorted({str(r.reject_reason) for r in strikes})
        return (
            f"{len(strikes)} of its last {len(rows)} results refused ({', '.join(reasons)}); "
            f"no units until {until.isoformat(timespec='seconds')}"
        )
