"""Routing statistics: the last forward of every layer, and a window of many forwards.

:func:`routing_stats` reads the routing record each layer keeps of its last forward;
:class:`~rankmoe.tracker.RoutingTracker` adds those records up over many forwards (a window of training steps)
and reports slot loads, the mean active ranks per layer and overall, the distribution of active ranks, dead
slots (never selected over the window) and active ranks against severity. :func:`rankmoe.plots.plot_routing`
draws the same numbers.

Axis legend: ``b`` batch, ``n`` tokens, ``r`` ranks, ``s`` slots (real routed experts first, then zero slots),
``p`` recorded samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankmoe.condition import rankmoe_layers
from rankmoe.losses.collect import decision_weights
from rankmoe.losses.functional import weighted_mean
from rankmoe.routers.selection import active_ranks, selection_mask


@dataclass
class LayerRoutingStats:
    """Routing statistics of one adapter in one layer, from its last forward.

    Attributes:
        mean_active_ranks: Mean ranks in use per routing decision (shared + ``expert_rank`` per selected expert).
        slot_load: ``(s,)`` fraction of decisions that selected each slot (sums to ``top_k``).
        zero_fraction: Fraction of all selections that went to zero slots.
        num_decisions: Routing decisions behind the numbers (tokens or samples).
        level: ``"token"``, ``"sample"`` or ``"shared"`` (nothing routed).
    """

    mean_active_ranks: float
    slot_load: torch.Tensor
    zero_fraction: float
    num_decisions: int
    level: str


def routing_stats(
    model: nn.Module, adapter_name: str | None = None, token_mask: torch.Tensor | None = None
) -> dict[str, LayerRoutingStats]:
    """Per-layer routing statistics of the last forward.

    Layers whose adapter routes nothing (every rank shared) report their ``r`` as active ranks. Layers that
    have not run since the adapter was added are left out.

    Args:
        model: A model carrying RankMoE adapters.
        adapter_name: Adapter to report; defaults to each layer's first active adapter.
        token_mask: Optional padding / attention mask ``(b, n)`` of the last forward (nonzero = real token);
            masked positions are left out (see :func:`rankmoe.losses.collect.decision_weights`).

    Returns:
        ``{module name: LayerRoutingStats}``.

    Raises:
        ValueError: If ``token_mask`` does not fit a token-routed layer.
    """
    stats: dict[str, LayerRoutingStats] = {}
    for name, layer in rankmoe_layers(model):
        adapter = adapter_name or next(iter(layer.active_adapters), None)
        if adapter is None or adapter not in layer.slot_layout:
            continue
        layout = layer.slot_layout[adapter]
        if not layout.is_routed:
            stats[name] = LayerRoutingStats(float(layout.r), torch.zeros(0), 0.0, 0, "shared")
            continue
        record = layer._rankmoe_records.get(adapter)
        if record is None:
            continue
        with torch.no_grad():
            weights = decision_weights(record, token_mask, name)
            top = record.flat("top_indices")
            load = weighted_mean(selection_mask(top, layout.num_slots), weights)
            zero = float(weighted_mean((top >= layout.num_experts).float().mean(dim=-1), weights))
            stats[name] = LayerRoutingStats(
                mean_active_ranks=float(weighted_mean(active_ranks(top, layout), weights)),
                slot_load=load.cpu(),
                zero_fraction=zero,
                num_decisions=int(top.shape[0]) if weights is None else int(weights.sum()),
                level=record.level,
            )
    return stats


def routing_summary(model: nn.Module, adapter_name: str | None = None) -> str:
    """A plain-text table of :func:`routing_stats`: one line per layer and the overall mean.

    Args:
        model: A model carrying RankMoE adapters.
        adapter_name: Adapter to report; defaults to each layer's first active adapter.

    Returns:
        One line per layer (routing level, mean active ranks, zero-slot share, max/mean slot load) and a last
        line with :func:`overall_active_ranks`; a short note when no layer has routed yet.
    """
    stats = routing_stats(model, adapter_name)
    if not stats:
        return "no routing recorded yet (run a forward pass first)"
    width = max(len(name) for name in stats)
    lines = [f"{'layer'.ljust(width)}  level   active ranks  zero-slot share  max/mean slot load"]
    for name, item in stats.items():
        balance = float(item.slot_load.max() / item.slot_load.mean()) if item.slot_load.numel() else float("nan")
        lines.append(
            f"{name.ljust(width)}  {item.level:<6}  {item.mean_active_ranks:12.2f}  {item.zero_fraction:15.3f}"
            f"  {balance:18.2f}"
        )
    lines.append(f"{'mean'.ljust(width)}          {overall_active_ranks(stats):12.2f}")
    return "\n".join(lines)


def overall_active_ranks(stats: dict[str, LayerRoutingStats]) -> float:
    """Mean active ranks over layers: the per-layer means averaged with equal weight per layer.

    Every layer counts once, however many routing decisions (tokens or samples) it made, so a per-token layer
    with thousands of tokens does not outweigh a per-sample layer.

    Args:
        stats: Per-layer statistics, as returned by :func:`routing_stats` or
            :meth:`~rankmoe.tracker.RoutingTracker.stats`.

    Returns:
        The mean of ``mean_active_ranks`` over ``stats``; ``nan`` when ``stats`` is empty.

    Example:
        >>> layer = LayerRoutingStats(4.0, torch.zeros(0), 0.0, 0, "shared")
        >>> overall_active_ranks({"a": layer, "b": LayerRoutingStats(2.0, torch.zeros(0), 0.0, 0, "shared")})
        3.0
    """
    if not stats:
        return float("nan")
    return sum(item.mean_active_ranks for item in stats.values()) / len(stats)
