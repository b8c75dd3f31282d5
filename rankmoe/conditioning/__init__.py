"""Condition sources for routers: degradation estimators for images and text anchors.

Every estimator returns :class:`DegradationScores` (``scores (b, D)`` and ``severity (b,)`` in ``[0, 1]``), which
``rankmoe.condition(model, scores)`` hands to the routed layers in one call.
"""

from rankmoe.conditioning.anchors import pair_anchor_scores, set_anchor_scores
from rankmoe.conditioning.backends import (
    ClipBackend,
    OpenClipBackend,
    SentenceTransformersClipBackend,
    TransformersClipBackend,
)
from rankmoe.conditioning.base import (
    DegradationEstimator,
    DegradationScores,
    SeverityRule,
    aggregate_severity,
    check_images,
    check_severity_rule,
)
from rankmoe.conditioning.cache import ConditionCache, content_keys
from rankmoe.conditioning.clip import ClipDegradationEstimator
from rankmoe.conditioning.clip_assets import build_clip_tokenizer
from rankmoe.conditioning.factory import ESTIMATOR_KINDS, degradation_estimator
from rankmoe.conditioning.handcrafted import DEFAULT_CALIBRATION, Calibration, WeightFreeDegradationEstimator
from rankmoe.conditioning.preprocess import ImageSettings, preprocess_images
from rankmoe.conditioning.prompts import DEFAULT_PROMPTS, DEFAULT_PROMPTS_VERSION, PromptPair, prompt_pairs
from rankmoe.conditioning.text import DEFAULT_LOGIT_SCALE, TextAnchorConditioner, check_prompts, parse_anchors

__all__ = [
    "Calibration",
    "ClipBackend",
    "ClipDegradationEstimator",
    "ConditionCache",
    "DEFAULT_CALIBRATION",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_PROMPTS",
    "DEFAULT_PROMPTS_VERSION",
    "DegradationEstimator",
    "DegradationScores",
    "ESTIMATOR_KINDS",
    "ImageSettings",
    "OpenClipBackend",
    "PromptPair",
    "SentenceTransformersClipBackend",
    "SeverityRule",
    "TextAnchorConditioner",
    "TransformersClipBackend",
    "WeightFreeDegradationEstimator",
    "aggregate_severity",
    "build_clip_tokenizer",
    "check_images",
    "check_prompts",
    "check_severity_rule",
    "content_keys",
    "degradation_estimator",
    "pair_anchor_scores",
    "parse_anchors",
    "preprocess_images",
    "prompt_pairs",
    "set_anchor_scores",
]
