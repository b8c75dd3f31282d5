"""CLIP text-anchor degradation estimator (MoR's degradation estimation module).

Each degradation dimension ``i`` is a prompt pair (positive ``p_i``, negative ``n_i``). With ``f`` the CLIP image
embedding, ``cos`` the cosine similarity and ``t`` the logit scale::

    s_i = exp(t * cos(f, n_i)) / (exp(t * cos(f, p_i)) + exp(t * cos(f, n_i)))
        = sigmoid(t * (cos(f, n_i) - cos(f, p_i)))

the probability of the negative prompt in a two-way softmax (CLIP-IQA with the roles reversed): higher means more
degraded. MoR prints ``d`` as a "cosine distance"; only a *similarity* makes ``s_i`` grow with degradation as the
paper states, so similarities are used. MoR's temperature is unknown; the default ``t`` is the model's own trained
``exp(logit_scale)`` (100 for OpenAI CLIP), as in CLIP-IQA.

Axis legend: ``b`` images, ``D`` prompt pairs (dimensions), ``e`` embedding width.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from rankmoe.conditioning.anchors import pair_anchor_scores
from rankmoe.conditioning.backends import (
    ClipBackend,
    OpenClipBackend,
    SentenceTransformersClipBackend,
    TransformersClipBackend,
)
from rankmoe.conditioning.base import DegradationEstimator, SeverityRule, check_severity_rule
from rankmoe.conditioning.prompts import (
    DEFAULT_PROMPTS,
    DEFAULT_PROMPTS_VERSION,
    PromptPair,
    PromptsLike,
    prompt_pairs,
)


class ClipDegradationEstimator(DegradationEstimator):
    """Score images along prompt-pair dimensions with a frozen CLIP model (MoR's degradation estimation module).

    The prompt embeddings are computed once, at construction, in one ``encode_text`` call on the backend's device,
    and kept as (non-persistent) buffers that follow ``.to(...)``; the prompts are immutable. Each call then
    preprocesses the images in torch (see :func:`~rankmoe.conditioning.preprocess.preprocess_images`), embeds them
    and applies :func:`~rankmoe.conditioning.anchors.pair_anchor_scores`.

    Args:
        backend: A :class:`~rankmoe.conditioning.backends.ClipBackend` (open_clip, transformers or
            sentence-transformers, or your own); or use :meth:`from_open_clip`, :meth:`from_transformers`,
            :meth:`from_sentence_transformers`.
        prompts: ``{name: (positive, negative)}``, a sequence of
            :class:`~rankmoe.conditioning.prompts.PromptPair`, or ``None`` for
            :data:`~rankmoe.conditioning.prompts.DEFAULT_PROMPTS` (7 dimensions). The score columns follow this
            order.
        severity: How the per-image severity is formed from the ``D`` scores: ``"mean"`` (default), ``"max"``,
            ``D`` non-negative weights, or a callable ``(b, D) -> (b,)`` (see
            :func:`~rankmoe.conditioning.base.aggregate_severity`).
        logit_scale: The temperature ``t``; default: the backend's trained ``exp(logit_scale)``. Required when the
            backend has none.

    Raises:
        TypeError: If ``backend`` is not a ``ClipBackend``.
        ValueError: For an invalid prompt set or severity rule, a missing or non-positive logit scale, or a backend
            whose text encoder does not return one embedding per prompt.

    Example:
        With real weights from a local file (not run here):

        ```python
        estimator = ClipDegradationEstimator.from_open_clip(
            "ViT-B-32", pretrained="/models/clip/open_clip_pytorch_model.bin", device="cuda")
        scores = estimator(images)               # images (b, 3, h, w) in [0, 1]
        with rankmoe.condition(unet, scores):    # routes on scores.scores (b, 7), severity (b,) for the loss
            ...
        ```
    """

    def __init__(
        self,
        backend: ClipBackend,
        prompts: PromptsLike | None = None,
        *,
        severity: SeverityRule = "mean",
        logit_scale: float | None = None,
    ) -> None:
        super().__init__(severity)
        if not isinstance(backend, ClipBackend):
            raise TypeError(
                f"backend must be a rankmoe ClipBackend, got {type(backend).__name__}; wrap a loaded model with "
                "OpenClipBackend / TransformersClipBackend / SentenceTransformersClipBackend or use "
                "ClipDegradationEstimator.from_open_clip / from_transformers / from_sentence_transformers"
            )
        self._prompts = prompt_pairs(prompts)
        self.prompts_version = DEFAULT_PROMPTS_VERSION if self._prompts == DEFAULT_PROMPTS else "custom"
        self.names = tuple(pair.name for pair in self._prompts)
        check_severity_rule(severity, len(self.names))
        self.backend = backend
        scale = backend.logit_scale if logit_scale is None else logit_scale
        if scale is None:
            raise ValueError(
                f"{backend.description} has no logit scale; pass logit_scale= (trained CLIP models use 100)"
            )
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = float(scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"logit_scale must be a positive finite number, got {scale!r}")
        self.logit_scale = float(scale)
        texts = [pair.positive for pair in self._prompts] + [pair.negative for pair in self._prompts]
        with torch.no_grad():
            text = backend.encode_text(texts)
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[0] != len(texts):
            raise ValueError(
                f"{backend.description}.encode_text must return ({len(texts)}, e) embeddings for {len(texts)} "
                f"prompts, got {type(text).__name__} {tuple(getattr(text, 'shape', ()))}"
            )
        text = F.normalize(text.detach().float(), dim=-1)
        count = len(self._prompts)
        self.register_buffer("positive_embeddings", text[:count].clone(), persistent=False)
        self.register_buffer("negative_embeddings", text[count:].clone(), persistent=False)

    @property
    def prompts(self) -> tuple[PromptPair, ...]:
        """The prompt pairs, in score-column order (immutable: build a new estimator for other prompts)."""
        return self._prompts

    @property
    def embedding_dim(self) -> int:
        """``e``, the width of the text (and image) embeddings."""
        return int(self.positive_embeddings.shape[-1])

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, D)`` probabilities of the negative prompts for validated images ``(b, 3, h, w)`` in ``[0, 1]``.

        Raises:
            ValueError: If the image embeddings' width differs from the text embeddings' (mismatched encoders).
        """
        features = self.backend.encode_images(self.backend.preprocess(images))
        if features.dim() != 2 or features.shape != (images.shape[0], self.embedding_dim):
            raise ValueError(
                f"mismatched backend: {self.backend.description} embeds images as {tuple(features.shape)} but the "
                f"prompts as (., {self.embedding_dim}); image and text encoders must share one embedding space"
            )
        positive = self.positive_embeddings.to(features.device)
        negative = self.negative_embeddings.to(features.device)
        return pair_anchor_scores(features, positive, negative, self.logit_scale)

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, logit_scale={self.logit_scale:g}, severity={self.severity_rule!r}"

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        prompts: PromptsLike | None = None,
        severity: SeverityRule = "mean",
        logit_scale: float | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> ClipDegradationEstimator:
        """Estimator on an open_clip model: ``from_open_clip("ViT-B-32", pretrained="<file>")``.

        ``model_name`` and ``pretrained`` (a local weights file, a tag, or ``None`` for random weights) go to
        :meth:`~rankmoe.conditioning.backends.OpenClipBackend.from_pretrained` with ``device`` and ``**kwargs``;
        the other arguments as in the constructor.
        """
        _check_early(prompts, severity)  # before loading the model
        backend = OpenClipBackend.from_pretrained(model_name, pretrained, device=device, **kwargs)
        return cls(backend, prompts, severity=severity, logit_scale=logit_scale)

    @classmethod
    def from_transformers(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        prompts: PromptsLike | None = None,
        severity: SeverityRule = "mean",
        logit_scale: float | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> ClipDegradationEstimator:
        """Estimator on a transformers ``CLIPModel`` folder (or hub id): ``from_transformers("/models/clip-vit-b32")``.

        Loads through :meth:`~rankmoe.conditioning.backends.TransformersClipBackend.from_pretrained`; the other
        arguments as in the constructor.
        """
        _check_early(prompts, severity)  # before loading the model
        backend = TransformersClipBackend.from_pretrained(
            name_or_path, local_files_only=local_files_only, device=device, dtype=dtype
        )
        return cls(backend, prompts, severity=severity, logit_scale=logit_scale)

    @classmethod
    def from_sentence_transformers(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        text_model: Any = None,
        prompts: PromptsLike | None = None,
        severity: SeverityRule = "mean",
        logit_scale: float | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
    ) -> ClipDegradationEstimator:
        """Estimator on a sentence-transformers CLIP model (``"clip-ViT-B-32"`` layout), optionally with a text model.

        Loads through :meth:`~rankmoe.conditioning.backends.SentenceTransformersClipBackend.from_pretrained`; the
        other arguments as in the constructor.
        """
        _check_early(prompts, severity)  # before loading the model
        backend = SentenceTransformersClipBackend.from_pretrained(
            name_or_path, text_model=text_model, device=device, local_files_only=local_files_only
        )
        return cls(backend, prompts, severity=severity, logit_scale=logit_scale)


def _check_early(prompts: PromptsLike | None, severity: SeverityRule) -> None:
    check_severity_rule(severity, len(prompt_pairs(prompts)))


__all__ = ["ClipDegradationEstimator"]
