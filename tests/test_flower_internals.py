"""Pin the Flower internals our transport relies on (flwr 1.42.0).

The driver (coordinator/flower), the worker (participant/flower) and
shared_model/flower_runtime.py use private Flower APIs: the Runtime HTTP client,
interceptors, task heartbeats, ``pull_task_input``/``push_message``/
``push_task_output`` and ``HttpGrid`` internals. If Flower is upgraded, this test
fails with the name of each symbol that moved or changed signature, before the
integration tests fail in a confusing way.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

EXPECTED_VERSION = "1.42.0"

# (module, attribute, parameters that must exist in the signature or None)
SYMBOLS: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("flwr.app", "Array", ("dtype", "shape", "stype", "data")),
    ("flwr.app", "ArrayRecord", None),
    ("flwr.app", "RecordDict", None),
    ("flwr.app", "Message", ("content", "reply_to")),
    ("flwr.app", "Error", ("code", "reason")),
    (
        "flwr.app",
        "Metadata",
        (
            "run_id",
            "message_id",
            "src_node_id",
            "dst_node_id",
            "reply_to_message_id",
            "group_id",
            "created_at",
            "ttl",
            "message_type",
            "src_task_id",
        ),
    ),
    ("flwr.app.message", "make_message", ("metadata", "content", "error")),
    ("flwr.app.metadata", "validate_message_type", ("message_type",)),
    ("flwr.common.constant", "ErrorCode", None),
    ("flwr.common.constant", "SubStatus", None),
    ("flwr.common.serde", "run_from_proto", None),
    ("flwr.common.serde", "fab_to_proto", None),
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest", None),
    ("flwr.proto.runtime_pb2", "PullTaskInputRequest", None),
    ("flwr.proto.runtime_pb2", "PushTaskOutputRequest", None),
    ("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest", None),
    ("flwr.proto.control_pb2", "StartRunRequest", None),
    ("flwr.proto.control_pb2", "ListRunsRequest", None),
    ("flwr.proto.control_pb2", "StopRunRequest", None),
    ("flwr.supercore.constant", "TaskType", None),
    ("flwr.supercore.date", "now", None),
    ("flwr.supercore.fab", "Fab", None),
    ("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",)),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",)),
    (
        "flwr.supercore.interceptors",
        "SuperExecAuthHttpInterceptor",
        ("master_secret", "protected_methods"),
    ),
    (
        "flwr.supercore.retry",
        "RetryInvoker",
        ("wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time", "should_giveup"),
    ),
    ("flwr.supercore.retry", "exponential", ("max_delay",)),
    ("flwr.supercore.runtime", "RuntimeHttpClient", None),
    ("flwr.supercore.control.control_http_client", "ControlHttpClient", None),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client",)),
    # participant.flower.worker.pull_task_input: Flower's, with the object pulls bounded
    ("flwr.common.serde", "context_from_proto", None),
    ("flwr.common.serde", "message_from_proto", None),
    ("flwr.proto.node_pb2", "Node", None),
    ("flwr.proto.runtime_pb2", "PullAppMessagesRequest", None),
    (
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_and_inflate_object_from_tree",
        ("return_type", "max_time", "max_tries_per_object", "backoff_cap"),
    ),
    ("flwr.supercore.inflatable.inflatable_utils", "ObjectPullError", None),
    (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_pull_object_fn_protobuf",
        None,
    ),
    (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_confirm_message_received_fn_protobuf",
        None,
    ),
    ("flwr.supercore.task_identity", "TaskIdentity", None),
    ("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context")),
    (
        "flwr.supernode.runtime.run_clientapp",
        "push_task_output",
        ("client", "context", "sub_status", "details"),
    ),
    (
        "flwr.superlink.grid",
        "HttpGrid",
        ("runtime_api_address", "insecure", "root_certificates", "token"),
    ),
    ("flwr.cli.build", "build_fab_from_files", ("files",)),
]


def test_flower_version_is_pinned() -> None:
    import flwr

    assert flwr.__version__ == EXPECTED_VERSION, (
        f"flwr {flwr.__version__} installed; the transport is verified against "
        f"{EXPECTED_VERSION} only (pyproject pins flwr==1.42.*). Re-check "
        "shared/notes/flower-1.42.md §5 and this file's SYMBOLS before upgrading."
    )


@pytest.mark.parametrize(("module", "name", "params"), SYMBOLS, ids=lambda v: str(v))
def test_internal_symbol(module: str, name: str, params: tuple[str, ...] | None) -> None:
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"Flower internal {module}.{name} is gone ({err}); adapt the transport")
    if params is None:
        return
    sig = inspect.signature(obj)
    missing = [p for p in params if p not in sig.parameters]
    assert not missing, f"{module}.{name}{sig} lacks parameters {missing}"


def test_runtime_client_methods_exist() -> None:
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.runtime import RuntimeHttpClient

    for cls, methods in (
        (
            RuntimeHttpClient,
            [
                "AcquireTask",
                "SendTaskHeartbeat",
                "PullTaskInput",
                "PushTaskOutput",
                "PushMessages",
                "PullMessages",
                "from_server_address",
            ],
        ),
        (ControlHttpClient, ["StartRun", "ListRuns", "StopRun", "from_server_address"]),
    ):
        missing = [m for m in methods if not hasattr(cls, m)]
        assert not missing, f"{cls.__module__}.{cls.__name__} lacks {missing}"


def test_http_grid_private_attributes_we_touch() -> None:
    """The driver swaps ``HttpGrid._retry_invoker`` and uses ``_runtime_client``."""
    from flwr.superlink.grid import HttpGrid

    grid = HttpGrid(runtime_api_address="127.0.0.1:1", insecure=True, token="t")
    assert hasattr(grid, "_retry_invoker"), "HttpGrid._retry_invoker renamed"
    assert isinstance(inspect.getattr_static(HttpGrid, "_runtime_client"), property)
    for method in ("get_node_ids", "push_messages", "pull_messages", "set_run", "close"):
        assert hasattr(grid, method), f"HttpGrid.{method} is gone"


def test_task_type_and_message_types() -> None:
    from flwr.app.metadata import validate_message_type
    from flwr.supercore.constant import TaskType

    assert TaskType.CLIENT_APP == "flwr-clientapp"
    assert TaskType.SERVER_APP == "flwr-serverapp"
    assert validate_message_type("train.unit") and validate_message_type("query.collect")
    assert not validate_message_type("unit")


def test_payload_round_trip_through_flower_records() -> None:
    """Our payload layout survives Flower's own (de)serialisation."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from shared_model.flower_runtime import payload_from_record, payload_record

    for data in (b"", b"\x00\xff" * 1000):
        record = payload_record(data)
        objects = get_all_nested_objects(record)
        assert objects  # Flower can walk it (content-addressed objects)
        assert payload_from_record(record) == data
    from shared_model.flower_runtime import FlowerTransportError

    with pytest.raises(FlowerTransportError, match="no array record"):
        payload_from_record(RecordDict())
