"""Text-anchor scoring: embeddings compared with anchor embeddings by scaled cosine similarity (pure functions).

Axis legend: ``b`` inputs (images or prompts), ``D`` dimensions (anchor pairs or anchors), ``e`` embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_anchor_scores(
    features: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Probability of the *negative* anchor of each (positive, negative) pair (CLIP-IQA with the roles of MoR).

    ``s_i = exp(t * cos(f, n_i)) / (exp(t * cos(f, p_i)) + exp(t * cos(f, n_i)))`` with ``t = logit_scale``: a
    softmax over the pair's two scaled cosine similarities. For degradation pairs ("a sharp photo" / "a blurry
    photo") a higher ``s_i`` means more degraded.

    Args:
        features: Input embeddings ``(b, e)`` (normalised here).
        positive: Positive-anchor embeddings ``(D, e)``.
        negative: Negative-anchor embeddings ``(D, e)``.
        logit_scale: Temperature ``t`` (CLIP's trained logit scale, about 100).

    Returns:
        ``(b, D)`` in ``[0, 1]``, float32.

    Example:
        >>> f = torch.tensor([[1.0, 0.0]])
        >>> pair_anchor_scores(f, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 1.0)
        tensor([[0.2689]])
    """
    features = F.normalize(features.float(), dim=-1)
    similarity_positive = features @ F.normalize(positive.float(), dim=-1).T
    similarity_negative = features @ F.normalize(negative.float(), dim=-1).T
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=features.device)
    return torch.sigmoid(scale * (similarity_negative - similarity_positive))


def set_anchor_scores(features: torch.Tensor, anchors: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Softmax over ``D`` anchors of the scaled cosine similarities: how much each input is about each anchor.

    Args:
        features: Input embeddings ``(b, e)``.
        anchors: Anchor embeddings ``(D, e)``.
        logit_scale: Temperature ``t``.

    Returns:
        ``(b, D)`` rows summing to 1, float32.
    """
    features = F.normalize(features.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=features.device)
    return (scale * (features @ F.normalize(anchors.float(), dim=-1).T)).softmax(dim=-1)
