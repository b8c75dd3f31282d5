"""Blur kernels of the Real-ESRGAN degradation model and a batched ``filter2d``.

Written in-house with torch (BasicSR, the usual source, cannot be imported without an old torchvision; see
``shared/notes/real-isr.md`` §3.2). The formulas follow BasicSR's ``basicsr/data/degradations.py``:

- bivariate Gaussian ``exp(-Q / 2)``, generalized Gaussian ``exp(-Q**beta / 2)`` and plateau ``1 / (Q**beta + 1)``,
  with ``Q = p^T Sigma^-1 p``, ``Sigma = R(theta) diag(sigma_x**2, sigma_y**2) R(theta)^T`` and ``p = (x, y)`` the
  offset from the kernel centre (``x`` along columns, ``y`` along rows);
- the circular low-pass (sinc) kernel ``omega_c J1(omega_c r) / (2 pi r)``, ``omega_c**2 / (4 pi)`` at ``r = 0``;
- the pulse (identity) kernel.

Every kernel is normalised to sum to 1. Axis legend: ``b`` batch, ``c`` channels, ``H``/``W`` image size,
``k`` kernel size (odd), ``K`` padded kernel size.

Builders take Python floats (one kernel, shape ``(k, k)``) or 1-D tensors of shape ``(b,)`` (a batch, shape
``(b, k, k)``), and compute in float64 before casting to ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Kernel types of ``KernelParams.kernel_list`` (BasicSR names, plus ``pulse`` for the identity).
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "pulse")
#: Name recorded for a kernel drawn as a circular low-pass (sinc) kernel.
SINC = "sinc"

Number = float | torch.Tensor


def _as_batch(*values: Number) -> tuple[list[torch.Tensor], bool]:
    """Broadcast floats / ``(b,)`` tensors to float64 ``(b,)`` tensors; report whether any input was a tensor."""
    batched = any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values)
    tensors = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]
    return list(torch.broadcast_tensors(*tensors)), batched


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")


def mesh_grid(size: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets from the centre of a ``size x size`` kernel.

    Args:
        size: odd kernel size ``k``.
        dtype: dtype of the grids.

    Returns:
        ``(x, y)``, each ``(k, k)``: ``x`` varies along columns, ``y`` along rows, both in ``[-k//2, k//2]``.
    """
    _check_size(size)
    ax = torch.arange(size, dtype=dtype) - size // 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def _quadratic_form(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``Q = p^T Sigma^-1 p`` on the grid, ``(b, k, k)``: stds ``sigma_x``, ``sigma_y``, rotation ``theta``."""
    if bool((sigma_x <= 0).any()) or bool((sigma_y <= 0).any()):
        raise ValueError(f"sigmas must be > 0, got sigma_x={sigma_x.tolist()}, sigma_y={sigma_y.tolist()}")
    x, y = mesh_grid(size)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u = c * x + s * y  # coordinates in the rotated frame: R(theta)^T p
    v = -s * x + c * y
    return (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2


def _finish(kernel: torch.Tensor, batched: bool, dtype: torch.dtype) -> torch.Tensor:
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    kernel = kernel.to(dtype)
    return kernel if batched else kernel[0]


def _bivariate(
    family: str, size: int, sigma_x: Number, sigma_y: Number | None, theta: Number, beta: Number, dtype: torch.dtype
) -> torch.Tensor:
    _check_size(size)
    (sx, sy, th, be), batched = _as_batch(sigma_x, sigma_x if sigma_y is None else sigma_y, theta, beta)
    if bool((be <= 0).any()):
        raise ValueError(f"beta must be > 0, got {be.tolist()}")
    q = _quadratic_form(size, sx, sy, th)
    be = be[:, None, None]
    if family == "gaussian":
        kernel = torch.exp(-0.5 * q)
    elif family == "generalized":
        kernel = torch.exp(-0.5 * q**be)
    else:  # plateau
        kernel = 1.0 / (q**be + 1.0)
    return _finish(kernel, batched, dtype)


def gaussian_kernel(
    size: int,
    sigma_x: Number,
    sigma_y: Number | None = None,
    theta: Number = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bivariate Gaussian kernel (isotropic when ``sigma_y`` is None, else anisotropic rotated by ``theta``).

    Args:
        size: odd kernel size ``k``.
        sigma_x: std along the kernel's first axis, float or ``(b,)``.
        sigma_y: std along the second axis; None for isotropic (``sigma_y = sigma_x``).
        theta: rotation angle in radians, float or ``(b,)``.
        dtype: output dtype.

    Returns:
        ``(k, k)`` for scalar parameters, ``(b, k, k)`` for tensor ones; each kernel sums to 1.

    Example:
        >>> k = gaussian_kernel(7, 1.5)
        >>> k.shape, round(float(k.sum()), 6)
        (torch.Size([7, 7]), 1.0)
    """
    return _bivariate("gaussian", size, sigma_x, sigma_y, theta, 1.0, dtype)


def generalized_gaussian_kernel(
    size: int,
    sigma_x: Number,
    sigma_y: Number | None = None,
    theta: Number = 0.0,
    beta: Number = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Generalized Gaussian kernel ``exp(-Q**beta / 2)`` (``beta = 1`` is the Gaussian).

    Args:
        size: odd kernel size ``k``.
        sigma_x: std along the first axis, float or ``(b,)``.
        sigma_y: std along the second axis; None for isotropic.
        theta: rotation angle in radians.
        beta: shape parameter > 0 (< 1 heavier tails, > 1 flatter top).
        dtype: output dtype.

    Returns:
        ``(k, k)`` or ``(b, k, k)``, each summing to 1.
    """
    return _bivariate("generalized", size, sigma_x, sigma_y, theta, beta, dtype)


def plateau_kernel(
    size: int,
    sigma_x: Number,
    sigma_y: Number | None = None,
    theta: Number = 0.0,
    beta: Number = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plateau-shaped kernel ``1 / (Q**beta + 1)``.

    Args:
        size: odd kernel size ``k``.
        sigma_x: std-like width along the first axis, float or ``(b,)``.
        sigma_y: width along the second axis; None for isotropic.
        theta: rotation angle in radians.
        beta: shape parameter > 0.
        dtype: output dtype.

    Returns:
        ``(k, k)`` or ``(b, k, k)``, each summing to 1.
    """
    return _bivariate("plateau", size, sigma_x, sigma_y, theta, beta, dtype)


def sinc_kernel(size: int, cutoff: Number, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cutoff frequency ``omega_c`` (radians per pixel).

    ``h(r) = omega_c J1(omega_c r) / (2 pi r)`` with ``h(0) = omega_c**2 / (4 pi)``, then normalised; it produces the
    ringing and overshoot artefacts of Real-ESRGAN.

    Args:
        size: odd kernel size ``k``.
        cutoff: ``omega_c`` in ``(0, pi]``, float or ``(b,)``.
        dtype: output dtype.

    Returns:
        ``(k, k)`` or ``(b, k, k)``, each summing to 1.
    """
    _check_size(size)
    (omega,), batched = _as_batch(cutoff)
    if bool((omega <= 0).any()):
        raise ValueError(f"sinc cutoff must be > 0, got {omega.tolist()}")
    x, y = mesh_grid(size)
    r = torch.sqrt(x**2 + y**2)
    om = omega[:, None, None]
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = om * torch.special.bessel_j1(om * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, om**2 / (4 * math.pi), kernel)
    return _finish(kernel, batched, dtype)


def pulse_kernel(size: int, batch_size: int | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity kernel: 1 at the centre, 0 elsewhere.

    Args:
        size: odd kernel size ``k``.
        batch_size: None for one ``(k, k)`` kernel, else ``b`` copies ``(b, k, k)``.
        dtype: output dtype.

    Returns:
        ``(k, k)`` or ``(b, k, k)``.
    """
    _check_size(size)
    kernel = torch.zeros(size, size, dtype=dtype)
    kernel[size // 2, size // 2] = 1.0
    return kernel if batch_size is None else kernel.expand(batch_size, size, size).clone()


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(..., k, k)`` kernels symmetrically to ``(..., K, K)`` with ``K = size >= k`` (both odd)."""
    _check_size(size)
    k = kernel.shape[-1]
    if k > size:
        raise ValueError(f"cannot pad a kernel of size {k} to the smaller size {size}")
    p = (size - k) // 2
    return F.pad(kernel, (p, p, p, p))


@dataclass(frozen=True)
class KernelParams:
    """What ``random_mixed_kernel`` draws from (one Real-ESRGAN blur stage).

    Attributes:
        kernel_list: kernel types, a subset of ``KERNEL_TYPES``.
        kernel_prob: probability of each type (same length, sums to 1).
        kernel_size_range: ``(min, max)`` odd sizes; a size is drawn uniformly among the odd sizes in between and
            every kernel is zero-padded to ``max``.
        sigma_range: ``(min, max)`` of ``sigma_x`` and ``sigma_y`` (``blur_sigma``).
        rotation_range: ``(min, max)`` of ``theta`` for anisotropic kernels (radians).
        betag_range: ``(min, max)`` of beta for generalized Gaussian kernels.
        betap_range: ``(min, max)`` of beta for plateau kernels.
        sinc_prob: probability that the kernel is a sinc kernel instead of a ``kernel_list`` draw.
        sinc_cutoff_range: ``(min, max)`` of ``omega_c`` for sizes ``< sinc_large_size``.
        sinc_cutoff_range_large: ``(min, max)`` of ``omega_c`` for sizes ``>= sinc_large_size``.
        sinc_large_size: size threshold between the two cutoff ranges (13 in Real-ESRGAN).
    """

    kernel_list: tuple[str, ...] = (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_size_range: tuple[int, int] = (7, 21)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sinc_cutoff_range: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_range_large: tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_size: int = 13

    def __post_init__(self) -> None:
        if not self.kernel_list or any(k not in KERNEL_TYPES for k in self.kernel_list):
            raise ValueError(f"kernel_list must hold kernel types from {KERNEL_TYPES}, got {self.kernel_list!r}")
        if len(self.kernel_prob) != len(self.kernel_list) or min(self.kernel_prob) < 0 or sum(self.kernel_prob) <= 0:
            raise ValueError(f"kernel_prob must be {len(self.kernel_list)} weights >= 0, got {self.kernel_prob!r}")
        low, high = self.kernel_size_range
        if low < 1 or low % 2 == 0 or high % 2 == 0 or low > high:
            raise ValueError(f"kernel_size_range must be odd sizes low <= high, got {self.kernel_size_range!r}")

    @property
    def padded_size(self) -> int:
        """``K``: the size every drawn kernel is padded to (the largest size of ``kernel_size_range``)."""
        return int(self.kernel_size_range[1])


@dataclass
class KernelRecord:
    """Sampled parameters of a batch of kernels; ``NaN`` where a parameter does not apply to the type.

    Attributes:
        kind: per sample, a ``KERNEL_TYPES`` name or ``"sinc"``.
        size: ``(b,)`` int64, the unpadded odd size.
        sigma_x, sigma_y: ``(b,)`` float64 (isotropic kernels record ``sigma_y = sigma_x``).
        theta: ``(b,)`` float64, anisotropic kernels only (isotropic ones are built with ``theta = 0``).
        beta: ``(b,)`` float64, generalized / plateau kernels only.
        cutoff: ``(b,)`` float64, ``omega_c`` of sinc kernels only.
        kernel: ``(b, K, K)`` the kernels themselves, each summing to 1.
    """

    kind: list[str]
    size: torch.Tensor
    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    theta: torch.Tensor
    beta: torch.Tensor
    cutoff: torch.Tensor
    kernel: torch.Tensor

    def sample(self, i: int) -> dict[str, float | int | str]:
        """Parameters of sample ``i`` as plain Python values (NaN entries left out)."""
        out: dict[str, float | int | str] = {"kind": self.kind[i], "size": int(self.size[i])}
        for name in ("sigma_x", "sigma_y", "theta", "beta", "cutoff"):
            value = float(getattr(self, name)[i])
            if not math.isnan(value):
                out[name] = value
        return out


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """``(n,)`` float64 draws from U[low, high] (CPU)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    return low + (high - low) * u


def draw_beta(generator: torch.Generator, n: int, beta_range: Sequence[float]) -> torch.Tensor:
    """BasicSR's beta draw: half from ``[low, 1]``, half from ``[1, high]`` when ``low <= 1 <= high``, else uniform.

    With BasicSR's plateau range ``[1, 2]`` half of the draws are exactly 1, as in BasicSR.

    Args:
        generator: source of randomness.
        n: number of draws ``b``.
        beta_range: ``(low, high)``.

    Returns:
        ``(b,)`` float64 inside ``beta_range``.
    """
    low, high = float(beta_range[0]), float(beta_range[1])
    half = _uniform(generator, n, 0.0, 1.0) < 0.5
    u = _uniform(generator, n, 0.0, 1.0)
    if low <= 1.0 <= high:
        return torch.where(half, low + (1.0 - low) * u, 1.0 + (high - 1.0) * u)
    return low + (high - low) * u


def random_mixed_kernel(
    params: KernelParams, generator: torch.Generator, batch_size: int = 1, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, KernelRecord]:
    """Draw one blur kernel per sample the way Real-ESRGAN's dataset does, batched.

    Per sample: an odd size from ``kernel_size_range``; with probability ``sinc_prob`` a sinc kernel (cutoff from
    ``sinc_cutoff_range`` or, for sizes ``>= sinc_large_size``, ``sinc_cutoff_range_large``), otherwise a type from
    ``kernel_list`` with ``kernel_prob`` and its sigmas / rotation / beta. Kernels are built at their size and
    zero-padded to ``params.padded_size``. All draws come from ``generator``; the number of draws does not depend
    on the outcomes, so a seed fixes the whole batch.

    Args:
        params: the stage's ranges and probabilities.
        generator: a ``torch.Generator`` (any device; draws are moved to the CPU).
        batch_size: ``b``.
        dtype: kernel dtype.

    Returns:
        ``(kernels, record)``: kernels ``(b, K, K)`` each summing to 1, and the sampled parameters.
    """
    b, big = batch_size, params.padded_size
    lo_k, hi_k = int(params.kernel_size_range[0]), int(params.kernel_size_range[1])
    n_sizes = (hi_k - lo_k) // 2 + 1
    size_idx = torch.randint(n_sizes, (b,), generator=generator, device=generator.device).cpu()
    size = lo_k + 2 * size_idx
    is_sinc = _uniform(generator, b, 0.0, 1.0) < params.sinc_prob
    probs = torch.tensor(params.kernel_prob, dtype=torch.float64, device=generator.device)
    type_idx = torch.multinomial(probs, b, replacement=True, generator=generator).cpu()
    sigma_x = _uniform(generator, b, *params.sigma_range)
    sigma_y = _uniform(generator, b, *params.sigma_range)
    theta = _uniform(generator, b, *params.rotation_range)
    beta_g = draw_beta(generator, b, params.betag_range)
    beta_p = draw_beta(generator, b, params.betap_range)
    cut_small = _uniform(generator, b, *params.sinc_cutoff_range)
    cut_large = _uniform(generator, b, *params.sinc_cutoff_range_large)

    kind = [SINC if bool(is_sinc[i]) else params.kernel_list[int(type_idx[i])] for i in range(b)]
    nan = torch.full((b,), math.nan, dtype=torch.float64)
    iso = torch.tensor([k.endswith("iso") and not k.endswith("aniso") for k in kind])
    shaped = torch.tensor([k not in (SINC, "pulse") for k in kind])
    sigma_y = torch.where(iso, sigma_x, sigma_y)
    theta = torch.where(iso, torch.zeros_like(theta), theta)
    generalized = torch.tensor([k.startswith("generalized") for k in kind])
    plateau = torch.tensor([k.startswith("plateau") for k in kind])
    beta = torch.where(generalized, beta_g, torch.where(plateau, beta_p, nan))
    cutoff = torch.where(size < params.sinc_large_size, cut_small, cut_large)

    x, y = mesh_grid(big)
    inside = (x.abs() <= (size // 2)[:, None, None]) & (y.abs() <= (size // 2)[:, None, None])
    q = _quadratic_form(big, sigma_x, sigma_y, theta)
    be = torch.where(beta.isnan(), torch.ones_like(beta), beta)[:, None, None]
    by_family = {
        "gaussian": torch.exp(-0.5 * q),
        "generalized": torch.exp(-0.5 * q**be),
        "plateau": 1.0 / (q**be + 1.0),
    }
    kernel = torch.where(generalized[:, None, None], by_family["generalized"], by_family["gaussian"])
    kernel = torch.where(plateau[:, None, None], by_family["plateau"], kernel)
    if bool(is_sinc.any()):
        kernel = torch.where(is_sinc[:, None, None], sinc_kernel(big, cutoff, dtype=torch.float64), kernel)
    pulse = torch.tensor([k == "pulse" for k in kind])
    kernel = torch.where(pulse[:, None, None], pulse_kernel(big, b, dtype=torch.float64), kernel)
    kernel = kernel * inside
    kernel = (kernel / kernel.sum(dim=(-2, -1), keepdim=True)).to(dtype)

    record = KernelRecord(
        kind=kind,
        size=size,
        sigma_x=torch.where(shaped, sigma_x, nan),
        sigma_y=torch.where(shaped, sigma_y, nan),
        theta=torch.where(shaped & ~iso, theta, nan),
        beta=beta,
        cutoff=torch.where(is_sinc, cutoff, nan),
        kernel=kernel,
    )
    return kernel, record


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (reflect padding, same size out), BasicSR's ``filter2D``.

    Zero borders shared by all kernels are trimmed first (cheaper, same result). Images too small for reflect
    padding (size <= pad) fall back to replicate padding.

    Args:
        image: ``(b, c, H, W)``.
        kernel: ``(k, k)`` or ``(1, k, k)`` (one kernel for all) or ``(b, k, k)`` (one per sample), ``k`` odd.

    Returns:
        ``(b, c, H, W)``.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (b, c, H, W), got shape {tuple(image.shape)}")
    kernel = kernel.to(dtype=image.dtype, device=image.device)
    if kernel.dim() == 2:
        kernel = kernel[None]
    b, c, h, w = image.shape
    if kernel.dim() != 3 or kernel.shape[-1] != kernel.shape[-2] or kernel.shape[-1] % 2 == 0:
        raise ValueError(f"kernel must be (k, k) or (b, k, k) with k odd, got shape {tuple(kernel.shape)}")
    if kernel.shape[0] not in (1, b):
        raise ValueError(f"kernel batch {kernel.shape[0]} does not match image batch {b}")
    nonzero = (kernel != 0).any(dim=0)
    rows = nonzero.any(dim=1).nonzero()
    cols = nonzero.any(dim=0).nonzero()
    k = kernel.shape[-1]
    if len(rows) > 0:
        ring = min(int(rows.min()), k - 1 - int(rows.max()), int(cols.min()), k - 1 - int(cols.max()))
        kernel = kernel[:, ring : k - ring, ring : k - ring]
        k = kernel.shape[-1]
    p = k // 2
    mode = "reflect" if p < h and p < w else "replicate"
    padded = F.pad(image, (p, p, p, p), mode=mode) if p > 0 else image
    # one grouped convolution, sample i's kernel for its c channels (faster on CPU than a batch of 1-kernel convs)
    weight = kernel.expand(b, k, k).repeat_interleave(c, dim=0)[:, None]  # (b*c, 1, k, k)
    out = F.conv2d(padded.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.reshape(b, c, h, w)
