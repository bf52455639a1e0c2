"""Keep the SuperLink's registered node keys in step with the coordinator database.

With SuperNode authentication on, a volunteer's node can connect only once its public
key is registered on the SuperLink, and a revoked volunteer must be unregistered so it
is refused from then on. The database is the only source of truth: any other node the
SuperLink lists (e.g. a key added with ``flwr supernode register``, since the Control API
has no authentication) is unregistered at the next pass, and ``serve``'s loop never
creates a participant from a node (``FederationLoop.enrolled_only``). Enrolment (REST
API) and revocation (REST API, CLI) only write the database; :class:`KeySync` runs in
``perspective coordinator serve`` and applies the difference every ``period_s`` seconds
through the SuperLink's Control API (loopback only: that API has no authentication in
Flower OSS) with :func:`coordinator.security.sync_participant_keys`.

A SuperLink that is down (restarting) is not an error: the next pass retries.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from coordinator.security import sync_participant_keys

log = logging.getLogger(__name__)


class KeySync:
    """Background thread registering enrolled keys and unregistering revoked ones.

    Args:
        session_factory: Coordinator database session factory.
        superlink_address: Loopback ``host:port`` of the SuperLink Control API.
        root_certificates: CA bytes when the SuperLink speaks TLS (``None``: plain HTTP).
        period_s: Seconds between passes.
    """

    def __init__(
        self,
        session_factory: Any,
        superlink_address: str,
        *,
        root_certificates: bytes | None,
        period_s: float = 5.0,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0 seconds, got {period_s}")
        self.session_factory = session_factory
        self.address = superlink_address
        self.root_certificates = root_certificates
        self.period_s = period_s
        self.passes = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._first_pass = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> KeySync:
        """Start syncing in a daemon thread (first pass immediately)."""
        if self._thread is not None:
            raise RuntimeError("KeySync already started")
        self._thread = threading.Thread(target=self._run, name="key-sync", daemon=True)
        self._thread.start()
        return self

    def wait_until_ready(self, timeout: float = 30.0) -> bool:
        """Block until the first pass finished (successfully or not); returns whether it did."""
        return self._first_pass.wait(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def sync_once(self) -> dict[str, list[int]] | None:
        """One pass; returns what changed, or ``None`` if the SuperLink was unreachable."""
        try:
            changes = sync_participant_keys(
                self.session_factory, self.address, root_certificates=self.root_certificates
            )
        except Exception as exc:  # noqa: BLE001 - a restarting SuperLink must not kill serve
            if str(exc) != self.last_error:
                log.warning("node key sync with %s failed (will retry): %s", self.address, exc)
            self.last_error = str(exc)
            return None
        self.last_error = None
        self.passes += 1
        if any(changes.values()):
            log.info("node keys: %s", changes)
        return changes

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sync_once()
            self._first_pass.set()
            self._stop.wait(self.period_s)
