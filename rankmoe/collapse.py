"""Collapse a routed RankMoE adapter into a plain LoRA for one condition (or for static routing).

Axis legend: ``b`` batch, ``r`` ranks of the adapter, ``k`` active ranks of one layer, ``d_in`` / ``d_out``
features (channels for convolutions), ``c`` condition width.

With per-sample routing every position of a sample uses the same rank gates ``g`` ``(r,)`` (scaling folded in), so
the update of a layer for that sample is ``B diag(g) A``, and only the ``k`` ranks with ``g != 0`` contribute.
Keeping those ranks and folding their gates into ``B`` gives an exact static LoRA of rank ``k`` and scaling 1:

    lora_A = A[active]               # (k, d_in[, *kernel])
    lora_B = B[:, active] * g[active]  # (d_out, k[, 1, 1])

``k`` differs from layer to layer. The result, a :class:`~rankmoe.collapsed.CollapsedLoRA`, can be merged into
the base weights (:meth:`~rankmoe.collapsed.CollapsedLoRA.merge_and_unload`) or exported as a plain PEFT LoRA
adapter that peft and diffusers load without rankmoe (:meth:`~rankmoe.collapsed.CollapsedLoRA.save_pretrained`,
see :mod:`rankmoe.export`). An adapter with static routing (``router="static"`` or every rank shared) collapses
the same way, without a condition.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankmoe.collapsed import CollapsedLayer, CollapsedLoRA, base_model_of, unload_rankmoe_layers
from rankmoe.condition import rankmoe_layers
from rankmoe.layer import RankMoELayer
from rankmoe.layer_merge import is_transformers_conv1d
from rankmoe.routers.base import RoutingInputs
from rankmoe.routers.selection import expand_rank_gates, select_top_k

__all__ = ["CollapsedLayer", "CollapsedLoRA", "base_model_of", "collapse", "unload_rankmoe_layers"]


def collapse(
    model: nn.Module,
    cond: torch.Tensor | None = None,
    *,
    adapter_name: str | None = None,
    from_last_forward: bool = False,
) -> CollapsedLoRA:
    """Collapse a RankMoE adapter into the exact plain LoRA it applies for one condition.

    Per layer the gates come from: the router's fixed routing (``router="static"``) or nothing (every rank shared):
    no condition needed; the condition ``cond`` for routers that route on it (``router="condition"``); or, with
    ``from_last_forward=True``, the per-sample routing recorded by the last forward of the model, which must have
    had batch size 1 (this covers routers that look at the layer input, such as ``pooled``). Per-token routing
    cannot be collapsed: every position has its own gates.

    Args:
        model: A ``PeftModel``, or a diffusers / transformers / plain model carrying RankMoE layers.
        cond: One condition, ``(c,)`` or ``(1, c)``. Required when a layer routes on a condition.
        adapter_name: The adapter to collapse; default: the only active RankMoE adapter.
        from_last_forward: Take the gates of routed layers from the last forward (batch size 1) instead of
            computing them from ``cond``.

    Returns:
        The :class:`CollapsedLoRA`. Layers with no active rank are listed in ``skipped``.

    Raises:
        ValueError: If ``cond`` has more than one row or a wrong shape, a layer needs a condition and none is given,
            a layer routes per token, a layer routes on its input without ``from_last_forward``, the last forward
            had batch size > 1, the adapter is unknown, ambiguous or merged, or it has ``modules_to_save``.

    Example:
        >>> import torch, rankmoe
        >>> from peft import get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> cfg = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, target_modules=["0"], init_weights=False,
        ...                             router="condition", router_kwargs={"condition_dim": 3})
        >>> model = get_peft_model(net, cfg)
        >>> collapsed = collapse(model, torch.rand(3))
        >>> collapsed.ranks
        {'0': 3}
    """
    if cond is not None and from_last_forward:
        raise ValueError("pass either cond or from_last_forward=True, not both: the gates come from one or the other")
    root = base_model_of(model)
    layers = rankmoe_layers(root)
    adapter = _resolve_adapter(layers, adapter_name)
    config = _adapter_config(model, root, adapter)
    if config is not None and getattr(config, "modules_to_save", None):
        raise ValueError(
            f"adapter {adapter!r} has modules_to_save={config.modules_to_save!r}; a collapsed LoRA carries only the "
            "low-rank updates, so those fully trained modules would be lost. Collapsing such adapters is not supported"
        )
    cond_row = None if cond is None else _condition_row(cond)
    collapsed: dict[str, CollapsedLayer] = {}
    skipped: list[str] = []
    for name, layer in layers:
        if adapter not in layer.rankmoe_A:
            continue
        if adapter in layer.merged_adapters:
            raise ValueError(
                f"adapter {adapter!r} is merged into layer {name!r}; call unmerge_adapter() before collapsing it"
            )
        gates = _layer_gates(name, layer, adapter, cond_row, from_last_forward)
        collapsed_layer = _collapse_layer(layer, adapter, gates)
        if collapsed_layer is None:
            skipped.append(name)
        else:
            collapsed[name] = collapsed_layer
    trains_biases = config is not None and getattr(config, "bias", "none") == "all"
    return CollapsedLoRA(
        layers=collapsed,
        adapter_name=adapter,
        skipped=tuple(skipped),
        biases=_trained_biases(root) if trains_biases else {},
        condition=None if cond_row is None else cond_row[0].detach().clone(),
        task_type=_plain(getattr(config, "task_type", None)),
        base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
    )


# ---------------------------------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """A str-Enum (PEFT's ``TaskType``) as its plain value."""
    return getattr(value, "value", value)


def _resolve_adapter(layers: list[tuple[str, RankMoELayer]], adapter_name: str | None) -> str:
    known: set[str] = set()
    active: set[str] = set()
    for _, layer in layers:
        known |= set(layer.rankmoe_A.keys())
        active |= {name for name in layer.active_adapters if name in layer.rankmoe_A}
    if adapter_name is not None:
        if adapter_name not in known:
            raise ValueError(f"adapter_name={adapter_name!r} is not a RankMoE adapter of this model; adapters: "
                             f"{sorted(known)}")
        return adapter_name
    if len(active) != 1:
        raise ValueError(
            f"the model has {len(active)} active RankMoE adapters ({sorted(active)}); pass adapter_name to choose one"
        )
    return next(iter(active))


def _adapter_config(model: nn.Module, root: nn.Module, adapter: str) -> Any:
    for owner in (model, root):
        configs = getattr(owner, "peft_config", None)
        if isinstance(configs, dict) and adapter in configs:
            return configs[adapter]
    return None


def _condition_row(cond: Any) -> torch.Tensor:
    """``cond`` as one row ``(1, c)``."""
    if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
        raise ValueError(
            f"cond must be a floating tensor of shape (c,) or (1, c), got {type(cond).__name__} "
            f"{tuple(getattr(cond, 'shape', ()))}"
        )
    if cond.dim() == 1:
        return cond.unsqueeze(0)
    if cond.dim() == 2 and cond.shape[0] == 1:
        return cond
    if cond.dim() == 2:
        raise ValueError(
            f"cond has shape {tuple(cond.shape)}: {cond.shape[0]} conditions, but one collapsed LoRA serves one "
            "condition; pass a single row, shape (c,) or (1, c), and collapse once per condition"
        )
    raise ValueError(f"cond must have shape (c,) or (1, c), got {tuple(cond.shape)}")


def _layer_gates(
    name: str, layer: RankMoELayer, adapter: str, cond_row: torch.Tensor | None, from_last_forward: bool
) -> torch.Tensor:
    """Rank gates ``(r,)`` of ``adapter`` in layer ``name``, scaling folded in, float64."""
    scaling = layer.scaling[adapter]
    layout = layer.slot_layout[adapter]
    if not layout.is_routed:
        return torch.full((layout.r,), scaling, dtype=torch.float64)
    if layer.is_static(adapter):
        return layer.static_gates(adapter).detach().double()
    router = layer.rankmoe_router[adapter]
    where = f"layer {name!r} (adapter {adapter!r}, router {layer.router_name[adapter]!r})"
    if router.level == "token":
        raise ValueError(
            f"{where} routes per token: every position has its own gates, so no single LoRA reproduces it; only "
            "per-sample or static routing can be collapsed"
        )
    if from_last_forward:
        record = layer._rankmoe_records.get(adapter)
        if record is None:
            raise ValueError(f"{where} has no routing record: run one forward with batch size 1 before collapsing")
        if record.level != "sample":
            raise ValueError(f"{where} recorded per-token routing, which cannot be collapsed")
        if record.batch_size != 1:
            raise ValueError(
                f"{where}: the last forward had batch size {record.batch_size}; collapsing from the last forward "
                "needs a forward on exactly one sample (batch size 1)"
            )
        rank_gates = expand_rank_gates(record.slot_gates.detach(), layout)[0]
    elif router.requires_condition:
        if cond_row is None:
            raise ValueError(f"{where} routes on a condition; pass cond, one condition of shape (c,) or (1, c)")
        with torch.no_grad():
            # condition routers read only the condition; an empty x makes any router that reads the input fail loudly
            inputs = RoutingInputs(x=cond_row.new_empty((1, 0)), batch_size=1, condition=cond_row)
            rank_gates = select_top_k(router(inputs), layout, router.selection_bias).rank_gates[0]
    else:
        raise ValueError(
            f"{where} routes on the layer input ({type(router).__name__}): its gates are known only after a "
            "forward; run the model on the one sample (batch size 1), then call collapse(model, "
            "from_last_forward=True)"
        )
    return rank_gates.double() * scaling


def _collapse_layer(layer: RankMoELayer, adapter: str, gates: torch.Tensor) -> CollapsedLayer | None:
    """Keep the ranks with a non-zero gate and fold their gates into ``B``; ``None`` if no rank is active."""
    active = torch.nonzero(gates != 0).flatten()
    if active.numel() == 0:
        return None
    lora_a = layer.rankmoe_A[adapter].detach()
    lora_b = layer.rankmoe_B[adapter].detach()
    index = active.to(lora_a.device)
    kept_gates = gates.to(lora_b.device)[index].reshape(1, -1, *([1] * (lora_b.dim() - 2)))
    compute = torch.float64 if lora_b.dtype in (torch.float32, torch.float64) else torch.float32
    folded = (lora_b.index_select(1, index).to(compute) * kept_gates.to(compute)).to(lora_b.dtype)
    base = layer.get_base_layer()
    conv = isinstance(base, (nn.Conv1d, nn.Conv2d))
    return CollapsedLayer(
        lora_A=lora_a.index_select(0, index).clone(),
        lora_B=folded.contiguous(),
        active_ranks=tuple(int(i) for i in active.tolist()),
        fan_in_fan_out=is_transformers_conv1d(base),
        dilation=tuple(base.dilation) if conv else (),
        padding_mode=base.padding_mode if conv else "zeros",
    )


def _trained_biases(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every bias of the model (``bias="all"`` trains them), by plain-model name (``"lin0.bias"``)."""
    tuner_prefixes = [name + "." for name, m in root.named_modules() if isinstance(m, BaseTunerLayer) and name]
    biases = {}
    for name, param in root.named_parameters():
        if not (name == "bias" or name.endswith(".bias")) or ".rankmoe_" in f".{name}":
            continue
        for prefix in tuner_prefixes:
            if name.startswith(prefix + "base_layer."):
                name = prefix + name[len(prefix + "base_layer."):]
                break
        biases[name] = param.detach().clone()
    return biases
