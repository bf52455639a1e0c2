"""Expert columns: staleness-weighted pull of the FP master toward each owner's copy.

A column's owner keeps training its own exact copy ("keep-local") and uploads
``compress(local - published_b)`` where ``b`` is the version it synced to. The
coordinator reconstructs the owner's copy as ``target = published_b + delta`` and moves
its master toward it::

    master += w(s) * (target - master),   s = current_version - b

so an owner's update is never counted twice (two pipelined units based on the same
version describe the same cumulative target, not two increments), a stale result
moves the master less, and replicas of a column (two owners) are averaged with their
staleness weights. To know ``published_b`` the aggregator keeps the published state of
each column at every version within ``max_staleness``; older results are refused.
Publishing (encoding ``master - published``) is :mod:`coordinator.publishing`'s.
"""

from __future__ import annotations

import torch

from coordinator.aggregation.staleness import staleness_weight

State = dict[str, torch.Tensor]


class StaleResultError(ValueError):
    """A result's base version is older than the aggregator still remembers."""


class ColumnAggregator:
    """FP masters of expert columns plus their recent published history."""

    def __init__(
        self, masters: dict[int, State], version: int, max_staleness: int, *, staleness_grace: int
    ):
        self.masters = {c: {k: v.clone().float() for k, v in s.items()} for c, s in masters.items()}
        self.max_staleness = max_staleness
        self.staleness_grace = staleness_grace
        # column -> list of (version, published state), oldest first.
        self._published: dict[int, list[tuple[int, State]]] = {
            c: [(version, {k: v.clone() for k, v in s.items()})] for c, s in self.masters.items()
        }
        self._dirty: set[int] = set()

    def published_at(self, column: int, version: int) -> State:
        """Published state of ``column`` as of ``version``."""
        history = self._published[column]
        if version < history[0][0]:
            raise StaleResultError(
                f"column {column}: version {version} is older than the oldest kept "
                f"({history[0][0]}); max_staleness={self.max_staleness}"
            )
        state = history[0][1]
        for v, s in history:
            if v > version:
                break
            state = s
        return state

    def apply(self, column: int, delta: State, base_version: int, current_version: int) -> float:
        """Pull the master of ``column`` toward ``published_base + delta``.

        Returns:
            The staleness weight used.
        """
        if column not in self.masters:
            raise KeyError(f"unknown column {column}")
        stale = current_version - base_version
        if stale > self.max_staleness:
            raise StaleResultError(f"result is {stale} versions stale (max {self.max_staleness})")
        weight = staleness_weight(stale, self.staleness_grace)
        base = self.published_at(column, base_version)
        master = self.masters[column]
        for name, d in delta.items():
            target = base[name] + d.to(master[name].dtype)
            master[name].add_(target - master[name], alpha=weight)
        self._dirty.add(column)
        return weight

    def changed(self) -> list[int]:
        """Columns whose master moved since they were last published, in order."""
        return sorted(self._dirty)

    def advance(self, column: int, version: int, published: State) -> None:
        """Record ``published`` as ``column``'s state at ``version`` (it is no longer changed).

        The publisher passes ``previous + decode(encode(master - previous))``: what is not
        sent now stays in ``master - published`` and goes out with a later version.
        """
        self._published[column].append((version, published))
        self._trim(column, version)
        self._dirty.discard(column)

    def _trim(self, column: int, version: int) -> None:
        history = self._published[column]
        oldest_needed = version - self.max_staleness
        while len(history) > 1 and history[1][0] <= oldest_needed:
            history.pop(0)

    def mark_dirty(self, columns) -> None:
        """Publish these columns with the next version even without new results."""
        self._dirty.update(columns)

    def history(self, column: int) -> list[tuple[int, State]]:
        """``[(version, published state)]`` kept for ``column``, oldest first."""
        return list(self._published[column])

    def restore_history(self, column: int, history: list[tuple[int, State]]) -> None:
        """Replace the kept published history of ``column`` (restart from a saved state)."""
        if not history:
            raise ValueError(f"column {column}: empty published history")
        self._published[column] = sorted(history, key=lambda item: item[0])

    def published(self, column: int) -> State:
        """The newest published state of ``column``."""
        return self._published[column][-1][1]
