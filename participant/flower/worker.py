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

Every call into Flower is bounded (issue 16: after two quick coordinator restarts both
workers once blocked for good in ``pull_task_input``, whose object pulls retry an
unavailable object for up to 2 h). The message's objects are pulled with a time limit
(:func:`pull_task_input`), each HTTP call has Flower's 30 s timeout and our bounded retry
invoker, and a watchdog thread restarts the polling loop when one Flower call (acquire,
pull, push) has not returned after ``call_timeout`` seconds: the stuck task is failed
towards the SuperNode (so it hands out the next one), its heartbeat stops, and a fresh
loop takes over; the old thread, if it ever returns, exits without running the handler
or pushing anything. The handler itself is not bounded here (a unit may take minutes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shared_model.flower_runtime import (
    FlowerTransportError,
    make_heartbeat_fn,
    make_runtime_client,
    payload_from_record,
    payload_record,
    pull_message,
)

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], bytes]
#: HTTP statuses of a Runtime API that refuses this worker (wrong secret): fatal.
REFUSED = (401, 403)
COMPONENT = "perspective-worker"
#: A Flower call (acquire, pull, push) not returned after this long is abandoned.
CALL_TIMEOUT_S = 150.0
#: Longest time the objects of one message may take to pull (Flower's default: 2 h). Our
#: messages are a few kB (blobs travel over the blob service), pushed right after the
#: message itself; an object still missing after this long belongs to a message whose
#: sender died mid-push (a coordinator killed as it leased) and will never arrive. Each
#: such message costs its node this long (60 s made 5 quick coordinator kills cost the
#: test network ~2 minutes of idle participants). So does a message of a run that ended
#: as the SuperNode received it: Flower 1.42 keeps its task, without the objects, and
#: hands it out (after every ``flwr stop``; at 20 s it cost a CI node its first lease).
PULL_MAX_S = 10.0


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


class MessageUnavailable(FlowerTransportError):
    """The task's message objects could not be pulled in time; carries the bare message
    (metadata only) and the context, so an error reply can still answer it."""

    def __init__(self, reason: str, message: object, context: object) -> None:
        super().__init__(reason)
        self.message, self.context = message, context


class FlowerWorker:
    """Executes ClientApp tasks of one SuperNode with a Python handler.

    Args:
        runtime_address: ``127.0.0.1:port`` of the SuperNode's Runtime API.
        handler: ``handler(kind, payload) -> reply_payload``; may block for minutes.
        poll_interval: Seconds between ``AcquireTask`` calls while idle.
        superexec_secret: Secret the SuperNode was started with (``None`` if none).
        insecure: Plain HTTP to the Runtime API (it is on loopback).
        root_certificates: CA bytes if the Runtime API uses TLS.
        call_timeout: Seconds one Flower call may take before the watchdog restarts the
            loop (see the module docstring).
        pull_max_s: Seconds the objects of one message may take to pull.
    """

    def __init__(
        self,
        runtime_address: str,
        handler: Handler,
        poll_interval: float = 0.2,
        superexec_secret: bytes | None = None,
        insecure: bool = True,
        root_certificates: bytes | None = None,
        call_timeout: float = CALL_TIMEOUT_S,
        pull_max_s: float = PULL_MAX_S,
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
        if call_timeout <= 0 or pull_max_s <= 0:
            raise ValueError("call_timeout and pull_max_s must be positive seconds")
        self.call_timeout, self.pull_max_s = call_timeout, pull_max_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.timings: list[TaskTiming] = []
        # Watchdog state, under _lock: the loop generation allowed to act, when its Flower
        # call began (None: not in a Flower call) and which call, the task it works on.
        self._lock = threading.Lock()
        self._gen = 0
        self._call_since: float | None = None
        self._call_name = ""
        self._call_client: object | None = None  # the client of that call
        self._task: tuple[str, object] | None = None  # token, heartbeat
        self.restarts = 0  # loops the watchdog replaced

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the polling loop and its watchdog in daemon threads."""
        if self._watchdog is not None:
            raise FlowerTransportError("worker already started")
        self._spawn_loop(0)
        self._watchdog = threading.Thread(
            target=self._watch, name=f"{COMPONENT}-watchdog", daemon=True
        )
        self._watchdog.start()

    def _spawn_loop(self, gen: int) -> None:
        thread = threading.Thread(
            target=self._run_guarded, args=(gen,), name=f"{COMPONENT}-{gen}", daemon=True
        )
        self._thread = thread
        thread.start()

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
        deadline = time.monotonic() + timeout
        while (thread := self._thread) is not None and thread.is_alive():
            thread.join(max(0.0, min(0.5, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        stopped = self._thread is None or not self._thread.is_alive()
        if stopped and (watchdog := self._watchdog) is not None:
            # The watchdog returns once it sees the loop ended (it polls every <= 1 s).
            watchdog.join(max(0.0, deadline - time.monotonic()))
        return stopped

    def __enter__(self) -> FlowerWorker:
        self.start()
        self.wait_until_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _run_guarded(self, gen: int) -> None:
        try:
            self._loop(gen)
        except BaseException as err:  # recorded for wait_until_ready / run_forever
            if self._current(gen):
                self.fatal_error = err
                log.exception("flower worker loop died")

    def run_forever(self) -> None:
        """Poll for tasks and execute them until :meth:`shutdown` (or SIGTERM in a process);
        returns once the task in progress, if any, has been answered.

        Raises:
            httpx.HTTPStatusError: If the Runtime API rejects us (e.g. wrong secret: 401).
        """
        self.start()
        while not self._stop.wait(0.5):
            if self.fatal_error is not None:
                self._stop.set()
                raise self.fatal_error
        while (thread := self._thread) is not None and thread.is_alive():
            thread.join(0.5)  # a stuck Flower call is abandoned by the watchdog meanwhile

    # ---------------------------------------------------------------- watchdog
    def _current(self, gen: int) -> bool:
        with self._lock:
            return gen == self._gen

    @contextlib.contextmanager
    def _flower_call(self, gen: int, name: str, client: object) -> Iterator[None]:
        """Mark a Flower call of loop ``gen`` on ``client`` for the watchdog."""
        with self._lock:
            if gen == self._gen:
                self._call_since, self._call_name = time.monotonic(), name
                self._call_client = client
        try:
            yield
        finally:
            with self._lock:
                if gen == self._gen:
                    self._call_since = None

    def _watch(self) -> None:
        """Restart the loop when one Flower call outlives ``call_timeout``; after a stop,
        keep watching until the loop has ended (a stuck one is then just abandoned)."""
        interval = min(1.0, self.call_timeout / 4)
        while True:
            if self._stop.is_set():
                thread = self._thread
                if thread is None or not thread.is_alive():
                    return
                time.sleep(interval)
            else:
                self._stop.wait(interval)
            stuck = self._abandon_stuck()
            if stuck is None:
                continue
            gen, name, client, task = stuck
            with contextlib.suppress(Exception):  # the stuck call fails now, not later
                client.close()
            log.warning(
                "Flower call %s did not return in %.0f s: abandoned, polling loop restarted",
                name,
                self.call_timeout,
            )
            if task is not None:
                threading.Thread(target=self._fail_task, args=task, daemon=True).start()
            if self._stop.is_set():
                self._thread = None  # nothing left to wait for
                return
            self._spawn_loop(gen)

    def _abandon_stuck(self) -> tuple[int, str, object, tuple[str, object] | None] | None:
        """If the current loop is stuck in a Flower call: retire it (new generation) and
        return the new generation, the call's name and client, and its task."""
        with self._lock:
            since = self._call_since
            if since is None or time.monotonic() - since <= self.call_timeout:
                return None
            self._gen += 1
            self.restarts += 1
            stuck = (self._gen, self._call_name, self._call_client, self._task)
            self._call_since, self._task = None, None
            return stuck

    def _fail_task(self, token: str, heartbeat) -> None:
        """Stop an abandoned task's heartbeat and report the task failed, so the SuperNode
        hands out the next message (bounded: the retry invoker gives up after a few
        seconds)."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        heartbeat.stop()
        client = self._client(token=token, max_retry_time=5.0)
        try:
            push_task_output(client, None, SubStatus.FAILED, "worker watchdog: Flower call stuck")
        except Exception as err:  # noqa: BLE001 - the SuperNode times the task out anyway
            log.info("could not report the abandoned task: %s", err)
        finally:
            client.close()

    def _client(self, **kwargs):
        return make_runtime_client(
            self.runtime_address,
            component=COMPONENT,
            insecure=self._insecure,
            root_certificates=self._certs,
            **kwargs,
        )

    # ---------------------------------------------------------------- main loop
    def _loop(self, gen: int) -> None:
        """Poll for tasks and execute them while this loop is the current one."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        client = self._client(
            superexec_secret=self._secret,
            max_retry_time=1.0,  # this loop retries itself; SIGTERM must not wait on it
        )
        try:
            while not self._stop.is_set() and self._current(gen):
                try:
                    with self._flower_call(gen, "AcquireTask", client):
                        res = client.AcquireTask(request)
                except (httpx.TransportError, httpx.HTTPStatusError) as err:
                    if (
                        isinstance(err, httpx.HTTPStatusError)
                        and err.response.status_code in REFUSED
                    ):
                        raise  # a wrong secret: no retry makes it right
                    # SuperNode restarting (it comes back on the same port) or failing a call
                    # (5xx): keep polling; a dead worker ends a laptop-network participant.
                    log.warning("AcquireTask failed (%s); retrying", err)
                    self._stop.wait(1.0)
                    continue
                if not self._current(gen):
                    return  # abandoned while acquiring: a newer loop polls now
                self._ready.set()
                if res.HasField("task") and res.token:
                    self._execute(res.token, gen)
                else:
                    self._stop.wait(self.poll_interval)
        finally:
            client.close()

    def _execute(self, token: str, gen: int) -> None:
        """Run one task end to end; never raises (a failed task is reported to Flower)."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_task_output

        client = self._client(token=token)
        acquired_at = time.time()
        lost: list[str] = []
        heartbeat = HeartbeatSender(make_heartbeat_fn(client, lost.append))
        heartbeat.start()
        with self._lock:
            self._task = (token, heartbeat)
        context = None
        try:
            context = self._handle_task(client, lost, acquired_at, gen)
        except Exception as err:  # stale token, lost SuperNode...: report and move on
            if self._current(gen):
                log.warning("task failed before a reply could be sent: %s", err)
                try:
                    with self._flower_call(gen, "PushTaskOutput", client):
                        push_task_output(
                            client, context, SubStatus.FAILED, f"{type(err).__name__}: {err}"
                        )
                except Exception as again:  # noqa: BLE001 - its token is as dead as its task
                    log.warning("could not report the failed task either: %s", again)
        finally:
            with self._lock:
                if gen == self._gen:
                    self._task = None
            heartbeat.stop()
            client.close()

    def _handle_task(
        self, client: object, lost: list[str], acquired_at: float, gen: int
    ) -> object | None:
        """Pull the input, run the handler, push reply and task output; returns the Context
        (``None``: the watchdog abandoned this task meanwhile)."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        try:
            with self._flower_call(gen, "pull_task_input", client):
                message, context = pull_task_input(client, self.pull_max_s)
        except MessageUnavailable as exc:
            # Answer with an error at once: without a reply the SuperNode waits ~60 s for
            # the task to be declared crashed before it hands out the next message.
            log.warning("task input unavailable: %s", exc)
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                reply_to=exc.message,
            )
            with self._flower_call(gen, "push_message", client):
                push_message(client, reply, exc.context)
                push_task_output(client, exc.context, SubStatus.FAILED, str(exc))
            return exc.context
        if not self._current(gen):
            log.info("an abandoned task's input arrived late; dropped")
            return None
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
        with self._flower_call(gen, "push_message", client):
            push_message(client, reply, context)
            push_task_output(client, context, status, details)
        timing.replied_at = time.time()
        self.timings.append(timing)
        return context


def pull_task_input(client, max_time: float) -> tuple[object, object]:
    """Flower's ``run_clientapp.pull_task_input`` with the object pulls bounded to
    ``max_time`` seconds (Flower's own retries an unavailable object for up to 2 h, which
    wedged workers after coordinator restarts). Returns ``(Message, Context)``; the FAB
    and Run are not needed (the FAB is never installed).

    Raises:
        FlowerTransportError: The task has no message.
        MessageUnavailable: The message's objects could not be pulled in time.
    """
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise FlowerTransportError("the SuperNode handed out a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    try:
        message = pull_message(
            client, node, context.run_id, tree,
            max_s=max_time,
            max_tries_per_object=max(2, int(max_time)),
            backoff_cap=min(10.0, max_time / 4),
        )  # fmt: skip
    except ObjectPullError as exc:
        bare = message_from_proto(pulled.messages_list[0])
        bare.metadata.__dict__["_message_id"] = tree.object_id
        raise MessageUnavailable(str(exc), bare, context) from exc
    return message, context
