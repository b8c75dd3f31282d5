"""Inference helpers of the one-step SR generator: latent tiling, colour fix and a small driver.

``shared/notes/real-isr.md`` §1.7 (OSEDiff ``test_osediff.py``):

```
lr (b, 3, h, w) in [0, 1] -> bicubic x scale -> pad (reflect) to a multiple of the VAE factor   (b, 3, H', W')
z   = model.encode(up)                                                                          (b, 4, H'/8, W'/8)
eps = UNet on overlapping latent tiles (tile 96, overlap 32), blended with Gaussian weights / summed weights
z0  = model.x0_from_prediction(z, eps);  sr = model.decode(z0)
sr  = crop back to (h * scale, w * scale), then colour fix against the upsampled LR (AdaIN | wavelet | none)
```

Decisions (documented here):

- **What is blended.** The UNet output (epsilon / v / x0 as the scheduler predicts), as OSEDiff does; ``x0`` is then
  computed once on the whole latent. Because ``x0`` is affine in the prediction per position and the blend weights
  sum to one, blending ``x0`` instead would give the same result up to rounding.
- **One tile.** When the latent fits in one tile (both sides ``<= tile``) the UNet runs once on the whole latent:
  bit-identical to the untiled path (``OneStepSR.forward``). A side shorter than ``tile`` uses a tile of that side's
  length.
- **Padding instead of cropping.** OSEDiff crops the upsampled LR to a multiple of 8 (losing up to 7 rows / columns).
  Here the upsampled image is padded on the bottom / right with ``reflect`` (``replicate`` when the image is too
  small to reflect) and the output is cropped back, so the output is exactly ``(h * scale, w * scale)``.
- **Colour fix after the crop.** The padded border would bias AdaIN's statistics, so the decoded image is cropped
  first and then fixed against the (unpadded) upsampled LR.
- **Upsampling.** ``torch.nn.functional.interpolate(..., mode="bicubic")`` (cubic coefficient -0.75) clamped to
  ``[0, 1]``; PIL's bicubic (-0.5) differs by a few 1e-3. OSEDiff's "enlarge when the LR's shorter side < 128"
  (``process_size``) changes the output size and is left to the caller (``infer.py``).
- **Conditions on tiles.** A RankMoE condition is per image. The ``n`` tiles of each image of a chunk are stacked
  image-major (``b * n`` samples) and the UNet runs inside ``rankmoe.condition(unet, cond, repeat="interleave")``,
  so every tile routes with its own image's row.
- **Tiled VAE.** ``vae_tiling=True`` switches on diffusers' ``vae.enable_tiling()`` for the call (tile =
  ``vae.config.sample_size`` pixels, overlap 0.25, linear blend). It does *not* synchronise GroupNorm statistics
  across tiles (unlike OSEDiff's ``VAEHook``), so faint seams can appear; use it only when the whole-image VAE does
  not fit in memory.

Axis legend: ``b`` batch, ``h``/``w`` LR size, ``H``/``W`` image size, ``c`` channels, ``n`` tiles, ``t`` tile side,
``hl``/``wl`` latent size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import rankmoe
from rankmoe.conditioning.base import DegradationScores

__all__ = [
    "COLOR_FIXES",
    "adain_color_fix",
    "apply_color_fix",
    "gaussian_weights",
    "super_resolve",
    "tile_positions",
    "tiled_unet_x0",
    "vae_factor",
    "wavelet_color_fix",
]

COLOR_FIXES = ("adain", "wavelet", None)
"""Values of ``color_fix`` (OSEDiff's ``--align_method adain | wavelet | nofix``)."""


# ------------------------------------------------------------------------------------------------ tile geometry


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def gaussian_weights(
    tile: int | tuple[int, int], sigma_frac: float = 0.1, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian blending mask of one tile (OSEDiff's ``_gaussian_weights``: variance 0.01 of the tile size).

    ``w[i, j] = exp(-((i - (t_h - 1) / 2) / t_h)^2 / (2 s^2)) * exp(-((j - (t_w - 1) / 2) / t_w)^2 / (2 s^2))``
    with ``s = sigma_frac`` (the normalisation constant is dropped: blends divide by the summed weights). Every
    entry is positive (about 3.7e-6 at the edge for ``s = 0.1``), so overlapping tiles always have weight.

    Args:
        tile: Tile side ``t`` (square) or ``(t_h, t_w)``.
        sigma_frac: Standard deviation as a fraction of the tile side (0.1 = OSEDiff's variance 0.01).
        device: Device of the result.
        dtype: Dtype of the result.

    Returns:
        ``(t_h, t_w)`` weights in ``(0, 1]``, peak 1 at the centre (for odd sides).

    Raises:
        ValueError: For a non-positive tile side or ``sigma_frac``.
    """
    height, width = _pair(tile, "tile")
    if not (isinstance(sigma_frac, (int, float)) and sigma_frac > 0 and math.isfinite(sigma_frac)):
        raise ValueError(f"sigma_frac must be a positive number, got {sigma_frac!r}")

    def profile(size: int) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64)
        return torch.exp(-(((x - (size - 1) / 2) / size) ** 2) / (2 * sigma_frac**2))

    return torch.outer(profile(height), profile(width)).to(device=device, dtype=dtype)


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, size)``; the last tile is flush with the edge.

    Starts step by ``tile - overlap``; the last start is ``size - tile`` (so the last overlap may be larger). When
    ``size <= tile`` there is one tile at 0 (of length ``size``: the caller uses ``min(tile, size)``).

    Args:
        size: Length to cover (latent height or width).
        tile: Tile length.
        overlap: Overlap of neighbouring tiles, ``0 <= overlap < tile``.

    Returns:
        Sorted distinct starts ``p`` with ``0 = p_0 < ... < p_last = max(size - tile, 0)``.

    Raises:
        ValueError: For ``size < 1``, ``tile < 1`` or an overlap outside ``[0, tile)``.

    Example:
        >>> tile_positions(200, 96, 32)
        [0, 64, 104]
    """
    for name, value in (("size", size), ("tile", tile)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an int in [0, tile) = [0, {tile}), got {overlap!r}")
    if size <= tile:
        return [0]
    last = size - tile
    starts = list(range(0, last, tile - overlap))
    return starts + [last]


def vae_factor(model: nn.Module) -> int:
    """Down-sampling factor of the model's VAE: ``2 ** (len(block_out_channels) - 1)`` (8 for SD and the tiny VAE)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------------ tiled UNet


def _needs_condition(module: nn.Module) -> bool:
    return any(
        getattr(router, "requires_condition", False)
        for _, layer in rankmoe.rankmoe_layers(module)
        for router in layer.rankmoe_router.values()
    )


def _has_rankmoe(module: nn.Module) -> bool:
    return any(True for _ in rankmoe.rankmoe_layers(module))


def _routed(module: nn.Module, model: nn.Module) -> bool:
    return any(m is module for m in model.routed_models())


@contextlib.contextmanager
def _maybe_condition(
    module: nn.Module,
    model: nn.Module,
    condition: DegradationScores | torch.Tensor | None,
    severity: torch.Tensor | None,
    repeat: str | None = None,
) -> Iterator[None]:
    """Route ``module`` with ``condition`` when it carries a RankMoE adapter of ``model``; else do nothing."""
    if (condition is not None or severity is not None) and _routed(module, model):
        with rankmoe.condition(module, condition, severity, repeat=repeat):
            yield
    else:
        yield


def _check_condition(model: nn.Module, condition: Any, severity: Any) -> None:
    routed = model.routed_models()
    if condition is None and severity is None:
        needing = [type(m).__name__ for m in routed if _needs_condition(m)]
        if needing:
            raise ValueError(
                f"the RankMoE adapter of {' and '.join(needing)} routes on a condition but none was given; pass "
                "condition=DegradationScores (estimator(lr)) or a (b, condition_dim) tensor"
            )
    elif not routed:
        raise ValueError("a condition was given but the model has no RankMoE adapter to route with it")


def tiled_unet_x0(
    model: nn.Module,
    z: torch.Tensor,
    text_emb: torch.Tensor,
    condition: DegradationScores | torch.Tensor | None = None,
    severity: torch.Tensor | None = None,
    *,
    tile: int = 96,
    overlap: int = 32,
    sigma_frac: float = 0.1,
    tile_batch_size: int = 4,
) -> torch.Tensor:
    """The clean latent ``x0`` from the UNet run on overlapping latent tiles (OSEDiff's latent tiling).

    Each tile's UNet output is weighted by :func:`gaussian_weights`, summed into the full latent and divided by the
    summed weights; ``x0 = model.x0_from_prediction(z, blended)``. With both latent sides ``<= tile`` the UNet runs
    once on the whole latent (identical to the untiled path).

    Args:
        model: A :class:`real_isr.model.OneStepSR` (reads ``unet``, ``timestep``, ``x0_from_prediction``,
            ``routed_models``).
        z: ``(b, 4, hl, wl)`` scaled latents (``model.encode``).
        text_emb: ``(b, n, d)`` or ``(1, n, d)`` text embeddings (``model.prompts(up)``).
        condition: Per-image routing condition: a ``DegradationScores`` or a ``(b, c)`` tensor; every tile of image
            ``i`` routes with row ``i``. Required when the UNet adapter routes on a condition.
        severity: ``(b,)`` severities (override the ``DegradationScores``').
        tile: Latent tile side (96 = 768 px for SD).
        overlap: Overlap of neighbouring tiles in latent pixels, ``0 <= overlap < tile``.
        sigma_frac: Gaussian mask width (see :func:`gaussian_weights`).
        tile_batch_size: Tile positions per UNet call (each call runs ``b * n`` tiles, ``n <= tile_batch_size``).

    Returns:
        ``(b, 4, hl, wl)`` x0 latents (dtype of ``z``).

    Raises:
        ValueError: For wrong shapes, tile settings, or a missing / superfluous condition.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(
            f"z must be a (b, c, h, w) latent tensor, got {type(z).__name__} {tuple(getattr(z, 'shape', ()))}"
        )
    batch = z.shape[0]
    if not isinstance(text_emb, torch.Tensor) or text_emb.dim() != 3 or text_emb.shape[0] not in (1, batch):
        raise ValueError(
            f"text_emb must be a (b, n, d) or (1, n, d) tensor with b = {batch}, got "
            f"{type(text_emb).__name__} {tuple(getattr(text_emb, 'shape', ()))}"
        )
    if isinstance(tile_batch_size, bool) or not isinstance(tile_batch_size, int) or tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be a positive int, got {tile_batch_size!r}")
    _check_condition(model, condition, severity)
    height, width = z.shape[-2:]
    rows, cols = tile_positions(height, tile, overlap), tile_positions(width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    unet = model.unet
    text_emb = text_emb.to(unet.dtype).expand(batch, -1, -1)

    def run(latents: torch.Tensor, text: torch.Tensor, repeat: str | None) -> torch.Tensor:
        t = torch.full((latents.shape[0],), model.timestep, device=latents.device, dtype=torch.long)
        with _maybe_condition(unet, model, condition, severity, repeat):
            return unet(latents.to(unet.dtype), t, encoder_hidden_states=text).sample

    if len(rows) == 1 and len(cols) == 1:
        return model.x0_from_prediction(z, run(z, text_emb, None))

    weights = gaussian_weights((th, tw), sigma_frac, device=z.device)  # (th, tw), float32
    blended = torch.zeros(batch, unet.config.out_channels, height, width, device=z.device, dtype=torch.float32)
    total = torch.zeros(height, width, device=z.device, dtype=torch.float32)
    boxes = [(r, c) for r in rows for c in cols]
    for start in range(0, len(boxes), tile_batch_size):
        chunk = boxes[start : start + tile_batch_size]
        n = len(chunk)
        tiles = torch.stack([z[:, :, r : r + th, c : c + tw] for r, c in chunk], dim=1)  # (b, n, 4, th, tw)
        text = text_emb.repeat_interleave(n, dim=0)  # image-major, as the tiles
        out = run(tiles.flatten(0, 1), text, "interleave").float().unflatten(0, (batch, n))
        for k, (r, c) in enumerate(chunk):
            blended[:, :, r : r + th, c : c + tw] += out[:, k] * weights
            total[r : r + th, c : c + tw] += weights
    prediction = (blended / total).to(z.dtype)
    return model.x0_from_prediction(z, prediction)


# ------------------------------------------------------------------------------------------------ colour fix


def _check_image(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a floating (b, c, H, W) tensor, got {type(value).__name__} "
            f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}"
        )
    return value


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN colour fix: match each channel's mean and standard deviation of ``output`` to ``reference``'s.

    ``(output - mean_o) / sqrt(var_o + eps) * sqrt(var_r + eps) + mean_r`` per image and channel, over the spatial
    axes (unbiased variance, as sd-webui-stablesr's ``adaptive_instance_normalization``). No clamping.

    Args:
        output: ``(b, c, H, W)`` image to correct.
        reference: ``(b, c, H2, W2)`` colour reference (the upsampled LR); its size may differ.

    Returns:
        ``(b, c, H, W)`` corrected image.

    Raises:
        ValueError: For non-4-D tensors or mismatched batch / channel counts.
    """
    _check_image(output, "output")
    _check_image(reference, "reference")
    if output.shape[:2] != reference.shape[:2]:
        raise ValueError(
            f"output {tuple(output.shape)} and reference {tuple(reference.shape)} must have the same batch and channels"
        )

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.float().flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    mean_o, std_o = stats(output)
    mean_r, std_r = stats(reference)
    return ((output.float() - mean_o) / std_o * std_r + mean_r).to(output.dtype)


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 ``[1, 2, 1] x [1, 2, 1] / 16`` blur with dilation ``radius`` and replicate padding, per channel."""
    channels = image.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device, dtype=image.dtype)
    kernel = (torch.outer(kernel, kernel) / 16).expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous decomposition: ``(high, low)`` with ``image = high + low`` (up to rounding).

    Level ``i`` blurs the previous low-pass with dilation ``2 ** i``; ``high`` sums the detail layers.

    Args:
        image: ``(b, c, H, W)`` floating image.
        levels: Number of levels (5 in OSEDiff / StableSR).

    Returns:
        ``high`` and ``low``, both ``(b, c, H, W)``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive int, got {levels!r}")
    high = torch.zeros_like(image)
    low = image
    for i in range(levels):
        blurred = _wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Wavelet colour fix: ``output``'s high frequencies plus ``reference``'s low frequencies.

    Both are decomposed by :func:`wavelet_decomposition` (à-trous, 3x3 ``[1, 2, 1] x [1, 2, 1] / 16`` kernel,
    dilation ``2 ** i``, replicate padding, ``levels`` levels). No clamping.

    Args:
        output: ``(b, c, H, W)`` image to correct.
        reference: ``(b, c, H, W)`` colour reference (the upsampled LR), same shape.
        levels: Number of decomposition levels.

    Returns:
        ``(b, c, H, W)`` corrected image.

    Raises:
        ValueError: For non-4-D tensors or different shapes.
    """
    _check_image(output, "output")
    _check_image(reference, "reference")
    if output.shape != reference.shape:
        raise ValueError(
            f"output {tuple(output.shape)} and reference {tuple(reference.shape)} must have the same shape"
        )
    high, _ = wavelet_decomposition(output.float(), levels)
    _, low = wavelet_decomposition(reference.float(), levels)
    return (high + low).to(output.dtype)


def apply_color_fix(output: torch.Tensor, reference: torch.Tensor, method: str | None) -> torch.Tensor:
    """Dispatch on ``method`` (``"adain"``, ``"wavelet"`` or ``None`` = unchanged); ``ValueError`` otherwise."""
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    if method is None:
        return output
    raise ValueError(f"color_fix must be one of {list(COLOR_FIXES)}, got {method!r}")


# ------------------------------------------------------------------------------------------------ driver


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom / right to a multiple (``reflect``; ``replicate`` when a side is too short to reflect)."""
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


@contextlib.contextmanager
def _vae_tiling(vae: nn.Module, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    try:
        yield
    finally:
        if not previous:
            vae.disable_tiling()


@torch.no_grad()
def super_resolve(
    model: nn.Module,
    lr_image: torch.Tensor,
    scale: int = 4,
    condition: DegradationScores | torch.Tensor | None = None,
    severity: torch.Tensor | None = None,
    *,
    tile: int = 96,
    overlap: int = 32,
    tile_batch_size: int = 4,
    color_fix: str | None = "adain",
    vae_tiling: bool = False,
    prompts: list[str] | None = None,
) -> torch.Tensor:
    """Super-resolve LR images end to end (upsample, pad, encode, tiled UNet, decode, crop, colour fix).

    Call it with the model in ``eval()`` mode for deterministic output (the posterior mode is used then).

    Args:
        model: A :class:`real_isr.model.OneStepSR`.
        lr_image: ``(b, 3, h, w)`` LR images in ``[0, 1]`` (usually ``b = 1``).
        scale: Integer upscaling factor (bicubic).
        condition: Per-image routing condition (``DegradationScores`` or ``(b, c)``), e.g. the estimator run on
            ``lr_image``; routes the UNet tiles and, when routed, the VAE encoder.
        severity: ``(b,)`` severities (override the ``DegradationScores``').
        tile: Latent tile side (see :func:`tiled_unet_x0`).
        overlap: Latent tile overlap.
        tile_batch_size: Tile positions per UNet call.
        color_fix: ``"adain"`` (default, OSEDiff), ``"wavelet"`` or ``None``.
        vae_tiling: Use diffusers' ``vae.enable_tiling()`` for this call (memory; may leave faint seams, see the
            module docstring).
        prompts: ``b`` prompts overriding the model's prompt source.

    Returns:
        ``(b, 3, h * scale, w * scale)`` SR images in ``[0, 1]``, float32.

    Raises:
        ValueError: For a wrong image shape, scale, colour-fix name or condition.
    """
    if not isinstance(lr_image, torch.Tensor) or lr_image.dim() != 4 or lr_image.shape[1] != 3:
        raise ValueError(
            f"lr_image must be a (b, 3, h, w) tensor, got {type(lr_image).__name__} "
            f"{tuple(getattr(lr_image, 'shape', ()))}"
        )
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {list(COLOR_FIXES)}, got {color_fix!r}")
    _check_condition(model, condition, severity)
    height, width = lr_image.shape[-2] * scale, lr_image.shape[-1] * scale
    device = next(model.unet.parameters()).device
    lr = lr_image.to(device=device, dtype=torch.float32)
    up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False) if scale > 1 else lr
    up = up.clamp(0, 1)
    padded = _pad_to_multiple(up, vae_factor(model))
    with _vae_tiling(model.vae, vae_tiling):
        with _maybe_condition(model.vae, model, condition, severity):
            z = model.encode(padded)
        text = model.prompts(padded, prompts)
        x0 = tiled_unet_x0(
            model, z, text, condition, severity, tile=tile, overlap=overlap, tile_batch_size=tile_batch_size
        )
        sr = model.decode(x0.to(model.vae.dtype)).float()
    sr = sr[..., :height, :width]
    return apply_color_fix(sr, up, color_fix).clamp(0, 1)
