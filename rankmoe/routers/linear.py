"""Per-token routers computed from the layer input."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankmoe.routers.base import LayerSpec, Router, RoutingInputs, SlotLayout
from rankmoe.routers.registry import register_router
from rankmoe.utils.validation import check_bool, check_positive_float


@register_router("linear")
class LinearRouter(Router):
    """Per-token router: slot logits are a linear map of each token of the layer input.

    For linear layers a token is one position of the input ``(..., d)``; logits are ``(..., s)``. For
    convolutions a token is one *output* position: the router is a convolution with the base layer's
    kernel, stride, padding, padding mode and dilation, so its logits ``(b, *spatial_out, s)`` line up with the output.

    Args:
        layout: Slot layout.
        spec: Geometry of the adapted layer.
        bias: Learn a per-slot bias (a prior over slots).
        init_scale: Weights start as ``N(0, init_scale**2 / fan_in)``, so the initial logits are small and
            routing starts close to uniform.
    """

    level = "token"

    def __init__(self, layout: SlotLayout, spec: LayerSpec, bias: bool = True, init_scale: float = 0.1) -> None:
        super().__init__(layout, spec)
        self.init_scale = float(init_scale)
        if spec.kind == "conv":
            conv_cls = nn.Conv1d if spec.conv_dim == 1 else nn.Conv2d
            self.proj: nn.Module = conv_cls(
                spec.in_features,
                layout.num_slots,
                kernel_size=spec.kernel_size,
                stride=spec.stride,
                padding=spec.padding,
                dilation=spec.dilation,
                padding_mode=spec.padding_mode,
                bias=bias,
            )
        else:
            self.proj = nn.Linear(spec.in_features, layout.num_slots, bias=bias)
        self.reset_parameters()

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], layout: SlotLayout) -> None:
        super().check_kwargs(kwargs, layout)
        if "bias" in kwargs:
            check_bool("router_kwargs['bias']", kwargs["bias"])
        if "init_scale" in kwargs:
            check_positive_float("router_kwargs['init_scale']", kwargs["init_scale"], allow_zero=True)

    def reset_parameters(self, init_weights: bool = True) -> None:
        weight = self.proj.weight
        fan_in = weight[0].numel()
        nn.init.normal_(weight, std=self.init_scale / math.sqrt(fan_in))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, inputs: RoutingInputs) -> torch.Tensor:
        """Logits ``(..., s)`` (linear) or ``(b, *spatial_out, s)`` (conv)."""
        x = inputs.x.to(self.proj.weight.dtype)
        logits = self.proj(x)
        if self.spec.kind == "conv":
            logits = logits.movedim(1, -1)
        return logits
