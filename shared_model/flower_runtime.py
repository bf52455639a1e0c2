"""What the coordinator driver and the participant worker share about Flower's Runtime API.

Both sides talk to a Flower Runtime API (SuperLink's for the coordinator, the
SuperNode's for a participant) as *long-lived* processes, which Flower's own
helpers are not written for. Two of them must not be used here:

* ``flwr.supercore.retry.make_simple_http_retry_invoker`` sends **SIGINT to its own
  process** on any HTTP 401 (e.g. a stale task token) and retries forever;
* ``flwr.supercore.heartbeat.make_task_heartbeat_fn_http`` raises SIGINT when the
  server answers ``success=False`` (run stopped/failed).

Both are right for a one-shot ``flwr-clientapp``/``flwr-serverapp`` process and
wrong for our coordinator (which also serves the REST API) and our worker. So we use
a retry invoker with a bounded retry time that re-raises 4xx errors, and a heartbeat
function that reports a lost task through a callback instead.

Payload convention (control plane): one ``ArrayRecord`` under :data:`PAYLOAD_RECORD`
holding one raw ``uint8`` ``Array`` under :data:`PAYLOAD_KEY`. ``Array`` is chunked
(5 MiB) and deduplicated by Flower, and carried large payloads 2.6–3× faster than a
``ConfigRecord`` bytes value (Flower note §3).

All ``flwr`` internals are imported lazily and pinned to flwr 1.42.0;
``tests/test_flower_internals.py`` checks every symbol used here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import RecordDict
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.runtime import RuntimeHttpClient

PAYLOAD_RECORD = "perspective"
PAYLOAD_KEY = "payload"
#: Runtime RPC guarded by the SuperExec HMAC secret (as in ``run_superexec.py``).
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
#: Give up retrying transport errors after this long; the caller decides what next.
DEFAULT_RETRY_MAX_TIME = 30.0


class FlowerTransportError(RuntimeError):
    """A Flower transport operation failed (bad argument, lost task, unreachable API)."""


def make_retry_invoker(max_time: float = DEFAULT_RETRY_MAX_TIME) -> RetryInvoker:
    """A retry invoker safe for long-lived processes.

    Retries connection-level errors and HTTP 502/503/504 with capped exponential
    back-off for at most ``max_time`` seconds; any other HTTP error is re-raised at
    once (never a signal to our own process).

    Args:
        max_time: Upper bound on the total retry time in seconds.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    retryable = {502, 503, 504}

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in retryable
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2.0),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=should_giveup,
    )


def make_runtime_client(
    address: str,
    *,
    component: str,
    insecure: bool = True,
    root_certificates: bytes | None = None,
    token: str | None = None,
    superexec_secret: bytes | None = None,
    max_retry_time: float = DEFAULT_RETRY_MAX_TIME,
) -> RuntimeHttpClient:
    """Open a Runtime API client with the interceptors Flower's own executors use.

    Args:
        address: ``host:port`` of the Runtime API.
        component: Name reported in the runtime-version header.
        insecure: Plain HTTP when true.
        root_certificates: CA bytes to verify the server (TLS only).
        token: Task token (adds ``RuntimeTokenHttpInterceptor``).
        superexec_secret: Secret for ``AcquireTask`` (adds ``SuperExecAuthHttpInterceptor``).
        max_retry_time: See :func:`make_retry_invoker`.
    """
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if superexec_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=superexec_secret, protected_methods=[ACQUIRE_TASK_METHOD]
            )
        )
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=interceptors,
        retry_invoker=make_retry_invoker(max_retry_time),
    )


def make_heartbeat_fn(
    client: RuntimeHttpClient, on_lost: Callable[[str], None]
) -> Callable[[], bool]:
    """Task heartbeat for ``flwr.supercore.heartbeat.HeartbeatSender`` without signals.

    Args:
        client: Runtime client carrying the task token.
        on_lost: Called with a reason when the server says the task is gone.

    Returns:
        A function returning ``False`` on transient failure (the sender retries).
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def heartbeat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (502, 503, 504):
                return False
            on_lost(f"heartbeat rejected with HTTP {err.response.status_code}")
            return True  # nothing more to retry; the owner reacts to on_lost
        if not res.success:
            on_lost("heartbeat answered success=False (task or run no longer running)")
        return True

    return heartbeat


def pull_message(
    client: Any,
    node: Any,
    run_id: int,
    tree: Any,
    *,
    max_s: float,
    backoff_cap: float,
    max_tries_per_object: int | None,
) -> Any:
    """One message's object tree pulled from a Runtime API within ``max_s`` seconds,
    confirmed received and inflated (Flower's own pulls wait up to hours for an object a
    dead sender never pushes; both sides bound theirs). ``client`` is the Runtime API
    client, ``node`` the ``Node`` proto that pulls.

    Raises:
        flwr.supercore.inflatable.inflatable_utils.ObjectPullError: not all in time.
    """
    from flwr.app import Message
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message,
        max_time=max_s,
        max_tries_per_object=max_tries_per_object,
        backoff_cap=backoff_cap,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own does
    return message


def payload_record(payload: bytes) -> RecordDict:
    """Wrap raw bytes in the ``RecordDict`` layout both sides agree on."""
    from flwr.app import Array, ArrayRecord, RecordDict

    if not isinstance(payload, bytes | bytearray | memoryview):
        raise FlowerTransportError(f"payload must be bytes, got {type(payload).__name__}")
    data = bytes(payload)
    array = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
    return RecordDict({PAYLOAD_RECORD: ArrayRecord({PAYLOAD_KEY: array})})


def payload_from_record(content: RecordDict) -> bytes:
    """Extract the raw bytes written by :func:`payload_record`.

    Raises:
        FlowerTransportError: If the record does not have our layout.
    """
    try:
        array = content.array_records[PAYLOAD_RECORD][PAYLOAD_KEY]
    except KeyError as err:
        raise FlowerTransportError(
            f"message content has no array record {PAYLOAD_RECORD!r}/{PAYLOAD_KEY!r}; "
            "it was not sent by a Perspective driver/worker"
        ) from err
    return bytes(array.data)


def validate_kind(kind: str) -> str:
    """Check that ``kind`` is a Flower message type such as ``train.unit``.

    Raises:
        FlowerTransportError: If Flower would reject it.
    """
    from flwr.app.metadata import validate_message_type

    if not isinstance(kind, str) or not validate_message_type(kind):
        raise FlowerTransportError(
            f"kind {kind!r} is not a Flower message type: use '<train|evaluate|query>.<action>' "
            "with a Python identifier as action, e.g. 'train.unit' or 'query.collect'"
        )
    return kind
