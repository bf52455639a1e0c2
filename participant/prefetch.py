"""Syncing to the versions published while a unit trains, before the next unit needs them.

A unit starts from the newest published version (``WorkUnit.start_from_newest``), so
every unit's sync begins with the versions published while the one before trained: a
``Head`` call, then the chain's manifests and, per version, the shared bundle and a bundle
per column held, each decoded, added and digest-checked. Done at the start of the unit,
the trainer waits for all of it (on ``tiny`` in ``make demo``: ~10 fetches and their
decoding, 0.1-0.2 s of a 2-s unit; on a volunteer's link, with 50-100 ms per round trip,
most of a second). :class:`VersionPrefetcher` does it from its own thread while the unit
trains, at a few points of its progress (:data:`PREFETCH_AT`): it fetches the new versions
into the blob cache and applies them to a :meth:`~shared_model.federated.replica.Replica.view`
of the trainer's replica (the same code, every digest checked). The next unit adopts that
replica (:meth:`~participant.unit_trainer.UnitTrainer.adopt`), so its own sync only has
what was published after the last point left to do.

A failed round costs nothing but its traffic: the sync fetches and applies what is
missing, as without it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from shared_model.blobs import BlobClient, BlobError
from shared_model.federated.replica import Replica, SyncError
from shared_model.wire.perspective.v1 import control_pb2

log = logging.getLogger(__name__)

#: Fractions of a unit's inner steps after which a prefetch round starts.
PREFETCH_AT = (0.5, 0.9)

OpenClient = Callable[[str, str], BlobClient]
#: ``fetch(client, content_id)``: the blob's bytes, from the cache or over ``client``.
Fetch = Callable[[BlobClient, str], bytes]


@dataclass(frozen=True)
class Round:
    """One prefetch round.

    Attributes:
        blob_address: the unit's blob service.
        token: the unit's capability token (valid while its lease is).
        replica: a view of the trainer's replica (:meth:`Replica.view`), advanced here.
    """

    blob_address: str
    token: str
    replica: Replica


def prefetch_steps(total_steps: int) -> set[int]:
    """The inner steps of a ``total_steps`` unit after which a round starts."""
    return {max(1, math.ceil(f * total_steps)) for f in PREFETCH_AT} if total_steps > 0 else set()


class VersionPrefetcher:
    """A thread that fetches and applies newly published versions ahead of the trainer.

    Args:
        open_client: opens a blob client (``address, token``) that uses the cache.
        fetch: reads a blob through a client (counts the traffic, fills the cache).
    """

    def __init__(self, open_client: OpenClient, fetch: Fetch) -> None:
        self._open, self._fetch = open_client, fetch
        self._cond = threading.Condition()
        self._next: Round | None = None
        self._ready: Replica | None = None
        self._stop = False
        self.rounds = 0  # rounds run
        self.fetched = 0  # blobs a round found missing from the cache and fetched
        self.applied = 0  # versions rounds applied
        self._thread = threading.Thread(target=self._loop, name="version-prefetch", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def request(self, round_: Round) -> None:
        """Ask for a round; returns at once. A round not started yet is replaced."""
        with self._cond:
            self._next = round_
            self._cond.notify()

    def take(self) -> Replica | None:
        """The replica the last finished round advanced (once), or ``None``."""
        with self._cond:
            ready, self._ready = self._ready, None
        return ready

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
                round_, self._next = self._onward(self._next), None
            try:
                self.run(round_)
            except (BlobError, SyncError) as exc:  # the sync does it again, and says why
                log.info("prefetch from version %s failed: %s", round_.replica.version, exc)
            except Exception:  # noqa: BLE001 - never take the worker down with a prefetch
                log.exception("prefetch from version %s failed", round_.replica.version)
            self.rounds += 1

    def _onward(self, round_: Round) -> Round:
        """The round, from the replica the last round advanced if it is further on (call
        with the lock held: a replica waiting for :meth:`take` is not changed by anyone)."""
        ready, asked = self._ready, round_.replica
        if ready is None or ready.version <= asked.version:
            return round_
        if not set(asked.columns) <= set(ready.columns):
            return round_
        return replace(round_, replica=ready.view())

    def run(self, round_: Round) -> None:
        """Fetch the chain from the round's replica's version to the newest into the cache,
        apply it to that replica and keep it for :meth:`take`."""
        replica = round_.replica
        client = self._open(round_.blob_address, round_.token)
        try:
            head = client.head(replica.version)
            if head.version <= replica.version:
                return
            ckpt = control_pb2.CheckpointManifest.FromString(self._get(client, head.checkpoint))
            chain = [
                control_pb2.VersionManifest.FromString(self._get(client, ref))
                for ref in head.versions
            ]
            for manifest in chain:  # all fetched before any is applied: the I/O first
                self._get(client, manifest.shared)
                for c in replica.columns:
                    if c in manifest.columns:
                        self._get(client, manifest.columns[c])
            applied = replica.sync(
                ckpt, chain, sorted(replica.columns), lambda ref: self._get(client, ref)
            )
        finally:
            client.close()
        with self._cond:
            self._ready = replica
        self.applied += applied

    def _get(self, client: BlobClient, ref) -> bytes:
        """One blob's bytes; counts it in :attr:`fetched` if it was not in the cache."""
        if client.cache is None or not client.cache.has(ref.content_id):
            self.fetched += 1
        return self._fetch(client, ref.content_id)
