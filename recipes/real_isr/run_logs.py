"""Logs of ``train.py``: a CSV tracker for ``accelerate``, the scalar summary of a step and the validation grid.

The CSV is long-form (``step,key,value``, one row per value) so that keys may come and go between rows (validation
metrics appear only every ``validation_steps``); ``pandas.read_csv(...).pivot(index="step", columns="key")`` gives
the wide table.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker

try:
    from .images import save_image
except ImportError:
    from images import save_image  # type: ignore[no-redef]

__all__ = ["CSVTracker", "routing_scalars", "save_validation_grid"]


class CSVTracker(GeneralTracker):
    """An ``accelerate`` tracker appending ``step,key,value`` rows to ``<logging_dir>/metrics.csv``.

    Args:
        logging_dir: Folder of the file (created); the hyper-parameters go to ``hparams.csv`` next to it.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, logging_dir: str | os.PathLike[str]) -> None:
        super().__init__()
        self.folder = Path(logging_dir)
        self.path = self.folder / "metrics.csv"

    @property
    def tracker(self) -> Path:
        """The CSV file."""
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Write the run's settings as ``key,value`` rows."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "hparams.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["key", "value"])
            writer.writerows(sorted((k, v) for k, v in values.items()))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Append one row per scalar value (non-scalars are skipped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "key", "value"])
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.writerow([step, key, repr(float(value))])


def routing_scalars(log: dict[str, float], prefix: str = "rankmoe/") -> dict[str, float]:
    """Reduce a ``RoutingTracker.log_dict()`` (hundreds of per-layer keys for a UNet) to a few run-level scalars.

    Returns:
        ``{prefix}active_ranks`` and ``{prefix}dead_slots`` as given, plus the mean over layers of
        ``load_max_over_mean`` and ``zero_share``.
    """
    out = {key: value for key, value in log.items() if key in (f"{prefix}active_ranks", f"{prefix}dead_slots")}
    for name in ("load_max_over_mean", "zero_share"):
        values = [v for k, v in log.items() if k.startswith(f"{prefix}{name}/")]
        if values:
            out[f"{prefix}{name}"] = sum(values) / len(values)
    return out


def save_validation_grid(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Save the validation images as one PNG: one row per image, columns LR (upsampled) | SR | HR.

    Args:
        lr, sr, hr: ``(v, 3, H, W)`` in ``[0, 1]``.
        path: The ``.png`` file.

    Returns:
        ``Path(path)``.
    """
    rows = [torch.cat([a, b, c], dim=-1) for a, b, c in zip(lr.float().cpu(), sr.float().cpu(), hr.float().cpu(),
                                                              strict=True)]
    return save_image(torch.cat(rows, dim=-2).clamp(0, 1), path)
