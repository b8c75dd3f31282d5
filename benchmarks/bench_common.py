"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts as files)."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from pathlib import Path

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on CUDA devices, a no-op otherwise."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def device_name(device: torch.device) -> str:
    """The CUDA card name, or the CPU model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"
