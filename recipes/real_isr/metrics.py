"""Offline image-quality metrics of the Real-ISR recipe: PSNR and SSIM on the Y channel, NIQE.

Conventions (BasicSR's ``calculate_psnr`` / ``calculate_ssim`` / ``calculate_niqe`` with ``test_y_channel=True``,
the numbers Real-ISR papers report through BasicSR or pyiqa):

- Inputs are ``(b, c, h, w)`` float tensors in ``[0, data_range]``, ``c`` = 3 (RGB) or 1 (already luminance,
  used as is). Images read from 8-bit files are on the ``1 / 255`` grid already; to score model outputs as
  BasicSR's validation does (``tensor2img`` rounds to uint8 first), quantise them first
  (``real_isr.degradations.quantize``). Values are never clamped here: out-of-range input is an error.
- Y is BT.601 "studio swing" luma as MATLAB's ``rgb2ycbcr`` computes it, ``(16 + 65.481 R + 128.553 G + 24.966
  B) / 255`` for R, G, B in [0, 1] (:func:`rgb_to_y`), so Y lies in ``[16, 235] / 255``. PSNR and SSIM use it
  unrounded (as BasicSR's ``to_y_channel``); NIQE rounds it to integers on the 0-255 scale (as BasicSR / MATLAB).
- ``crop_border`` pixels are removed on every side before scoring (usually the SR scale).
- PSNR: ``10 log10(1 / MSE)`` on the ``[0, 1]`` scale (= ``10 log10(255^2 / MSE)`` on 0-255), MSE over the
  channels and pixels of each image; identical images give ``+inf`` (BasicSR's numpy version; no epsilon).
- SSIM: Wang et al. 2004 as in BasicSR's ``_ssim`` and the reference MATLAB code: an ``11 x 11`` Gaussian window
  with ``sigma = 1.5`` (normalised), ``K1 = 0.01``, ``K2 = 0.03`` for a 0-255 dynamic range, population
  statistics, "valid" filtering (no padding) and the mean of the SSIM map; several channels are scored apart and
  averaged. This equals scikit-image's ``structural_similarity(a * 255, b * 255, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`` (which filters with reflection and then drops the
  5-pixel rim it affected), up to float rounding.
- NIQE: :mod:`real_isr.niqe` with the pristine model of the MATLAB release (``assets/niqe_pris_params.npz``);
  needs at least two whole ``96 x 96`` blocks after the crop (e.g. ``96 x 192``; ``192 x 192`` or larger is
  advisable for a stable covariance). Runs offline, on the CPU, per image. Luminance: BasicSR's Y by default,
  pyiqa's default full-range ``0.299 R + 0.587 G + 0.114 B`` with ``luma="yiq"`` (what OSEDiff reports). On
  textured photos it agrees with BasicSR 1.4.2 (ycbcr) and pyiqa 0.1.16 (yiq) to 1e-4; on photos with flat areas
  every implementation differs by up to a few 1e-3 (astronaut: ours 3.0646, BasicSR 3.0649) or more, see
  :data:`real_isr.niqe.FLAT_TOL`.

All functions return float64 tensors of shape ``(b,)`` on the input's device (NIQE computes on the CPU).

Axis legend: ``b`` batch, ``c`` channels (1 or 3), ``h``/``w`` image size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

try:  # imported as ``real_isr.metrics`` (tests; scripts with recipes/ on sys.path)
    from . import niqe as _niqe
except ImportError:  # imported flat from inside recipes/real_isr
    import niqe as _niqe  # type: ignore[no-redef]

Y_WEIGHTS = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr, BT.601, for R, G, B in [0, 1]; Y in [16, 235] / 255
Y_OFFSET = 16.0
YIQ_WEIGHTS = (0.299, 0.587, 0.114)  # full-range luma (YIQ / BT.601 "gray"), pyiqa's default for NIQE
LUMAS = ("ycbcr", "yiq")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


def _check_images(img: object, name: str, data_range: float) -> torch.Tensor:
    """Validate one ``(b, c, h, w)`` batch (c in {1, 3}, floating, finite, inside ``[0, data_range]``)."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if img.ndim != 4 or img.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (b, 3, h, w) or (b, 1, h, w), got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor in [0, {data_range}], got dtype {img.dtype}")
    if img.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(img.shape)}")
    if not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > data_range:
        raise ValueError(f"{name} must lie in [0, {data_range}] (clamp first), got values in [{lo:.6g}, {hi:.6g}]")
    return img


def _check_data_range(data_range: float) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)):
        raise TypeError(f"data_range must be a number, got {data_range!r}")
    if not data_range > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def _crop(img: torch.Tensor, crop_border: int, min_size: int, name: str) -> torch.Tensor:
    """Remove ``crop_border`` pixels on every side; the rest must be at least ``min_size`` on both axes."""
    if isinstance(crop_border, bool) or not isinstance(crop_border, int):
        raise TypeError(f"crop_border must be an int, got {crop_border!r}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    h, w = img.shape[-2:]
    if min(h, w) - 2 * crop_border < min_size:
        raise ValueError(
            f"{name} of size {h}x{w} with crop_border={crop_border} leaves "
            f"{h - 2 * crop_border}x{w - 2 * crop_border} pixels; this metric needs at least {min_size}x{min_size}"
        )
    if crop_border == 0:
        return img
    return img[..., crop_border:-crop_border, crop_border:-crop_border]


def _prepare_pair(
    pred: torch.Tensor, target: torch.Tensor, crop_border: int, test_y_channel: bool, data_range: float, min_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, scale to [0, 1] in float64, crop and (optionally) convert to Y: two ``(b, c', h', w')``."""
    data_range = _check_data_range(data_range)
    pred = _check_images(pred, "pred", data_range)
    target = _check_images(target, "target", data_range)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    out = []
    for img, name in ((pred, "pred"), (target, "target")):
        img = _crop(img.to(torch.float64) / data_range, crop_border, min_size, name)
        if test_y_channel and img.shape[1] == 3:
            img = rgb_to_y(img)
        out.append(img)
    return out[0], out[1]


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma Y of RGB images as MATLAB's ``rgb2ycbcr`` (and BasicSR's ``rgb2ycbcr_pt``) computes it.

    ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1], so black maps to 16/255 and
    white to 235/255. No rounding, no range check; the dtype is kept.

    Args:
        img: ``(b, 3, h, w)`` RGB in [0, 1].

    Returns:
        ``(b, 1, h, w)`` Y in ``[16, 235] / 255``.

    Raises:
        TypeError: for a non-tensor.
        ValueError: for a shape other than ``(b, 3, h, w)``.

    Example:
        >>> rgb_to_y(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)).item() * 255  # white
        235.0
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"rgb_to_y needs a torch.Tensor, got {type(img).__name__}")
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"rgb_to_y needs (b, 3, h, w) RGB images, got {tuple(img.shape)}")
    weights = torch.tensor(Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (Y_OFFSET + (img * weights).sum(dim=1, keepdim=True)) / 255.0


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    crop_border: int = 4,
    test_y_channel: bool = True,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: ``10 log10(1 / MSE)`` after scaling to [0, 1].

    Args:
        pred: ``(b, c, h, w)`` in ``[0, data_range]``, c = 3 (RGB) or 1.
        target: same shape.
        crop_border: pixels removed on every side first (the SR scale, by convention).
        test_y_channel: score the Y channel of :func:`rgb_to_y` (RGB inputs); otherwise all channels.
        data_range: the inputs' peak value (1.0 for [0, 1], 255.0 for 0-255).

    Returns:
        ``(b,)`` float64 PSNR; ``+inf`` where an image equals its target (after the crop).

    Raises:
        TypeError: for a non-tensor or non-floating input, a non-int ``crop_border``, a non-number ``data_range``.
        ValueError: for bad shapes, mismatched shapes, values outside ``[0, data_range]``, NaN, a crop that
            leaves nothing.
    """
    pred, target = _prepare_pair(pred, target, crop_border, test_y_channel, data_range, min_size=1)
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)  # 1 / 0 = inf -> +inf for identical images


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable "valid" correlation of ``(n, 1, h, w)`` with a 1-D kernel on both axes, ``(n, 1, h-k+1, w-k+1)``."""
    k = kernel.numel()
    out = F.conv2d(img, kernel.view(1, 1, k, 1))
    return F.conv2d(out, kernel.view(1, 1, 1, k))


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    crop_border: int = 4,
    test_y_channel: bool = True,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Structural similarity per image (BasicSR ``calculate_ssim`` / MATLAB ``ssim_index`` convention).

    Statistics on the 0-255 scale with an ``11 x 11`` Gaussian window (sigma 1.5), ``C1 = (0.01 * 255)^2``,
    ``C2 = (0.03 * 255)^2``, valid filtering, mean of the map; channels scored apart and averaged.

    Args:
        pred: ``(b, c, h, w)`` in ``[0, data_range]``, c = 3 (RGB) or 1.
        target: same shape.
        crop_border: pixels removed on every side first; at least ``11 x 11`` must remain.
        test_y_channel: score the Y channel of :func:`rgb_to_y` (RGB inputs); otherwise every channel.
        data_range: the inputs' peak value (1.0 for [0, 1], 255.0 for 0-255).

    Returns:
        ``(b,)`` float64 SSIM, 1 for identical images.

    Raises:
        TypeError: for a non-tensor or non-floating input, a non-int ``crop_border``, a non-number ``data_range``.
        ValueError: for bad or mismatched shapes, values outside ``[0, data_range]``, NaN, fewer than 11x11
            pixels after the crop.
    """
    pred, target = _prepare_pair(pred, target, crop_border, test_y_channel, data_range, min_size=SSIM_WINDOW)
    b, c, h, w = pred.shape
    x = pred.reshape(b * c, 1, h, w) * 255.0
    y = target.reshape(b * c, 1, h, w) * 255.0
    kernel = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)
    c1, c2 = (SSIM_K[0] * 255.0) ** 2, (SSIM_K[1] * 255.0) ** 2
    mu_x, mu_y = _filter_valid(x, kernel), _filter_valid(y, kernel)
    var_x = _filter_valid(x * x, kernel) - mu_x**2
    var_y = _filter_valid(y * y, kernel) - mu_y**2
    cov_xy = _filter_valid(x * y, kernel) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).view(b, c).mean(dim=1)


def _luma_255_rounded(img: torch.Tensor, luma: str) -> torch.Tensor:
    """Integer luminance on the 0-255 scale of ``(b, c, h, w)`` float64 images in [0, 1], ``(b, h, w)``.

    RGB on the 8-bit grid (every value within 1e-3 of ``k / 255``) is converted exactly in integers, rounding
    halves up as MATLAB's ``round`` (``ycbcr``: ``Y * 255 = 16 + (65481 R + 128553 G + 24966 B) / 255000``;
    ``yiq``: ``(299 R + 587 G + 114 B) / 1000``, R, G, B integers); otherwise, and for one channel, the float
    value is rounded (halves to even). The exact path keeps the result independent of the input's float dtype:
    NIQE moves by about 1e-3 when 3 of astronaut's 262,144 pixels (its exact .5 ties) round the other way.
    """
    scaled = img * 255.0
    grid = scaled.round()
    offset, weights = (16, Y_WEIGHTS) if luma == "ycbcr" else (0, YIQ_WEIGHTS)
    if img.shape[1] == 3 and bool(((scaled - grid).abs() <= 1e-3).all()):
        denominator = 255_000 if luma == "ycbcr" else 1000
        ints = torch.tensor([round(v * 1000) for v in weights], dtype=torch.int64).view(1, 3, 1, 1)
        num = (grid.to(torch.int64) * ints).sum(dim=1)  # luma = offset + num / denominator
        return (offset + torch.div(num + denominator // 2, denominator, rounding_mode="floor")).to(torch.float64)
    if img.shape[1] == 1:
        return scaled[:, 0].round()
    if luma == "ycbcr":
        return (rgb_to_y(img)[:, 0] * 255.0).round()
    return (torch.tensor(weights, dtype=img.dtype).view(1, 3, 1, 1) * scaled).sum(dim=1).round()


def niqe(
    img: torch.Tensor,
    crop_border: int = 0,
    data_range: float = 1.0,
    params: str | Path | None = None,
    luma: str = "ycbcr",
) -> torch.Tensor:
    """Natural Image Quality Evaluator per image (lower is better), offline.

    The luminance (a 1-channel input is used as is) is brought to 0-255 and rounded, cropped, and scored by
    :func:`real_isr.niqe.niqe_score` with the MATLAB release's pristine model.

    Args:
        img: ``(b, c, h, w)`` in ``[0, data_range]``, c = 3 (RGB) or 1.
        crop_border: pixels removed on every side first.
        data_range: the inputs' peak value.
        params: an ``.npz`` pristine model in BasicSR's layout (default: the bundled
            ``assets/niqe_pris_params.npz``).
        luma: ``"ycbcr"`` for the Y of :func:`rgb_to_y` (BasicSR ``calculate_niqe``, MATLAB ``rgb2ycbcr``) or
            ``"yiq"`` for ``0.299 R + 0.587 G + 0.114 B`` (full range), the default of pyiqa's ``niqe`` metric,
            which OSEDiff's ``test_metrics.py`` and many Real-ISR papers use; the two differ by about 0.05.

    Returns:
        ``(b,)`` float64 NIQE on ``img``'s device; NaN for an image without two blocks of finite features
        (for example a constant image).

    Raises:
        TypeError: for a non-tensor or non-floating input, a non-int ``crop_border``, a non-number ``data_range``.
        ValueError: for bad shapes, values outside ``[0, data_range]``, NaN, fewer than two whole ``96 x 96``
            blocks after the crop (the minimum is ``96 x 192`` or ``192 x 96``), or an unknown ``luma``.
        FileNotFoundError: when ``params`` does not exist.
    """
    if luma not in LUMAS:
        raise ValueError(f"luma must be one of {LUMAS}, got {luma!r}")
    data_range = _check_data_range(data_range)
    img = _check_images(img, "img", data_range)
    device = img.device
    img = _crop(img.detach().to("cpu", torch.float64) / data_range, crop_border, 1, "img")
    h, w = img.shape[-2:]
    if (h // _niqe.BLOCK) * (w // _niqe.BLOCK) < _niqe.MIN_BLOCKS:
        raise ValueError(
            f"NIQE needs at least {_niqe.MIN_BLOCKS} whole {_niqe.BLOCK}x{_niqe.BLOCK} blocks after the crop "
            f"(at least {_niqe.BLOCK}x{2 * _niqe.BLOCK}); img of size {h + 2 * crop_border}x{w + 2 * crop_border} "
            f"with crop_border={crop_border} leaves {h}x{w}"
        )
    model = _niqe.load_params() if params is None else _niqe.load_params(Path(params))
    ys = _luma_255_rounded(img, luma).numpy()  # (b, h, w)
    return torch.tensor([_niqe.niqe_score(y, model) for y in ys], dtype=torch.float64, device=device)
