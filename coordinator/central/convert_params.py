"""The settings of path 9.1's conversion and its error, apart from the conversion itself
(:mod:`coordinator.central.convert`), so ``perspective convert`` reads its defaults and
checks its arguments without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


class ConvertError(ValueError):
    """The source checkpoint or a conversion setting cannot be used."""


@dataclass(frozen=True)
class ConvertParams:
    """Settings of a conversion: the student's shape, the batch geometry and the lengths
    of the regression and KD phases (``perspective convert`` names the common ones)."""

    #: final expert count (the source's count × a power of two; None: unchanged)
    n_experts: int | None = None
    gqa_every: int = 4
    seq_len: int = 64
    batch_size: int = 4
    distill_batches: int = 4
    distill_steps: int = 100
    distill_lr: float = 3e-3
    kd_steps: int = 20
    kd_lr: float = 3e-4
    ppl_batches: int = 4
    grow_noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("gqa_every", "seq_len", "batch_size", "distill_batches", "ppl_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConvertError(f"{name} = {getattr(self, name)}: must be at least 1")
        for name in ("distill_steps", "kd_steps"):
            if getattr(self, name) < 0:
                raise ConvertError(f"{name} = {getattr(self, name)}: must be 0 or more")
        for name in ("distill_lr", "kd_lr", "grow_noise"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConvertError(f"{name} = {getattr(self, name)!r}: must be finite and >= 0")
        if self.n_experts is not None and self.n_experts < 1:
            raise ConvertError(f"n_experts = {self.n_experts}: must be at least 1")
