"""Build a degradation estimator from plain settings (a recipe's YAML), with the weight-free one as the default."""

from __future__ import annotations

from typing import Any

from rankmoe.conditioning.base import DegradationEstimator

ESTIMATOR_KINDS = ("weight_free", "open_clip", "transformers", "sentence_transformers")
"""Accepted values of ``kind`` in :func:`degradation_estimator`."""


def degradation_estimator(kind: str | None = None, **settings: Any) -> DegradationEstimator:
    """A degradation estimator chosen by name; without a name, the weight-free one (no weights, no download).

    Args:
        kind: ``None`` or ``"weight_free"``: :class:`~rankmoe.conditioning.handcrafted.WeightFreeDegradationEstimator`;
            ``"open_clip"``, ``"transformers"``, ``"sentence_transformers"``: the CLIP text-anchor estimator through
            :meth:`~rankmoe.conditioning.clip.ClipDegradationEstimator.from_open_clip` /
            :meth:`~rankmoe.conditioning.clip.ClipDegradationEstimator.from_transformers` /
            :meth:`~rankmoe.conditioning.clip.ClipDegradationEstimator.from_sentence_transformers`.
        **settings: Keyword arguments of that constructor (for example ``model_name="ViT-B-32"``,
            ``pretrained="/weights/open_clip_pytorch_model.bin"``, ``severity="max"``).

    Returns:
        The estimator, frozen and in ``eval()`` mode.

    Raises:
        ValueError: For an unknown ``kind`` (the message lists the accepted ones).
        TypeError: For settings the chosen constructor does not accept.

    Example:
        >>> estimator = degradation_estimator()
        >>> estimator.names
        ('blur', 'noise', 'jpeg', 'resolution')
    """
    kind = "weight_free" if kind is None else kind
    if kind == "weight_free":
        from rankmoe.conditioning.handcrafted import WeightFreeDegradationEstimator

        return WeightFreeDegradationEstimator(**settings)
    if kind not in ESTIMATOR_KINDS:
        raise ValueError(f"unknown degradation estimator kind {kind!r}; choose from {list(ESTIMATOR_KINDS)}")
    from rankmoe.conditioning.clip import ClipDegradationEstimator

    build = {
        "open_clip": ClipDegradationEstimator.from_open_clip,
        "transformers": ClipDegradationEstimator.from_transformers,
        "sentence_transformers": ClipDegradationEstimator.from_sentence_transformers,
    }[kind]
    return build(**settings)
