"""Long-lived participant worker attached to a SuperNode's Runtime API.

Why not a Flower ``ClientApp``: in its default mode Flower installs the server's FAB
and runs it on the volunteer's machine, spawning a new Python process (and paying
``import torch``) for **every** message. With the SuperNode in ``--isolation
process`` our worker is the executor instead: one process of our installed package
claims each ClientApp task and answers it with our own handler. The FAB arrives as
bytes and is ignored — never installed, never imported.

Call sequence per task (Flower note §5, mirroring ``flwr/supernode/runtime/
run_clientapp.py`` and ``flwr/supercore/superexec/run_superexec.py``, flwr 1.42.0):

1. ``AcquireTask(supported_task_types=[CLIENT_APP])`` on a client that carries the
   SuperExec HMAC interceptor (polled every ``poll_interval`` seconds);
2. a per-task client with the task token; a task ``HeartbeatSender`` (tasks without
   heartbeats are declared crashed after 60 s, so handlers may run for minutes);
3. ``pull_task_input`` → ``(Message, Context, Run, Fab)``;
4. ``handler(kind, payload)`` → reply payload, or an exception → ``Error`` reply
   with code ``CLIENT_APP_RAISED_EXCEPTION`` and the reason ``"Type: text"``;
5. ``push_message`` then ``push_task_output`` (stores the ``Context``).

The SuperNode hands out one message at a time and polls the SuperLink every ~3 s
when idle, so the coordinator keeps two units in flight per node (pipelining).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared_model.flower_runtime import (
    FlowerTransportError,
    make_heartbeat_fn,
    make_runtime_client,
    payload_from_record,
    payload_record,
)

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], bytes]
COMPONENT = "perspective-worker"


@dataclass
class TaskTiming:
    """Wall-clock timestamps (``time.time()``) of one handled task, for utilisation metrics."""

    kind: str
    message_id: str
    acquired_at: float
    handler_started_at: float = 0.0
    handler_finished_at: float = 0.0
    replied_at: float = 0.0
    error: str | None = None


class FlowerWorker:
    """Executes ClientApp tasks of one SuperNode with a Python handler.

    Args:
        runtime_address: ``127.0.0.1:port`` of the SuperNode's Runtime API.
        handler: ``handler(kind, payload) -> reply_payload``; may block for minutes.
        poll_interval: Seconds between ``AcquireTask`` calls while idle.
        superexec_secret: Secret the SuperNode was started with (``None`` if none).
        insecure: Plain HTTP to the Runtime API (it is on loopback).
        root_certificates: CA bytes if the Runtime API uses TLS.
    """

    def __init__(
        self,
        runtime_address: str,
        handler: Handler,
        poll_interval: float = 0.2,
        superexec_secret: bytes | None = None,
        insecure: bool = True,
        root_certificates: bytes | None = None,
    ) -> None:
        if not callable(handler):
            raise TypeError("handler must be callable as handler(kind: str, payload: bytes)")
        if not 0.01 <= poll_interval <= 60:
            raise ValueError(f"poll_interval must be in [0.01, 60] s, got {poll_interval}")
        self.runtime_address = runtime_address
        self.handler = handler
        self.poll_interval = poll_interval
        self._secret = superexec_secret
        self._insecure = insecure
        self._certs = root_certificates
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.timings: list[TaskTiming] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Run :meth:`run_forever` in a daemon thread."""
        if self._thread is not None:
            raise FlowerTransportError("worker already started")
        self._thread = threading.Thread(target=self._run_guarded, name=COMPONENT, daemon=True)
        self._thread.start()

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Block until one ``AcquireTask`` call succeeded (Runtime API reachable, secret OK).

        Raises:
            FlowerTransportError: On timeout or if the worker loop died.
        """
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.fatal_error is not None:
                raise FlowerTransportError(f"worker failed: {self.fatal_error}") from None
            if time.monotonic() > deadline:
                raise FlowerTransportError(
                    f"worker not attached to {self.runtime_address} after {timeout:.0f} s"
                )

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop polling; wait up to ``timeout`` for a running handler to finish.

        Returns:
            ``True`` if the loop ended within ``timeout``.
        """
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> FlowerWorker:
        self.start()
        self.wait_until_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _run_guarded(self) -> None:
        try:
            self.run_forever()
        except BaseException as err:  # recorded for wait_until_ready / the supervisor
            self.fatal_error = err
            log.exception("flower worker loop died")

    # ---------------------------------------------------------------- main loop
    def run_forever(self) -> None:
        """Poll for tasks and execute them until :meth:`shutdown` (or SIGTERM in a process).

        Raises:
            httpx.HTTPStatusError: If the Runtime API rejects us (e.g. wrong secret: 401).
        """
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        client = make_runtime_client(
            self.runtime_address,
            component=COMPONENT,
            insecure=self._insecure,
            root_certificates=self._certs,
            superexec_secret=self._secret,
            max_retry_time=1.0,  # this loop retries itself; SIGTERM must not wait on it
        )
        try:
            while not self._stop.is_set():
                try:
                    res = client.AcquireTask(request)
                except httpx.TransportError as err:
                    # SuperNode restarting: keep waiting, it comes back on the same port.
                    log.warning("AcquireTask failed (%s); retrying", err)
                    self._stop.wait(1.0)
                    continue
                self._ready.set()
                if res.HasField("task") and res.token:
                    self._execute(res.token)
                else:
                    self._stop.wait(self.poll_interval)
        finally:
            client.close()

    def _execute(self, token: str) -> None:
        """Run one task end to end; never raises (a failed task is reported to Flower)."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_task_output

        client = make_runtime_client(
            self.runtime_address,
            component=COMPONENT,
            insecure=self._insecure,
            root_certificates=self._certs,
            token=token,
        )
        acquired_at = time.time()
        lost: list[str] = []
        heartbeat = HeartbeatSender(make_heartbeat_fn(client, lost.append))
        heartbeat.start()
        context = None
        try:
            context = self._handle_task(client, lost, acquired_at)
        except Exception as err:  # stale token, lost SuperNode...: report and move on
            log.warning("task failed before a reply could be sent: %s", err)
            push_task_output(client, context, SubStatus.FAILED, f"{type(err).__name__}: {err}")
        finally:
            heartbeat.stop()
            client.close()

    def _handle_task(self, client: object, lost: list[str], acquired_at: float) -> object:
        """Pull the input, run the handler, push reply and task output; returns the Context."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        message, context, _run, _fab = pull_task_input(client)  # the FAB is never installed
        kind = message.metadata.message_type
        timing = TaskTiming(kind, message.metadata.message_id, acquired_at=acquired_at)
        timing.handler_started_at = time.time()
        try:
            reply_payload = self.handler(kind, payload_from_record(message.content))
            reply = Message(payload_record(reply_payload), reply_to=message)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # the handler's failure is the reply, not a worker crash
            reason = f"{type(err).__name__}: {err}"
            log.warning("handler raised for %s: %s", kind, reason)
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
            status, details, timing.error = SubStatus.FAILED, reason, reason
        timing.handler_finished_at = time.time()
        if lost:
            log.warning("task was lost during the handler (%s); its reply may be dropped", lost[0])
        push_message(client, reply, context)
        push_task_output(client, context, status, details)
        timing.replied_at = time.time()
        self.timings.append(timing)
        return context
