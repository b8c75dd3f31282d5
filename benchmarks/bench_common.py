"""Helpers shared by the benchmark scripts (imported as a sibling module: run the scripts as files)."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


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


class Wrapper(nn.Module):
    """Holds one benchmarked layer as ``self.layer`` (the PEFT target ``target_modules=["layer"]``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: ``(b, n, d) -> (b, n, d)`` (linear) or ``(b, c, h, w) -> (b, c, h, w)`` (conv)."""
        return self.layer(x)


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory one call of ``fn`` allocates above what was allocated before it (MiB); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
