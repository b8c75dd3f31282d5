"""The estimator protocol: DegradationScores, severity rules, image checks, anchors, condition(model, scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import get_peft_model

import rankmoe
from rankmoe.conditioning import (
    DegradationEstimator,
    DegradationScores,
    aggregate_severity,
    check_images,
    pair_anchor_scores,
    set_anchor_scores,
)


class MeanBrightness(DegradationEstimator):
    """A toy estimator: darkness and redness, to exercise the base class."""

    names = ("darkness", "redness")

    def score(self, images: torch.Tensor) -> torch.Tensor:
        darkness = 1 - images.mean(dim=(1, 2, 3))
        redness = images[:, 0].mean(dim=(1, 2)) * 2  # may exceed 1: the base class clamps
        return torch.stack([darkness, redness], dim=-1)


def test_base_class_validates_clamps_and_follows_the_images() -> None:
    estimator = MeanBrightness(severity="max")
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    images[0, 0] = 1.0
    result = estimator(images)
    assert result.scores.dtype == result.severity.dtype == torch.float64
    assert result.names == ("darkness", "redness")
    assert float(result.scores[0, 1]) == 1.0  # clamped
    torch.testing.assert_close(result.severity, result.scores.amax(dim=-1))
    assert not estimator.training
    estimator.train()
    assert not estimator.training  # estimators never train


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.randint(0, 255, (1, 3, 4, 4), dtype=torch.uint8), TypeError, "uint8"),
        (np.zeros((1, 3, 4, 4)), TypeError, "ndarray"),
        (torch.rand(3, 4, 4), ValueError, r"\(b, 3, h, w\)"),
        (torch.rand(1, 4, 4, 4), ValueError, "3 \\(RGB\\) channels"),
        (torch.rand(1, 1, 4, 4), ValueError, "channels"),
        (torch.rand(1, 3, 4, 4) * 2 - 1, ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 4, 4), float("nan")), ValueError, r"\[0, 1\]"),
        (torch.rand(0, 3, 4, 4), ValueError, "empty"),
    ],
)
def test_bad_images_are_clear_errors(images, error, match) -> None:
    with pytest.raises(error, match=match):
        check_images(images)
    with pytest.raises(error, match=match):
        MeanBrightness()(images)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 1000))
def test_severity_rules_match_their_definitions(b, d, seed) -> None:
    scores = torch.rand(b, d, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(aggregate_severity(scores, "mean"), scores.mean(-1))
    torch.testing.assert_close(aggregate_severity(scores, "max"), scores.max(-1).values)
    weights = [float(i + 1) for i in range(d)]
    expected = [sum(w * float(v) for w, v in zip(weights, row, strict=True)) / sum(weights) for row in scores]
    torch.testing.assert_close(aggregate_severity(scores, weights), torch.tensor(expected))
    torch.testing.assert_close(aggregate_severity(scores, lambda s: s[:, 0] * 3), (scores[:, 0] * 3).clamp(0, 1))


@pytest.mark.parametrize("rule", ["median", [1.0], [-1.0, 2.0], [0.0, 0.0], lambda s: s])
def test_bad_severity_rules_are_clear_errors(rule) -> None:
    with pytest.raises(ValueError, match="severity"):
        aggregate_severity(torch.rand(2, 2), rule)
    if not callable(rule):
        with pytest.raises(ValueError, match="severity"):
            MeanBrightness(severity=rule)(torch.rand(1, 3, 4, 4))


def test_scores_index_and_move() -> None:
    scores = DegradationScores(torch.rand(3, 2), torch.rand(3), ("a", "b"))
    tiles = scores[[0, 0, 2]]
    assert len(tiles) == 3 and torch.equal(tiles.scores[1], scores.scores[0])
    assert torch.equal(scores[1].severity, scores.severity[1:2])
    assert scores.to(torch.float64).scores.dtype == torch.float64
    assert set(scores.as_dict()) == {"a", "b", "severity"}
    with pytest.raises(ValueError, match="shape"):
        DegradationScores(torch.rand(3, 2), torch.rand(3), ("a",))
    with pytest.raises(ValueError, match="severity"):
        DegradationScores(torch.rand(3, 2), torch.rand(2), ("a", "b"))


@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6), st.floats(0.5, 100), st.integers(0, 1000))
def test_anchor_formulas_match_a_hand_computation(b, d, e, scale, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    features, positive, negative = (torch.randn(n, e, generator=generator, dtype=torch.float64) for n in (b, d, d))

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    f, p, n = features.numpy(), positive.numpy(), negative.numpy()
    pair = np.array([[math.exp(scale * cos(f[i], n[j])) / (math.exp(scale * cos(f[i], p[j]))
                                                         + math.exp(scale * cos(f[i], n[j])))
                      for j in range(d)] for i in range(b)])
    np.testing.assert_allclose(pair_anchor_scores(features, positive, negative, scale).numpy(), pair, rtol=1e-5,
                               atol=1e-7)
    logits = np.array([[scale * cos(f[i], p[j]) for j in range(d)] for i in range(b)])
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(set_anchor_scores(features, positive, scale).numpy(), softmax, rtol=1e-5, atol=1e-7)


def test_condition_takes_scores_and_severity_in_one_argument() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    config = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, target_modules=["0"], router="condition",
                                   router_kwargs={"condition_dim": 2}, balance_loss="degradation_aware")
    model = get_peft_model(net, config)
    images = torch.rand(3, 3, 8, 8)
    scores = MeanBrightness()(images)
    x = torch.randn(3, 4)
    with rankmoe.condition(model, scores):
        out = model(x)
    record = dict(rankmoe.rankmoe_layers(model))["base_model.model.0"]._rankmoe_records["default"]
    torch.testing.assert_close(record.severity, scores.severity)
    with rankmoe.condition(model, scores.scores, severity=scores.severity):
        torch.testing.assert_close(model(x), out)
    override = torch.zeros(3)
    with rankmoe.condition(model, scores, severity=override):
        model(x)
    assert torch.equal(dict(rankmoe.rankmoe_layers(model))["base_model.model.0"]._rankmoe_records["default"].severity,
                       override)
