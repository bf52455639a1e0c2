"""The coordinator's asynchronous federation loop (stages 3 and 4), FedBuff-style.

Each iteration: expire overdue leases (:mod:`coordinator.db.leases`); lease work so that
every online participant has ``max_in_flight`` units queued (it never waits for us;
:mod:`coordinator.leasing`); pull Flower replies (our own fast loop, no rounds, no
barrier); hand each result to :class:`coordinator.intake.Intake` (check → store → apply;
the submitted ones for about ``INTAKE_SLICE_S`` a step, so the loop leases between intakes);
every ``buffer_size`` accepted results take an outer step on the shared layers and publish
a new version; evaluate now and then.

Durability. The database is the log: a result row is committed before it is applied,
and ``publish_version`` + ``mark_applied`` commit together. The in-memory state is
checkpointed every ``checkpoint_every`` versions; on restart :meth:`FederationLoop.recover`
loads the checkpoint and replays, in order and with the same publishing boundaries,
every accepted result applied after it — which recreates the same versions bit for bit
(same content ids) — and then the accepted results never applied. Nothing accepted is
lost or applied twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable

from coordinator import intake, reply_fields
from coordinator.acks import AckQueue
from coordinator.aggregation.bounds import UpdateBounds
from coordinator.aggregation.robust import robust_reducer
from coordinator.column_validation import ColumnValidator
from coordinator.db import events as db_events
from coordinator.db import leases as db_leases
from coordinator.db import participants as db_participants
from coordinator.db import results as db_results
from coordinator.db import stats as db_stats
from coordinator.db import versions as db_versions
from coordinator.db.errors import Conflict, NotFound, ParticipantRevoked, ParticipantUnknown
from coordinator.db.types import utcnow
from coordinator.federation_settings import FederationSettings, LoopStats
from coordinator.leasing import UnitFactory, leases_needed
from coordinator.metrics import METRICS
from coordinator.node_status import NodeStatus
from coordinator.publishing import CoordinatorState
from coordinator.reputation import Quarantine, Reputation
from coordinator.result_inbox import ResultInbox, Submitted
from coordinator.routing.assignment import ColumnAssignment
from coordinator.routing.rescoring import Rescoring
from coordinator.unit_handoff import UnitHandoff
from coordinator.validation import column_val_loss
from shared_model.data import DocumentDataset
from shared_model.wire.perspective.v1 import control_pb2

log = logging.getLogger(__name__)
# Flower error codes meaning the destination node is gone (3: message unavailable because
# the node was removed, 5: node unavailable after missed heartbeats).
NODE_GONE_CODES = (3, 5)
#: Longest wait for the end-of-stage round that delivers the last acks.
ACK_ROUND_S = 15.0
#: The end of a stage waits this long beyond the asked nodes' training left (sync, upload
#: and Flower's ~3 s poll of each message).
END_GRACE_S = 20.0
#: A step takes in submitted results for about this long (at least one), then leases again.
INTAKE_SLICE_S = 0.5


class FederationLoop:
    """Drives one federated stage over a :class:`~coordinator.flower.driver.FlowerDriver`."""

    def __init__(
        self,
        state: CoordinatorState,
        settings: FederationSettings,
        session_factory,
        driver,
        units: UnitFactory,
        val: DocumentDataset,
        assignment: ColumnAssignment,
        progress: Callable[[LoopStats], float],
        inbox: ResultInbox | None = None,
        handoff: UnitHandoff | None = None,
    ) -> None:
        self.state, self.settings, self.factory = state, settings, session_factory
        self.driver, self.units, self.val = driver, units, val
        self.assignment, self.progress = assignment, progress
        self.sizing = settings.sizing()
        self.rescoring = Rescoring(settings, assignment)  # off unless settings.score_every
        state.shared.reducer = robust_reducer(
            settings.aggregator, trim=settings.trim, clip_factor=settings.clip_factor
        )
        self.intake = self._build_intake()
        self.quarantine = Quarantine(Reputation.from_settings(settings), self._log)
        self._step_tokens = state.cfg.train.batch_size * state.cfg.train.seq_len
        # Only what the result log does not hold; counts come from it (see ``totals``).
        self._bytes_down = 0  # control messages pushed + downloads nodes reported
        self._val_loss: list[tuple[int, float]] = []
        self._train_loss: list[tuple[int, float]] = []
        self._applied: list[str] = []
        # Flower message id -> the units it carries still leased (several for a submitting
        # node; an expired lease's unit is dropped from its list).
        self._message_units: dict[str, list[str]] = {}
        self.acks = AckQueue()  # decided results, acked with the next message to the node
        # Nodes Flower reported gone get no leases for a while (the SuperLink keeps
        # listing a dead node until its heartbeat times out, ~60 s); and the like.
        self.nodes = NodeStatus()
        self._budget_leased = False  # no new unit fits the token budget any more
        self.on_checkpoint: Callable[[], None] | None = None  # after each state save (blob GC)
        self.hold_leases = False  # paused stage (coordinator.stage_control): in flight only
        # Enrolled network (SuperNode auth): a node no enrolled participant owns gets no
        # participant row and no units (key sync unregisters it; issue 16).
        self.enrolled_only = False
        # Results participants submit through the blob service (coordinator.result_inbox).
        self.inbox = inbox
        self.ended = False  # collect() ran: the stage takes no more submitted results
        self._submitters: set[int] = set()  # nodes whose last reply said they submit
        # Nodes whose capability (max_columns) a reply to this loop reported. Until then a
        # node is leased one unit: its reply (at once, when it queues the unit) says how
        # many columns it holds, and the units after it are leased with them. Leasing
        # max_in_flight units at first contact gave them all one column: on a `small`
        # demo the first 9 units of stage 3 trained 3 of the 16 columns.
        self._capable: set[int] = set()
        self._submitted: deque[Submitted] = deque()  # drained, not taken in yet (in order)
        self.units_per_message: Counter[int] = Counter()  # batch size -> messages pushed
        # Units handed to a node in the reply to its Submit (coordinator.unit_handoff): the
        # nodes whose handled result has a Submit waiting for them, and batch size -> count.
        self.handoff = handoff
        self._handoff_due: set[int] = set()
        self._collecting = False  # collect() runs: no leases, acks go back with Submit replies
        self._capabilities: dict[int, control_pb2.NodeCapability] = {}  # last stored per node
        self.units_per_submit_reply: Counter[int] = Counter()
        self.recently_handed: deque[str] = deque(maxlen=1000)  # their unit ids (tests)
        if handoff is not None:
            handoff.open()

    def _build_intake(self) -> intake.Intake:
        """The stage's intake: update bounds restored with the state, and the column check
        on held-out windows unless ``column_check_sequences`` is 0."""
        settings, validator = self.settings, None
        if settings.column_check_sequences > 0:
            validator = ColumnValidator(
                self.state,
                self.val,
                self.assignment,
                sequences=settings.column_check_sequences,
                window=settings.column_check_window,
                tolerance=settings.column_loss_tolerance,
            )
        return intake.Intake(
            self.state,
            self.factory,
            self.rescoring,
            bounds=_restored_bounds(self.state, settings),
            validator=validator,
            log=self._log,
            stage=f"stage{settings.stage}",
        )

    # --- main loop ------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], on_tick: Callable[[], None] | None = None):
        """Iterate until ``progress`` reaches 1 or ``should_stop()``; then collect results."""
        while not should_stop() and self.progress(self.totals()) < 1.0 and not self._done():
            self.step()
            if on_tick is not None:
                on_tick()
        self.collect(timeout=self.settings.lease_seconds)

    def _done(self) -> bool:
        """The token budget is fully leased and every reply is in (refused results
        can leave the accepted tokens short of it)."""
        return self._budget_leased and not self.driver.pending

    def step(self, wait: float = 0.2) -> None:
        """One iteration: expire, lease, pull replies and handle them."""
        with METRICS.timed(METRICS.loop_step):
            self._step(wait)

    def _step(self, wait: float) -> None:
        self._expire_leases(utcnow())
        now = time.monotonic()
        nodes = self.driver.node_ids()
        self.nodes.listed(nodes)
        # One look at what is in flight per step, not per node (a fleet of N nodes made
        # this N² work, and a DB transaction per node every 0.2 s: a 2.5 s step at 700
        # nodes; benchmarks/fleet_soak.py).
        pending = self.driver.pending
        busy = set(pending.values())
        units_out: Counter[int] = Counter()
        for mid, n in pending.items():
            units_out[n] += len(self._message_units.get(mid, ()))
        due_touch = []  # busy nodes due a liveness touch: one transaction for all of them
        for node_id in nodes:
            if self.nodes.cooling(node_id, now):
                continue
            # All it may hold is out. (Not "all there is to lease": an expired lease's unit
            # is re-issued after the budget is fully leased, and must find a taker.)
            full = self.nodes.full(node_id, now)
            if units_out[node_id] >= self.settings.max_in_flight or full:
                if self.nodes.touch_due(node_id, now):
                    due_touch.append(node_id)
                continue
            if self._is_quarantined(node_id):
                continue
            self.nodes.touched(node_id, now)
            try:
                self._lease_for(node_id, busy)
            except (ParticipantRevoked, ParticipantUnknown) as exc:
                self._no_units(node_id, exc, now)
        self._touch_busy(due_touch, now)
        self._take_replies(wait, INTAKE_SLICE_S)

    def _take_replies(self, wait: float, intake_s: float | None = None) -> None:
        """Handle the Flower replies that come within ``wait`` s, then the submitted results:
        for about ``intake_s`` s (at least one; the rest wait for the next step), or all of
        them (``None``).

        A slice, not all: a result's slot is leased again only after its intake, and on
        ``small`` (three participants on two cores) one intake took 5-9 s; a step that took
        in every result submitted meanwhile leased nothing for 46 s while the nodes'
        queues ran dry. Freeing a slot as soon as its result arrives, before the intake,
        was measured too and is worse: the nodes outran the intake (docs/federated-training.md
        §5.1, "The coordinator's loop on `small`").
        """
        for reply in self.driver.wait_any(wait) if self.driver is not None else ():
            self._handle_reply(reply)
        if self.inbox is not None:
            for item in self.inbox.drain():
                node_id, capability = item.node_id, item.capability
                if capability is not None and self._capability_news(node_id, capability):
                    self._reply_fields(node_id, control_pb2.ControlReply(capability=capability))
                self._submitted.append(item)
        start = time.monotonic()
        while self._submitted:
            item = self._submitted.popleft()
            self._handle_submitted(item.node_id, item.result, item.at)
            if intake_s is not None and time.monotonic() - start >= intake_s:
                break

    def _capability_news(self, node_id: int, cap: control_pb2.NodeCapability) -> bool:
        """Whether a capability sent with a ``Submit`` is worth a transaction: the first,
        another column count / device / thread count, or a speed 10 % off the last stored
        (it is remeasured after every unit)."""
        last = self._capabilities.get(node_id)
        self._capabilities[node_id] = cap
        if last is None or (last.max_columns, last.threads, last.device) != (
            cap.max_columns, cap.threads, cap.device,
        ):  # fmt: skip
            return True
        if abs(cap.tokens_per_s - last.tokens_per_s) <= 0.1 * last.tokens_per_s:
            self._capabilities[node_id] = last  # compare with what is stored
            return False
        return True

    def _touch_busy(self, node_ids: list[int], now: float) -> None:
        """Mark nodes that hold all the units they may as seen (liveness), in one
        transaction; they need nothing else from a step."""
        refused = []
        with self.factory.begin() as s:
            for node_id in node_ids:
                self.nodes.touched(node_id, now)
                try:
                    db_participants.touch_participant(
                        s, node_id=node_id, create=not self.enrolled_only
                    )
                except (ParticipantRevoked, ParticipantUnknown) as exc:
                    refused.append((node_id, exc))
        for node_id, exc in refused:
            self._no_units(node_id, exc, now)

    def _no_units(self, node_id: int, exc: Exception, now: float) -> None:
        """A revoked or unknown node: still connected until the key sync unregisters it and
        its heartbeat expires; no work meanwhile (its results would be refused anyway)."""
        self.nodes.cool_down(node_id, now)
        kind = "revoked" if isinstance(exc, ParticipantRevoked) else "unknown"
        self._log(f"participant.{kind}_node", f"node {node_id}: {exc}; no units")

    def _is_quarantined(self, node_id: int) -> bool:
        """Whether the node's results keep failing the defences (:mod:`coordinator.reputation`)."""
        rule = self.quarantine.rule
        if rule.after <= 0:
            return False
        with self.factory() as s:
            row = db_participants.find_participant(s, node_id=node_id)
            why = None if row is None else rule.quarantined(s, participant_id=row.id)
        return self.quarantine.holds(node_id, why, online=self.nodes.online)

    def _lease_for(self, node_id: int, busy: set[int] | None = None) -> None:
        """Touch the node (online), lease it what it lacks of ``max_in_flight`` units, and
        ask for results when it has all it may and no message of ours to answer (``busy``:
        the nodes with a message pending, as of this step)."""
        with self.factory.begin() as s:
            row = db_participants.touch_participant(  # online from here on
                s, node_id=node_id, create=not self.enrolled_only
            )
            needed = leases_needed(s, node_id=node_id, max_in_flight=self.settings.max_in_flight)
            if node_id not in self._capable:  # one unit in flight until it says
                needed = max(0, needed - (self.settings.max_in_flight - 1))
            if self.hold_leases:  # paused: collect what is in flight, lease nothing
                out = db_leases.count_in_flight(s, participant_id=row.id, now=utcnow()) > 0
                needed = 0 if out else -1
        submits = node_id in self._submitters
        if submits and 0 < needed < self._refill_at(needed):
            needed = 0  # wait for a batch's worth of free slots (see _refill_at)
        leased = self._lease_units(node_id, needed)
        pushed = bool(leased)
        if self._hand_over(node_id, leased):
            pass  # in the reply to the node's Submit
        elif pushed and submits:  # one Flower message for the whole batch
            self._push_units(node_id, leased)
        else:
            for request in leased:
                self._push_units(node_id, [request])
        # Online with nothing to lease: all max_in_flight units are in flight, or the budget
        # is fully leased while some are (no next unit's reply will bring their results).
        in_flight = needed == 0 or (self._budget_leased and needed < self.settings.max_in_flight)
        if in_flight and not pushed and submits:
            self.nodes.found_full(node_id, time.monotonic())  # its results come by themselves
            return
        if busy is None:
            busy = set(self.driver.pending.values())
        if in_flight and not pushed and node_id not in busy:
            self._ask_for_results(node_id)

    def _refill_at(self, free: int) -> int:
        """Free slots a submitting node waits for before it is leased more: with
        ``max_in_flight`` of 4 or more, half of them (rounded up), else one; every slot
        while nothing is in flight.

        Flower hands a SuperNode one message at a time, ~1.5 s each on a busy machine
        (SuperLink, SuperNode and our worker all poll), longer than a ``tiny`` unit
        trains: one message per unit starved the trainer. A submitting node takes its
        units in batches, one message each, leased while the other half still trains.
        With 3 in flight, waiting for 2 free slots left one unit to train while the batch
        travelled, which starved the trainer more (measured: 0.21-0.22 of the wall time
        trained against 0.27-0.28 without waiting)."""
        n = self.settings.max_in_flight
        if free >= n or n < 4:
            return 1
        return math.ceil(n / 2)

    def _lease_units(self, node_id: int, n: int) -> list[control_pb2.ControlRequest]:
        """Lease up to ``n`` units to the node (fewer once the token budget is leased)."""
        requests = []
        for _ in range(n):
            leased = self.lease_request(node_id)
            if leased is None:
                self._budget_leased = True
                break
            requests.append(leased[1])
        return requests

    def _hand_over(self, node_id: int, requests: list[control_pb2.ControlRequest]) -> bool:
        """Hand leased units to the node's ``Submit`` that waits for them (the one whose
        result freed the slot; :mod:`coordinator.unit_handoff`), with the acks waiting for
        the node. With nothing leased, the wait ends with the acks alone. ``False``: no ``Submit``
        waits (any more), the caller sends them over Flower."""
        if node_id not in self._handoff_due or self.handoff is None:
            return False
        if not requests:
            self._hand_acks(node_id)  # nothing to lease now: only the acks due
            return False
        self._handoff_due.discard(node_id)
        batch = _batch(requests, submit_results=True)
        self.acks.attach(node_id, batch)
        if not self.handoff.offer(node_id, batch):
            self._push_units(node_id, [batch])  # the Submit gave up waiting (acks kept)
            return True
        self._bytes_down += batch.ByteSize()
        self.units_per_submit_reply[len(requests)] += 1
        self.recently_handed.extend(r.unit.unit_id for r in requests)
        return True

    def _hand_acks(self, node_id: int) -> None:
        """No units for the node's waiting ``Submit`` (none to lease now, or the stage is
        ending): it takes the node's acks back (or nothing), so the acks of a stage's last
        results need no ``collect`` round."""
        self._handoff_due.discard(node_id)
        request = control_pb2.ControlRequest()
        self.acks.attach(node_id, request)
        if self.handoff.offer(node_id, request if request.acks else None):
            self._bytes_down += request.ByteSize()
        elif request.acks:  # the call gave up: the next message (or the ack round) takes them
            self.acks.requeue(node_id, request.acks)

    def _push_units(self, node_id: int, requests: list[control_pb2.ControlRequest]) -> None:
        """Push leased units in one ``train.unit`` message: the first, and the rest queued
        behind it (``more_units``, only to a node that submits its results)."""
        first = _batch(requests, submit_results=self.inbox is not None)
        message_id = self._push(node_id, first, "train.unit")
        self._message_units[message_id] = [first.unit.unit_id] + [
            r.unit.unit_id for r in first.more_units
        ]
        self.units_per_message[1 + len(first.more_units)] += 1

    def _ask_for_results(self, node_id: int) -> None:
        """A node training its last leased unit with no message of ours to answer would keep
        the result until its lease expires (a reply carries the results finished so far, and
        the reply to unit k+1 is what normally brings unit k's result back; with
        ``max_in_flight = 1`` there is no unit k+1). A ``collect`` query is answered when the
        node's queue has run dry, with those results."""
        self._push(node_id, control_pb2.ControlRequest(collect=True), "query.collect")

    def _push(
        self, node_id: int, request: control_pb2.ControlRequest, kind: str, ttl: float = 0.0
    ) -> str:
        """Push ``request`` with the acks waiting for the node; returns the message id."""
        self.acks.attach(node_id, request)
        payload = request.SerializeToString()
        message_id = self.driver.push(node_id, payload, kind, ttl or self.settings.lease_seconds)
        self._bytes_down += len(payload)
        return message_id

    def lease_request(self, node_id: int) -> tuple[str, control_pb2.ControlRequest] | None:
        """Lease one unit to a known node, sized from its last reported tokens/s.

        Returns:
            The unit id and the ``ControlRequest`` that carries it (not sent yet), or
            ``None`` when the stage's token budget is fully leased.
        """
        with METRICS.timed(METRICS.lease), self.factory.begin() as s:
            participant = db_participants.find_participant(s, node_id=node_id)
            steps = self.sizing.steps_for(participant.tokens_per_s, self._step_tokens)
            unit = self.units.lease(s, participant, self.state, steps)
            if unit is None:
                return None
            self.rescoring.mark(unit)
            return unit.unit_id, self.units.request(unit, self.state, node_id)

    # --- replies --------------------------------------------------------------------------

    def _handle_reply(self, reply) -> None:
        """Handle one Flower reply. Nothing a participant sends can raise out of here: an
        unexpected error (a bug, or ``MemoryError`` from a payload that escaped a check) is
        logged and stored as a refusal, and the loop goes on (issue 16)."""
        try:
            if reply.kind == "train.unit" and reply.ok:
                with METRICS.timed(METRICS.intake):
                    self._handle_reply_body(reply)
            else:
                self._handle_reply_body(reply)
        except Exception as exc:  # noqa: BLE001 - one hostile reply must not stop the loop
            log.exception("reply from node %s could not be handled", reply.node_id)
            self._log(
                "reply.refused",
                reply_fields.short(
                    f"node {reply.node_id}: reply could not be handled: {type(exc).__name__}: {exc}"
                ),
            )

    def _handle_reply_body(self, reply) -> None:
        unit_ids = self._message_units.pop(reply.message_id, [])
        if not reply.ok:
            first = unit_ids[0] if unit_ids else None
            self._log("unit.failed", f"node {reply.node_id}: {reply.error_reason}", first)
            gone = reply.error_code in NODE_GONE_CODES
            if gone:
                self._node_gone(reply.node_id)
            # A node that missed its heartbeats may take its units back (its columns).
            for unit_id in unit_ids:
                self._fail(unit_id, str(reply.error_reason), exclude_holder=not gone)
            return
        self._answered(reply.node_id)
        try:
            body = control_pb2.ControlReply.FromString(reply.payload)
        except Exception as exc:  # protobuf DecodeError: the node sent garbage
            self._log("reply.malformed", f"node {reply.node_id}: {exc}")
            return
        if body.submits_results and self.inbox is not None:
            self._submitters.add(reply.node_id)
        else:
            self._submitters.discard(reply.node_id)
        self._reply_fields(reply.node_id, body)
        failed = list(zip(body.failed_units, body.failure_reasons, strict=False))
        if len(failed) > reply_fields.MAX_FAILED_PER_REPLY:
            self._log("reply.truncated", f"node {reply.node_id}: {len(failed)} failed units")
        for unit, why in failed[: reply_fields.MAX_FAILED_PER_REPLY]:
            self._fail(unit, reply_fields.short(why), node_id=reply.node_id)
        for result in body.results:
            # Acked only now: ``receive`` returns after the decision committed.
            self.acks.add(reply.node_id, self.receive(reply.node_id, result))

    def _handle_submitted(self, node_id: int, result, at: float) -> None:
        """One result a node submitted through the blob service (under its unit's token) at
        ``at`` (monotonic): the same intake as a reply's, acked with the node's next
        message. It shows the node alive (lifting a hold) only if it came after the node's
        last hold began: a node killed right after submitting has its result drained after
        Flower's error for it (or after its leases expired), and must not be leased more
        for that."""
        if self.nodes.after_hold(node_id, at):
            self._answered(node_id)
        with METRICS.timed(METRICS.intake):
            self.acks.add(node_id, self.receive(node_id, result))
        if self.handoff is not None and self.handoff.waiting(node_id):
            if self._collecting:  # no more leases: the call takes the node's acks now
                self._hand_acks(node_id)
            else:
                self._handoff_due.add(node_id)  # its freed slot is leased at the next step

    def _answered(self, node_id: int) -> None:
        """A node replied or submitted a result: it is alive, and lifts any hold on it; a
        submitting node has a slot free (lease at the next step)."""
        self.nodes.answered(node_id)

    def _reply_fields(self, node_id: int, body) -> None:
        """Store the capability and traffic a reply reports, if they are sane."""
        try:
            capability = reply_fields.capability(body.capability)
            bytes_down = reply_fields.bytes_down(body.bytes_down)
        except reply_fields.FieldError as exc:
            self._log("reply.field_refused", f"node {node_id}: {exc}")
            return
        # A revoked node's results are still recorded, as refused (WRONG_NODE).
        with contextlib.suppress(ParticipantRevoked, ParticipantUnknown):
            self._update_capability(node_id, capability, bytes_down)
            if capability is not None:
                self._capable.add(node_id)
        self._bytes_down += bytes_down

    def _node_gone(self, node_id: int) -> None:
        """Stop leasing to a node Flower says is unreachable; it comes back when it replies.

        Flower says so also when a live node merely left our messages unpulled past their
        TTL (slow to start, swamped): it is asked to answer a ``collect``, so that it need
        not sit out the whole cooldown."""
        self.nodes.cool_down(node_id, time.monotonic())
        with self.factory.begin() as s:
            row = db_participants.find_participant(s, node_id=node_id)
            if row is not None and row.state == "online":
                db_participants.set_participant_state(
                    s, participant_id=row.id, state="offline", reason="Flower: node unavailable"
                )
        self._ask_if_silent(node_id)

    def _ask_if_silent(self, node_id: int) -> None:
        """A node held back with no message of ours to answer gets a ``collect``: a live one
        answers it once its queue is done (any reply lifts the hold); a dead one's expires
        (and Flower's error holds it back again, until Flower stops listing it)."""
        if self.driver is None or node_id not in self.nodes.online:
            return
        if node_id not in set(self.driver.pending.values()):
            self._ask_for_results(node_id)

    def _fail(
        self, unit_id: str, reason: str, node_id: int | None = None, exclude_holder: bool = True
    ) -> None:
        """Re-queue a unit a participant could not do (unknown ids: a previous run's).

        With ``node_id`` (a participant reporting its own failures), only a unit leased to
        that node is failed: nobody can fail another node's lease. ``exclude_holder``: see
        :func:`coordinator.db.leases.requeue_copy`.
        """
        try:
            with self.factory.begin() as s:
                mine = node_id is None or _may_fail(s, unit_id, node_id)
                if mine:
                    db_leases.fail_unit(
                        s,
                        unit_id=unit_id,
                        reason=reason,
                        requeue=True,
                        max_attempts=self.settings.max_attempts,
                        exclude_holder=exclude_holder,
                    )
        except (NotFound, Conflict) as exc:
            self._log("unit.failed.ignored", f"{unit_id}: {exc}")
            return
        if not mine:
            self._log("unit.failed.refused", f"node {node_id} does not hold {unit_id}")

    def _update_capability(
        self, node_id: int, capability: db_participants.Capability | None, bytes_down: int = 0
    ) -> None:
        if capability is None:
            return  # an old or partial reply: keep what we know
        with self.factory.begin() as s:
            row = db_participants.touch_participant(
                s, node_id=node_id, capability=capability, create=not self.enrolled_only
            )
            if bytes_down:
                db_participants.add_traffic(s, participant_id=row.id, bytes_down=bytes_down)

    def receive(self, node_id: int, result) -> db_results.RecordOutcome:
        """Hand one result to the intake (idempotent on replays of the same unit).

        Never raises for what the result holds: an unexpected error while checking it is
        stored as its refusal (:meth:`~coordinator.intake.Intake.refuse_unexpected`).
        """
        try:
            got = self.intake.receive(node_id, result)
        except Exception as exc:  # noqa: BLE001 - incl. MemoryError: a hostile payload
            log.exception("result %.40r of node %s could not be checked", result.unit_id, node_id)
            return self.intake.refuse_unexpected(node_id, result, exc)
        if not got.applied:
            return got.outcome
        loss = reply_fields.finite(result.train_loss)
        if loss is not None:  # a version's metrics are JSON: no NaN (PostgreSQL refuses it)
            self._train_loss.append((self.state.version, loss))
        self._applied_one(result.unit_id, got.stepped)
        return got.outcome

    def totals(self, *, timings: bool = False) -> LoopStats:
        """This stage's running totals: counted once, in the result log (SQL), plus what
        only the loop sees (control bytes, the loss history); ``timings`` adds train/unit
        seconds (one row read per result)."""
        with self.factory() as s:
            t = db_stats.stage_totals(s, stage=f"stage{self.settings.stage}", timings=timings)
        return LoopStats(
            tokens=t.tokens, accepted=t.accepted, rejected=t.rejected, bytes_up=t.bytes_up,
            bytes_down=self._bytes_down, val_loss=list(self._val_loss),
            train_loss=list(self._train_loss), train_s=t.train_s, unit_s=t.unit_s,
        )  # fmt: skip

    @property
    def stats(self) -> LoopStats:
        """:meth:`totals` with timings (for the demo's view, benchmarks and tests)."""
        return self.totals(timings=True)

    def _applied_one(self, unit_id: str, stepped: bool) -> None:
        """Book an applied result for the next version; publish it if the step was taken."""
        self._applied.append(unit_id)
        if stepped:
            self.publish()

    # --- versions -------------------------------------------------------------------------

    def publish(self) -> int:
        """Publish the masters as a new version and record it with the results it applies."""
        with METRICS.time_aggregation():
            version = self.state.publish(self._applied)
        totals = self.totals()
        metrics = {"tokens": totals.tokens, "accepted": totals.accepted}
        recent = [loss for v, loss in self._train_loss if v == version - 1]
        if recent:
            metrics["train_loss"] = sum(recent) / len(recent)
        if version % self.settings.eval_every == 0:
            metrics["val_loss"] = self.evaluate()
        with self.factory.begin() as s:
            db_versions.lock_latest_version(s)
            db_versions.publish_version(
                s,
                parent=version - 1,
                checksum=self.state.publisher.manifests[version].content_id,
                delta_blobs=[self.state.publisher.manifests[version].content_id],
                checkpoint_id=_cid(self.state.publisher.checkpoints.get(version)),
                metrics=metrics,
                stage=f"stage{self.settings.stage}",
            )
            if self._applied:
                db_results.mark_applied(s, unit_ids=self._applied, version=version)
        self._applied = []
        if self.settings.state_path and version in self.state.publisher.checkpoints:
            bounds = {"stage": self.settings.stage, **self.intake.bounds.state_dict()}
            self.state.save(self.settings.state_path, bounds=bounds)
            if self.on_checkpoint is not None:
                self.on_checkpoint()
        if self.rescoring.due(version):
            self.rescoring.rescore(self.factory, version, self._log)
        return version

    def evaluate(self) -> float:
        """Validation loss of the published model in column mode (stage 4: with its expert
        weights as ternary as the schedule has made them so far, the model it trains)."""
        cfg = self.state.cfg
        model = self.state.published_model()
        if self.settings.stage == 4:
            with self.factory() as s:
                _, position = db_leases.stage_schedule_position(s, stage="stage4")
                model.set_ternary_fraction(self.units.ternary_fraction(s, position))
        loss = column_val_loss(
            model,
            self.val,
            self.assignment,
            batch_size=cfg.train.batch_size,
            seq_len=cfg.train.seq_len,
            batches=self.settings.eval_batches,
        )
        self._val_loss.append((self.state.version, loss))
        self._log("eval", f"version {self.state.version}: val loss {loss:.4f}")
        return loss

    # --- end of stage and recovery ---------------------------------------------------------

    def collect(self, timeout: float) -> None:
        """Ask every node with a message pending for its finished results; bounded wait.

        When the stage ends by its token budget, the nodes holding its last leased units
        are asked too (those units are part of the budget; no later reply will bring
        them). When its time is up, they are asked to drop the units still queued (they
        would train them before the next stage's, and the next stage refuses their
        results) and answer once the unit in progress is done.
        """
        # No more leases: a Submit waiting now, or coming while the nodes finish, takes the
        # node's acks back instead of units (then _deliver_acks has little left to send).
        self._collecting = True
        for node_id in list(self._handoff_due):
            self._hand_acks(node_id)
        holding, drop = self._steps_held(), not self._budget_leased
        asked = set(self.driver.pending.values()) | set(holding)
        for node_id in asked:
            ask = control_pb2.ControlRequest(collect=True, drop_queued=drop)
            self._push(node_id, ask, "query.collect", timeout)
        wait = min(timeout, self._end_wait_s({n: holding.get(n, []) for n in asked}, drop))
        deadline = time.monotonic() + wait
        while self.driver.pending and time.monotonic() < deadline:
            self._take_replies(0.2)
        self._take_replies(0.0)  # submitted just before the last reply
        if self.handoff is not None:  # a Submit from now on answers at once
            self.handoff.close()
        self.ended = True  # later results wait for the next stage's replies, as before
        if self._applied or self.state.shared.has_buffered():
            self.state.shared.flush()
            self.publish()
        self._deliver_acks(min(timeout, ACK_ROUND_S))

    def _deliver_acks(self, timeout: float) -> None:
        """End of stage: no further unit carries the acks of the results decided last, so one
        ``collect`` round delivers them (bounded; what is not acked is re-sent next time and
        answered as already decided)."""
        nodes = self.acks.nodes()
        for node_id in nodes:
            self._push(node_id, control_pb2.ControlRequest(collect=True), "query.collect", timeout)
        deadline = time.monotonic() + timeout
        while self.driver.pending and time.monotonic() < deadline:
            for reply in self.driver.wait_any(0.2):
                self._handle_reply(reply)
        if nodes:
            log.info(
                "end of stage: acks sent to %d node(s); %d message(s) unanswered",
                len(nodes),
                len(self.driver.pending),
            )

    def _steps_held(self) -> dict[int, list[int]]:
        """Online nodes that hold leased units (their results are still on the node): the
        steps of each unit they hold."""
        now, holding = utcnow(), {}
        with self.factory() as s:
            for node_id in self.nodes.online:
                row = db_participants.find_participant(s, node_id=node_id)
                steps = (
                    []
                    if row is None
                    else db_leases.steps_in_flight(s, participant_id=row.id, now=now)
                )
                if steps:
                    holding[node_id] = steps
        return holding

    def _end_wait_s(self, held: dict[int, list[int]], drop: bool) -> float:
        """How long the end of a stage waits for the asked nodes' last results.

        Each node's share is what it has left to train (only the unit in progress when its
        queue is dropped) at its reported speed, twice over, plus ``END_GRACE_S`` for its
        sync, upload and Flower's poll; the slowest node sets the wait. A node that never
        answers (a lost message, a SuperNode left on a stopped run) then holds the stage's
        end for that long, not for a whole lease (a 5-minute hang of a 1-minute demo).
        A node that has not reported a speed yet (no unit finished in this process) is
        taken to be as slow as the slowest that has; with none, each unit counts its share
        of the lease budget (``lease_fraction × lease_seconds / max_in_flight``).
        """
        with self.factory() as s:
            rows = {n: db_participants.find_participant(s, node_id=n) for n in held}
        speeds = {n: reply_fields.speed(r.tokens_per_s) for n, r in rows.items() if r is not None}
        known = [v for v in speeds.values() if v is not None]
        sizing = self.sizing
        wait = 0.0
        for node_id, steps in held.items():
            # Dropped: only the unit in progress (the longest held, as the lease query has
            # no order). A node asked with no lease holds none.
            left = [max(steps)] if drop and steps else steps
            speed = speeds.get(node_id) or (min(known) if known else None)
            if speed is None:
                train_s = sizing.lease_fraction * sizing.lease_seconds / sizing.max_in_flight
                train_s *= len(left)
            else:
                train_s = sum(left) * self._step_tokens / speed
            wait = max(wait, 2 * train_s)
        return wait + END_GRACE_S

    def attach(self, driver) -> None:
        """Use ``driver`` (a new Flower run) from now on, e.g. after the SuperLink restarted.

        Leases still open were pushed on the previous run; their replies can never arrive
        on this one, so they are expired and re-queued (their units are redone).
        """
        if self.driver is not None:
            self._expire_leases(utcnow() + dt.timedelta(days=365), hold_back=False)
        self.driver = driver
        self.nodes.forget_cooldowns()

    def recover(self) -> int:
        """Replay the result log after the loaded state checkpoint; returns results replayed.

        Leases still open belong to the Flower run that died with the previous process
        (their replies cannot reach this run): they are expired now and re-queued.
        """
        self._expire_leases(utcnow() + dt.timedelta(days=365), hold_back=False)
        with self.factory.begin() as s:
            self.rescoring.restore(s)  # the re-scored routing, not the initial k-means one
            done = db_results.applied_results_after(s, version=self.state.version)
            pending = db_results.pending_results(s)
            rows = [
                (
                    r.applied_in_version,
                    r.unit_id,
                    r.blob_ids,
                    db_leases.find_unit(s, unit_id=r.unit_id),
                )
                for r in done + pending
            ]
        replayed = 0
        for target, unit_id, ids, unit in rows:
            decoded = intake.decode_result(
                self.state, ids, unit.base_version, db_leases.result_columns(unit), None,
                column_codec=intake.unit_column_codec(unit),
            )  # fmt: skip
            if target is not None:
                intake.apply_result(self.state, decoded, step=False)
                self._applied.append(unit_id)
                if _last_of_version(rows, replayed, target):
                    self.state.shared.flush()
                    self.state.publish(self._applied)
                    self._applied = []
            else:
                self._applied_one(unit_id, intake.apply_result(self.state, decoded))
            replayed += 1
        return replayed  # the stage's budget continues: its totals are in the result log

    def _expire_leases(self, now: dt.datetime, hold_back: bool = True) -> None:
        """Expire leases past their deadline at ``now``; their units are re-queued as copies.
        With ``hold_back``, their nodes get no new units until they answer again, nor
        these units back; without (their run was lost), the units wait for their nodes."""
        with self.factory.begin() as s:
            expired = db_leases.expire_leases(
                s, now=now, max_attempts=self.settings.max_attempts, exclude_holders=hold_back
            )
            gone = {u.unit_id for u in expired}
            late = {u.participant_id for u in expired} if hold_back else set()
            nodes = {db_participants.get_participant(s, participant_id=p).node_id for p in late}
        for node_id in nodes - {None}:
            self._hold_back(node_id)
        # Their messages may still be pending: they no longer fill the node's slots (the
        # step leases to a node with a free slot at once, as the DB's count says).
        for message_id, unit_ids in self._message_units.items():
            if gone.intersection(unit_ids):
                self._message_units[message_id] = [u for u in unit_ids if u not in gone]

    def _hold_back(self, node_id: int) -> None:
        """A node that missed a deadline is dead, stuck or swamped: no new units until it
        answers (any reply lifts this), rather than refilling the slots its expired leases
        freed until Flower drops a dead node (up to a minute). A node with no message of
        ours to answer is sent a ``collect``, which a live one answers once its queue is
        done; a dead one's expires, and Flower's error marks it gone."""
        # Logged once until the node answers, also when Flower's error put it in cooldown
        # first (a node that submits has no message of ours pending: that error often
        # comes before its leases expire).
        if self.nodes.hold_back(node_id, time.monotonic()):
            self._log(
                "participant.held_back",
                f"node {node_id}: a lease expired; no units until it answers",
            )
        self._ask_if_silent(node_id)

    def _log(self, kind: str, message: str, unit_id: str | None = None) -> None:
        log.info("%s: %s", kind, message)
        with self.factory.begin() as s:
            db_events.log_event(s, kind=kind, message=message, unit_id=unit_id)


def _restored_bounds(state: CoordinatorState, settings: FederationSettings) -> UpdateBounds:
    """The stage's update bounds, with the history a restarted coordinator's state file saved
    for the same stage (another stage's updates have other sizes: it starts afresh)."""
    bounds = UpdateBounds.from_settings(settings)
    saved = state.saved_bounds
    if saved is not None and saved.get("stage") == settings.stage:
        bounds.load_state_dict(saved)
    return bounds


def _batch(
    requests: list[control_pb2.ControlRequest], *, submit_results: bool
) -> control_pb2.ControlRequest:
    """One message for leased units: the first, the rest queued behind it (``more_units``)."""
    first = requests[0]
    first.submit_results = submit_results
    for request in requests[1:]:
        request.submit_results = submit_results
        first.more_units.append(request)
    return first


def _last_of_version(rows, index: int, target: int) -> bool:
    nxt = rows[index + 1][0] if index + 1 < len(rows) else None
    return nxt != target


def _cid(ref) -> str | None:
    return ref.content_id if ref is not None else None


def _may_fail(session, unit_id: str, node_id: int) -> bool:
    """Whether the node may fail ``unit_id``: it holds it (or the id is unknown, which
    ``fail_unit`` reports as a previous run's)."""
    unit = db_leases.find_unit(session, unit_id=unit_id)
    if unit is None:
        return True
    participant = db_participants.find_participant(session, node_id=node_id)
    return participant is not None and unit.participant_id == participant.id
