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

Module layout: the pixel operations live in ``pixel_ops.py``, ``DegradationParams`` in ``degradation_params.py``;
this module holds the records and the pipeline, and re-exports the names of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

try:  # imported as ``real_isr.degradations`` (tests; scripts with recipes/ on sys.path)
    from .degradation_params import PRESET_DIR, DegradationParams  # noqa: F401  (PRESET_DIR re-exported)
    from .kernels import KernelRecord, filter2d, random_mixed_kernel
    from .pixel_ops import (
        RESIZE_MODES,  # noqa: F401  (re-exported)
        gaussian_noise,
        jpeg_compress,
        poisson_noise,
        quantize,
        resize,
        rgb_to_gray,
    )
except ImportError:  # imported flat from inside recipes/real_isr
    from degradation_params import PRESET_DIR, DegradationParams  # type: ignore[no-redef]  # noqa: F401
    from kernels import KernelRecord, filter2d, random_mixed_kernel  # type: ignore[no-redef]
    from pixel_ops import (  # type: ignore[no-redef]
        RESIZE_MODES,  # noqa: F401
        gaussian_noise,
        jpeg_compress,
        poisson_noise,
        quantize,
        resize,
        rgb_to_gray,
    )

RESIZE_TYPES = ("up", "down", "keep")


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
