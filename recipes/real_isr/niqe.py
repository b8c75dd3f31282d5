"""NIQE (Mittal, Soundararajan and Bovik, 2012) on one luminance image, in numpy / scipy, float64.

Written from the paper and the published algorithm of the MATLAB release (``niqe_release.zip``) as BasicSR
1.4.2 documents it (``basicsr/metrics/niqe.py``), using the same pristine model (``assets/niqe_pris_params.npz``,
see ``assets/README.md``):

1. crop the image to whole ``96 x 96`` blocks (no overlap);
2. MSCN coefficients ``(y - mu) / (sigma + 1)`` with the model's ``7 x 7`` Gaussian window (``fspecial('gaussian',
   7, 7/6)``), replicate ("nearest") borders, ``sigma = sqrt(|E[y^2] - mu^2|)``;
3. per block, 18 features: an AGGD fit (shape, mean scale) of the coefficients and, for the products with the
   neighbour along the four orientations (circular shift inside the block), shape, mean, left and right scale;
   the shape comes from a grid search over ``0.2 : 0.001 : 10`` as in MATLAB;
4. the same at half resolution (MATLAB ``imresize(y, 0.5)``: bicubic with antialiasing, symmetric borders, here
   :func:`imresize_half` in numpy) with ``48 x 48`` blocks, giving 36 features per block;
5. a multivariate Gaussian fit to the block features (NaN-ignoring mean; covariance of the blocks without NaN)
   and ``sqrt((mu_p - mu_d)^T pinv((cov_p + cov_d) / 2) (mu_p - mu_d))``.

Everything runs in float64, as MATLAB does (BasicSR casts the image to float32 first, which shifts its values on
images with flat regions; see :data:`FLAT_TOL` and ``tests/recipes/test_metrics.py`` for the numbers).

Axis legend: ``h``/``w`` image size, ``n`` blocks, ``m`` pixels per block, ``f`` features (36).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.special import gamma

PARAMS_PATH = Path(__file__).resolve().parent / "assets" / "niqe_pris_params.npz"
BLOCK = 96  # block size at full resolution (the MATLAB release's recommended and only tested value)
MIN_BLOCKS = 2  # the block covariance needs at least two blocks
FLAT_TOL = 1e-8
"""``|y - mu|`` at or below this (on the 0-255 scale) counts as an exactly flat neighbourhood: MSCN 0.

In a constant neighbourhood ``y - mu`` is 0 in exact arithmetic but a rounding residue (about 1e-14 in float64,
1e-4 in float32) in practice, whose sign pattern decides which AGGD side those pixels count on. Every
implementation has its own residues, so images with flat areas (saturated sky, black backgrounds) get
implementation-dependent NIQE values (astronaut: 3.0649 BasicSR float32, 3.1236 pyiqa float64). Setting them to
0 gives the exact-arithmetic answer and makes the result reproducible; textured images are unaffected.
"""
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, main diagonal, anti-diagonal neighbours
_GAM = np.arange(0.2, 10.001, 0.001)  # AGGD shape grid of the MATLAB release (9801 values)
_R_GAM = gamma(2.0 / _GAM) ** 2 / (gamma(1.0 / _GAM) * gamma(3.0 / _GAM))  # strictly increasing in the shape


class NiqeParams(NamedTuple):
    """The pristine NIQE model.

    Attributes:
        mu: ``(f,)`` mean of the pristine block features.
        cov: ``(f, f)`` their covariance.
        window: ``(7, 7)`` Gaussian window for the MSCN coefficients (sums to 1).
    """

    mu: np.ndarray
    cov: np.ndarray
    window: np.ndarray


@lru_cache(maxsize=4)
def load_params(path: str | Path = PARAMS_PATH) -> NiqeParams:
    """Load the pristine model from an ``.npz`` with keys ``mu_pris_param`` (1x36), ``cov_pris_param`` (36x36)
    and ``gaussian_window`` (7x7), BasicSR's layout.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when a key is missing or has the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIQE parameters not found: {path}")
    with np.load(path) as data:
        expected = {"mu_pris_param": (1, 36), "cov_pris_param": (36, 36), "gaussian_window": (7, 7)}
        for key, shape in expected.items():
            if key not in data.files or data[key].shape != shape:
                found = data[key].shape if key in data.files else "missing"
                raise ValueError(f"{path}: {key} must have shape {shape}, got {found}")
        return NiqeParams(
            mu=data["mu_pris_param"].astype(np.float64).reshape(36),
            cov=data["cov_pris_param"].astype(np.float64),
            window=data["gaussian_window"].astype(np.float64),
        )


# ------------------------------------------------------------------------------------------ MATLAB imresize


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_matrix(in_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The linear map of MATLAB's ``imresize(..., scale, 'bicubic')`` along one axis.

    MATLAB's ``contributions``: output pixel ``x`` (1-based) maps to ``u = x / scale + (1 - 1 / scale) / 2``;
    when shrinking with antialiasing the kernel is stretched by ``1 / scale`` (width ``4 / scale``); weights are
    normalised to sum to 1 and indices outside the image are mirrored with the edge repeated (``symmetric``).

    Args:
        in_len: input length.
        scale: scale factor; the output length is ``ceil(in_len * scale)``.
        antialias: stretch the kernel when ``scale < 1``.

    Returns:
        ``(out_len, in_len)`` matrix ``R`` with ``resized = R @ signal``.
    """
    out_len = math.ceil(in_len * scale)
    stretch = scale < 1 and antialias
    width = 4.0 / scale if stretch else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]  # 1-based input indices, (out_len, p)
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])  # symmetric padding, edge repeated
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.repeat(np.arange(out_len), idx.shape[1]), cols.ravel()), weights.ravel())
    return matrix


def imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased) of an ``(h, w)`` float image, ``(ceil(h/2), ceil(w/2))``.

    Rows first, then columns, as MATLAB orders equal scales; no clipping or rounding.
    """
    h, w = img.shape
    return resize_matrix(h, 0.5) @ img @ resize_matrix(w, 0.5).T


# ------------------------------------------------------------------------------------------------- features


def mscn(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of an ``(h, w)`` image on the 0-255 scale, ``(h, w)``."""
    mu = ndimage.correlate(img, window, mode="nearest")
    sigma = np.sqrt(np.abs(ndimage.correlate(img * img, window, mode="nearest") - mu * mu))
    centred = img - mu
    centred[np.abs(centred) <= FLAT_TOL] = 0.0
    return centred / (sigma + 1)


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit an asymmetric generalised Gaussian to each row by moment matching (Lasmar et al., NIQE Eq. 7).

    Zeros count in the overall moments but on neither side. A row without negative (or positive) values gives a
    NaN side scale and, as in MATLAB (``min`` over an all-NaN vector returns the first index), the shape 0.2.

    Args:
        x: ``(n, m)`` samples, one distribution per row.

    Returns:
        ``alpha`` (shape), ``beta_l`` and ``beta_r`` (left and right scales), each ``(n,)``.
    """
    sq = x * x
    neg, pos = x < 0, x > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.sqrt(np.where(neg, sq, 0.0).sum(axis=1) / neg.sum(axis=1))
        right = np.sqrt(np.where(pos, sq, 0.0).sum(axis=1) / pos.sum(axis=1))
        ratio = left / right
        rhat = np.abs(x).mean(axis=1) ** 2 / sq.mean(axis=1)
        target = rhat * (ratio**3 + 1) * (ratio + 1) / (ratio**2 + 1) ** 2
    # nearest grid value (argmin of the squared distance, first index on ties); _R_GAM is strictly increasing
    hi = np.clip(np.searchsorted(_R_GAM, target), 1, len(_GAM) - 1)
    lo = hi - 1
    pick = np.where((_R_GAM[lo] - target) ** 2 <= (_R_GAM[hi] - target) ** 2, lo, hi)
    pick = np.where(np.isnan(target), 0, pick)
    alpha = _GAM[pick]
    factor = np.sqrt(gamma(1.0 / alpha) / gamma(3.0 / alpha))
    return alpha, left * factor, right * factor


def block_features(coeffs: np.ndarray, block: int) -> np.ndarray:
    """The 18 NIQE features of every ``block x block`` tile of an ``(h, w)`` MSCN map (h, w multiples of block).

    Returns:
        ``(n, 18)``: ``alpha, (beta_l + beta_r) / 2`` of the coefficients, then for each neighbour product
        (horizontal, vertical, two diagonals; circular shift inside the tile) ``alpha, mean, beta_l, beta_r``.
        Tiles in row-major order.
    """
    h, w = coeffs.shape
    tiles = coeffs.reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3).reshape(-1, block, block)
    n = tiles.shape[0]
    alpha, beta_l, beta_r = aggd_fit(tiles.reshape(n, -1))
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        product = tiles * np.roll(tiles, shift, axis=(1, 2))
        alpha, beta_l, beta_r = aggd_fit(product.reshape(n, -1))
        mean = (beta_r - beta_l) * gamma(2.0 / alpha) / gamma(1.0 / alpha)
        feats += [alpha, mean, beta_l, beta_r]
    return np.stack(feats, axis=1)


def niqe_features(y: np.ndarray, window: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Block features at full and half resolution of an ``(h, w)`` luminance image on the 0-255 scale.

    The image is cropped to whole blocks (top-left corner kept) first.

    Returns:
        ``(n, 36)`` with ``n = (h // block) * (w // block)``.
    """
    nh, nw = y.shape[0] // block, y.shape[1] // block
    img = np.asarray(y, dtype=np.float64)[: nh * block, : nw * block]
    full = block_features(mscn(img, window), block)
    half = block_features(mscn(imresize_half(img), window), block // 2)
    return np.concatenate([full, half], axis=1)


def niqe_score(y: np.ndarray, params: NiqeParams | None = None, block: int = BLOCK) -> float:
    """NIQE of one ``(h, w)`` luminance image on the 0-255 scale (lower is better).

    Args:
        y: ``(h, w)`` image, already rounded if MATLAB parity is wanted; needs at least two whole blocks.
        params: the pristine model (default: :func:`load_params`).
        block: block size at full resolution (even).

    Returns:
        The distance between the pristine and the image's multivariate Gaussian; NaN when fewer than two blocks
        have finite features (for example a constant image).

    Raises:
        ValueError: for a non-2-D image or fewer than :data:`MIN_BLOCKS` whole blocks.
    """
    if y.ndim != 2:
        raise ValueError(f"NIQE needs an (h, w) image, got shape {tuple(y.shape)}")
    blocks = (y.shape[0] // block) * (y.shape[1] // block)
    if blocks < MIN_BLOCKS:
        raise ValueError(
            f"NIQE needs at least {MIN_BLOCKS} whole {block}x{block} blocks (e.g. {block}x{2 * block}), "
            f"got an image of {tuple(y.shape)}"
        )
    params = load_params() if params is None else params
    feats = niqe_features(y, params.window, block)
    finite = feats[~np.isnan(feats).any(axis=1)]
    if finite.shape[0] < 2:
        return float("nan")
    mu = np.nanmean(feats, axis=0)  # NaN-ignoring mean over all blocks (MATLAB nanmean), covariance without them
    cov = np.cov(finite, rowvar=False)
    diff = params.mu - mu
    return float(np.sqrt(diff @ np.linalg.pinv((params.cov + cov) / 2) @ diff))
