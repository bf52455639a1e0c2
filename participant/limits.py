"""Resource limits a volunteer sets, and how each one is enforced.

=================  ==========================================================================
limit              enforcement
=================  ==========================================================================
``max_columns``    passed to the worker (``--max-columns``) and reported to the coordinator,
                   whose scheduler never leases more columns than that
``threads``        ``torch.set_num_threads`` in the worker before each unit
``cache_cap_mb``   the worker evicts its blob cache to the cap after every unit
                   (:meth:`shared_model.blobs.BlobStore.evict_to`)
``ram_cap_mb``     the daemon watches the worker's RSS (psutil, whole process tree) and
                   restarts it when it stays above the cap; the lease then expires and the
                   coordinator re-issues the unit
``bandwidth_mbps`` passed to the worker (``--bandwidth-mbps``); one :class:`TokenBucket`
                   throttles every chunk its blob clients send or receive (sum of both
                   directions; the first second may burst)
``device``         passed to the worker (``--device``); unset = the best one detected
``schedule``       the daemon runs SuperNode + worker only inside the window
                   (``"22:00-07:00"``, local time, may wrap midnight) and stops them outside
=================  ==========================================================================
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from participant.hardware import DEVICES
from shared_model.files import write_json_atomic


class LimitsError(ValueError):
    """A limit is out of range or malformed (says which and how to fix it)."""


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """Parse ``"HH:MM-HH:MM"`` into (start, end) local times.

    Raises:
        LimitsError: On any other format or equal start and end.
    """
    try:
        start_s, end_s = text.split("-")
        start = dt.time.fromisoformat(start_s.strip())
        end = dt.time.fromisoformat(end_s.strip())
    except ValueError as err:
        raise LimitsError(f"schedule {text!r} must look like '22:00-07:00' ({err})") from None
    if start == end:
        raise LimitsError(f"schedule {text!r} is empty; leave it unset to run all day")
    return start, end


@dataclass(frozen=True)
class Limits:
    """What the participant may use on this machine (``None`` = no limit)."""

    max_columns: int = 1
    threads: int = 1
    cache_cap_mb: float | None = None
    ram_cap_mb: float | None = None
    bandwidth_mbps: float | None = None
    schedule: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_columns <= 1024:
            raise LimitsError(f"max_columns must be in 1..1024, got {self.max_columns}")
        if not 1 <= self.threads <= 4096:
            raise LimitsError(f"threads must be in 1..4096, got {self.threads}")
        for name in ("cache_cap_mb", "ram_cap_mb", "bandwidth_mbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LimitsError(f"{name} must be > 0 (or unset for no limit), got {value}")
        if self.schedule is not None:
            parse_window(self.schedule)
        if self.device is not None and self.device not in DEVICES:
            raise LimitsError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    def in_window(self, now: dt.datetime | None = None) -> bool:
        """Whether ``now`` (local time) lies in the schedule window (always true if unset)."""
        if self.schedule is None:
            return True
        start, end = parse_window(self.schedule)
        t = (now or dt.datetime.now()).time()
        return start <= t < end if start < end else t >= start or t < end

    def worker_args(self) -> list[str]:
        """Command-line options of ``perspective participant worker`` that enforce limits."""
        args = ["--threads", str(self.threads), "--max-columns", str(self.max_columns)]
        if self.cache_cap_mb is not None:
            args += ["--cache-cap-mb", str(self.cache_cap_mb)]
        if self.bandwidth_mbps is not None:
            args += ["--bandwidth-mbps", str(self.bandwidth_mbps)]
        if self.device is not None:
            args += ["--device", self.device]
        return args

    def save(self, path: Path) -> None:
        """Write as JSON (temp file + rename)."""
        write_json_atomic(path, asdict(self), indent=2)

    @classmethod
    def load(cls, path: Path) -> Limits:
        """Read a file written by :meth:`save`.

        Raises:
            LimitsError: Unknown keys or bad values.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise LimitsError(f"cannot read limits file {path}: {err}") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LimitsError(
                f"limits file {path} has unknown keys {unknown}; known: {sorted(known)}"
            )
        return cls(**data)


class TokenBucket:
    """Blocking byte-rate limiter: ``consume(n)`` sleeps so the long-run rate stays under the cap.

    Args:
        rate_bytes_per_s: Sustained rate.
        burst_bytes: Largest burst allowed without waiting (one second's worth by default).
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None) -> None:
        if not rate_bytes_per_s > 0:
            raise LimitsError(f"rate must be > 0 bytes/s, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes or rate_bytes_per_s)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_mbps(cls, mbps: float) -> TokenBucket:
        """A bucket for ``mbps`` megabits per second."""
        return cls(mbps * 1e6 / 8)

    def consume(self, n_bytes: int) -> float:
        """Take ``n_bytes``; returns the seconds slept."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n_bytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait
