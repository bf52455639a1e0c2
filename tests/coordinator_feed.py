"""Write a coordinator database the way the federation loop does, through the real CRUD layer.

Tests of the REST API and the dashboard use :class:`NetworkFeed` to fill a database with
participants, leases, accepted and rejected results and published versions, either all at
once (:meth:`NetworkFeed.run`) or from a background thread while a browser watches
(:meth:`NetworkFeed.start`). The numbers a participant reports (losses, tokens) follow a
fixed, seeded schedule; everything else — lease checks, credit, version numbering, events —
is the database layer's own behaviour. A real federated run can replace the feed: anything
with ``start()``/``stop()`` that writes the same database fits the browser fixture.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from coordinator.db import RejectReason
from coordinator.db.leases import create_lease
from coordinator.db.participants import Capability, add_traffic, touch_participant
from coordinator.db.results import ResultPayload, mark_applied, pending_results
from coordinator.db.versions import latest_version, publish_version
from coordinator.intake import Rejected, record_result
from coordinator.leasing import assign_columns


def _norm_too_large(unit) -> None:
    """A payload check that fails, as the intake's norm bound would."""
    raise Rejected(RejectReason.NORM_OUT_OF_BOUNDS, "update norm 9.1e3 above bound 4.0e2")


@dataclass
class FeedConfig:
    """Shape of the simulated network."""

    participants: int = 3
    columns: int = 8
    stage: str = "expert_diff"
    tokens_per_unit: int = 4096
    reject_every: int = 5  # every n-th result fails payload validation
    seed: int = 0


class NetworkFeed:
    """Fills a coordinator database tick by tick (see module docstring)."""

    def __init__(self, factory: sessionmaker[Session], config: FeedConfig | None = None) -> None:
        self.factory = factory
        self.config = config or FeedConfig()
        self.rng = random.Random(self.config.seed)
        self.ticks = 0
        self.results = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def node_ids(self) -> list[int]:
        """Flower node ids of the simulated participants."""
        return [1000 + i for i in range(self.config.participants)]

    def _ensure_started(self, s: Session) -> None:
        for i, node in enumerate(self.node_ids()):
            cap = Capability(max_columns=2, device="cpu", threads=2, tokens_per_s=900.0 + 150 * i)
            row = touch_participant(s, node_id=node, name=f"volunteer-{i}", capability=cap)
            assign_columns(s, participant=row, n_columns=self.config.columns)
        if latest_version(s) is None:
            publish_version(s, parent=None, checksum="v0", stage=self.config.stage, metrics={})

    def tick(self) -> int:
        """One round: each participant answers one lease, then a version is published.

        Returns:
            The number of the version published.
        """
        cfg = self.config
        with self.factory.begin() as s:
            self._ensure_started(s)
            base = latest_version(s).version
            for node in self.node_ids():
                row = touch_participant(s, node_id=node)
                cols = assign_columns(s, participant=row, n_columns=cfg.columns)
                unit = create_lease(
                    s,
                    participant_id=row.id,
                    stage=cfg.stage,
                    base_version=base,
                    columns=cols,
                    docs=[f"doc-{self.results}"],
                    steps=20,
                    params={},
                    lease_seconds=600,
                )
                self.results += 1
                bad = cfg.reject_every and self.results % cfg.reject_every == 0
                loss = 6.0 * math.exp(-0.05 * self.ticks) + 1.5 + self.rng.uniform(-0.05, 0.05)
                payload = ResultPayload(
                    tokens=cfg.tokens_per_unit,
                    train_loss=loss,
                    val_loss=loss + 0.1,
                    base_version=base,
                    bytes_up=20_000 + self.rng.randrange(5_000),
                )
                record_result(
                    s,
                    unit_id=unit.unit_id,
                    node_id=node,
                    payload=payload,
                    check_payload=_norm_too_large if bad else None,
                )
                add_traffic(s, participant_id=row.id, bytes_down=50_000)
            pending = pending_results(s)
            losses = [r.train_loss for r in pending if r.train_loss is not None]
            mean = sum(losses) / len(losses) if losses else None
            metrics = {} if mean is None else {"train_loss": mean, "val_loss": mean + 0.12}
            version = publish_version(
                s,
                parent=base,
                checksum=f"v{base + 1}",
                stage=cfg.stage,
                metrics=metrics | {"results": len(pending)},
            )
            mark_applied(s, unit_ids=[r.unit_id for r in pending], version=version.version)
        self.ticks += 1
        return version.version

    def run(self, ticks: int) -> None:
        """Run ``ticks`` rounds in the calling thread."""
        for _ in range(ticks):
            self.tick()

    def start(self, interval_s: float = 0.5) -> NetworkFeed:
        """Run rounds from a background thread every ``interval_s`` until :meth:`stop`."""

        def loop() -> None:
            try:
                while not self._stop.wait(interval_s):
                    self.tick()
            except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
                self.error = exc

        self._thread = threading.Thread(target=loop, name="network-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread; re-raise whatever it failed with."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise self.error
