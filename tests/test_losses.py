"""Balance-loss functions against loop-based numpy references."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankmoe.losses import BALANCE_LOSSES, degradation_aware_loss, switch_loss, z_loss
from rankmoe.routers.selection import selection_mask


def reference_switch(probs: np.ndarray, selected: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    t, s = probs.shape
    weights = np.ones_like(probs) if weights is None else weights
    total = 0.0
    for i in range(s):
        f_i = sum(selected[row, i] for row in range(t)) / (t * k)
        p_i = sum(weights[row, i] * probs[row, i] for row in range(t)) / t
        total += f_i * p_i
    return s * total


@given(t=st.integers(1, 12), s=st.integers(2, 8), data=st.data())
def test_switch_and_degradation_aware_match_reference(t, s, data) -> None:
    k = data.draw(st.integers(1, s))
    num_experts = data.draw(st.integers(0, s))
    seed = data.draw(st.integers(0, 10_000))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, s, generator=generator, dtype=torch.float64)
    probs = logits.softmax(-1)
    selected = selection_mask(probs.topk(k, -1).indices, s)
    severity = torch.rand(t, generator=generator, dtype=torch.float64)
    expected = reference_switch(probs.numpy(), selected.numpy(), k)
    np.testing.assert_allclose(float(switch_loss(probs, selected, k)), expected, rtol=1e-6)
    weights = np.ones((t, s))
    weights[:, num_experts:] = severity.numpy()[:, None]
    expected_da = 0.3 * reference_switch(probs.numpy(), selected.numpy(), k, weights)
    got = degradation_aware_loss(probs, selected, k, num_experts, severity, alpha=0.3)
    np.testing.assert_allclose(float(got), expected_da, rtol=1e-6)
    ones = torch.ones(t, dtype=torch.float64)
    np.testing.assert_allclose(
        float(degradation_aware_loss(probs, selected, k, num_experts, ones, alpha=0.3)), 0.3 * expected, rtol=1e-6
    )
    permutation = torch.randperm(s, generator=generator)
    np.testing.assert_allclose(
        float(switch_loss(probs[:, permutation], selected[:, permutation], k)), expected, rtol=1e-6
    )


def test_switch_is_one_under_uniform_top1_routing() -> None:
    s = 4
    probs = torch.full((8, s), 1 / s)
    selected = selection_mask(torch.arange(8).remainder(s)[:, None], s)
    torch.testing.assert_close(switch_loss(probs, selected, 1), torch.tensor(1.0))


def test_z_loss_matches_formula() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (np.log(2.0) ** 2 + np.log(np.exp(1) + np.exp(3)) ** 2) / 2
    np.testing.assert_allclose(float(z_loss(logits)), expected, rtol=1e-6)


def test_registry_names() -> None:
    assert BALANCE_LOSSES.names() == ["degradation_aware", "switch", "z_loss"]
