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
from collections.abc import Callable
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


#: Quarantine never takes the last node of a network of at least this many online nodes
#: whose others are all quarantined (see :meth:`Quarantine.holds`).
QUARANTINE_QUORUM = 3


class Quarantine:
    """The nodes the federation loop leases nothing: the :class:`Reputation` rule applied
    to the online network, with the transitions logged through ``log(kind, message)``."""

    def __init__(self, rule: Reputation, log: Callable[[str, str], None]) -> None:
        self.rule, self._log = rule, log
        self.nodes: set[int] = set()  # node ids quarantined at their last check
        self.suspended = False  # suspended once: the whole network failed the defences

    def holds(self, node_id: int, why: str | None, *, online: set[int]) -> bool:
        """Whether ``node_id`` is quarantined now, given ``why`` the rule quarantines it
        (:meth:`Reputation.quarantined`, ``None``: it does not) and ``online``, the node
        ids the SuperLink lists; logged when it enters and leaves.

        Never the whole network: when the last of ``QUARANTINE_QUORUM`` or more online
        nodes would join the others in quarantine, the defences are more likely
        miscalibrated than every participant hostile (the ``small`` demo once quarantined
        all 3 honest nodes for an hour). That node keeps getting units (its results still
        face every check, so nothing hostile gets in) and the operator is told, once.
        """
        if (
            why is not None
            and len(online) >= QUARANTINE_QUORUM
            and online - {node_id} <= self.nodes
        ):
            if not self.suspended:
                self._log(
                    "defence.quarantine_suspended",
                    f"node {node_id}: {why}; every other online node is quarantined too: the "
                    "update bounds or the column check are more likely wrong than every "
                    "participant hostile (see docs/federated-training.md §3.3)",
                )
            self.suspended = True
            why = None
        if (why is not None) != (node_id in self.nodes):
            self.nodes.symmetric_difference_update({node_id})
            what = f"node {node_id}: {why}" if why else f"node {node_id}: on probation"
            self._log("participant.quarantined" if why else "participant.released", what)
        return why is not None
