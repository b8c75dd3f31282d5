"""Pixel operations of the Real-ESRGAN degradation: quantise, grey, resize, noise fields and JPEG on tensors.

Pure functions on ``(b, c, h, w)`` float tensors in [0, 1]; every random draw comes from an explicit
``torch.Generator``. ``degradations.RealESRGANDegradation`` chains them (see its module docstring for the order
and the deviations from BasicSR). JPEG uses PIL's libjpeg codec (in memory, per sample, on the CPU, 4:2:0 chroma
subsampling, integer quality) instead of BasicSR's ``DiffJPEG``.

Axis legend: ``b`` batch, ``c`` channels, ``h``/``w`` image size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("area", "bilinear", "bicubic")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights, as BasicSR uses


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
