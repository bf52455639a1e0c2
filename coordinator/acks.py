"""Acknowledged delivery: the coordinator tells each node which of its results it decided.

A participant keeps every finished result in its outbox (:mod:`participant.outbox`) and
re-sends it with its replies until the coordinator acknowledges it. The coordinator acks
a result only after the transaction that decided it committed (accepted, refused with a
reason, or recognised as already decided), by carrying a :class:`WorkAck` in the next
``ControlRequest`` it pushes to that node. Nothing is lost when the coordinator dies
between the two: the queue below is in memory only, so the node re-sends and the
restarted coordinator answers the duplicate with the stored outcome and acks it then.
"""

from __future__ import annotations

from coordinator import reply_fields
from coordinator.db.results import RecordOutcome
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2

#: Most acks carried by one message (a node sends few results; a hostile one may send
#: many, whose acks then travel over several messages).
MAX_ACKS_PER_MESSAGE = 256


def work_ack(outcome: RecordOutcome) -> federation_pb2.WorkAck:
    """The acknowledgement a participant receives for a decided result."""
    return federation_pb2.WorkAck(
        unit_id=outcome.unit_id,
        accepted=outcome.accepted,
        reason_code="" if outcome.reason is None else str(outcome.reason.value),
        detail=reply_fields.short(outcome.detail or ""),
    )


class AckQueue:
    """Acks waiting for the next message to their node (one list per Flower node id)."""

    def __init__(self) -> None:
        self._waiting: dict[int, dict[str, federation_pb2.WorkAck]] = {}

    def add(self, node_id: int, outcome: RecordOutcome) -> None:
        """Queue the ack of a committed decision (a later ack of the same unit replaces it)."""
        self._waiting.setdefault(node_id, {})[outcome.unit_id] = work_ack(outcome)

    def requeue(self, node_id: int, acks) -> None:
        """Put back acks a message could not carry (a later ack of the same unit wins)."""
        waiting = self._waiting.setdefault(node_id, {})
        for ack in acks:
            waiting.setdefault(ack.unit_id, ack)

    def attach(self, node_id: int, request: control_pb2.ControlRequest) -> int:
        """Move up to :data:`MAX_ACKS_PER_MESSAGE` waiting acks into ``request``.

        Returns:
            How many acks were attached.
        """
        waiting = self._waiting.get(node_id)
        if not waiting:
            return 0
        units = list(waiting)[:MAX_ACKS_PER_MESSAGE]
        request.acks.extend(waiting.pop(unit) for unit in units)
        if not waiting:
            del self._waiting[node_id]
        return len(units)

    def nodes(self) -> list[int]:
        """Nodes with acks waiting."""
        return list(self._waiting)

    def waiting(self, node_id: int) -> int:
        """Acks queued for ``node_id``."""
        return len(self._waiting.get(node_id, {}))
