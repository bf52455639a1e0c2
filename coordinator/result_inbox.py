"""Results that participants submit through the blob service, waiting for the intake.

Over Flower a result travels with the reply to the node's *next* message: the SuperNode
pulls one message at a time and polls for the next every few seconds, so a short unit's
result waited on Flower longer than it took to train, and the node's next unit waited on
that result (measured on ``tiny``: a participant trained 21–39 % of the wall time). With
``ControlRequest.submit_results`` a participant sends each result the moment it is
finished (``BlobService.Submit``, :mod:`coordinator.blob_server`); the gRPC thread puts it
here and the federation loop, the only one that touches the intake, takes it on its next
step (:meth:`coordinator.federation.FederationLoop.step`).

Bounded: a node may have at most ``per_node`` results waiting and the inbox ``capacity``
results and ``capacity_bytes`` in all; beyond that :meth:`ResultInbox.put` raises
:class:`InboxFull` (the node keeps the result and sends it with its next reply instead).
A result is a few kB (blob ids, counts, a scoring unit's per-document losses): one over
``max_result_bytes`` is refused as malformed, so a hostile node cannot park gRPC's 8 MiB
messages in the coordinator's memory.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import NamedTuple

from shared_model.blobs import InvalidRequest, QuotaExceeded
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2

#: Results one node may have waiting: more than ``max_in_flight`` allows honestly.
PER_NODE = 16
CAPACITY = 4096
CAPACITY_BYTES = 64 << 20
MAX_RESULT_BYTES = 1 << 20


class InboxFull(QuotaExceeded):
    """Too many results wait for the intake (of this node, or in all); the blob service
    answers RESOURCE_EXHAUSTED."""


class Submitted(NamedTuple):
    """One waiting result: who sent it, when (``time.monotonic()``) it came in, and the
    capability the node reported with it (``None``: none)."""

    node_id: int
    result: federation_pb2.WorkResult
    at: float
    capability: control_pb2.NodeCapability | None = None


class ResultInbox:
    """Thread-safe queue of :class:`Submitted` results from the blob service's ``Submit``."""

    def __init__(
        self,
        per_node: int = PER_NODE,
        capacity: int = CAPACITY,
        capacity_bytes: int = CAPACITY_BYTES,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        if per_node < 1 or capacity < per_node or capacity_bytes < max_result_bytes:
            raise ValueError(
                "need 1 <= per_node <= capacity and max_result_bytes <= capacity_bytes, got "
                f"{per_node}, {capacity}, {max_result_bytes}, {capacity_bytes}"
            )
        self.per_node, self.capacity = per_node, capacity
        self.capacity_bytes, self.max_result_bytes = capacity_bytes, max_result_bytes
        self._lock = threading.Lock()
        self._items: deque[Submitted] = deque()
        self._by_node: Counter[int] = Counter()
        self._bytes = 0
        self.received = 0  # results ever queued (tests read it)

    def put(
        self,
        node_id: int,
        result: federation_pb2.WorkResult,
        capability: control_pb2.NodeCapability | None = None,
    ) -> int:
        """Queue one node's result (and the capability it reported with it); returns how
        many of its results now wait.

        Raises:
            InvalidRequest: the result is larger than ``max_result_bytes``.
            InboxFull: the node already has ``per_node`` results waiting, or the inbox
                holds ``capacity`` results or ``capacity_bytes``.
        """
        size = result.ByteSize()
        if size > self.max_result_bytes:
            raise InvalidRequest(
                f"a result of {size} bytes is over the {self.max_result_bytes} a result may "
                "have (it names blobs; the updates travel as blobs)"
            )
        with self._lock:
            if self._by_node[node_id] >= self.per_node:
                raise InboxFull(
                    f"node {node_id} has {self._by_node[node_id]} results waiting for the "
                    "intake already; send this one with the next reply"
                )
            if len(self._items) >= self.capacity or self._bytes + size > self.capacity_bytes:
                raise InboxFull(f"{len(self._items)} results wait for the intake; try later")
            self._items.append(Submitted(node_id, result, time.monotonic(), capability))
            self._by_node[node_id] += 1
            self._bytes += size
            self.received += 1
            return self._by_node[node_id]

    def drain(self) -> list[Submitted]:
        """Take every waiting result, in the order they came."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._by_node.clear()
            self._bytes = 0
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
