"""Error-feedback ternary compression of FP updates (sender side, DESIGN §3).

The sender keeps a residual per tensor: ``u = residual + update`` is ternarised
(threshold 0.7 * mean|u|, scale = mean |u| over the kept support, which is the
least-squares scale for that support) and ``residual = u - decode(encoded)``, so what
the quantiser drops is sent later instead of being lost.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from shared_model.codec.errors import CodecError
from shared_model.codec.tensor import decode_ternary, encode_ternary

THRESHOLD = 0.7


def ternarize(values: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, float]:
    """Ternarise a float array: ``(trits int8, scale float)`` with ``trits*scale ~ values``."""
    arr = np.asarray(values, np.float32)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int8), 0.0
    mag = np.abs(arr)
    tau = threshold * float(mag.mean(dtype=np.float64))
    keep = mag > tau
    trits = (np.sign(arr) * keep).astype(np.int8)
    kept = int(np.count_nonzero(keep))
    scale = float(mag[keep].mean(dtype=np.float64)) if kept else 0.0
    return trits, float(np.float32(scale))


class ErrorFeedbackCompressor:
    """Compress FP updates to ternary with a per-tensor error-feedback residual.

    Example:
        >>> ef = ErrorFeedbackCompressor()
        >>> blob = ef.encode("w1", update)          # bytes to upload
        >>> approx = ErrorFeedbackCompressor.decode(blob)  # float32, on the receiver
    """

    def __init__(self, threshold: float = THRESHOLD) -> None:
        if not 0.0 <= threshold < 10.0:
            raise CodecError(f"threshold must be in [0, 10), got {threshold}")
        self.threshold = threshold
        self.residuals: dict[str, np.ndarray] = {}

    def encode(self, name: str, update: np.ndarray) -> bytes:
        """Add the residual, ternarise, keep the new residual, return container bytes."""
        upd = np.asarray(update, np.float32)
        if not np.all(np.isfinite(upd)):
            raise CodecError(f"update {name!r} contains NaN or Inf")
        prev = self.residuals.get(name)
        if prev is not None and prev.shape != upd.shape:
            raise CodecError(f"update {name!r} has shape {upd.shape}, residual {prev.shape}")
        u = upd + prev if prev is not None else upd.copy()
        trits, scale = ternarize(u, self.threshold)
        self.residuals[name] = u - trits.astype(np.float32) * np.float32(scale)
        return encode_ternary(trits, scale, name)

    @staticmethod
    def decode(data: bytes) -> np.ndarray:
        """Receiver side: the float32 update the sender committed to."""
        trits, scale, _ = decode_ternary(data)
        return trits.astype(np.float32) * np.float32(scale)

    def save(self, path: str | Path) -> None:
        """Write the residuals atomically (safetensors, temp file + rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(dict(self.residuals), tmp, metadata={"threshold": repr(self.threshold)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> ErrorFeedbackCompressor:
        """Read residuals written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                out = cls(float(meta.get("threshold", THRESHOLD)))
                out.residuals = {k: fh.get_tensor(k).astype(np.float32) for k in fh.keys()}  # noqa: SIM118
        except (OSError, ValueError) as exc:
            raise CodecError(f"cannot read error-feedback state {path}: {exc}") from None
        return out
