"""Fetching the versions published while a unit trains, before the next unit needs them.

A unit starts from the newest published version (``WorkUnit.start_from_newest``), so
every unit's sync begins with the versions published while the one before trained: a
``Head`` call, then the chain's manifests and, per version, the shared bundle and a bundle
per column held. Fetched at the start of the unit, each is a round trip the trainer waits
for (on ``tiny`` in ``make demo``: ~10 fetches, 0.1 s of a 2 s unit; on a volunteer's
link, with 50-100 ms per round trip, most of a second). :class:`VersionPrefetcher` fetches
them into the blob cache from its own thread while the unit trains, at a few points of its
progress (:data:`PREFETCH_AT`), so the next sync mostly reads the cache and only fetches
what was published after the last point.

It only fills the cache; the trainer still syncs, checks every digest and applies the
chain itself. A failed prefetch costs nothing but its traffic: the sync fetches what is
missing, as without it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from shared_model.blobs import BlobClient, BlobError
from shared_model.wire.perspective.v1 import control_pb2

log = logging.getLogger(__name__)

#: Fractions of a unit's inner steps after which a prefetch round starts.
PREFETCH_AT = (0.5, 0.9)

OpenClient = Callable[[str, str], BlobClient]
#: ``fetch(client, content_id)``: the blob's bytes, from the cache or over ``client``.
Fetch = Callable[[BlobClient, str], bytes]


@dataclass(frozen=True)
class Round:
    """One prefetch round: from the version held, for the columns held.

    Attributes:
        blob_address: the unit's blob service.
        token: the unit's capability token (valid while its lease is).
        version: the version the trainer's replica holds.
        columns: the columns it holds (a version's bundle of each is applied to it).
    """

    blob_address: str
    token: str
    version: int
    columns: tuple[int, ...]


def prefetch_steps(total_steps: int) -> set[int]:
    """The inner steps of a ``total_steps`` unit after which a round starts."""
    return {max(1, math.ceil(f * total_steps)) for f in PREFETCH_AT} if total_steps > 0 else set()


class VersionPrefetcher:
    """A thread that fetches newly published versions into the participant's blob cache.

    Args:
        open_client: opens a blob client (``address, token``) that uses the cache.
        fetch: reads a blob through a client (counts the traffic, fills the cache).
    """

    def __init__(self, open_client: OpenClient, fetch: Fetch) -> None:
        self._open, self._fetch = open_client, fetch
        self._cond = threading.Condition()
        self._next: Round | None = None
        self._stop = False
        self.rounds = 0  # rounds run (tests, logs)
        self.fetched = 0  # blobs a round found missing from the cache and fetched
        self._thread = threading.Thread(target=self._loop, name="version-prefetch", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def request(self, round_: Round) -> None:
        """Ask for a round; returns at once. A round not started yet is replaced."""
        with self._cond:
            self._next = round_
            self._cond.notify()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop after the round in progress (it gives up within ``timeout`` at most)."""
        with self._cond:
            self._stop, self._next = True, None
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._next is not None)
                if self._stop:
                    return
                round_, self._next = self._next, None
            try:
                self.fetched += self.run(round_)
            except BlobError as exc:  # the sync fetches what is missing
                log.debug("prefetch from version %d failed: %s", round_.version, exc)
            except Exception:  # noqa: BLE001 - never take the worker down with a prefetch
                log.exception("prefetch from version %d failed", round_.version)
            self.rounds += 1

    def run(self, round_: Round) -> int:
        """Fetch the chain from ``round_.version`` to the newest version into the cache;
        returns how many blobs were not cached yet."""
        client = self._open(round_.blob_address, round_.token)
        fetched = 0
        try:
            head = client.head(round_.version)
            if head.version <= round_.version:
                return 0
            wanted = [head.checkpoint.content_id]
            for ref in head.versions:
                data, new = self._get(client, ref.content_id)
                fetched += new
                manifest = control_pb2.VersionManifest.FromString(data)
                wanted.append(manifest.shared.content_id)
                wanted += [
                    manifest.columns[c].content_id for c in round_.columns if c in manifest.columns
                ]
            fetched += sum(self._get(client, cid)[1] for cid in wanted)
        finally:
            client.close()
        return fetched

    def _get(self, client: BlobClient, content_id: str) -> tuple[bytes, int]:
        """One blob's bytes, and 1 if it was not in the cache (else 0)."""
        cached = client.cache is not None and client.cache.has(content_id)
        return self._fetch(client, content_id), 0 if cached else 1
