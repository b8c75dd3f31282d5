"""``DegradationParams``: the ranges and probabilities of the Real-ESRGAN second-order degradation.

Validation (``ValueError`` naming the field and the value), YAML presets of ``configs/degradations`` and the
per-stage ``KernelParams``; defaults are OSEDiff's ``params_realesrgan.yml``. The pipeline that draws from these
ranges is ``degradations.RealESRGANDegradation``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # imported as ``real_isr.degradation_params`` (tests; scripts with recipes/ on sys.path)
    from .kernels import KERNEL_TYPES, KernelParams
    from .pixel_ops import RESIZE_MODES
except ImportError:  # imported flat from inside recipes/real_isr
    from kernels import KERNEL_TYPES, KernelParams  # type: ignore[no-redef]
    from pixel_ops import RESIZE_MODES  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "degradations"
_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)

_STAGED = ("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range", "poisson_scale_range")
_RANGE_LOWER = {  # range field -> (lowest allowed value, strictly greater?)
    **{f"{n}{s}": (0.0, not n.startswith(("noise", "poisson"))) for n in _STAGED for s in ("", "2")},
    **{n: (0.0, True) for n in ("sinc_cutoff_range", "sinc_cutoff_range_large", "final_sinc_cutoff_range")},
    **{n: (-math.inf, False) for n in ("rotation_range", "rotation_range2")},
}
_INT_RANGES = ("kernel_size_range", "kernel_size_range2", "final_sinc_size_range", "jpeg_range", "jpeg_range2")


@dataclass(frozen=True)
class DegradationParams:
    """Ranges and probabilities of the second-order model; defaults = OSEDiff's ``params_realesrgan.yml``.

    Names follow Real-ESRGAN's options (suffix ``2`` for stage 2). Ranges are ``(low, high)`` with ``low <= high``;
    ``*_prob`` are probabilities. Additions over Real-ESRGAN's file (its hard-coded values as defaults):
    ``kernel_size_range*`` / ``final_sinc_size_range`` (odd sizes 7..21; kernels are padded to the largest),
    ``rotation_range*``, the sinc cutoff ranges and ``sinc_large_size``, ``sinc_first_prob`` (order of the final
    step), ``resize_modes`` / ``resize_back_modes``, and S3Diff's ``no_degradation_prob``. Real-ESRGAN's
    ``blur_kernel_size`` is the largest size of ``kernel_size_range``. Resize draws: ``up`` from
    ``[max(low, 1), high]``, ``down`` from ``[low, min(high, 1)]``, ``keep`` is 1. Noise sigmas are in 8-bit units.
    """

    scale: int = 4
    kernel_list: tuple[str, ...] = _KERNELS
    kernel_prob: tuple[float, ...] = _KERNEL_PROBS
    kernel_size_range: tuple[int, int] = (7, 21)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = _KERNELS
    kernel_prob2: tuple[float, ...] = _KERNEL_PROBS
    kernel_size_range2: tuple[int, int] = (7, 21)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    rotation_range2: tuple[float, float] = (-math.pi, math.pi)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    sinc_cutoff_range: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_range_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_size: int = 13
    final_sinc_prob: float = 0.8
    final_sinc_size_range: tuple[int, int] = (7, 21)
    final_sinc_cutoff_range: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_first_prob: float = 0.5
    resize_modes: tuple[str, ...] = RESIZE_MODES
    resize_back_modes: tuple[str, ...] = RESIZE_MODES
    gray_prob: float = 0.0
    no_degradation_prob: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        for f in dataclasses.fields(self):
            self._check(f.name, getattr(self, f.name))

    def _fail(self, name: str, value: Any, why: str) -> None:
        raise ValueError(f"degradation parameter {name!r} = {value!r}: {why}")

    def _check(self, name: str, value: Any) -> None:
        if name in ("scale", "sinc_large_size"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, value, "must be an integer >= 1")
        elif name in ("kernel_list", "kernel_list2"):
            if not isinstance(value, tuple) or not value or any(k not in KERNEL_TYPES for k in value):
                self._fail(name, value, f"must list kernel types from {KERNEL_TYPES}")
            if len(set(value)) != len(value):
                self._fail(name, value, "must not repeat a kernel type")
        elif name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            n = 3 if name.startswith("resize") else len(getattr(self, name.replace("prob", "list")))
            if not isinstance(value, tuple) or len(value) != n or not all(_is_number(v) and v >= 0 for v in value):
                self._fail(name, value, f"must be {n} non-negative probabilities")
            if abs(sum(value) - 1.0) > 1e-6:
                self._fail(name, value, "must sum to 1")
        elif name.endswith(("_prob", "_prob2")):
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                self._fail(name, value, "must be a probability in [0, 1]")
        elif name in ("resize_modes", "resize_back_modes"):
            if not isinstance(value, tuple) or not value or any(m not in RESIZE_MODES for m in value):
                self._fail(name, value, f"must be a non-empty subset of {RESIZE_MODES}")
        else:
            self._check_range(name, value)

    def _check_range(self, name: str, value: Any) -> None:
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not all(_is_number(v) and math.isfinite(v) for v in value)
        ):
            self._fail(name, value, "must be a range [low, high] of two finite numbers")
        low, high = value
        if low > high:
            self._fail(name, value, "low must be <= high")
        if name in _INT_RANGES:
            if any(float(v) != int(v) for v in value):
                self._fail(name, value, "must hold integers")
            object.__setattr__(self, name, (int(low), int(high)))
            if name.startswith("jpeg") and not (1 <= low and high <= 100):
                self._fail(name, value, "JPEG quality must lie in [1, 100]")
            if not name.startswith("jpeg") and (low < 1 or low % 2 == 0 or high % 2 == 0):
                self._fail(name, value, "kernel sizes must be odd and >= 1")
            return
        object.__setattr__(self, name, (float(low), float(high)))
        floor, strict = _RANGE_LOWER[name]
        if low < floor or (strict and low == floor):
            self._fail(name, value, f"low must be {'>' if strict else '>='} {floor}")
        if "cutoff" in name and high > math.pi + 1e-9:
            self._fail(name, value, "a sinc cutoff must be <= pi")
        if name.startswith("resize_range"):
            up, down, _ = getattr(self, name.replace("range", "prob"))
            if (up > 0 and high < 1) or (down > 0 and low > 1):
                self._fail(name, value, "must reach 1 on the side of every resize direction with probability > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DegradationParams:
        """Build from a mapping; missing keys keep the defaults, unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise ValueError(f"unknown degradation parameter {key!r}; valid keys: {', '.join(valid)}")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DegradationParams:
        """Load a YAML file of parameters (a flat mapping; see ``configs/degradations/*.yaml``)."""
        import yaml

        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of degradation parameters, got {type(values).__name__}")
        return cls.from_dict(values)

    @classmethod
    def preset(cls, name: str) -> DegradationParams:
        """A preset of ``configs/degradations``: ``"realesrgan"`` (OSEDiff, default) or ``"mild"``."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown degradation preset {name!r}; available: {', '.join(names)}")
        return cls.from_yaml(path)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists for ranges), ready for YAML/JSON logging."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def kernel_params(self, stage: int | str) -> KernelParams:
        """``KernelParams`` of stage ``1``, ``2`` or ``"final"`` (sinc with ``final_sinc_prob``, else pulse)."""
        if stage == "final":
            cutoff = self.final_sinc_cutoff_range
            return KernelParams(
                ("pulse",),
                (1.0,),
                self.final_sinc_size_range,
                sinc_prob=self.final_sinc_prob,
                sinc_cutoff_range=cutoff,
                sinc_cutoff_range_large=cutoff,
            )
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1, 2 or 'final', got {stage!r}")
        s = "" if stage == 1 else "2"
        return KernelParams(
            kernel_list=getattr(self, f"kernel_list{s}"),
            kernel_prob=getattr(self, f"kernel_prob{s}"),
            kernel_size_range=getattr(self, f"kernel_size_range{s}"),
            sigma_range=getattr(self, f"blur_sigma{s}"),
            rotation_range=getattr(self, f"rotation_range{s}"),
            betag_range=getattr(self, f"betag_range{s}"),
            betap_range=getattr(self, f"betap_range{s}"),
            sinc_prob=getattr(self, f"sinc_prob{s}"),
            sinc_cutoff_range=self.sinc_cutoff_range,
            sinc_cutoff_range_large=self.sinc_cutoff_range_large,
            sinc_large_size=self.sinc_large_size,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

