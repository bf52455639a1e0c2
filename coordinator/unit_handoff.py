"""Units handed to a node in the reply to its ``Submit``, not over Flower.

A participant sends each finished result to the blob service's ``Submit``
(:mod:`coordinator.result_inbox`). That frees one of its ``max_in_flight`` slots, and the
unit that refills it used to travel as a Flower message: the SuperNode finds it on its
next poll of the SuperLink (every 3 s when idle, hard-coded) and hands it to the worker
one message at a time. On a busy 2-core machine a unit leased at once still reached its
trainer 3-5 s later, longer than the two units queued ahead of it trained (``tiny``: 2-3 s
each), so the trainer waited: a quarter of the stage's wall time in ``make demo``.

With ``SubmitRequest.want_units`` the gRPC thread that took the result waits here, for
at most ``wait_s``, while the federation loop (the only one that leases) handles the
result and leases what the node lacks; the loop hands that batch over and the ``Submit``
reply carries it. The wait is registered before the result is queued, so the loop always
sees it when it handles the result; a batch the loop offers after the wait gave up goes
over Flower as before (:meth:`UnitHandoff.offer` says which).

Bounded: one waiting ``Submit`` per node, and ``max_waiters`` in all (each holds one of the
blob service's threads); beyond that ``Submit`` answers at once, without units.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from shared_model.wire.perspective.v1 import control_pb2

#: How long a ``Submit`` waits for its units: the loop's step (0.2 s) plus the intake of
#: the result, with room for a busy machine. The participant trains its next queued unit
#: meanwhile (it submits from another thread).
WAIT_S = 2.0
#: Waiting ``Submit`` calls in all: under half of the blob service's 32 threads, so reads
#: and uploads always find one.
MAX_WAITERS = 12


@dataclass(eq=False)
class Ticket:
    """One ``Submit`` waiting for units."""

    node_id: int
    event: threading.Event = field(default_factory=threading.Event)
    request: control_pb2.ControlRequest | None = None
    closed: bool = False


class UnitHandoff:
    """Where ``Submit`` calls wait for the units the loop leases their nodes.

    Args:
        wait_s: the longest a ``Submit`` waits.
        max_waiters: waiting calls in all (one per node at most).
    """

    def __init__(self, wait_s: float = WAIT_S, max_waiters: int = MAX_WAITERS) -> None:
        if wait_s <= 0 or max_waiters < 1:
            raise ValueError(f"need wait_s > 0 and max_waiters >= 1, got {wait_s}, {max_waiters}")
        self.wait_s, self.max_waiters = wait_s, max_waiters
        self._lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}
        self._open = False  # a federated stage leases: Submit calls may wait
        self.handed = 0  # batches of units taken by a waiting Submit (tests)

    def open(self) -> None:
        """A stage's loop starts leasing: ``Submit`` calls may wait for units."""
        with self._lock:
            self._open = True

    def expect(self, node_id: int) -> Ticket | None:
        """Register a ``Submit`` of ``node_id`` that will wait; ``None`` when the node has
        one waiting already or ``max_waiters`` wait (that call answers without units)."""
        with self._lock:
            if not self._open or node_id in self._tickets or len(self._tickets) >= self.max_waiters:
                return None
            ticket = self._tickets[node_id] = Ticket(node_id)
            return ticket

    def wait(self, ticket: Ticket) -> control_pb2.ControlRequest | None:
        """Block until the loop hands ``ticket``'s node its units (or says there are none),
        at most ``wait_s``; returns them, or ``None``."""
        ticket.event.wait(self.wait_s)
        return self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> control_pb2.ControlRequest | None:
        """Stop waiting; returns what the loop handed over before (decided under the lock,
        so a batch is either taken here or left to Flower, never both or neither)."""
        with self._lock:
            ticket.closed = True
            if self._tickets.get(ticket.node_id) is ticket:
                del self._tickets[ticket.node_id]
            return ticket.request

    def waiting(self, node_id: int) -> bool:
        """Whether a ``Submit`` of ``node_id`` waits for units."""
        with self._lock:
            return node_id in self._tickets

    def offer(self, node_id: int, request: control_pb2.ControlRequest | None) -> bool:
        """Hand ``request`` (units and acks, or only acks; ``None``: nothing now) to the
        node's waiting ``Submit``; ``False`` when none waits any more (send them over
        Flower)."""
        with self._lock:
            ticket = self._tickets.pop(node_id, None)
            if ticket is None or ticket.closed:
                return False
            ticket.request = request
            ticket.closed = True
            if request is not None and request.WhichOneof("body") == "unit":
                self.handed += 1
        ticket.event.set()
        return True

    def close(self) -> None:
        """The stage leases no more: answer every waiting ``Submit`` without units, and
        let later ones answer at once (until :meth:`open`)."""
        with self._lock:
            self._open = False
            tickets = list(self._tickets.values())
            self._tickets.clear()
            for ticket in tickets:
                ticket.closed = True
        for ticket in tickets:
            ticket.event.set()
