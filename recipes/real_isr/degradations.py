"""Real-ESRGAN second-order degradation (OSEDiff's parameters by default), seedable and batched.

The order is Real-ESRGAN's (``shared/notes/real-isr.md`` §3.1, OSEDiff ``dataloaders/realesrgan.py``):

1. stage 1: blur (kernel 1) -> random resize -> Gaussian or Poisson noise -> JPEG;
2. stage 2: blur (kernel 2, with ``second_blur_prob``) -> random resize relative to ``H / scale`` -> noise;
3. final, in random order: [resize to ``H / scale`` + sinc (or pulse) filter] then JPEG, or JPEG then [resize + sinc];
4. optional grey conversion (``gray_prob``), optional resize back to the HR size (OSEDiff's ``resize_bak``),
   optional no-degradation replacement (``no_degradation_prob``, S3Diff), then clamp and round to 1/255.

Randomness: every draw comes from one explicit ``torch.Generator`` (or a seed); the same seed on the same device
gives the same image. ``RealESRGANDegradation.sample`` draws all parameters (kernels included) into a
``DegradationRecord`` without touching pixels; ``apply`` runs the pipeline with them, drawing only the noise
fields. Per-sample draws: kernels, second-blur flag, resize modes, noise type / level / grey flag, JPEG quality,
final order, grey, no-degradation. The resize *scale* of each stage is drawn once per batch (it sets the tensor
shape), as in Real-ESRGAN's batched GPU pipeline; call with ``b = 1`` (OSEDiff degrades per image in
``Dataset.__getitem__``) to draw it per image.

JPEG uses PIL's libjpeg codec (in memory, per sample, on the CPU, 4:2:0 chroma subsampling, integer quality) instead
of BasicSR's ``DiffJPEG``: a real codec, no extra dependency, and nothing here needs gradients. Quality is drawn
as an integer uniformly in ``jpeg_range`` (DiffJPEG draws a float). Other deviations from BasicSR: the stage-1
resize passes an explicit output size (``floor(H * scale)``, at least 1) rather than ``scale_factor``; a kernel
padding that does not fit a tiny image falls back to replicate padding; the per-sample grey Gaussian noise field
is drawn per sample (BasicSR shares one across the batch).

Axis legend: ``b`` batch, ``c`` channels (3), ``H``/``W`` HR size, ``h``/``w`` intermediate size, ``K`` kernel.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # imported as ``real_isr.degradations`` (tests; scripts with recipes/ on sys.path)
    from .kernels import KERNEL_TYPES, KernelParams, KernelRecord, filter2d, random_mixed_kernel
except ImportError:  # imported flat from inside recipes/real_isr
    from kernels import KERNEL_TYPES, KernelParams, KernelRecord, filter2d, random_mixed_kernel  # type: ignore[no-redef]

RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_TYPES = ("up", "down", "keep")
PRESET_DIR = Path(__file__).resolve().parent / "configs" / "degradations"
_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights, as BasicSR uses

# ------------------------------------------------------------------------------------------------ operations


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to multiples of 1/255 (same shape)."""
    return torch.clamp((image * 255.0).round(), 0, 255) / 255.0


def rgb_to_gray(image: torch.Tensor) -> torch.Tensor:
    """Luma of ``(b, 3, h, w)`` RGB images, ``(b, 1, h, w)``."""
    r, g, b = image.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b)[:, None]


def resize(image: torch.Tensor, size: tuple[int, int], modes: str | Sequence[str]) -> torch.Tensor:
    """Resize ``(b, c, h, w)`` to ``(b, c, *size)`` with one mode per sample (or one for all), no antialiasing.

    Args:
        image: ``(b, c, h, w)``.
        size: output ``(h', w')``.
        modes: ``"area"``, ``"bilinear"`` or ``"bicubic"``, or a sequence of ``b`` of them.

    Returns:
        ``(b, c, h', w')``. Bicubic may overshoot [0, 1], as in Real-ESRGAN.
    """
    b = image.shape[0]
    modes = [modes] * b if isinstance(modes, str) else list(modes)
    if len(modes) != b or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"modes must be {b} of {RESIZE_MODES}, got {modes}")
    if len(set(modes)) == 1:
        kwargs = {} if modes[0] == "area" else {"align_corners": False}
        return F.interpolate(image, size=size, mode=modes[0], **kwargs)
    out = image.new_empty(b, image.shape[1], *size)
    for mode in sorted(set(modes)):
        idx = torch.tensor([m == mode for m in modes], device=image.device)
        kwargs = {} if mode == "area" else {"align_corners": False}
        out[idx] = F.interpolate(image[idx], size=size, mode=mode, **kwargs)
    return out


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


def gaussian_noise(
    image: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Additive Gaussian noise field (BasicSR's ``generate_gaussian_noise_pt``).

    Args:
        image: ``(b, c, h, w)``, used for shape, dtype and device.
        sigma: ``(b,)`` standard deviations in 8-bit units (divided by 255 here).
        gray: ``(b,)`` bool, True for the same noise in every channel.
        generator: source of randomness.

    Returns:
        ``(b, c, h, w)`` noise (to be added, then clamped).
    """
    b, c, h, w = image.shape
    std = sigma.to(device=image.device, dtype=image.dtype).view(b, 1, 1, 1) / 255.0
    color = _randn((b, c, h, w), generator, image) * std
    mono = _randn((b, 1, h, w), generator, image) * std
    return torch.where(gray.to(image.device).view(b, 1, 1, 1), mono.expand(b, c, h, w), color)


def _poisson_field(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``poisson(img * vals) / vals - img`` on the image rounded to 1/255, ``vals = 2**ceil(log2(#unique))``."""
    b = image.shape[0]
    img = quantize(image)
    levels = (img * 255).round().long().reshape(b, -1)
    offsets = torch.arange(b, device=img.device)[:, None] * 256
    counts = torch.bincount((levels + offsets).reshape(-1), minlength=256 * b).view(b, 256)
    vals = 2.0 ** torch.ceil(torch.log2((counts > 0).sum(dim=1).to(torch.float64)))
    vals = vals.to(img.dtype).view(b, 1, 1, 1)
    rates = (img * vals).to(generator.device)
    noisy = torch.poisson(rates, generator=generator).to(img.device) / vals
    return noisy - img


def poisson_noise(
    image: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Signal-dependent Poisson noise field (BasicSR's ``generate_poisson_noise_pt``).

    Args:
        image: ``(b, 3, h, w)`` in [0, 1].
        scale: ``(b,)`` multiplier of the noise.
        gray: ``(b,)`` bool, True for noise computed on the luma and shared by the channels.
        generator: source of randomness.

    Returns:
        ``(b, 3, h, w)`` noise (to be added, then clamped); its mean is close to 0.
    """
    b, c, h, w = image.shape
    gray = gray.to(image.device)
    noise = _poisson_field(image, generator)
    if bool(gray.any()):
        mono = torch.zeros_like(noise)
        mono[gray] = _poisson_field(rgb_to_gray(image[gray]), generator).expand(-1, c, h, w)
        noise = torch.where(gray.view(b, 1, 1, 1), mono, noise)
    return noise * scale.to(device=image.device, dtype=image.dtype).view(b, 1, 1, 1)


def jpeg_compress(image: torch.Tensor, quality: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """JPEG encode + decode each image with PIL (in memory, CPU), returning multiples of 1/255.

    Args:
        image: ``(b, c, h, w)`` with ``c`` 1 or 3, values clamped to [0, 1] here.
        quality: ``b`` integer qualities in [1, 100].

    Returns:
        ``(b, c, h, w)`` on ``image``'s device and dtype.
    """
    b, c = image.shape[:2]
    quality = [int(q) for q in (quality.tolist() if isinstance(quality, torch.Tensor) else quality)]
    if len(quality) != b or c not in (1, 3):
        raise ValueError(f"need {b} qualities and 1 or 3 channels, got {len(quality)} and {c}")
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for i in range(b):
        buffer = io.BytesIO()
        Image.fromarray(pixels[i, ..., 0] if c == 1 else pixels[i]).save(buffer, format="JPEG", quality=quality[i])
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert("L" if c == 1 else "RGB")).reshape(pixels.shape[1:]))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=image.device, dtype=image.dtype) / 255.0


# ------------------------------------------------------------------------------------------------ parameters

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


# ------------------------------------------------------------------------------------------------ records


@dataclass
class StageRecord:
    """Sampled parameters of one stage; ``NaN`` where not applicable.

    Attributes:
        kernel: the stage's kernels (``kernel.kernel`` ``(b, K, K)``).
        blur: ``(b,)`` bool, whether the kernel is applied (always True in stage 1).
        resize_type: ``"up"``, ``"down"`` or ``"keep"``, one per batch.
        resize_scale: the scale factor, one per batch (relative to ``H`` in stage 1, to ``H / scale`` in stage 2).
        resize_mode: ``b`` resize modes.
        gaussian: ``(b,)`` bool, Gaussian noise (else Poisson).
        noise_sigma: ``(b,)`` float64, Gaussian sigma in 8-bit units.
        poisson_scale: ``(b,)`` float64, Poisson scale.
        gray_noise: ``(b,)`` bool, noise shared by the channels.
        jpeg_quality: ``(b,)`` int64.
    """

    kernel: KernelRecord
    blur: torch.Tensor
    resize_type: str
    resize_scale: float
    resize_mode: list[str]
    gaussian: torch.Tensor
    noise_sigma: torch.Tensor
    poisson_scale: torch.Tensor
    gray_noise: torch.Tensor
    jpeg_quality: torch.Tensor

    def sample(self, i: int) -> dict[str, Any]:
        """Parameters of sample ``i`` as plain Python values (NaN entries left out)."""
        out: dict[str, Any] = {"kernel": self.kernel.sample(i)} if bool(self.blur[i]) else {}
        out |= {"resize_type": self.resize_type, "resize_scale": self.resize_scale, "resize_mode": self.resize_mode[i]}
        if bool(self.gaussian[i]):
            out |= {"noise": "gaussian", "noise_sigma": float(self.noise_sigma[i])}
        else:
            out |= {"noise": "poisson", "poisson_scale": float(self.poisson_scale[i])}
        return out | {"gray_noise": bool(self.gray_noise[i]), "jpeg_quality": int(self.jpeg_quality[i])}


@dataclass
class DegradationRecord:
    """Every parameter drawn for a batch (``b`` samples).

    Attributes:
        stage1, stage2: the two stages.
        final_kernel: sinc or pulse kernels of the final step.
        sinc_first: ``(b,)`` bool, [resize + sinc] before the final JPEG (else after).
        final_resize_mode: ``b`` modes of the resize to ``H / scale``.
        resize_back_mode: ``b`` modes of the resize back to ``H`` (used only with ``resize_back``).
        gray: ``(b,)`` bool, output converted to grey.
        no_degradation: ``(b,)`` bool, output replaced by the clean (resized) HR image.
    """

    stage1: StageRecord
    stage2: StageRecord
    final_kernel: KernelRecord
    final_jpeg_quality: torch.Tensor
    sinc_first: torch.Tensor
    final_resize_mode: list[str]
    resize_back_mode: list[str]
    gray: torch.Tensor
    no_degradation: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.sinc_first)

    def sample(self, i: int) -> dict[str, Any]:
        """Nested plain-Python parameters of sample ``i`` (for logging)."""
        return {
            "stage1": self.stage1.sample(i),
            "stage2": self.stage2.sample(i),
            "final": {
                "kernel": self.final_kernel.sample(i),
                "jpeg_quality": int(self.final_jpeg_quality[i]),
                "sinc_first": bool(self.sinc_first[i]),
                "resize_mode": self.final_resize_mode[i],
                "resize_back_mode": self.resize_back_mode[i],
            },
            "gray": bool(self.gray[i]),
            "no_degradation": bool(self.no_degradation[i]),
        }


# ------------------------------------------------------------------------------------------------ pipeline


def make_generator(seed: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator from a seed (on ``device``), the generator itself, or a randomly seeded one for None."""
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    else:
        generator.manual_seed(seed)
    return generator


class DegradationOutput(NamedTuple):
    """``lr`` ``(b, 3, H/scale, W/scale)`` (or ``(b, 3, H, W)`` with ``resize_back``) and its ``record``."""

    lr: torch.Tensor
    record: DegradationRecord


class RealESRGANDegradation:
    """The second-order degradation as a callable: ``lr, record = degrade(hr, seed_or_generator)``.

    Args:
        params: ranges and probabilities; ``DegradationParams()`` (OSEDiff / Real-ESRGAN x4plus) by default, or a
            preset name (``"realesrgan"``, ``"mild"``).
        resize_back: resize the LR back to the HR size with a random mode (OSEDiff's ``resize_bak=True``).

    Example:
        >>> degrade = RealESRGANDegradation("realesrgan")
        >>> lr, record = degrade(torch.rand(2, 3, 64, 64), 0)
        >>> lr.shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, params: DegradationParams | str | None = None, *, resize_back: bool = False) -> None:
        if isinstance(params, str):
            params = DegradationParams.preset(params)
        self.params = params if params is not None else DegradationParams()
        self.resize_back = resize_back

    def __call__(self, hr: torch.Tensor, generator: int | torch.Generator | None = None) -> DegradationOutput:
        """Degrade ``hr`` ``(b, 3, H, W)`` in [0, 1]; see ``DegradationOutput`` for the result."""
        _check_hr(hr, self.params.scale)
        g = make_generator(generator, hr.device)
        record = self.sample(hr.shape[0], g)
        return DegradationOutput(self.apply(hr, record, g), record)

    def _stage(self, stage: int, b: int, g: torch.Generator) -> StageRecord:
        p, s = self.params, "" if stage == 1 else "2"
        _, kernel = random_mixed_kernel(p.kernel_params(stage), g, b)
        blur = _rand(g, b) < (1.0 if stage == 1 else p.second_blur_prob)
        resize_type = RESIZE_TYPES[int(torch.multinomial(_probs(getattr(p, f"resize_prob{s}"), g), 1, generator=g))]
        low, high = getattr(p, f"resize_range{s}")
        u = float(_rand(g, 1))
        scales = {"up": max(low, 1.0) + (high - max(low, 1.0)) * u, "down": low + (min(high, 1.0) - low) * u}
        gaussian = _rand(g, b) < getattr(p, f"gaussian_noise_prob{s}")
        sigma = _uniform(g, b, getattr(p, f"noise_range{s}"))
        poisson = _uniform(g, b, getattr(p, f"poisson_scale_range{s}"))
        nan = torch.full((b,), math.nan, dtype=torch.float64)
        return StageRecord(
            kernel=kernel,
            blur=blur,
            resize_type=resize_type,
            resize_scale=scales.get(resize_type, 1.0),
            resize_mode=_choices(p.resize_modes, b, g),
            gaussian=gaussian,
            noise_sigma=torch.where(gaussian, sigma, nan),
            poisson_scale=torch.where(gaussian, nan, poisson),
            gray_noise=_rand(g, b) < getattr(p, f"gray_noise_prob{s}"),
            jpeg_quality=_quality(g, b, getattr(p, f"jpeg_range{s}")),
        )

    def sample(self, batch_size: int, generator: int | torch.Generator | None = None) -> DegradationRecord:
        """Draw every parameter of ``batch_size`` samples (kernels included) without touching pixels."""
        g, p, b = make_generator(generator), self.params, batch_size
        stage1, stage2 = self._stage(1, b, g), self._stage(2, b, g)
        _, final_kernel = random_mixed_kernel(p.kernel_params("final"), g, b)
        return DegradationRecord(
            stage1=stage1,
            stage2=stage2,
            final_kernel=final_kernel,
            final_jpeg_quality=_quality(g, b, p.jpeg_range2),
            sinc_first=_rand(g, b) < p.sinc_first_prob,
            final_resize_mode=_choices(p.resize_modes, b, g),
            resize_back_mode=_choices(p.resize_back_modes, b, g),
            gray=_rand(g, b) < p.gray_prob,
            no_degradation=_rand(g, b) < p.no_degradation_prob,
        )

    def _noise(self, x: torch.Tensor, st: StageRecord, g: torch.Generator) -> torch.Tensor:
        gaussian = st.gaussian.to(x.device)
        out = x.clone()
        if bool(gaussian.any()):
            sub = x[gaussian]
            out[gaussian] = (
                sub + gaussian_noise(sub, st.noise_sigma[st.gaussian], st.gray_noise[st.gaussian], g)
            ).clamp(0, 1)
        if bool((~gaussian).any()):
            sub, m = x[~gaussian], ~st.gaussian
            out[~gaussian] = (sub + poisson_noise(sub, st.poisson_scale[m], st.gray_noise[m], g)).clamp(0, 1)
        return out

    def apply(
        self, hr: torch.Tensor, record: DegradationRecord, generator: int | torch.Generator | None = None
    ) -> torch.Tensor:
        """Degrade ``hr`` ``(b, 3, H, W)`` with the parameters of ``record``; only noise fields draw from ``generator``.

        Returns:
            ``(b, 3, H // scale, W // scale)`` (``(b, 3, H, W)`` with ``resize_back``), multiples of 1/255 in [0, 1].
        """
        _check_hr(hr, self.params.scale)
        if record.batch_size != hr.shape[0]:
            raise ValueError(f"record holds {record.batch_size} samples, hr {hr.shape[0]}")
        g, p = make_generator(generator, hr.device), self.params
        b, _, big_h, big_w = hr.shape
        lr_h, lr_w = big_h // p.scale, big_w // p.scale
        s1, s2 = record.stage1, record.stage2
        # stage 1: blur -> resize -> noise -> JPEG
        out = filter2d(hr, s1.kernel.kernel)
        size = (max(1, math.floor(big_h * s1.resize_scale)), max(1, math.floor(big_w * s1.resize_scale)))
        out = self._noise(resize(out, size, s1.resize_mode), s1, g)
        out = jpeg_compress(out.clamp(0, 1), s1.jpeg_quality)
        # stage 2: blur (maybe) -> resize relative to H / scale -> noise
        blur = s2.blur.to(out.device)
        if bool(blur.any()):
            out[blur] = filter2d(out[blur], s2.kernel.kernel[s2.blur])
        size = (max(1, int(big_h / p.scale * s2.resize_scale)), max(1, int(big_w / p.scale * s2.resize_scale)))
        out = self._noise(resize(out, size, s2.resize_mode), s2, g)
        # final: [resize + sinc] and JPEG in a random order per sample
        final = out.new_empty(b, 3, lr_h, lr_w)
        for first in (True, False):
            idx = (record.sinc_first == first).nonzero().flatten()
            if len(idx) == 0:
                continue
            x, kernels, quality = (
                out[idx.to(out.device)],
                record.final_kernel.kernel[idx],
                record.final_jpeg_quality[idx],
            )
            modes = [record.final_resize_mode[i] for i in idx.tolist()]
            if first:
                x = jpeg_compress(filter2d(resize(x, (lr_h, lr_w), modes), kernels).clamp(0, 1), quality)
            else:
                x = filter2d(resize(jpeg_compress(x.clamp(0, 1), quality), (lr_h, lr_w), modes), kernels)
            final[idx.to(out.device)] = x
        out = final
        gray = record.gray.to(out.device)
        if bool(gray.any()):
            out = torch.where(gray.view(b, 1, 1, 1), rgb_to_gray(out).expand(-1, 3, -1, -1), out)
        if self.resize_back:
            out = resize(out, (big_h, big_w), record.resize_back_mode)
        clean = record.no_degradation.to(out.device)
        if bool(clean.any()):
            ref = (
                hr[clean]
                if self.resize_back
                else F.interpolate(hr[clean], size=(lr_h, lr_w), mode="bicubic", antialias=True)
            )
            out[clean] = ref
        return quantize(out)


def _check_hr(hr: torch.Tensor, scale: int) -> None:
    if hr.dim() != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(f"hr must be a float tensor (b, 3, H, W), got {hr.dtype} {tuple(hr.shape)}")
    if min(hr.shape[-2:]) < scale:
        raise ValueError(f"hr of size {tuple(hr.shape[-2:])} is smaller than the scale {scale}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rand(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64, device=g.device).cpu()


def _uniform(g: torch.Generator, n: int, bounds: Sequence[float]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * _rand(g, n)


def _probs(values: Sequence[float], g: torch.Generator) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=g.device)


def _choices(options: Sequence[str], n: int, g: torch.Generator) -> list[str]:
    idx = torch.randint(len(options), (n,), generator=g, device=g.device).tolist()
    return [options[i] for i in idx]


def _quality(g: torch.Generator, n: int, bounds: Sequence[int]) -> torch.Tensor:
    return torch.randint(int(bounds[0]), int(bounds[1]) + 1, (n,), generator=g, device=g.device).cpu()
