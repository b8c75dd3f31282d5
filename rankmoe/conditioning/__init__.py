"""Condition sources for routers: degradation estimators for images and text anchors.

Every estimator returns :class:`DegradationScores` (``scores (b, D)`` and ``severity (b,)`` in ``[0, 1]``), which
``rankmoe.condition(model, scores)`` hands to the routed layers in one call.
"""

from rankmoe.conditioning.anchors import pair_anchor_scores, set_anchor_scores
from rankmoe.conditioning.base import (
    DegradationEstimator,
    DegradationScores,
    SeverityRule,
    aggregate_severity,
    check_images,
    check_severity_rule,
)

__all__ = [
    "DegradationEstimator",
    "DegradationScores",
    "SeverityRule",
    "aggregate_severity",
    "check_images",
    "check_severity_rule",
    "pair_anchor_scores",
    "set_anchor_scores",
]
