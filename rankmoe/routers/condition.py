"""Per-sample router driven by an external condition vector (for example degradation scores)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankmoe.routers.base import LayerSpec, Router, RoutingInputs, SlotLayout
from rankmoe.routers.registry import register_router
from rankmoe.utils.validation import check_bool, check_int, check_positive_float


@register_router("condition")
class ConditionRouter(Router):
    """Per-sample router on an external condition ``(b, c)`` set with :func:`rankmoe.condition`.

    The layer input is not looked at, so the routing of a sample is known before the layer runs (this is
    what makes per-image merging possible). With ``hidden_features`` the map is a two-layer MLP
    (``Linear -> SiLU -> Linear``), otherwise one linear map.

    Args:
        layout: Slot layout.
        spec: Geometry of the adapted layer (unused: the router only sees the condition).
        condition_dim: Width ``c`` of the condition vector. Required.
        hidden_features: Width of an optional hidden layer.
        bias: Learn biases.
        init_scale: Output weights start as ``N(0, init_scale**2 / fan_in)``.
    """

    level = "sample"
    requires_condition = True
    reads_input = False

    def __init__(
        self,
        layout: SlotLayout,
        spec: LayerSpec,
        condition_dim: int,
        hidden_features: int | None = None,
        bias: bool = True,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__(layout, spec)
        self.condition_dim = condition_dim
        self.init_scale = float(init_scale)
        if hidden_features:
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(condition_dim, hidden_features, bias=bias),
                nn.SiLU(),
                nn.Linear(hidden_features, layout.num_slots, bias=bias),
            )
        else:
            self.proj = nn.Linear(condition_dim, layout.num_slots, bias=bias)
        self.reset_parameters()

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], layout: SlotLayout) -> None:
        super().check_kwargs(kwargs, layout)
        if "condition_dim" not in kwargs:
            raise ValueError(
                "router='condition' needs router_kwargs['condition_dim'] (the width of the condition vector), "
                f"got router_kwargs={kwargs!r}"
            )
        check_int("router_kwargs['condition_dim']", kwargs["condition_dim"], minimum=1)
        if kwargs.get("hidden_features") is not None:
            check_int("router_kwargs['hidden_features']", kwargs["hidden_features"], minimum=1)
        if "bias" in kwargs:
            check_bool("router_kwargs['bias']", kwargs["bias"])
        if "init_scale" in kwargs:
            check_positive_float("router_kwargs['init_scale']", kwargs["init_scale"], allow_zero=True)

    def reset_parameters(self, init_weights: bool = True) -> None:
        linears = [m for m in self.proj.modules() if isinstance(m, nn.Linear)]
        for linear in linears[:-1]:
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        last = linears[-1]
        nn.init.normal_(last.weight, std=self.init_scale / math.sqrt(last.in_features))
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, inputs: RoutingInputs) -> torch.Tensor:
        """Logits ``(b, s)`` from the condition ``(b, c)``."""
        condition = inputs.condition
        if condition is None:
            raise ValueError(
                "router 'condition' needs a per-sample condition but none is set; wrap the call in "
                "`with rankmoe.condition(model, cond): ...` or call rankmoe.set_condition(model, cond)"
            )
        if condition.shape[-1] != self.condition_dim:
            raise ValueError(
                f"condition has width {condition.shape[-1]} (shape {tuple(condition.shape)}), but this router was "
                f"built with condition_dim={self.condition_dim}"
            )
        weight = next(self.proj.parameters())
        return self.proj(condition.to(device=weight.device, dtype=weight.dtype))
