"""A unit's documents: (column, document) pairs, as stored with the lease and as sent.

A unit lists the training documents it trains on, each with the column it is routed to in
that unit. The wire carries them typed (``WorkUnit.documents``, one ``DocumentRef`` each);
the lease row keeps them in ``work_units.docs`` as ``"<column>:<doc>"`` strings, the form
databases already hold. This module is the one place that converts between the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared_model.wire.perspective.v1 import federation_pb2


class UnitDocumentsError(ValueError):
    """A stored unit document is not ``"<column>:<doc>"`` (the database was edited by hand)."""


def stored(pairs: Iterable[tuple[int, int]]) -> list[str]:
    """``(column, doc)`` pairs as stored in ``work_units.docs``."""
    return [f"{int(column)}:{int(doc)}" for column, doc in pairs]


def pairs(docs: Sequence[str]) -> list[tuple[int, int]]:
    """``(column, doc)`` pairs of a lease's stored ``docs``.

    Raises:
        UnitDocumentsError: an entry is not ``"<column>:<doc>"`` with integers.
    """
    out = []
    for item in docs:
        try:
            column, doc = item.split(":", 1)
            out.append((int(column), int(doc)))
        except ValueError as exc:
            raise UnitDocumentsError(f"unit document {item!r} is not '<column>:<doc>'") from exc
    return out


def refs(docs: Sequence[str]) -> list[federation_pb2.DocumentRef]:
    """A lease's stored ``docs`` as ``WorkUnit.documents``."""
    return [federation_pb2.DocumentRef(column=c, doc=d) for c, d in pairs(docs)]
