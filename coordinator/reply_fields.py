"""Field checks of what a participant reports: the edge between its bytes and our state.

Volunteers are untrusted (DESIGN §6, issue 16). Every number or string a reply carries is
checked here before it reaches the database or any arithmetic: finite, in range, and
small enough for its column on SQLite *and* PostgreSQL (``INTEGER``, ``BIGINT``, double
``FLOAT``, ``VARCHAR(n)``, and JSON, which has no NaN). What cannot be trusted is refused
with a :class:`FieldError` naming the field (the caller logs or stores it as the reason);
purely descriptive text (a device name, a failure reason) is shortened instead.

The payload itself (blobs, tensors) is checked by :mod:`coordinator.intake`.
"""

from __future__ import annotations

import math

from coordinator.db.participants import Capability

#: Above any one machine's training speed; a larger claim is refused (it would size
#: units from a fantasy and, unbounded, overflow the sizing arithmetic).
MAX_TOKENS_PER_S = 1e9
#: Counts stored in ``INTEGER`` columns are clamped to this (far above any real value).
MAX_COUNT = 1 << 16
#: ``participants.device`` is ``VARCHAR(64)``.
DEVICE_CHARS = 64
#: ``work_units.unit_id`` / ``events.unit_id`` are ``VARCHAR(36)`` (a UUID).
UNIT_ID_CHARS = 36
#: Download bytes one reply may report (a unit downloads a few checkpoints at most);
#: keeps the ``BIGINT`` traffic counters far from overflowing.
MAX_BYTES_DOWN = 1 << 40
#: Free text a participant sends (failure reasons) is stored at most this long.
TEXT_CHARS = 500
#: Longest phase of a unit a result may report (a lease is minutes; a year is nonsense).
MAX_SECONDS = 365 * 86400.0
#: Unit ids one reply may report as failed (a node holds ``max_in_flight`` leases).
MAX_FAILED_PER_REPLY = 256


class FieldError(ValueError):
    """A reported field is out of range; the message names it and the accepted range."""


def short(text: str, limit: int = TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with an ellipsis when cut)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def speed(tokens_per_s: float | None) -> float | None:
    """A usable training speed, or ``None`` (unreported, or nonsense already stored).

    The one guard every consumer of ``tokens_per_s`` uses (unit sizing, shares), so a
    poisoned value in the database cannot divide by zero or overflow there either.
    """
    if tokens_per_s is None or not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
        return None
    return min(float(tokens_per_s), MAX_TOKENS_PER_S)


def capability(cap) -> Capability | None:
    """The :class:`Capability` a reply's ``NodeCapability`` reports.

    Returns:
        ``None`` when the reply carries none (``max_columns`` 0: an old or partial reply).

    Raises:
        FieldError: ``tokens_per_s`` is NaN, infinite, negative or above
            :data:`MAX_TOKENS_PER_S` (the node keeps what we knew of it).
    """
    if cap.max_columns < 1:
        return None
    rate = float(cap.tokens_per_s)
    if not (math.isfinite(rate) and 0 <= rate <= MAX_TOKENS_PER_S):
        raise FieldError(
            f"capability.tokens_per_s = {rate!r}: must be a finite number in "
            f"[0, {MAX_TOKENS_PER_S:.0e}]"
        )
    device = short("".join(c for c in cap.device if c.isprintable()), DEVICE_CHARS)
    return Capability(
        max_columns=min(int(cap.max_columns), MAX_COUNT),
        threads=min(int(cap.threads), MAX_COUNT) or None,
        device=device or None,
        tokens_per_s=rate or None,
    )


def bytes_down(value: int) -> int:
    """A reply's reported download bytes.

    Raises:
        FieldError: above :data:`MAX_BYTES_DOWN`.
    """
    if not 0 <= value <= MAX_BYTES_DOWN:
        raise FieldError(f"bytes_down = {value}: at most {MAX_BYTES_DOWN} per reply")
    return int(value)


def unit_id(value: str) -> str:
    """A reported unit id, checked to fit the id columns.

    Raises:
        FieldError: longer than :data:`UNIT_ID_CHARS` (no unit of ours has such an id).
    """
    if len(value) > UNIT_ID_CHARS:
        raise FieldError(
            f"unit id {short(value, 40)!r} is {len(value)} characters; ours are at most "
            f"{UNIT_ID_CHARS}"
        )
    return value


def finite(x: float) -> float | None:
    """``x`` if it is a finite number, else ``None`` (stored as unknown)."""
    return float(x) if math.isfinite(x) else None


def timings(t) -> dict[str, float]:
    """A result's ``Timings`` as stored (JSON, which has no NaN): a phase whose seconds are
    not finite, negative or above :data:`MAX_SECONDS` is left out (unknown); the counts of
    blobs and versions its sync fetched and applied, and of the node's results its unit
    started from eagerly, are kept as sent (uint32s)."""
    out: dict[str, float] = {}
    for name in ("sync_s", "train_s", "encode_s", "upload_s", "total_s", "score_s"):
        value = finite(getattr(t, name))
        if value is not None and 0 <= value <= MAX_SECONDS:
            out[name] = value
    out["sync_fetches"], out["sync_versions"] = int(t.sync_fetches), int(t.sync_versions)
    out["eager_results"] = int(t.eager_results)
    return out
