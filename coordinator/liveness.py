"""Participants go offline after a stated silence (DESIGN §5: liveness from lease activity).

A participant is *seen* whenever the federation loop leases to it or takes its reply
(the loop touches every node the SuperLink lists at each step) and when it reports over
the REST API. The SuperLink stops listing a node once its heartbeats stop, so a node that
died or left is marked ``offline`` by :class:`Liveness` after ``silence_s`` without being
seen (and ``online`` again the next time it is). ``coordinator serve --offline-after``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from coordinator.db import participants as db_participants
from coordinator.db.types import utcnow

log = logging.getLogger(__name__)
OFFLINE_AFTER_S = 120.0


class Liveness:
    """Marks silent participants offline; call :meth:`tick` from the loop (rate-limited).

    ``clock`` gives the database time "now" (tests pass a later one instead of sleeping).
    """

    def __init__(
        self, session_factory, silence_s: float = OFFLINE_AFTER_S, poll_s: float = 2.0,
        clock: Callable[[], dt.datetime] = utcnow,
    ):  # fmt: skip
        self.factory, self.silence = session_factory, dt.timedelta(seconds=silence_s)
        self.poll_s, self._next, self.clock = poll_s, 0.0, clock

    def tick(self) -> list[int]:
        """Mark participants silent for longer than the silence offline; their ids."""
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.poll_s
        with self.factory.begin() as s:
            rows = db_participants.mark_silent_offline(s, silence=self.silence, now=self.clock())
            ids = [r.id for r in rows]
        if ids:
            log.info("offline after %s of silence: participants %s", self.silence, ids)
        return ids
