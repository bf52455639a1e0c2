"""Coordinator-side push/pull driver on a Flower ``Grid``.

Mechanism (why no ``ServerApp`` runs): the SuperLink is started with ``--isolation
process`` and a SuperExec secret, so it launches no ``flwr-serverapp`` itself. The
coordinator process acquires the run's ServerApp task from the SuperLink Runtime API
exactly as ``flower-superexec`` + ``flwr-serverapp`` do
(``flwr/supercore/superexec/run_superexec.py``, ``flwr/superlink/runtime/
run_serverapp.py``): ``AcquireTask(SERVER_APP)`` → token → ``HttpGrid(token)`` +
task heartbeat + ``PullTaskInput`` → ``grid.set_run(run)``. The federation loop,
blob service and REST API therefore live in one long-lived process with direct
access to the database, no FAB code is installed or run, and we poll replies every
~0.05 s instead of ``send_and_receive``'s fixed 3 s sleep.

Replies can be pulled only once (a second pull answers error code 3), so the
driver tracks outstanding message ids itself and the caller must persist what it
receives before acting on it (the DB is the source of truth, DESIGN §5).

If the coordinator dies, the SuperLink marks the run ``finished:failed`` once task
heartbeats stop; the restarted coordinator starts a **new** run on the same SuperLink
database (node ids survive) — see :func:`coordinator.flower.run.open_driver`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared_model.flower_runtime import (
    FlowerTransportError,
    make_heartbeat_fn,
    make_retry_invoker,
    make_runtime_client,
    payload_from_record,
    payload_record,
    pull_message,
    validate_kind,
)

log = logging.getLogger(__name__)
COMPONENT = "perspective-coordinator"
#: How long one reply's objects may take to arrive before the reply counts as lost. Our
#: replies are small control messages (results travel through the blob service), so one
#: whose objects are not there within seconds was cut off mid-upload: its node died or was
#: stopped. Flower's own pull waits up to 500 tries at up to 10 s each (in practice until
#: the SuperLink expires the upload, minutes), and the whole loop waited with it: no
#: leases, no operator pause or cancel.
REPLY_PULL_MAX_S = 10.0
#: Tries per reply object within that time (Flower's own default, 500: the time bounds it).
PULL_MAX_TRIES = 500


class RunLostError(FlowerTransportError):
    """The Flower run this driver is attached to is no longer running."""


@dataclass(frozen=True)
class Reply:
    """One reply (or error) for a message pushed by :meth:`FlowerDriver.push`.

    Attributes:
        message_id: Id returned by ``push``.
        node_id: Destination node of the original message.
        kind: Message type of the original message.
        payload: Reply bytes, ``None`` when this is an error.
        error_code: Flower ``ErrorCode`` (2 handler raised, 3 unavailable/TTL, 5 node
            gone, 8 worker crashed), ``None`` on success.
        error_reason: Human-readable error text, ``None`` on success.
        latency_s: Seconds from ``push`` to the moment the reply was pulled.
    """

    message_id: str
    node_id: int
    kind: str
    payload: bytes | None
    error_code: int | None
    error_reason: str | None
    latency_s: float

    @property
    def ok(self) -> bool:
        """Whether this reply carries a payload."""
        return self.error_code is None


@dataclass
class _Pending:
    node_id: int
    kind: str
    pushed_at: float


def acquire_serverapp_task(
    runtime_address: str,
    run_id: int,
    *,
    superexec_secret: bytes | None,
    insecure: bool = True,
    root_certificates: bytes | None = None,
    timeout: float = 30.0,
    on_stale: Callable[[int], None] | None = None,
) -> str:
    """Claim the pending ServerApp task of ``run_id`` and return its token.

    The SuperLink hands out the *oldest* pending task; one of an older run (created
    but never attached, e.g. the coordinator crashed in between) is passed to
    ``on_stale(run_id)`` — typically ``stop_run`` — and polling continues.

    Raises:
        FlowerTransportError: If no task for ``run_id`` appears within ``timeout``, or
            the SuperLink hands out a task of another run (a stale pending run: stop it).
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = make_runtime_client(
        runtime_address,
        component=COMPONENT,
        insecure=insecure,
        root_certificates=root_certificates,
        superexec_secret=superexec_secret,
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                if res.task.run_id != run_id and on_stale is not None:
                    on_stale(int(res.task.run_id))
                    continue
                if res.task.run_id != run_id:
                    raise FlowerTransportError(
                        f"SuperLink handed out the ServerApp task of run {res.task.run_id}, "
                        f"expected run {run_id}; stop stale pending runs first"
                    )
                return str(res.token)
            time.sleep(0.1)
    finally:
        client.close()
    raise FlowerTransportError(f"no ServerApp task for run {run_id} within {timeout:.0f} s")


class FlowerDriver:
    """Push/pull messages to SuperNodes through an attached ServerApp task.

    Args:
        runtime_address: ``host:port`` of the SuperLink Runtime API.
        token: ServerApp task token from :func:`acquire_serverapp_task`.
        insecure: Plain HTTP when true.
        root_certificates: CA bytes (TLS).
        poll_interval: Sleep between pulls in :meth:`wait_any`.
    """

    def __init__(
        self,
        runtime_address: str,
        token: str,
        *,
        insecure: bool = True,
        root_certificates: bytes | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        from flwr.superlink.grid import HttpGrid

        self.poll_interval = poll_interval
        self._grid = HttpGrid(
            runtime_api_address=runtime_address,
            insecure=insecure,
            root_certificates=None if insecure else root_certificates,
            token=token,
        )
        # Replace the invoker that SIGINTs this process on HTTP 401 (see flower_runtime).
        self._grid._retry_invoker = make_retry_invoker()
        self._hb_client = make_runtime_client(
            runtime_address,
            component=COMPONENT,
            insecure=insecure,
            root_certificates=root_certificates,
            token=token,
        )
        self._lost_reason: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._heartbeat: Any = None
        self.run_id: int = -1
        self._task_id = 0
        self._src_node_id = 0
        self._attach()

    def _attach(self) -> None:
        from flwr.common.serde import run_from_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest
        from flwr.supercore.heartbeat import HeartbeatSender

        self._heartbeat = HeartbeatSender(make_heartbeat_fn(self._hb_client, self._on_lost))
        self._heartbeat.start()
        res = self._grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        run = run_from_proto(res.run)
        self._grid.set_run(run)
        self.run_id = run.run_id
        self._task_id = int(res.task_id)
        self._src_node_id = int(res.context.node_id)
        log.info("attached to Flower run %d", self.run_id)

    def _on_lost(self, reason: str) -> None:
        if self._lost_reason is None:
            log.error("Flower run %d lost: %s", self.run_id, reason)
        self._lost_reason = reason

    @property
    def run_lost(self) -> str | None:
        """Why the run stopped (heartbeat rejected), or ``None`` while it is running."""
        return self._lost_reason

    def _check_alive(self) -> None:
        if self._lost_reason is not None:
            raise RunLostError(f"Flower run {self.run_id} is gone: {self._lost_reason}")

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run a grid call, mapping a rejected task token to :class:`RunLostError`."""
        import httpx

        self._check_alive()
        try:
            return fn(*args)
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (401, 403):
                self._on_lost(f"Runtime API answered HTTP {err.response.status_code}")
                self._check_alive()
            raise FlowerTransportError(f"SuperLink Runtime API error: {err}") from err
        except httpx.TransportError as err:
            raise FlowerTransportError(f"SuperLink unreachable: {err}") from err

    def node_ids(self) -> list[int]:
        """Ids of the SuperNodes the SuperLink currently considers online."""
        return sorted(int(n) for n in self._call(self._grid.get_node_ids))

    def push(self, node_id: int, payload: bytes, kind: str, ttl: float) -> str:
        """Queue ``payload`` for ``node_id``; returns the message id without waiting.

        Args:
            node_id: Destination SuperNode id.
            payload: Raw bytes (a serialized protobuf).
            kind: Flower message type, e.g. ``"train.unit"``.
            ttl: Seconds the whole round trip may take before Flower answers code 3.

        Raises:
            FlowerTransportError: Invalid kind/ttl, or the SuperLink refused the node id.
        """
        validate_kind(kind)
        if not ttl > 0:
            raise FlowerTransportError(f"ttl must be > 0 seconds, got {ttl}")
        msg = self._instruction(int(node_id), kind, float(ttl), payload)
        ids = list(self._call(self._grid.push_messages, [msg]))
        if not ids or not ids[0]:
            raise FlowerTransportError(
                f"SuperLink refused a message for node {node_id} (unknown node id?)"
            )
        with self._lock:
            self._pending[ids[0]] = _Pending(int(node_id), kind, time.monotonic())
        return str(ids[0])

    def _instruction(self, node_id: int, kind: str, ttl: float, payload: bytes) -> Any:
        """Build an instruction message with explicit metadata.

        ``Message(content, dst, type)`` reads the process-global ``TaskIdentity``, which a
        worker running in the same process (tests, the demo) overwrites; explicit
        metadata keeps the driver independent of it.
        """
        from flwr.app import Metadata
        from flwr.app.message import make_message
        from flwr.supercore.date import now

        metadata = Metadata(
            run_id=self.run_id,
            message_id="",
            src_node_id=self._src_node_id,
            dst_node_id=node_id,
            reply_to_message_id="",
            group_id="",
            created_at=now().timestamp(),
            ttl=ttl,
            message_type=kind,
            src_task_id=self._task_id,
        )
        metadata.delivered_at = ""
        return make_message(metadata=metadata, content=payload_record(payload))

    @property
    def pending(self) -> dict[str, int]:
        """Outstanding message ids mapped to their destination node."""
        with self._lock:
            return {mid: p.node_id for mid, p in self._pending.items()}

    def poll(self) -> list[Reply]:
        """Pull every reply available now (non-blocking); each reply is returned once."""
        with self._lock:
            ids = list(self._pending)
        if not ids:
            return []
        replies = []
        for msg in self._call(pull_replies, self._grid, ids):
            mid = msg.metadata.reply_to_message_id
            with self._lock:
                pend = self._pending.pop(mid, None)
            if pend is None:
                continue  # not ours / already delivered
            replies.append(self._to_reply(mid, pend, msg))
        return replies

    @staticmethod
    def _to_reply(mid: str, pend: _Pending, msg: Any) -> Reply:
        latency = time.monotonic() - pend.pushed_at
        if msg.has_error():
            err = msg.error
            return Reply(mid, pend.node_id, pend.kind, None, int(err.code), err.reason, latency)
        try:
            payload = payload_from_record(msg.content)
        except FlowerTransportError as err:
            return Reply(mid, pend.node_id, pend.kind, None, -1, str(err), latency)
        return Reply(mid, pend.node_id, pend.kind, payload, None, None, latency)

    def wait_any(self, timeout: float) -> list[Reply]:
        """Block until at least one reply is available or ``timeout`` passes.

        Returns:
            The replies pulled (empty on timeout or when nothing is pending).
        """
        deadline = time.monotonic() + timeout
        while True:
            replies = self.poll()
            if replies or not self._pending or time.monotonic() >= deadline:
                return replies
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def close(self, failed: bool = False, details: str = "") -> None:
        """Finish the ServerApp task (run becomes ``finished:completed``/``failed``)."""
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest

        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        if self._lost_reason is None:
            status = SubStatus.FAILED if failed else SubStatus.COMPLETED
            try:
                self._grid._runtime_client.PushTaskOutput(
                    PushTaskOutputRequest(sub_status=status, details=details)
                )
            except Exception as err:  # best effort on shutdown; the run then times out
                log.warning("could not finish Flower run %d: %s", self.run_id, err)
        self._grid.close()
        self._hb_client.close()

    def __enter__(self) -> FlowerDriver:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def pull_replies(grid: Any, message_ids: list[str], max_s: float = REPLY_PULL_MAX_S) -> list:
    """``HttpGrid.pull_messages`` of Flower 1.42, with each reply's objects pulled within
    ``max_s`` seconds (:data:`REPLY_PULL_MAX_S`); a reply whose objects do not arrive in
    time becomes an error reply (``MESSAGE_UNAVAILABLE``), as Flower makes one that never
    arrives."""
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    client, node, run_id = grid._runtime_client, grid.node, grid._run.run_id
    res = client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    pulled = []
    for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        try:
            pulled.append(
                pull_message(
                    client,
                    node,
                    run_id,
                    tree,
                    max_s=max_s,
                    backoff_cap=1.0,
                    max_tries_per_object=PULL_MAX_TRIES,
                )  # fmt: skip
            )
        except ObjectPullError as err:
            meta = Metadata(
                run_id=run_id, message_id="", src_node_id=node.node_id,
                dst_node_id=node.node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="",
                ttl=0, reply_to_message_id=proto.metadata.reply_to_message_id,
                created_at=now().timestamp(),
            )  # fmt: skip
            reason = f"reply objects not uploaded within {max_s:.0f} s (node cut off?): {err}"
            pulled.append(make_message(meta, error=Error(ErrorCode.MESSAGE_UNAVAILABLE, reason)))
    return pulled
