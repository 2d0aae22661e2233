"""A description of the machine a measurement ran on, for benchmark and experiment reports."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["machine"]


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, processor, core and thread counts, and the device (with its GPU name)."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
