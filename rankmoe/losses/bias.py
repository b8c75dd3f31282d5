"""Bias balancing: move each router's selection-only bias toward balanced load (and an active-rank budget)."""

from __future__ import annotations

import torch
from torch import nn

from rankmoe.losses.collect import balance_inputs, routed_records
from rankmoe.losses.functional import selection_bias_update, selection_fraction, weighted_mean
from rankmoe.routers.selection import active_ranks


@torch.no_grad()
def update_selection_bias(
    model: nn.Module, token_mask: torch.Tensor | None = None, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """One bias-balancing step for every routed adapter with ``selection_bias_update_rate > 0``.

    Reads each layer's last routing record (call it once per training step, after the forward) and adds
    :func:`~rankmoe.losses.selection_bias_update` of the observed load to the router's ``selection_bias``. With
    ``target_active_ranks`` the zero slots' bias also moves so that the layer's mean active ranks approach the
    target. The bias changes which slots are selected, never the gate values; it is a buffer, saved and loaded with
    the adapter, and used at inference too.

    Args:
        model: A model carrying RankMoE adapters.
        token_mask: Optional padding / attention mask ``(b, n)``; masked positions do not count as load.
        adapter_name: Only this adapter (default: every active adapter).

    Returns:
        ``{layer name: observed load (s,)}`` (fraction of selections per slot) for the layers that were updated.
    """
    loads: dict[str, torch.Tensor] = {}
    for name, layer, adapter, record, settings in routed_records(model, adapter_name):
        rate = settings.selection_bias_update_rate
        if rate <= 0:
            continue
        inputs = balance_inputs(record, token_mask, name)
        layout = inputs.layout
        load = selection_fraction(inputs.selected, layout.top_k, inputs.weights)
        mean_active = None
        if settings.target_active_ranks is not None:
            mean_active = weighted_mean(active_ranks(record.flat("top_indices"), layout), inputs.weights)
        bias = layer.rankmoe_router[adapter].selection_bias
        step = selection_bias_update(
            load,
            rate,
            num_experts=layout.num_experts,
            mean_active_ranks=mean_active,
            target_active_ranks=settings.target_active_ranks,
        )
        bias.add_(step.to(bias))
        loads[name] = load.detach().cpu()
    return loads
