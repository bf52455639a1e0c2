"""The operator's control of the running federated stage, through its stage-job row.

``coordinator serve`` runs stage 3 or 4 as the stage job ``stage3`` / ``stage4`` (created
when the stage starts, or the live one continued after a restart). Operators pause, resume
and cancel that row through the REST API, the CLI or the dashboard; the running loop reads
it every :attr:`StageControl.poll_s` seconds:

* **paused**: no new leases; units already in flight finish and their results are taken
  (the loop keeps pulling replies); **running** again: leasing continues;
* **cancelled**: the loop stops, collects the results in flight and the stage ends cleanly;
* the stage's budget used up: the job is marked **done**.

The job's progress (version, tokens, accepted results) is written at each poll, so the
dashboard's stage-jobs page follows the real stage.
"""

from __future__ import annotations

import logging
import time

from coordinator.db import StageJobState
from coordinator.db import stage_jobs as db_jobs

log = logging.getLogger(__name__)
FEDERATED_STAGES = ("stage3", "stage4")  # the stage jobs the API accepts (serve runs them)


def stage_job_name(stage: int) -> str:
    """The stage-job name of federated stage ``stage`` (also the versions' ``stage``)."""
    return f"stage{stage}"


class StageControl:
    """Binds one running :class:`~coordinator.federation.FederationLoop` to its job row."""

    def __init__(self, session_factory, stage: int, *, poll_s: float = 1.0) -> None:
        self.factory, self.name, self.poll_s = session_factory, stage_job_name(stage), poll_s
        self.job_id: int | None = None
        self.state = StageJobState.RUNNING
        self._next_poll = 0.0

    def begin(self, config: dict | None = None) -> int:
        """Continue the stage's live job (a restart) or create and start a new one."""
        with self.factory.begin() as s:
            job = db_jobs.live_stage_job(s, stage=self.name)
            if job is None:
                job = db_jobs.create_stage_job(s, stage=self.name, config=config or {})
            if job.state == StageJobState.QUEUED:
                why = "coordinator serve started the stage"
                db_jobs.transition_stage_job(s, job_id=job.id, to=StageJobState.RUNNING, reason=why)
            self.job_id, self.state = job.id, StageJobState(job.state)
        log.info("stage job %d (%s): %s", self.job_id, self.name, self.state.value)
        return self.job_id

    def cancelled(self) -> bool:
        """Whether the operator cancelled the stage (the loop's stop condition)."""
        return self.state == StageJobState.CANCELLED

    def tick(self, loop) -> None:
        """Read the job (at most every ``poll_s``), apply pause/resume, record progress."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_s
        totals = loop.totals()
        progress = {"version": loop.state.version, "tokens": totals.tokens,
                    "accepted": totals.accepted}  # fmt: skip
        with self.factory.begin() as s:
            job = db_jobs.get_stage_job(s, job_id=self.job_id)
            state = StageJobState(job.state)
            if state in (StageJobState.RUNNING, StageJobState.PAUSED):
                db_jobs.update_stage_progress(s, job_id=self.job_id, progress=progress)
        if state != self.state:
            log.info("stage job %d: %s -> %s", self.job_id, self.state.value, state.value)
        self.state = state
        loop.hold_leases = state != StageJobState.RUNNING

    def finish(self, loop) -> None:
        """After the loop: a stage that used its budget is done (cancelled stays cancelled;
        a stage stopped by a signal stays running and continues on restart)."""
        if self.state != StageJobState.RUNNING or loop.progress(loop.totals()) < 1.0:
            return
        with self.factory.begin() as s:
            db_jobs.transition_stage_job(s, job_id=self.job_id, to=StageJobState.DONE,
                                         reason="budget used",
                                         progress={"version": loop.state.version})  # fmt: skip
