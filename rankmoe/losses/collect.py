"""``aux_loss(model)``: the configured routing losses of every routed layer, from the layers' last records.

Axis legend: ``b`` batch, ``n`` tokens, ``t`` routing decisions, ``s`` slots.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from rankmoe.losses import functional
from rankmoe.losses.modules import BalanceInputs, BalanceSettings
from rankmoe.records import RoutingRecord
from rankmoe.routers.selection import selection_mask


@dataclass
class AuxLoss:
    """The routing losses of one forward pass.

    ``total`` is what you add to the task loss. It is the mean, over every routed (layer, adapter) pair that ran,
    of ``balance_loss_weight * balance + z_loss_weight * z``, so its size does not grow with the number of layers.
    When no routed layer ran (every rank shared, or no forward yet) ``total`` is a zero tensor, ``num_layers`` is 0
    and adding it changes nothing.

    Attributes:
        total: Scalar float32 tensor, differentiable through the router logits of the last forward.
        terms: Unweighted means over the pairs: ``"z"`` always, ``"balance"`` where a balance loss is configured.
        per_layer: ``{name: {"balance": ..., "z": ..., "total": ...}}`` per pair; the name is the module name, with
            ``"/<adapter>"`` appended when several adapters are active.
        num_layers: Routed (layer, adapter) pairs behind the numbers.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    per_layer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    num_layers: int = 0

    def log_dict(self, prefix: str = "rankmoe/") -> dict[str, float]:
        """Plain floats for loggers: ``{prefix}aux_loss`` and ``{prefix}<term>_loss`` per term."""
        logs = {f"{prefix}aux_loss": float(self.total.detach())}
        logs.update({f"{prefix}{name}_loss": float(value.detach()) for name, value in self.terms.items()})
        return logs


def decision_weights(record: RoutingRecord, token_mask: torch.Tensor | None, layer_name: str) -> torch.Tensor | None:
    """Per-decision weights ``(t,)`` of ``record`` from a padding / attention mask, or ``None`` (all count).

    Token-level records need a mask with exactly their token axes (``(b, n)`` for a transformer layer). A
    sample-level record counts a sample when any of its positions is unmasked.

    Raises:
        ValueError: If the mask's shape does not match the layer's token axes.
    """
    if token_mask is None:
        return None
    mask = token_mask.to(device=record.probs.device)
    if record.level == "sample":
        return mask.reshape(record.batch_size, -1).ne(0).any(dim=-1).float()
    token_shape = tuple(record.probs.shape[:-1])
    if tuple(mask.shape) != token_shape:
        raise ValueError(
            f"token_mask has shape {tuple(mask.shape)}, but layer {layer_name!r} routes per token over axes "
            f"{token_shape}; pass a mask with exactly those axes, or token_mask=None for models whose routed layers "
            "see sequences of different lengths (encoder-decoder cross attention, convolutions)"
        )
    return mask.reshape(-1).ne(0).float()


def decision_severity(record: RoutingRecord) -> torch.Tensor | None:
    """The record's per-sample severity repeated over each sample's decisions, ``(t,)``, or ``None``."""
    if record.severity is None:
        return None
    decisions = record.probs[..., 0].numel()
    per_sample = max(decisions // max(record.batch_size, 1), 1)
    return record.severity.to(record.probs.device).float().repeat_interleave(per_sample)


def balance_inputs(record: RoutingRecord, token_mask: torch.Tensor | None, layer_name: str) -> BalanceInputs:
    """Flatten ``record`` into the :class:`~rankmoe.losses.BalanceInputs` a loss sees."""
    top = record.flat("top_indices")
    return BalanceInputs(
        layout=record.layout,
        logits=record.flat("logits"),
        probs=record.flat("probs"),
        selected=selection_mask(top, record.layout.num_slots),
        severity=decision_severity(record),
        weights=decision_weights(record, token_mask, layer_name),
    )


def routed_records(
    model: nn.Module, adapter_name: str | None = None
) -> Iterator[tuple[str, nn.Module, str, RoutingRecord, BalanceSettings]]:
    """Yield ``(name, layer, adapter, record, settings)`` for every routed adapter with a routing record.

    Only active adapters are visited (or ``adapter_name`` alone). The name gets ``"/<adapter>"`` appended when a
    layer has several active adapters.
    """
    from rankmoe.condition import rankmoe_layers  # local: condition imports the layer module

    for name, layer in rankmoe_layers(model):
        adapters = [adapter_name] if adapter_name is not None else list(layer.active_adapters)
        for adapter in adapters:
            record = layer._rankmoe_records.get(adapter)
            if record is None or adapter not in layer.slot_layout or not layer.slot_layout[adapter].is_routed:
                continue
            label = name if len(adapters) == 1 else f"{name}/{adapter}"
            yield label, layer, adapter, record, layer.balance_settings[adapter]


def aux_loss(model: nn.Module, token_mask: torch.Tensor | None = None, adapter_name: str | None = None) -> AuxLoss:
    """The configured balance loss and z-loss of every routed layer, from each layer's last routing record.

    Call it once after each training forward and add ``.total`` to the task loss. Every forward overwrites the
    records, so gradient accumulation (one call per micro-batch) and activation checkpointing (recomputation during
    ``backward`` overwrites, never appends) count each forward exactly once. Use non-reentrant checkpointing
    (``use_reentrant=False``): reentrant checkpointing runs the forward without autograd, so the routers would get
    no gradient from this loss (a warning says so).

    Args:
        model: A model carrying RankMoE adapters.
        token_mask: Optional padding / attention mask ``(b, n)`` (nonzero = real token); masked positions are left
            out of every statistic.
        adapter_name: Only this adapter (default: every active adapter).

    Returns:
        An :class:`AuxLoss`; its ``total`` is 0 (and ``num_layers`` 0) when no routed layer ran.

    Raises:
        ValueError: If ``token_mask`` does not fit a token-routed layer, or a loss needs severities that were not
            set with :func:`rankmoe.condition`.

    Example:
        >>> import torch, rankmoe
        >>> from peft import get_peft_model
        >>> cfg = rankmoe.RankMoEConfig(r=4, num_shared_ranks=0, top_k=1, target_modules=["0"],
        ...                             balance_loss="switch", balance_loss_weight=0.01)
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), cfg)
        >>> _ = model(torch.randn(3, 8))
        >>> losses = rankmoe.aux_loss(model)
        >>> losses.num_layers, sorted(losses.terms)
        (1, ['balance', 'z'])
    """
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    totals: list[torch.Tensor] = []
    suspicious: list[str] = []
    for name, layer, adapter, record, settings in routed_records(model, adapter_name):
        inputs = balance_inputs(record, token_mask, name)
        values = {"z": functional.z_loss(inputs.logits, inputs.weights)}
        total = settings.z_loss_weight * values["z"]
        if settings.loss is not None:
            values["balance"] = settings.loss(inputs)
            total = total + settings.balance_loss_weight * values["balance"]
        values["total"] = total
        per_layer[name] = values
        totals.append(total)
        router_trains = any(p.requires_grad for p in layer.rankmoe_router[adapter].parameters())
        if router_trains and layer.training and torch.is_grad_enabled() and not record.probs.requires_grad:
            suspicious.append(name)
    if suspicious:
        warnings.warn(
            f"aux_loss: the last forward of {len(suspicious)} routed layer(s) (e.g. {suspicious[0]!r}) ran without "
            "autograd while the model trains, so the routers get no gradient from this loss. Reentrant activation "
            "checkpointing does this; use gradient_checkpointing_kwargs={'use_reentrant': False}",
            stacklevel=2,
        )
    if not totals:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return AuxLoss(total=torch.zeros((), device=device))
    terms = {
        term: torch.stack([values[term] for values in per_layer.values() if term in values]).mean()
        for term in ("balance", "z")
        if any(term in values for values in per_layer.values())
    }
    return AuxLoss(total=torch.stack(totals).mean(), terms=terms, per_layer=per_layer, num_layers=len(totals))
