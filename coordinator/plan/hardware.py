"""Accelerator datasheet figures the planner divides by, and the planner's error type."""

from __future__ import annotations

import math
from dataclasses import dataclass


class PlanError(ValueError):
    """A planner input is invalid; the message says which one and what is allowed."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: dense bf16 tensor-core peak and memory.

    Attributes:
        name: short key (``a100``).
        peak_tflops: dense (no sparsity) bf16/fp16 tensor peak with fp32 accumulation,
            TFLOP/s, from the vendor datasheet/whitepaper.
        memory_gb: device memory in GB (1e9 bytes).
        label: human-readable name.
    """

    name: str
    peak_tflops: float
    memory_gb: float
    label: str


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("a100", 312.0, 80.0, "NVIDIA A100 SXM 80 GB"),
        GpuSpec("a100-40gb", 312.0, 40.0, "NVIDIA A100 40 GB"),
        GpuSpec("h100", 989.0, 80.0, "NVIDIA H100 SXM 80 GB"),
        GpuSpec("h100-pcie", 756.0, 80.0, "NVIDIA H100 PCIe 80 GB"),
        GpuSpec("h200", 989.0, 141.0, "NVIDIA H200 141 GB"),
        GpuSpec("l40s", 362.0, 48.0, "NVIDIA L40S 48 GB"),
        GpuSpec("rtx4090", 165.0, 24.0, "NVIDIA GeForce RTX 4090 24 GB"),
        GpuSpec("rtx3090", 71.0, 24.0, "NVIDIA GeForce RTX 3090 24 GB"),
        GpuSpec("v100", 125.0, 32.0, "NVIDIA V100 SXM 32 GB"),
        GpuSpec("mi300x", 1307.0, 192.0, "AMD Instinct MI300X 192 GB"),
    )
}


def gpu_spec(
    name: str, peak_tflops: float | None = None, memory_gb: float | None = None
) -> GpuSpec:
    """Look up a GPU by name, optionally overriding its peak or memory.

    Raises:
        PlanError: unknown name, or a non-positive override.
    """
    key = name.strip().lower()
    if key not in GPUS:
        raise PlanError(
            f"unknown GPU {name!r}: allowed {', '.join(GPUS)} "
            "(or pick the closest one and pass --peak-tflops/--gpu-memory-gb)"
        )
    spec = GPUS[key]
    if peak_tflops is not None:
        require_positive("peak_tflops", peak_tflops)
        spec = GpuSpec(spec.name, float(peak_tflops), spec.memory_gb, spec.label + " (custom peak)")
    if memory_gb is not None:
        require_positive("gpu_memory_gb", memory_gb)
        spec = GpuSpec(
            spec.name, spec.peak_tflops, float(memory_gb), spec.label + " (custom memory)"
        )
    return spec


def require_positive(name: str, value: float) -> None:
    """Raise :class:`PlanError` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{name} = {value!r} is invalid: allowed a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise PlanError(f"{name} = {value!r} is invalid: allowed a finite number > 0")
