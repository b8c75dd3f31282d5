"""Load-balancing losses as pure functions (tensors in, scalar tensor out).

Axis legend: ``t`` routing decisions (tokens, or samples for per-sample routers), ``s`` slots
(``num_experts`` real experts first, then zero slots).
"""

from __future__ import annotations

import torch


def selection_fraction(selected: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of all selections that went to each slot: ``f_i = (1 / (t * k)) * sum_t selected[t, i]``.

    Args:
        selected: Boolean or 0/1 selection mask ``(t, s)`` with exactly ``top_k`` ones per row.
        top_k: ``k``.

    Returns:
        ``(s,)`` summing to 1.
    """
    return selected.float().sum(dim=0) / (selected.shape[0] * top_k)


def switch_loss(probs: torch.Tensor, selected: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i * P_i`` over all slots (real and zero).

    ``f_i`` is the fraction of selections (:func:`selection_fraction`), ``P_i`` the mean router probability.
    Under exactly uniform routing the loss is 1, its minimum for a given ``P``-uniformity.

    Args:
        probs: Router probabilities ``(t, s)``.
        selected: Selection mask ``(t, s)``.
        top_k: Slots selected per decision.

    Returns:
        Scalar tensor (differentiable through ``probs``).
    """
    num_slots = probs.shape[-1]
    return num_slots * torch.sum(selection_fraction(selected, top_k) * probs.float().mean(dim=0))


def degradation_aware_loss(
    probs: torch.Tensor,
    selected: torch.Tensor,
    top_k: int,
    num_experts: int,
    severity: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """MoR's degradation-aware balance loss ``N * sum_i alpha_i * f_i * P_i``.

    Real experts keep weight ``alpha``; for the zero slots each decision's probability is weighted by its
    severity ``s_t``, i.e. ``P_i = mean_t(s_t * p_ti)`` for ``i >= num_experts``. Severe inputs (``s`` near 1) are
    pushed away from zero slots as hard as the Switch loss pushes; mild inputs (``s`` near 0) are free to pick
    zero slots and so use fewer ranks. With every severity equal to 1 the loss is ``alpha * switch_loss``.

    Args:
        probs: Router probabilities ``(t, s)``.
        selected: Selection mask ``(t, s)``.
        top_k: Slots selected per decision.
        num_experts: Real routed experts (the first ``num_experts`` slots).
        severity: Severity per decision ``(t,)`` in ``[0, 1]``.
        alpha: Overall weight ``alpha``.

    Returns:
        Scalar tensor.
    """
    probs = probs.float()
    weights = torch.ones_like(probs)
    weights[:, num_experts:] = severity.float().unsqueeze(-1)
    num_slots = probs.shape[-1]
    weighted_mean_probs = (weights * probs).mean(dim=0)
    return alpha * num_slots * torch.sum(selection_fraction(selected, top_k) * weighted_mean_probs)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t) ** 2``; keeps router logits small.

    Args:
        logits: Router logits ``(t, s)``.

    Returns:
        Scalar tensor.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
