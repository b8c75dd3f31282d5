"""Fréchet Inception Distance for the Real-ISR evaluation: the distance itself and the feature network.

- :func:`frechet_distance` of two Gaussians (means and covariances), without complex square roots;
- :func:`fid_from_features`: the same from two feature sets, exact and cheap for sets smaller than the width;
- :class:`InceptionFeatures`: torchvision ``inception_v3`` pool3 features from a local weight file.

These are torchvision's ImageNet Inception-v3 features, not the TF-Inception of pytorch-fid / clean-fid / pyiqa,
so the numbers compare runs of this recipe with each other, not with papers' FID.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as ``real_isr.fid``
    from .lpips import load_state_dict_file
except ImportError:  # imported flat from inside recipes/real_isr
    from lpips import load_state_dict_file  # type: ignore[no-redef]

__all__ = ["InceptionFeatures", "fid_from_features", "frechet_distance"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)`` (same eigenvalues, but a
    symmetric positive semi-definite matrix): two ``eigh`` in float64, negative rounding eigenvalues set to 0. No
    complex numbers, no ``eps`` offset; exact for singular covariances (fewer samples than dimensions).

    Args:
        mu1: ``(d,)`` mean of the first set.
        sigma1: ``(d, d)`` covariance of the first set (symmetric positive semi-definite).
        mu2: ``(d,)`` mean of the second set.
        sigma2: ``(d, d)`` covariance of the second set.

    Returns:
        The distance (float, clamped at 0 against rounding).

    Raises:
        ValueError: For mismatched shapes or non-finite values.

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))  # 2 + 2 * (1 - 2) ** 2
        4.0
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    mu1, sigma1, mu2, sigma2 = arrays
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"need mu (d,) and sigma (d, d) twice, got shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("mu1, sigma1, mu2, sigma2 must be finite")

    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt), 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets (means, ``n - 1`` covariances).

    With fewer samples than dimensions it uses ``tr((S1 S2)^(1/2)) = ||A1 A2^T||_*`` (nuclear norm) with
    ``A_i = (F_i - mu_i) / sqrt(n_i - 1)``, since ``S_i = A_i^T A_i`` and ``S1 S2`` has the nonzero eigenvalues of
    ``(A1 A2^T)(A1 A2^T)^T``: an ``n1 x n2`` SVD instead of two ``d x d`` eigendecompositions (2048 x 2048 for
    Inception). Otherwise it calls :func:`frechet_distance` on the covariances.

    Args:
        features1: ``(n1, d)`` features, ``n1 >= 2``.
        features2: ``(n2, d)`` features, ``n2 >= 2``.

    Returns:
        The distance (float, clamped at 0).

    Raises:
        ValueError: For fewer than 2 samples, different widths or non-finite values.
    """
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two (n, d) feature arrays with n >= 2 and one d, got {f1.shape} and {f2.shape}")
    if not (np.isfinite(f1).all() and np.isfinite(f2).all()):
        raise ValueError("features must be finite")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    if max(len(f1), len(f2)) > f1.shape[1]:
        return frechet_distance(mu1, np.cov(f1, rowvar=False), mu2, np.cov(f2, rowvar=False))
    a1, a2 = (f1 - mu1) / math.sqrt(len(f1) - 1), (f2 - mu2) / math.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear), 0.0)


class InceptionFeatures(nn.Module):
    """Pool3 (2048-d) features of torchvision's ``inception_v3`` with weights from a local state dict file.

    Images in ``[0, 1]`` are resized to 299 x 299 (bilinear) and mapped to ``[-1, 1]``, which is what torchvision's
    ImageNet weights see after their ``transform_input`` step; the classifier is replaced by the identity.

    Args:
        weights: A torchvision ``inception_v3`` state dict file (``inception_v3_google-0cc3c7bd.pth``; with or
            without the ``AuxLogits.*`` keys) or ``.safetensors``.

    Raises:
        ValueError: If the file does not fit ``inception_v3`` (the message names the file).
    """

    def __init__(self, weights: str | os.PathLike[str]) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        state = load_state_dict_file(weights)
        aux = any(key.startswith("AuxLogits.") for key in state)
        self.net = inception_v3(weights=None, aux_logits=aux, transform_input=False, init_weights=False)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{weights} is not a torchvision inception_v3 state dict: {error}") from error
        self.net.fc = nn.Identity()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, 3, H, W)`` in ``[0, 1]`` -> ``(b, 2048)`` float64 features."""
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net.eval()(2 * x - 1).double()
