"""Load-balancing losses and the bias-balancing update as pure functions (tensors in, tensors out).

Axis legend: ``t`` routing decisions (tokens, or samples for per-sample routers), ``s`` slots
(``num_experts`` real experts first, then zero slots).

Every statistic takes optional per-decision ``weights`` ``(t,)`` (typically a 0/1 padding or attention mask):
a decision with weight 0 does not count, and the statistics are weighted means over the remaining decisions.
With no decision left (all weights 0) every loss is 0.
"""

from __future__ import annotations

import torch


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the first axis of ``values`` ``(t, ...)``, weighted by ``weights`` ``(t,)``.

    Args:
        values: ``(t, ...)``, computed in float32.
        weights: ``(t,)`` non-negative, or ``None`` for the plain mean.

    Returns:
        ``(...)``; 0 when every weight is 0.
    """
    values = values.float()
    if weights is None:
        return values.mean(dim=0)
    weights = weights.to(device=values.device, dtype=values.dtype)
    shaped = weights.reshape(-1, *([1] * (values.dim() - 1)))
    return (values * shaped).sum(dim=0) / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def selection_fraction(selected: torch.Tensor, top_k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of all selections that went to each slot: ``f_i = mean_t(selected[t, i]) / top_k``.

    Args:
        selected: Boolean or 0/1 selection mask ``(t, s)`` with exactly ``top_k`` ones per row.
        top_k: ``k``.
        weights: Optional decision weights ``(t,)`` (0 excludes a decision).

    Returns:
        ``(s,)`` summing to 1 (to 0 when no decision counts).
    """
    return weighted_mean(selected, weights) / top_k


def mean_probability(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean router probability of each slot, ``P_i = mean_t(p[t, i])``.

    Args:
        probs: Router probabilities ``(t, s)``.
        weights: Optional decision weights ``(t,)``.

    Returns:
        ``(s,)`` float32, differentiable through ``probs``.
    """
    return weighted_mean(probs, weights)


def switch_loss(
    probs: torch.Tensor, selected: torch.Tensor, top_k: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i * P_i`` over all ``N`` slots (real and zero).

    ``f_i`` is the fraction of selections (:func:`selection_fraction`), ``P_i`` the mean router probability
    (:func:`mean_probability`). It is 1 under exactly uniform routing and grows as load concentrates.

    Args:
        probs: Router probabilities ``(t, s)``.
        selected: Selection mask ``(t, s)``.
        top_k: Slots selected per decision.
        weights: Optional decision weights ``(t,)``.

    Returns:
        Scalar float32 tensor (differentiable through ``probs``).

    Example:
        >>> probs = torch.full((4, 2), 0.5)
        >>> selected = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
        >>> switch_loss(probs, selected, top_k=1)
        tensor(1.)
    """
    num_slots = probs.shape[-1]
    fraction = selection_fraction(selected, top_k, weights)
    return num_slots * torch.sum(fraction * mean_probability(probs, weights))


def degradation_aware_loss(
    probs: torch.Tensor,
    selected: torch.Tensor,
    top_k: int,
    num_experts: int,
    severity: torch.Tensor,
    alpha: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoR's degradation-aware balance loss ``N * sum_i alpha_i * f_i * P_i``.

    Real experts (slots ``i < num_experts``) keep weight ``alpha``. For the zero slots each decision's probability is
    weighted by its severity: ``P_i = mean_t(s_t * p_ti)``, i.e. ``alpha_i = s * alpha``. Severe inputs (``s`` near 1)
    are pushed away from zero slots as hard as the Switch loss pushes, so they use more ranks; mild inputs (``s``
    near 0) are free to pick zero slots and so use fewer. With every severity equal to 1 the loss is
    ``alpha * switch_loss``.

    Args:
        probs: Router probabilities ``(t, s)``.
        selected: Selection mask ``(t, s)``.
        top_k: Slots selected per decision.
        num_experts: Real routed experts (the first ``num_experts`` slots).
        severity: Severity per decision ``(t,)`` in ``[0, 1]``.
        alpha: Overall weight ``alpha``.
        weights: Optional decision weights ``(t,)``.

    Returns:
        Scalar float32 tensor.
    """
    probs = probs.float()
    slot_weights = torch.ones_like(probs)
    slot_weights[:, num_experts:] = severity.to(probs).unsqueeze(-1)
    num_slots = probs.shape[-1]
    fraction = selection_fraction(selected, top_k, weights)
    return alpha * num_slots * torch.sum(fraction * mean_probability(slot_weights * probs, weights))


def z_loss(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t) ** 2``; keeps router logits small.

    Args:
        logits: Router logits ``(t, s)``.
        weights: Optional decision weights ``(t,)``.

    Returns:
        Scalar float32 tensor.
    """
    return weighted_mean(torch.logsumexp(logits.float(), dim=-1).square(), weights)


def selection_bias_update(
    load: torch.Tensor,
    rate: float,
    num_experts: int | None = None,
    mean_active_ranks: float | torch.Tensor | None = None,
    target_active_ranks: float | None = None,
) -> torch.Tensor:
    """The step added to a selection bias by bias balancing (DeepSeek-V3 style, sign updates).

    Without a target every slot moves by ``rate`` toward the mean load:
    ``delta_i = rate * sign(mean(load) - load_i)``; overloaded slots become less likely to be selected.

    With ``target_active_ranks`` the real experts are balanced among themselves and the zero slots among
    themselves, and all zero slots additionally move together by ``rate * sign(mean_active_ranks - target)``:
    too many active ranks make zero slots more attractive, too few make them less. The bias only changes
    *which* slots are selected, never the gate values.

    Args:
        load: Observed load per slot ``(s,)`` (selection counts or fractions).
        rate: Step size ``gamma`` (> 0).
        num_experts: Real experts (first slots); needed with a target.
        mean_active_ranks: Observed mean active ranks; needed with a target.
        target_active_ranks: Desired mean active ranks, or ``None``.

    Returns:
        ``(s,)`` float32 step to add to the bias.

    Example:
        >>> selection_bias_update(torch.tensor([3.0, 1.0, 2.0]), rate=0.1)
        tensor([-0.1000,  0.1000,  0.0000])
    """
    load = load.float()

    def toward_mean(part: torch.Tensor) -> torch.Tensor:
        return rate * torch.sign(part.mean() - part) if part.numel() else part

    if target_active_ranks is None:
        return toward_mean(load)
    if num_experts is None or mean_active_ranks is None:
        raise ValueError("selection_bias_update with target_active_ranks needs num_experts and mean_active_ranks")
    real, zero = load[:num_experts], load[num_experts:]
    excess = torch.as_tensor(mean_active_ranks, dtype=torch.float32, device=load.device) - target_active_ranks
    return torch.cat([toward_mean(real), toward_mean(zero) + rate * torch.sign(excess)])
