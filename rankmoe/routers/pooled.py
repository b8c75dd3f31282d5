"""Per-sample router computed from the mean-pooled layer input."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankmoe.routers.base import LayerSpec, Router, RoutingInputs, SlotLayout
from rankmoe.routers.registry import register_router
from rankmoe.utils.validation import check_bool, check_positive_float


def mean_pool_tokens(x: torch.Tensor, spec: LayerSpec, batch_size: int) -> torch.Tensor:
    """Average the token axes of a layer input into one feature vector per sample.

    Args:
        x: Layer input, ``(b, *tokens, d)`` for linear layers (``(b, d)`` means one token per sample, ``(d,)``
            an unbatched sample) or ``(b, d, *spatial)`` for convolutions.
        spec: Geometry of the adapted layer.
        batch_size: ``b``.

    Returns:
        ``(b, d)``.
    """
    if spec.kind == "conv":
        return x.reshape(batch_size, spec.in_features, -1).mean(dim=-1)
    return x.reshape(batch_size, -1, x.shape[-1]).mean(dim=1)


@register_router("pooled")
class PooledRouter(Router):
    """Per-sample router: one routing decision per sample from its mean-pooled input.

    Every token of a sample shares the sample's gates, so with static weights the selected ranks could be
    folded into the weight per sample.

    Args:
        layout: Slot layout.
        spec: Geometry of the adapted layer.
        bias: Learn a per-slot bias.
        init_scale: Weights start as ``N(0, init_scale**2 / d)``.
    """

    level = "sample"

    def __init__(self, layout: SlotLayout, spec: LayerSpec, bias: bool = True, init_scale: float = 0.1) -> None:
        super().__init__(layout, spec)
        self.init_scale = float(init_scale)
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
        nn.init.normal_(self.proj.weight, std=self.init_scale / math.sqrt(self.spec.in_features))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, inputs: RoutingInputs) -> torch.Tensor:
        """Logits ``(b, s)``."""
        pooled = mean_pool_tokens(inputs.x, self.spec, inputs.batch_size)
        return self.proj(pooled.to(self.proj.weight.dtype))
