"""The federation loop's per-node timers (coordinator.node_status), on a clock of our own."""

from __future__ import annotations

from coordinator.node_status import NODE_COOLDOWN_S, TOUCH_EVERY_S, NodeStatus


def test_a_held_node_cools_down_until_it_answers_or_the_superlink_lists_it_anew():
    nodes = NodeStatus()
    nodes.listed([1, 2])
    assert nodes.hold_back(1, now=100.0)  # new: the loop logs it
    assert not nodes.hold_back(1, now=101.0)  # held already: logged once
    assert nodes.cooling(1, 150.0) and not nodes.cooling(2, 150.0)
    assert not nodes.cooling(1, 101.0 + NODE_COOLDOWN_S)  # the cooldown ends by itself
    nodes.cool_down(2, now=200.0)
    nodes.listed([1])  # node 2 left the SuperLink's list ...
    assert nodes.cooling(2, 210.0)
    nodes.listed([1, 2])  # ... and came back: tried at once
    assert not nodes.cooling(2, 210.0)
    assert not nodes.after_hold(1, at=100.0) and nodes.after_hold(1, at=101.5)
    nodes.answered(1)
    assert not nodes.cooling(1, 150.0) and 1 not in nodes.held


def test_a_full_node_is_left_alone_and_touched_only_every_few_seconds():
    nodes = NodeStatus()
    nodes.found_full(7, now=10.0)
    assert nodes.full(7, 10.0 + TOUCH_EVERY_S / 2) and not nodes.full(7, 10.0 + TOUCH_EVERY_S)
    nodes.answered(7)  # a result frees a slot: lease again at once
    assert not nodes.full(7, 10.5)
    assert nodes.touch_due(7, 0.0)
    nodes.touched(7, now=20.0)
    assert not nodes.touch_due(7, 20.0 + TOUCH_EVERY_S / 2) and nodes.touch_due(7, 25.0)
