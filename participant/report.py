"""Tell the coordinator why this node was refused: signed reports to its REST API.

The daemon classifies each SuperNode refusal (:func:`participant.daemon.classify_exit`);
:class:`NodeReporter` sends it to ``POST /api/v1/participants/{id}/reports`` signed with
the enrolled node key, so the operator's event log says why this volunteer cannot
connect (:mod:`coordinator.node_reports`). Sending happens in a background thread: the
supervisor never waits on the network. A revoked participant's report is refused
(``409 participant_revoked``): then ``on_revoked`` is called (the daemon stops for good).

The report is verified with the enrolment CA; if that fails (the very problem being
reported may be a wrong CA) it is sent once more without verifying the server: the
content is a reason code and a sentence, and the signature stops anyone from forging it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from participant.join import Enrolment
from shared_model.identity import report_payload, sign_report

log = logging.getLogger(__name__)
REPORTED_KINDS = ("participant.refused",)


class NodeReporter:
    """An ``on_event`` sink for :class:`~participant.daemon.ParticipantDaemon`.

    Args:
        enrolment: Who we are (participant id, node key, coordinator URL, CA).
        timeout_s: HTTP timeout of one attempt.
    """

    def __init__(
        self,
        enrolment: Enrolment,
        timeout_s: float = 10.0,
        on_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self.enrolment = enrolment
        self.timeout_s = timeout_s
        self.on_revoked = on_revoked
        self.sent: list[int] = []  # event ids the coordinator assigned (for status and tests)

    def sink(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Report ``kind`` events worth the operator's attention, in the background."""
        if kind not in REPORTED_KINDS:
            return
        reason = str(data.get("reason", "unknown"))[:64]
        args = (kind, reason, message[:1000])
        threading.Thread(target=self.send, args=args, name="node-report", daemon=True).start()

    def send(self, kind: str, reason: str, message: str) -> int | None:
        """Send one report now; returns the coordinator's event id, ``None`` if it failed."""
        import httpx

        e = self.enrolment
        at = round(time.time(), 3)
        payload = report_payload(e.participant_id, kind, reason, message, at)
        body = {"kind": kind, "reason": reason, "message": message, "at": at,
                "signature": sign_report(e.key, payload)}  # fmt: skip
        url = f"{e.coordinator_url.rstrip('/')}/api/v1/participants/{e.participant_id}/reports"
        for verify in (e.ca_cert or True, False):
            try:
                resp = httpx.post(url, json=body, timeout=self.timeout_s, verify=verify)
            except httpx.ConnectError as err:
                log.info("report to %s failed (verify=%s): %s", url, bool(verify), err)
                continue
            except httpx.HTTPError as err:
                log.info("report to %s failed: %s", url, err)
                return None
            if resp.status_code == 201:
                self.sent.append(int(resp.json()["event_id"]))
                return self.sent[-1]
            if _error_code(resp) == "participant_revoked" and self.on_revoked:
                self.on_revoked(
                    f"the coordinator at {e.coordinator_url} revoked participant "
                    f"{e.participant_id} ({e.name}): this machine's enrolment is no longer "
                    "accepted. To take part again, ask the operator for a new enrolment "
                    "token and run 'perspective participant join' with a new --state-dir."
                )
            log.warning("report refused (%d): %s", resp.status_code, resp.text[:200])
            return None
        return None


def _error_code(resp) -> str | None:
    """The API's error code (``{"error": code, "detail": ...}``), if the body has one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None
