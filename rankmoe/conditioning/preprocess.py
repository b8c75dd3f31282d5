"""Images in ``[0, 1]`` to a CLIP model's pixel input, in torch: resize, center crop (or pad), normalise.

The usual CLIP evaluation transform (open_clip's ``preprocess``, transformers' ``CLIPImageProcessor``), done on
batched tensors on the images' device instead of per image through PIL.

Axis legend: ``b`` images, ``h`` / ``w`` height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's preprocessing (most open_clip and transformers CLIP models use it)."""
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of OpenAI CLIP's preprocessing."""


@dataclass(frozen=True)
class ImageSettings:
    """How images become the model's pixel input.

    Attributes:
        size: ``(h, w)`` of the model input.
        mean: Per-channel mean subtracted after resizing.
        std: Per-channel standard deviation divided by.
        resize_mode: ``"shortest"`` (scale so that the image covers ``size``, then center-crop; CLIP's default),
            ``"longest"`` (scale so that it fits inside ``size``, then center-pad with ``fill``) or ``"squash"``
            (resize to ``size``, ignoring the aspect ratio).
        shortest_edge: For ``"shortest"``: the short side's length after resizing (transformers'
            ``size={"shortest_edge": ...}``); ``None`` scales so that ``size`` is just covered.
        interpolation: ``"bicubic"`` (CLIP's) or ``"bilinear"``; antialiased when shrinking.
        fill: Pixel value of the padding in ``"longest"`` mode, in ``[0, 1]``.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    shortest_edge: int | None = None
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    fill: float = 0.0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"ImageSettings.size must be (h, w) with positive sides, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={self.mean}, std={self.std}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode={self.resize_mode!r} is unknown; use 'shortest', 'longest' or 'squash'")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation={self.interpolation!r} is unknown; use 'bicubic' or 'bilinear'")

    @classmethod
    def from_image_processor(cls, processor: Any, image_size: int | tuple[int, int] = 224) -> ImageSettings:
        """Read size, crop, mean, std and resampling of a transformers image processor (``CLIPImageProcessor``).

        Args:
            processor: The processor, or ``None`` for OpenAI CLIP's transform at ``image_size``.
            image_size: Fallback input size (the vision config's ``image_size``).
        """
        square = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if processor is None:
            return cls(size=square)

        def read(container: Any, key: str) -> Any:
            if container is None:
                return None
            if isinstance(container, dict):
                return container.get(key)
            return getattr(container, key, None)

        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        edge = read(size, "shortest_edge")
        resized = (read(size, "height"), read(size, "width"))
        if getattr(processor, "do_center_crop", True) and read(crop, "height") and read(crop, "width"):
            target = (int(read(crop, "height")), int(read(crop, "width")))
        elif None not in resized:
            target = (int(resized[0]), int(resized[1]))
        else:
            target = (int(edge), int(edge)) if edge else square
        resample = getattr(processor, "resample", 3)
        bilinear = "BILINEAR" in str(resample).upper() or (isinstance(resample, int) and resample == 2)
        return cls(
            size=target,
            mean=tuple(float(v) for v in getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN),
            std=tuple(float(v) for v in getattr(processor, "image_std", None) or OPENAI_CLIP_STD),
            resize_mode="shortest" if edge else "squash",
            shortest_edge=int(edge) if edge else None,
            interpolation="bilinear" if bilinear else "bicubic",
        )


def preprocess_images(images: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    """Resize, crop or pad and normalise ``(b, 3, h, w)`` images in ``[0, 1]`` to ``(b, 3, *settings.size)``.

    Float32, on the images' device, batched. Output sizes, crops and pads follow open_clip's and transformers'
    transforms; on float tensors the result equals open_clip's ``preprocess`` and ``CLIPImageProcessor`` for CLIP's
    square shortest-side transform (open_clip's PIL-only modes agree to one 8-bit level). Resampling is
    antialiased; bicubic overshoot is clamped to ``[0, 1]`` before normalising, as in an 8-bit PIL pipeline; images
    already of the resized size are not resampled.

    Example:
        >>> preprocess_images(torch.full((2, 3, 40, 60), 0.5), ImageSettings(size=(32, 32))).shape
        torch.Size([2, 3, 32, 32])
    """
    x = images.float()
    (h, w), (th, tw) = x.shape[-2:], settings.size
    if settings.resize_mode == "squash":
        new = (th, tw)
    elif settings.resize_mode == "longest":
        scale = min(th / h, tw / w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
    elif settings.shortest_edge is None and th != tw:  # open_clip's ResizeKeepRatio for non-square inputs
        ratio = min(h / th, w / tw)
        new = (max(round(h / ratio), 1), max(round(w / ratio), 1))
    else:  # torchvision's Resize(int) / transformers' shortest_edge: the long side truncates
        edge = settings.shortest_edge if settings.shortest_edge is not None else th
        scale = edge / min(h, w)
        new = (edge, max(int(w * scale), 1)) if h <= w else (max(int(h * scale), 1), edge)
    if new != (h, w):
        x = F.interpolate(x, size=new, mode=settings.interpolation, align_corners=False, antialias=True).clamp(0, 1)
    if x.shape[-2] < th or x.shape[-1] < tw:  # "longest" mode (or an edge shorter than the crop): center-pad
        pad_h, pad_w = max(th - x.shape[-2], 0), max(tw - x.shape[-1], 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=settings.fill)
    top, left = int(round((x.shape[-2] - th) / 2.0)), int(round((x.shape[-1] - tw) / 2.0))
    x = x[..., top : top + th, left : left + tw]
    mean = torch.tensor(settings.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageSettings", "preprocess_images"]
