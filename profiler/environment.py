"""What a measurement was taken on: the device's name and the software versions a profile records."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model name (/proc/cpuinfo on Linux)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_versions(nccl: bool) -> dict[str, Any]:
    """torch, CUDA and (when the run used it) NCCL versions, in HardwareProfile's field names."""
    import torch

    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if nccl else None,
    }


def utc_now() -> str:
    """ISO 8601 to the second, UTC: a profile's `created`."""
    return datetime.now(UTC).isoformat(timespec="seconds")
