"""What the federation loop knows of each node between its steps: whether the SuperLink
lists it, whether it is held back or cooling down, and when it was last touched or found
with every unit it may hold.

All in memory, on the monotonic clock: a restarted coordinator starts with every node
leasable, and the database (``participants``) keeps what must survive (liveness, state).
"""

from __future__ import annotations

import math

#: A node Flower reported gone, revoked or unknown, or held back after a missed deadline,
#: gets no units for this long, unless it answers first.
NODE_COOLDOWN_S = 90.0
#: A node busy with all the units it may hold is touched (marked seen) this often, not at
#: every step: liveness counts in minutes (``serve --offline-after``).
TOUCH_EVERY_S = 5.0


class NodeStatus:
    """Per-node timers and flags of the loop (node ids as Flower names them)."""

    def __init__(self) -> None:
        self.online: set[int] = set()  # node ids the SuperLink listed at the last step
        self.held: set[int] = set()  # held back after an expiry, until they answer
        self._cooldown: dict[int, float] = {}  # node id -> monotonic end of its cooldown
        self._held_since: dict[int, float] = {}  # node id -> monotonic start of its last hold
        self._touched: dict[int, float] = {}  # node id -> monotonic time of its last touch
        # A node that submits its results through the blob service answers a unit as soon as
        # it is queued, so no pending message says it is busy: this remembers when it last
        # had all the units it may hold (no lease attempt, a DB transaction, at every step
        # until its next result).
        self._full: dict[int, float] = {}

    def listed(self, nodes: list[int]) -> None:
        """The SuperLink lists ``nodes`` now: one (re)activated since the last step is tried
        at once, whatever its cooldown."""
        for node_id in set(nodes) - self.online:
            self._cooldown.pop(node_id, None)
        self.online = set(nodes)

    def cooling(self, node_id: int, now: float) -> bool:
        """Whether the node sits out a cooldown at ``now``."""
        return self._cooldown.get(node_id, 0.0) > now

    def cool_down(self, node_id: int, now: float) -> None:
        """No units for the node for ``NODE_COOLDOWN_S`` from ``now`` (gone, revoked or
        unknown), unless it answers first."""
        self._held_since[node_id] = now
        self._cooldown[node_id] = now + NODE_COOLDOWN_S

    def hold_back(self, node_id: int, now: float) -> bool:
        """A lease of the node expired: no units until it answers. Returns whether it was
        not held already (the caller logs that once)."""
        new = node_id not in self.held
        self.held.add(node_id)
        self._held_since[node_id] = now
        self._cooldown[node_id] = max(self._cooldown.get(node_id, 0.0), now + NODE_COOLDOWN_S)
        return new

    def answered(self, node_id: int) -> None:
        """The node replied or submitted a result: it is alive, lifts any hold and cooldown,
        and a submitting node has a slot free."""
        self._cooldown.pop(node_id, None)
        self.held.discard(node_id)
        self._full.pop(node_id, None)

    def after_hold(self, node_id: int, at: float) -> bool:
        """Whether something the node sent at ``at`` came after its last hold began (a node
        killed right after submitting has that result drained after the hold)."""
        return at > self._held_since.get(node_id, -math.inf)

    def found_full(self, node_id: int, now: float) -> None:
        """A submitting node holds all the units it may: its results come by themselves."""
        self._full[node_id] = now

    def full(self, node_id: int, now: float) -> bool:
        """Whether the node was found full within the last ``TOUCH_EVERY_S``."""
        return now - self._full.get(node_id, -math.inf) < TOUCH_EVERY_S

    def touch_due(self, node_id: int, now: float) -> bool:
        """Whether a busy node is due its liveness touch."""
        return now - self._touched.get(node_id, -math.inf) >= TOUCH_EVERY_S

    def touched(self, node_id: int, now: float) -> None:
        """The node was marked seen in the database at ``now``."""
        self._touched[node_id] = now

    def forget_cooldowns(self) -> None:
        """A new Flower run: what the last one said of the nodes no longer holds."""
        self._cooldown.clear()
