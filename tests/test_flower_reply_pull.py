"""The coordinator's pull of Flower replies (``coordinator.flower.driver.pull_replies``).

A real Flower reply message (its protobuf and object tree, as a SuperNode uploads them)
is served by a stand-in for the SuperLink's Runtime API, which either has every object
or never gets them (the node was cut off mid-upload). Flower's own pull waits minutes for
those, with the federation loop blocked; ours gives up within its bound.
"""

from __future__ import annotations

import pytest
from flwr.app import Metadata
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from coordinator.flower.driver import pull_replies
from shared_model.flower_runtime import payload_from_record, payload_record

RUN_ID = 7


class RuntimeStandIn:
    """The three Runtime API calls a pull makes, over one uploaded reply."""

    def __init__(self, reply, uploaded: bool) -> None:
        self.proto = message_to_proto(remove_content_from_message(reply))
        self.tree = get_object_tree(reply)
        self.objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        self.uploaded = uploaded
        self.confirmed: list[str] = []

    def PullMessages(self, request):  # noqa: N802 - the Runtime API's names
        return PullAppMessagesResponse(messages_list=[self.proto], message_object_trees=[self.tree])

    def PullObject(self, request):  # noqa: N802
        if not self.uploaded:
            return PullObjectResponse(object_found=True, object_available=False)
        content = self.objects[request.object_id]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)


class GridStandIn:
    def __init__(self, client) -> None:
        self._runtime_client = client
        self.node = Node(node_id=1)
        self._run = type("Run", (), {"run_id": RUN_ID})()


def _reply(payload: bytes):
    meta = Metadata(
        run_id=RUN_ID, message_id="", src_node_id=42, dst_node_id=1, reply_to_message_id="m1",
        group_id="", created_at=1.0, ttl=60, message_type="train.unit",
    )  # fmt: skip
    reply = make_message(meta, content=payload_record(payload))
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def test_a_complete_reply_is_pulled_confirmed_and_inflated():
    client = RuntimeStandIn(_reply(b"result bytes"), uploaded=True)
    (msg,) = pull_replies(GridStandIn(client), ["m1"])
    assert not msg.has_error()
    assert payload_from_record(msg.content) == b"result bytes"
    assert msg.metadata.reply_to_message_id == "m1"
    assert client.confirmed == [client.proto.metadata.message_id]


@pytest.mark.timeout(60)  # Flower's own pull would wait here up to 500 tries of 10 s
def test_a_reply_cut_off_mid_upload_becomes_an_error_reply_within_the_bound():
    client = RuntimeStandIn(_reply(b"never arrives"), uploaded=False)
    (msg,) = pull_replies(GridStandIn(client), ["m1"], max_s=1.0)
    assert msg.has_error() and msg.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert "not uploaded within 1 s" in msg.error.reason
    assert msg.metadata.reply_to_message_id == "m1"  # the loop maps it to its units
    assert client.confirmed == []  # not acknowledged to the SuperLink as received
