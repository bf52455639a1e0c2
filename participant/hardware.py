"""What this machine can offer: CPU cores, RAM, disk, and an accelerator (CUDA / MPS).

The report is sent to the coordinator at enrolment (``device``, ``threads``) and shown by
``perspective participant status``. Detection can be overridden (``--device cpu``) because a
volunteer may want to keep the GPU for themselves; an override naming a device that is not
there is refused with a clear error rather than failing later inside torch.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from shared_model.processes import usable_cores

DEVICES = ("cpu", "cuda", "mps")


class HardwareError(ValueError):
    """A requested device is not available here (says what is)."""


@dataclass(frozen=True)
class HardwareReport:
    """Capabilities of this machine.

    Attributes:
        device: Device training will use (``cpu``, ``cuda`` or ``mps``).
        devices: Every device torch can use here.
        cpu_cores: Logical CPUs available to this process.
        ram_bytes: Total physical memory.
        ram_available_bytes: Memory available right now.
        disk_free_bytes: Free space where the state directory lives.
        gpu_name: Name of the CUDA device, if any.
        gpu_memory_bytes: Memory of the CUDA device, if any.
    """

    device: str
    devices: tuple[str, ...]
    cpu_cores: int
    ram_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {**asdict(self), "devices": list(self.devices)}


def available_devices() -> tuple[str, ...]:
    """Devices torch can use in this process (always includes ``cpu``)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return tuple(found)


def detect(state_dir: Path | None = None, device: str | None = None) -> HardwareReport:
    """Detect this machine's capabilities.

    Args:
        state_dir: Directory whose file system's free space is reported (cwd if ``None``).
        device: Override (``cpu``/``cuda``/``mps``); ``None`` picks the best one present.

    Raises:
        HardwareError: If ``device`` is unknown or not present.
    """
    devices = available_devices()
    if device is not None and device not in DEVICES:
        raise HardwareError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device is not None and device not in devices:
        raise HardwareError(
            f"device {device!r} is not available here (found: {', '.join(devices)})"
        )
    chosen = device or ("cuda" if "cuda" in devices else "mps" if "mps" in devices else "cpu")
    gpu_name = gpu_mem = None
    if "cuda" in devices:
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu_name, gpu_mem = props.name, int(props.total_memory)
    where = Path(state_dir) if state_dir is not None else Path.cwd()
    while not where.exists():
        where = where.parent
    vm = psutil.virtual_memory()
    return HardwareReport(
        device=chosen,
        devices=devices,
        cpu_cores=usable_cores(),
        ram_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        disk_free_bytes=int(shutil.disk_usage(where).free),
        gpu_name=gpu_name,
        gpu_memory_bytes=gpu_mem,
    )
