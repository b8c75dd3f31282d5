"""Weight-free image-degradation measures: pure, batched torch functions behind the weight-free estimator.

Every public function takes a batch of RGB images ``(b, 3, h, w)`` with values in ``[0, 1]`` (any floating dtype,
any device) and returns one raw measure per image ``(b,)`` in ``float32`` on the images' device. Nothing is
learned and nothing is downloaded: each measure is a classical signal-processing estimate, computed in
``float32`` on the 8-bit-scaled luminance ``Y = 255 * (0.299 R + 0.587 G + 0.114 B)`` (BT.601), except
:func:`noise_level`, which averages the three colour channels (colour noise partly cancels in ``Y``).

Axis legend: ``b`` images, ``h`` / ``w`` height and width in pixels, ``n`` tiles, ``K`` frequency bands.

The measures (values on five clean scikit-image photographs, 256 x 256 crops, in brackets):

- :func:`edge_blur`: Gaussian-equivalent width (px, signed) of the sharpest strong edges [-0.7 to 0.9]; rises
  with blur wider than about 1 px.
- :func:`noise_level`: noise sigma in flat blocks, 8-bit levels [0.3 to 1.8, texture]; rises with additive noise.
- :func:`blockiness`: log ratio of the steps across 8x8 block borders to mid-block steps [0.04 to 0.2]; rises with
  JPEG compression.
- :func:`high_frequency_loss`: spectral power (nats) missing at periods of 2-7 px, relative to the image's own
  low-frequency power law [-1.9 to 0.6]; rises with down-and-up scaling and with blur.
- :func:`resolution_loss`: :func:`high_frequency_loss` minus the part that heavy blur explains [as above]; rises
  with down-and-up scaling.

Images must be at least :data:`MIN_SIZE` pixels high and wide (one spectral tile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rankmoe.conditioning.base import check_images

MIN_SIZE = 128
"""Smallest supported height and width: one ``128 x 128`` tile of :func:`high_frequency_loss`."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""BT.601 luma weights of R, G, B."""

# ---------------------------------------------------------------------------------------------- edge blur
EDGE_SIGMAS = (1.5, 3.0)
"""Probe scales ``(sigma_a, sigma_b)`` (px) of the two Gaussian-derivative gradients of :func:`edge_blur`."""
EDGE_FRACTION = 0.005
"""Share of the (interior) pixels kept as the strongest edge points: 0.5 %, at least 16 points."""
EDGE_QUANTILE = 0.75
"""Quantile of the gradient ratio over the kept edge points (0.75: the sharper edges decide)."""

# ---------------------------------------------------------------------------------------------- noise
NOISE_BLOCK = 16
"""Side (px) of the blocks whose mean Immerkaer response is ranked in :func:`noise_level`."""
NOISE_QUANTILE = 0.2
"""Quantile of the block means used as the noise level (the flattest 20 % of blocks)."""

# ---------------------------------------------------------------------------------------------- JPEG
BLOCK_PERIOD = 8
"""JPEG block size (px)."""
BLOCK_EPS = 0.5
"""Added to both mean steps of :func:`blockiness` (8-bit levels), so flat images give a ratio of 1."""

# ---------------------------------------------------------------------------------------------- spectrum
TILE = 128
"""Side (px) of the Hann-windowed tiles of :func:`high_frequency_loss` (Welch's method, half-tile stride)."""
BAND_EDGES = (
    0.018, 0.024, 0.031, 0.039, 0.048, 0.058, 0.07, 0.085, 0.1, 0.12, 0.145, 0.175, 0.21, 0.25, 0.3, 0.35, 0.4,
    0.45, 0.5001,
)  # fmt: skip
"""Radial frequency band edges in cycles per pixel (Nyquist = 0.5); the spectrum is averaged per band."""
POWER_LAW_MAX = 0.085
"""Bands whose centre frequency is at most this (cycles/px) fit the power law ``a + c log(nu)``."""
TOP_MIN = 0.145
"""Bands whose centre frequency is at least this (cycles/px, the top octave) measure the loss."""

# ---------------------------------------------------------------------------------------------- resolution
BLUR_EXPLAINS_FROM = 3.5
"""``tau`` (px^2): edge blur variances above this explain away high-frequency loss in :func:`resolution_loss`."""
BLUR_EXPLAINS_SLOPE = 2.0
"""``kappa`` (nats per px^2): how much high-frequency loss one px^2 of edge-blur variance above ``tau`` explains."""


def check_size(images: torch.Tensor, name: str = "images") -> None:
    """Require images of at least :data:`MIN_SIZE` pixels on both sides.

    Args:
        images: ``(b, c, h, w)``.
        name: The argument's name for the message.

    Raises:
        ValueError: Naming the shape and the minimum, if ``h`` or ``w`` is below :data:`MIN_SIZE`.
    """
    h, w = images.shape[-2:]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(
            f"{name} must be at least {MIN_SIZE}x{MIN_SIZE} pixels for the weight-free degradation measures, got "
            f"{h}x{w} (shape {tuple(images.shape)}); score larger crops"
        )


def _check(images: torch.Tensor) -> None:
    """Validate a public function's input: floating RGB ``(b, 3, h, w)`` in ``[0, 1]``, at least ``MIN_SIZE``."""
    check_images(images)
    check_size(images)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """8-bit-scaled BT.601 luminance ``255 * (0.299 R + 0.587 G + 0.114 B)`` in ``float32``.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``.

    Returns:
        ``(b, h, w)`` in ``[0, 255]``, ``float32``, on the images' device.
    """
    x = images.to(torch.float32)
    r, g, b = LUMA_WEIGHTS
    return 255.0 * (r * x[:, 0] + g * x[:, 1] + b * x[:, 2])


# ================================================================================================ edge blur
def _fft_size(n: int) -> int:
    """Smallest ``m >= n`` of the form ``2^i 3^j 5^k`` (fast FFT lengths)."""
    m = n
    while True:
        rest = m
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


def _edge_blur(luma: torch.Tensor) -> torch.Tensor:
    """:func:`edge_blur` on luminance ``(b, h, w)`` (8-bit scale) -> ``(b,)`` px."""
    sigma_a, sigma_b = EDGE_SIGMAS
    b, h, w = luma.shape
    pad = math.ceil(4 * sigma_b)
    size_h, size_w = _fft_size(h + 2 * pad), _fft_size(w + 2 * pad)
    padded = F.pad(luma[:, None], (pad, size_w - w - pad, pad, size_h - h - pad), mode="reflect")[:, 0]
    spectrum = torch.fft.fft2(padded)  # (b, H, W) complex
    fy = torch.fft.fftfreq(size_h, device=luma.device)[:, None]
    fx = torch.fft.fftfreq(size_w, device=luma.device)[None, :]
    radius2 = fx**2 + fy**2
    # One complex inverse per scale: ifft(S * G * 2 pi (i fx - fy)) = d/dx (G * y) + i d/dy (G * y).
    derivative = (2.0 * math.pi) * (1j * fx - fy)
    kernels = torch.stack([torch.exp(-2.0 * math.pi**2 * s**2 * radius2) * derivative for s in (sigma_a, sigma_b)])
    grads = torch.fft.ifft2(spectrum[:, None] * kernels)[..., pad : pad + h, pad : pad + w]  # (b, 2, h, w)
    strength_a = grads[:, 0].abs()  # |gradient| at sigma_a, (b, h, w)
    strength_b = grads[:, 1].abs()
    # Non-maximum suppression of the coarse gradient along its dominant axis, away from the border.
    m = math.ceil(2 * sigma_b)
    centre = strength_b[:, m:-m, m:-m]
    coarse = grads[:, 1, m:-m, m:-m]
    horizontal = coarse.real.abs() >= coarse.imag.abs()
    left, right = strength_b[:, m:-m, m - 1 : -m - 1], strength_b[:, m:-m, m + 1 : w - m + 1]
    up, down = strength_b[:, m - 1 : -m - 1, m:-m], strength_b[:, m + 1 : h - m + 1, m:-m]
    peak = torch.where(horizontal, (centre > left) & (centre >= right), (centre > up) & (centre >= down))
    edges = torch.where(peak, centre, torch.zeros_like(centre)).flatten(1)
    count = max(16, round(EDGE_FRACTION * edges.shape[1]))
    strongest, index = edges.topk(count, dim=1)
    ratio = strength_a[:, m:-m, m:-m].flatten(1).gather(1, index) / strongest.clamp_min(1e-6)
    ratio = ratio.quantile(EDGE_QUANTILE, dim=1).clamp_min(1.0 + 1e-3)
    ratio2 = ratio**2
    variance = (sigma_b**2 - ratio2 * sigma_a**2) / (ratio2 - 1.0)
    return variance.sign() * variance.abs().sqrt()


def edge_blur(images: torch.Tensor) -> torch.Tensor:
    """Gaussian-equivalent blur (px) of the sharpest strong edges, from gradients at two scales.

    At a step edge blurred by a Gaussian of width ``sigma``, the gradient peak seen through a Gaussian derivative
    of width ``s`` is ``A / sqrt(2 pi (sigma^2 + s^2))``. The ratio ``R`` of the peaks at the probe scales
    ``sigma_a = 1.5`` and ``sigma_b = 3`` px (:data:`EDGE_SIGMAS`) therefore gives
    ``sigma^2 = (sigma_b^2 - R^2 sigma_a^2) / (R^2 - 1)`` whatever the edge contrast (Zhuo & Sim, "Defocus map
    estimation from a single image", 2011, with Gaussian-derivative gradients). Edge points are the local maxima
    of the coarse gradient along its dominant axis (non-maximum suppression), at least ``2 sigma_b`` from the
    border; the strongest 0.5 % of the pixels (:data:`EDGE_FRACTION`) are kept and the 75th percentile of ``R``
    (:data:`EDGE_QUANTILE`, the sharper of them) decides. Gradients are exact Gaussian derivatives applied in the
    Fourier domain on a reflect-padded image.

    The result is ``sign(sigma^2) sqrt(|sigma^2|)``: negative for edges sharper than the ideal step (fine lines,
    noise), so the measure stays strictly monotone. Clean photographs give -0.7 to 0.9 px (0.3 on average); a
    Gaussian blur of ``s`` px adds roughly ``s^2`` to ``sigma^2`` (3 px of blur -> 2.7 px). Bicubic down-and-up
    scaling moves it much less (its kernel has zero second moment; x4 gives 1.6 px), which is what separates
    blur from loss of resolution. Images without any edge read as fully blurred (``R`` clamps at 1).

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.

    Returns:
        ``(b,)`` signed Gaussian-equivalent edge width in pixels, ``float32``.

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches ``(b, 3, h, w)`` in ``[0, 1]``
            (:func:`~rankmoe.conditioning.base.check_images`) or are smaller than :data:`MIN_SIZE`.
    """
    _check(images)
    return _edge_blur(luminance(images))


# ================================================================================================ noise
def _second_differences(x: torch.Tensor) -> torch.Tensor:
    """Immerkaer's operator ``[1, -2, 1]^T [1, -2, 1]`` (valid part): ``(..., h, w) -> (..., h - 2, w - 2)``."""
    dx = x[..., :, 2:] - 2.0 * x[..., :, 1:-1] + x[..., :, :-2]
    return dx[..., 2:, :] - 2.0 * dx[..., 1:-1, :] + dx[..., :-2, :]


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """``True`` where a 3x3 window (valid part) holds a ``True``: ``(..., h, w) -> (..., h - 2, w - 2)``."""
    rows = mask[..., :, 2:] | mask[..., :, 1:-1] | mask[..., :, :-2]
    return rows[..., 2:, :] | rows[..., 1:-1, :] | rows[..., :-2, :]


def noise_level(images: torch.Tensor) -> torch.Tensor:
    """Noise standard deviation in 8-bit grey levels, from the flattest blocks (Immerkaer's fast estimator).

    Immerkaer ("Fast noise variance estimation", 1996): the operator ``[1, -2, 1]^T [1, -2, 1]`` cancels any
    local plane *and* any straight horizontal or vertical edge (so JPEG block borders hardly register), and maps
    white noise of standard deviation ``sigma`` to a response with mean absolute value ``6 sigma sqrt(2 / pi)``.
    The mean absolute response is taken per ``16 x 16`` block (:data:`NOISE_BLOCK`); image structure only adds to
    it, so the 20th percentile of the blocks (:data:`NOISE_QUANTILE`, the flattest ones) estimates the noise.
    Blocks that touch a clipped pixel (``<= 0.5`` or ``>= 254.5`` of 255) are left out, since clipping removes
    noise (all of them are used if every block is clipped). Computed per colour channel and averaged, so both
    grey and colour noise of ``sigma`` give about ``sigma``. Texture reads as noise of about 0.3-1.8 levels on
    clean photographs; blur, JPEG and down-scaling lower it.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.

    Returns:
        ``(b,)`` noise sigma in 8-bit levels (``255 * sigma`` for images in ``[0, 1]``), ``float32``.

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches ``(b, 3, h, w)`` in ``[0, 1]``
            (:func:`~rankmoe.conditioning.base.check_images`) or are smaller than :data:`MIN_SIZE`.
    """
    _check(images)
    return _noise_level(images)


def _noise_level(images: torch.Tensor) -> torch.Tensor:
    """:func:`noise_level` on validated images ``(b, 3, h, w)`` -> ``(b,)`` 8-bit levels."""
    x = 255.0 * images.to(torch.float32)
    b = x.shape[0]
    response = _second_differences(x).abs()  # (b, 3, h - 2, w - 2)
    clipped = _dilate3((x <= 0.5) | (x >= 254.5))
    s = NOISE_BLOCK
    rows, cols = response.shape[-2] // s, response.shape[-1] // s
    response = response[..., : rows * s, : cols * s].reshape(b, 3, rows, s, cols, s)
    clipped = clipped[..., : rows * s, : cols * s].reshape(b, 3, rows, s, cols, s)
    means = response.mean(dim=(3, 5)).flatten(2)  # (b, 3, blocks)
    bad = clipped.any(dim=5).any(dim=3).flatten(2)
    bad = bad & ~bad.all(dim=-1, keepdim=True)
    means = torch.where(bad, torch.full_like(means, math.inf), means)
    usable = (~bad).sum(dim=-1, keepdim=True)  # (b, 3, 1)
    rank = (NOISE_QUANTILE * usable.to(torch.float32)).ceil().clamp_min(1).long() - 1
    level = means.sort(dim=-1).values.gather(-1, rank)[..., 0]  # (b, 3)
    return (level * math.sqrt(math.pi / 2.0) / 6.0).mean(dim=1)


# ================================================================================================ JPEG
def _blockiness(luma: torch.Tensor) -> torch.Tensor:
    """:func:`blockiness` on luminance ``(b, h, w)`` -> ``(b,)``."""
    p = BLOCK_PERIOD
    axes = []
    for steps in (luma[:, :, 1:] - luma[:, :, :-1], (luma[:, 1:, :] - luma[:, :-1, :]).transpose(1, 2)):
        steps = steps.abs()
        length = steps.shape[-1] // p * p
        phase_means = steps[..., :length].reshape(steps.shape[0], steps.shape[1], -1, p).mean(dim=(1, 2))  # (b, 8)
        ratio = (phase_means + BLOCK_EPS) / (phase_means.roll(p // 2, dims=1) + BLOCK_EPS)
        axes.append(ratio.log().amax(dim=1))
    return (axes[0] + axes[1]) / 2.0


def blockiness(images: torch.Tensor) -> torch.Tensor:
    """JPEG blocking: log ratio of the mean step across 8x8 block borders to the mean step mid-block.

    Along each axis, the absolute differences between neighbouring pixels are averaged per phase ``p = x mod 8``
    (``m_p``). JPEG quantises each 8x8 block on its own, so the step across a block border (one phase) grows while
    the steps inside the blocks shrink. The measure is ``max_p log((m_p + eps) / (m_{p+4} + eps))`` (``eps`` =
    :data:`BLOCK_EPS`), averaged over the two axes. Comparing phase ``p`` with ``p + 4`` (the block middle), not with
    all phases, makes it blind to structure of period 2 or 4 (x2 / x4 up-scaling); the maximum over ``p`` finds the
    grid wherever it lies (cropped JPEGs). About 0.04-0.07 for clean photographs (0.2 for ``rocket``, itself
    stored as JPEG), 0.18 at quality 75, 0.31 at 50 and 0.77 at 10. Structure that truly repeats every 8 px (x8
    up-scaling, some textures) also reads as blocking.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.

    Returns:
        ``(b,)`` log ratio (0 for no blocking), ``float32``.

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches ``(b, 3, h, w)`` in ``[0, 1]``
            (:func:`~rankmoe.conditioning.base.check_images`) or are smaller than :data:`MIN_SIZE`.
    """
    _check(images)
    return _blockiness(luminance(images))


# ================================================================================================ spectrum
def _band_layout(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Band index and weight of every rfft bin of a tile, and the band centres.

    Returns:
        ``index`` ``(m,)`` band of each kept bin, ``weight`` ``(m,)`` (``nu^2`` whitening, times 2 for the bins
        that stand for a mirrored pair, divided by the band's bin count), ``keep`` ``(T * (T // 2 + 1),)`` bool,
        ``centres`` ``(K,)`` mean frequency of each band.
    """
    fy = torch.fft.fftfreq(TILE, device=device)[:, None]
    fx = torch.fft.rfftfreq(TILE, device=device)[None, :]
    radius = (fx**2 + fy**2).sqrt()
    mirrored = torch.full_like(radius, 2.0)
    mirrored[:, 0] = 1.0
    mirrored[:, -1] = 1.0
    edges = torch.tensor(BAND_EDGES, device=device)
    band = torch.bucketize(radius.flatten(), edges) - 1
    keep = (band >= 0) & (band < len(BAND_EDGES) - 1)
    index, radius, mirrored = band[keep], radius.flatten()[keep], mirrored.flatten()[keep]
    bands = len(BAND_EDGES) - 1
    count = torch.zeros(bands, device=device).index_add_(0, index, mirrored)
    centres = torch.zeros(bands, device=device).index_add_(0, index, mirrored * radius) / count
    weight = mirrored * radius**2 / count[index]
    return index, weight, keep, centres


def band_spectrum(luma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened log power per radial frequency band, averaged over Hann-windowed tiles (Welch's method).

    The luminance is cut into ``128 x 128`` tiles (:data:`TILE`) with a 64 px stride (the remainder at the
    bottom / right, under 64 px, is not used); each tile loses its window-weighted mean, is Hann-windowed and
    Fourier-transformed; the power ``|F|^2 / sum(window^2)`` (white noise of variance ``v`` gives ``v``) is
    averaged over tiles, multiplied by ``nu^2`` (a natural image's ``1 / nu^2`` power law becomes flat) and
    averaged per band of :data:`BAND_EDGES`.

    Args:
        luma: ``(b, h, w)`` luminance (any scale), ``h, w >= MIN_SIZE``.

    Returns:
        ``centres`` ``(K,)`` band centres in cycles per pixel and ``log_power`` ``(b, K)`` in nats.
    """
    stride = TILE // 2
    tiles = luma.unfold(1, TILE, stride).unfold(2, TILE, stride).reshape(luma.shape[0], -1, TILE, TILE)
    hann = torch.hann_window(TILE, periodic=False, device=luma.device, dtype=luma.dtype)
    window = hann[:, None] * hann[None, :]
    tiles = tiles - (tiles * window).sum(dim=(-2, -1), keepdim=True) / window.sum()
    spectrum = torch.view_as_real(torch.fft.rfft2(tiles * window))
    power = spectrum.square().sum(dim=-1).mean(dim=1) / window.square().sum()  # (b, T, T // 2 + 1)
    index, weight, keep, centres = _band_layout(luma.device)
    values = power.flatten(1)[:, keep] * weight
    band_power = torch.zeros(luma.shape[0], len(centres), device=luma.device).index_add_(1, index, values)
    return centres, band_power.clamp_min(1e-12).log()


def _high_frequency_loss(luma: torch.Tensor) -> torch.Tensor:
    """:func:`high_frequency_loss` on luminance ``(b, h, w)`` -> ``(b,)`` nats."""
    centres, log_power = band_spectrum(luma)
    x = centres.log()  # (K,)
    fit, top = centres <= POWER_LAW_MAX, centres >= TOP_MIN
    x_fit, y_fit = x[fit], log_power[:, fit]  # (k,), (b, k)
    x_mean, y_mean = x_fit.mean(), y_fit.mean(dim=1, keepdim=True)
    slope = ((x_fit - x_mean) * (y_fit - y_mean)).sum(dim=1, keepdim=True) / (x_fit - x_mean).square().sum()
    predicted = y_mean + slope * (x[top] - x_mean)  # least-squares line a + c log(nu) at the top bands, (b, k')
    return (predicted - log_power[:, top]).mean(dim=1)


def high_frequency_loss(images: torch.Tensor) -> torch.Tensor:
    """Spectral power missing in the top octave, relative to the image's own low-frequency power law (nats).

    Natural images have a power spectrum close to a power law ``nu^-alpha``. :func:`band_spectrum` gives the
    whitened log power per band; a line ``a + c log(nu)`` is fitted by least squares to the bands up to
    0.085 cycles/px (:data:`POWER_LAW_MAX`, periods of 12 px and more, which down-scaling by up to 4 leaves
    intact), extrapolated, and the measure is the mean shortfall of the bands from 0.145 cycles/px up
    (:data:`TOP_MIN`, periods of 2-7 px) below it. Down-and-up scaling removes those frequencies; so does blur,
    while noise adds to them (it lowers the measure). About -1.9 to 0.6 on clean photographs; x1.5 / x2 / x4
    bicubic down-and-up scaling adds about 1.5 / 2.5 / 5.2.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.

    Returns:
        ``(b,)`` mean log-power shortfall in nats (natural log), ``float32``.

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches ``(b, 3, h, w)`` in ``[0, 1]``
            (:func:`~rankmoe.conditioning.base.check_images`) or are smaller than :data:`MIN_SIZE`.
    """
    _check(images)
    return _high_frequency_loss(luminance(images))


def _explained_by_blur(blur: torch.Tensor) -> torch.Tensor:
    """High-frequency loss (nats) that an edge blur ``(b,)`` px explains: ``kappa * max(0, sigma|sigma| - tau)``."""
    return BLUR_EXPLAINS_SLOPE * (blur * blur.abs() - BLUR_EXPLAINS_FROM).clamp_min(0.0)


def resolution_loss(images: torch.Tensor) -> torch.Tensor:
    """Loss of fine detail not explained by blur: :func:`high_frequency_loss` minus the share heavy blur explains.

    ``high_frequency_loss - kappa * max(0, s|s| - tau)`` with ``s`` the :func:`edge_blur` (px), ``tau = 3.5`` px^2
    (:data:`BLUR_EXPLAINS_FROM`) and ``kappa = 2`` nats/px^2 (:data:`BLUR_EXPLAINS_SLOPE`). A Gaussian blur wide
    enough to move the edge measure past ``sqrt(tau)`` (about 2 px of blur) removes the fine detail as well; that
    loss is then attributed to blur, not to resolution. Narrower blur removes the same detail as a x1.5-x3
    down-scale and reads as resolution loss (one image cannot tell the two apart). ``tau`` lies above the edge
    measure of x4 bicubic down-and-up scaling on the reference photographs (2.6 px^2 on average, at most 3.5), and
    ``kappa`` is large enough that a 3 px blur leaves little resolution loss (-3.6 nats on average). Both were set
    by hand on the sweeps of the reference page.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.

    Returns:
        ``(b,)`` nats, ``float32``.

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches ``(b, 3, h, w)`` in ``[0, 1]``
            (:func:`~rankmoe.conditioning.base.check_images`) or are smaller than :data:`MIN_SIZE`.
    """
    _check(images)
    return _measure(images, ("resolution",))["resolution"]


MEASURES = ("blur", "noise", "jpeg", "high_frequency", "resolution")
"""Names of the raw measures :func:`measure` computes: :func:`edge_blur`, :func:`noise_level`, :func:`blockiness`,
:func:`high_frequency_loss`, :func:`resolution_loss`."""


def _measure(images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """:func:`measure` on validated images: shares the luminance, the spectrum and the edge measure."""
    luma = luminance(images)
    out: dict[str, torch.Tensor] = {}
    blur = _edge_blur(luma) if {"blur", "resolution"} & set(names) else None
    high = _high_frequency_loss(luma) if {"high_frequency", "resolution"} & set(names) else None
    for name in names:
        if name == "blur":
            out[name] = blur
        elif name == "noise":
            out[name] = _noise_level(images)
        elif name == "jpeg":
            out[name] = _blockiness(luma)
        elif name == "high_frequency":
            out[name] = high
        else:
            out[name] = high - _explained_by_blur(blur)
    return out


def measure(images: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Several raw measures at once, sharing the luminance, the spectrum and the edge measure.

    Args:
        images: ``(b, 3, h, w)`` RGB in ``[0, 1]``, ``h, w >= MIN_SIZE``.
        names: Which of :data:`MEASURES` to compute (default: all), in the order of the returned dict.

    Returns:
        ``{name: (b,) float32}``: ``"blur"`` (:func:`edge_blur`, px), ``"noise"`` (:func:`noise_level`, 8-bit
        levels), ``"jpeg"`` (:func:`blockiness`), ``"high_frequency"`` (:func:`high_frequency_loss`, nats),
        ``"resolution"`` (:func:`resolution_loss`, nats).

    Raises:
        TypeError / ValueError: For images that are not floating RGB batches in ``[0, 1]``, images smaller than
            :data:`MIN_SIZE`, or an unknown measure name.

    Example:
        >>> images = torch.rand(2, 3, 128, 128)
        >>> raw = measure(images, ["blur", "noise"])
        >>> {name: tuple(value.shape) for name, value in raw.items()}
        {'blur': (2,), 'noise': (2,)}
    """
    selected = MEASURES if names is None else tuple(names)
    unknown = [name for name in selected if name not in MEASURES]
    if unknown or not selected:
        raise ValueError(f"unknown measure names {unknown or list(selected)}; choose from {list(MEASURES)}")
    _check(images)
    return _measure(images, selected)
