"""Balance-loss functions and modules against loop-based numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankmoe import RankMoEConfig
from rankmoe.losses import (
    BALANCE_LOSSES,
    BalanceInputs,
    BalanceLoss,
    DegradationAwareLoss,
    SwitchLoss,
    ZLoss,
    degradation_aware_loss,
    register_balance_loss,
    selection_bias_update,
    switch_loss,
    z_loss,
)
from rankmoe.routers.base import SlotLayout
from rankmoe.routers.selection import selection_mask


def reference_balance(probs, selected, k, slot_weights=None, decision_weights=None) -> float:
    """``N * sum_i f_i * P_i`` with plain loops; ``slot_weights[t, i]`` scales ``p_ti``, rows weighted by
    ``decision_weights[t]``."""
    t, s = probs.shape
    slot_weights = np.ones_like(probs) if slot_weights is None else slot_weights
    decision_weights = np.ones(t) if decision_weights is None else decision_weights
    norm = sum(decision_weights)
    if norm == 0:
        return 0.0
    total = 0.0
    for i in range(s):
        f_i = sum(decision_weights[row] * selected[row, i] for row in range(t)) / (norm * k)
        p_i = sum(decision_weights[row] * slot_weights[row, i] * probs[row, i] for row in range(t)) / norm
        total += f_i * p_i
    return s * total


def reference_z(logits, decision_weights=None) -> float:
    t = logits.shape[0]
    decision_weights = np.ones(t) if decision_weights is None else decision_weights
    if sum(decision_weights) == 0:
        return 0.0
    values = [np.log(np.sum(np.exp(logits[row]))) ** 2 for row in range(t)]
    return sum(w * v for w, v in zip(decision_weights, values, strict=True)) / sum(decision_weights)


@st.composite
def routing_batches(draw):
    t, s = draw(st.integers(1, 12)), draw(st.integers(2, 8))
    k = draw(st.integers(1, s))
    num_experts = draw(st.integers(0, s))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    logits = torch.randn(t, s, generator=generator, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    probs = logits.softmax(-1)
    selected = selection_mask(probs.topk(k, -1).indices, s)
    severity = torch.rand(t, generator=generator, dtype=torch.float64)
    mask = draw(st.none() | st.lists(st.integers(0, 1), min_size=t, max_size=t).map(torch.tensor))
    return logits, probs, selected, k, num_experts, severity, mask


@given(routing_batches())
def test_losses_match_loop_references(batch) -> None:
    logits, probs, selected, k, num_experts, severity, mask = batch
    weights = None if mask is None else mask.numpy()
    p, sel = probs.numpy(), selected.numpy()
    np.testing.assert_allclose(float(switch_loss(probs, selected, k, mask)),
                               reference_balance(p, sel, k, None, weights), rtol=1e-6, atol=1e-12)
    slot_weights = np.ones_like(p)
    slot_weights[:, num_experts:] = severity.numpy()[:, None]
    got = degradation_aware_loss(probs, selected, k, num_experts, severity, alpha=0.3, weights=mask)
    np.testing.assert_allclose(float(got), 0.3 * reference_balance(p, sel, k, slot_weights, weights),
                               rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(z_loss(logits, mask)), reference_z(logits.numpy(), weights), rtol=1e-6, atol=1e-12)


@given(routing_batches())
def test_degradation_aware_equals_alpha_switch_at_full_severity(batch) -> None:
    _, probs, selected, k, num_experts, severity, mask = batch
    ones = torch.ones_like(severity)
    torch.testing.assert_close(
        degradation_aware_loss(probs, selected, k, num_experts, ones, alpha=0.7, weights=mask),
        0.7 * switch_loss(probs, selected, k, mask),
    )


@given(routing_batches(), st.data())
def test_losses_are_invariant_to_permuting_slots(batch, data) -> None:
    logits, probs, selected, k, num_experts, severity, mask = batch
    s = probs.shape[-1]
    perm = torch.tensor(data.draw(st.permutations(range(s))))
    torch.testing.assert_close(switch_loss(probs[:, perm], selected[:, perm], k, mask),
                               switch_loss(probs, selected, k, mask))
    torch.testing.assert_close(z_loss(logits[:, perm], mask), z_loss(logits, mask))
    # the degradation-aware loss distinguishes real from zero slots: permute within each group
    real = torch.tensor(data.draw(st.permutations(range(num_experts))), dtype=torch.long)
    zero = torch.tensor(data.draw(st.permutations(range(num_experts, s))), dtype=torch.long)
    group_perm = torch.cat([real, zero])
    torch.testing.assert_close(
        degradation_aware_loss(probs[:, group_perm], selected[:, group_perm], k, num_experts, severity, weights=mask),
        degradation_aware_loss(probs, selected, k, num_experts, severity, weights=mask),
    )


@given(routing_batches())
def test_masking_equals_dropping_the_masked_decisions(batch) -> None:
    logits, probs, selected, k, num_experts, severity, mask = batch
    if mask is None or not mask.any():
        return
    keep = mask.bool()
    torch.testing.assert_close(switch_loss(probs, selected, k, mask), switch_loss(probs[keep], selected[keep], k))
    torch.testing.assert_close(
        degradation_aware_loss(probs, selected, k, num_experts, severity, weights=mask),
        degradation_aware_loss(probs[keep], selected[keep], k, num_experts, severity[keep]),
    )
    torch.testing.assert_close(z_loss(logits, mask), z_loss(logits[keep]))


def test_every_decision_masked_gives_zero() -> None:
    probs = torch.full((3, 4), 0.25)
    selected = selection_mask(torch.zeros(3, 1, dtype=torch.long), 4)
    assert float(switch_loss(probs, selected, 1, torch.zeros(3))) == 0.0
    assert float(z_loss(torch.zeros(3, 4), torch.zeros(3))) == 0.0


@pytest.mark.parametrize("s", [2, 4, 7])
def test_switch_is_one_under_uniform_top1_routing(s) -> None:
    probs = torch.full((4 * s, s), 1 / s)
    selected = selection_mask(torch.arange(4 * s).remainder(s)[:, None], s)
    torch.testing.assert_close(switch_loss(probs, selected, 1), torch.tensor(1.0))


def test_degradation_aware_pushes_severe_inputs_off_zero_slots() -> None:
    """The gradient on a zero slot's probability scales with the decision's severity (0 for s = 0)."""
    logits = torch.zeros(2, 3, requires_grad=True)
    probs = logits.softmax(-1)
    selected = torch.tensor([[True, False, True], [True, False, True]])
    severity = torch.tensor([1.0, 0.0])
    degradation_aware_loss(probs, selected, 2, num_experts=2, severity=severity).backward()
    zero_grad = logits.grad[:, 2]
    assert zero_grad[0] > 0  # severe: raising the zero slot's logit raises the loss
    severe_vs_mild = logits.grad[0, 2] - logits.grad[1, 2]
    assert severe_vs_mild > 0


def test_z_loss_matches_formula() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (np.log(2.0) ** 2 + np.log(np.exp(1) + np.exp(3)) ** 2) / 2
    np.testing.assert_allclose(float(z_loss(logits)), expected, rtol=1e-6)


def reference_bias_step(load, rate, num_experts=None, mean_active=None, target=None) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)

    def toward(part):
        return np.array([rate * np.sign(part.mean() - value) for value in part]) if len(part) else part

    if target is None:
        return toward(load)
    real, zero = load[:num_experts], load[num_experts:]
    return np.concatenate([toward(real), toward(zero) + rate * np.sign(mean_active - target)])


@given(
    st.lists(st.integers(0, 64).map(lambda count: count / 64), min_size=2, max_size=9),  # loads are count ratios
    st.sampled_from([0.001, 0.05]),
    st.data(),
)
def test_selection_bias_update_matches_reference(load, rate, data) -> None:
    tensor = torch.tensor(load)
    np.testing.assert_allclose(selection_bias_update(tensor, rate).numpy(), reference_bias_step(load, rate), rtol=1e-6)
    num_experts = data.draw(st.integers(1, len(load) - 1))
    mean_active, target = (data.draw(st.integers(0, 40).map(lambda v: v / 4)) for _ in range(2))
    got = selection_bias_update(tensor, rate, num_experts, mean_active, target)
    np.testing.assert_allclose(got.numpy(), reference_bias_step(load, rate, num_experts, mean_active, target),
                               rtol=1e-6, atol=1e-9)


def test_selection_bias_update_with_target_needs_the_observation() -> None:
    with pytest.raises(ValueError, match="mean_active_ranks"):
        selection_bias_update(torch.ones(3), 0.1, target_active_ranks=2.0)


def test_modules_wrap_the_functions() -> None:
    layout = SlotLayout(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=2)
    logits = torch.randn(5, layout.num_slots)
    probs = logits.softmax(-1)
    selected = selection_mask(probs.topk(2, -1).indices, layout.num_slots)
    severity = torch.rand(5)
    inputs = BalanceInputs(layout, logits, probs, selected, severity=severity)
    torch.testing.assert_close(SwitchLoss()(inputs), switch_loss(probs, selected, 2))
    torch.testing.assert_close(ZLoss()(inputs), z_loss(logits))
    torch.testing.assert_close(
        DegradationAwareLoss(alpha=0.5)(inputs), degradation_aware_loss(probs, selected, 2, 4, severity, alpha=0.5)
    )
    with pytest.raises(ValueError, match="severity"):
        DegradationAwareLoss()(BalanceInputs(layout, logits, probs, selected))


def test_registry_names_and_custom_losses() -> None:
    assert BALANCE_LOSSES.names() == ["degradation_aware", "switch", "z_loss"]

    @register_balance_loss("test_entropy")
    class EntropyLoss(BalanceLoss):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, inputs):
            return self.scale * (inputs.probs * inputs.probs.clamp_min(1e-9).log()).sum(-1).mean()

    try:
        config = RankMoEConfig(target_modules=["lin0"], balance_loss="test_entropy", balance_loss_kwargs={"scale": 2})
        assert config.balance_loss == "test_entropy"
        with pytest.raises(ValueError, match="balance_loss_kwargs"):
            RankMoEConfig(target_modules=["lin0"], balance_loss="test_entropy", balance_loss_kwargs={"scal": 2})
        with pytest.raises(ValueError, match="already registered"):
            register_balance_loss("test_entropy")(EntropyLoss)
    finally:
        BALANCE_LOSSES.unregister("test_entropy")
    with pytest.raises(TypeError, match="BalanceLoss"):
        register_balance_loss("test_function")(lambda inputs: inputs.probs.sum())
    assert "test_function" not in BALANCE_LOSSES
