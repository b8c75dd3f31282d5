"""A router with fixed, input-independent routing (ablations, tests, exporting one routing)."""

from __future__ import annotations

from typing import Any

import torch

from rankmoe.routers.base import LayerSpec, Router, RoutingInputs, SlotLayout
from rankmoe.routers.registry import register_router
from rankmoe.utils.validation import check_int


def static_logits(selected: list[int], num_slots: int) -> torch.Tensor:
    """Logits that make top-k selection pick exactly ``selected`` with equal weights.

    Args:
        selected: Distinct slot indices.
        num_slots: ``s``.

    Returns:
        ``(s,)``: 0 for selected slots, a large negative number elsewhere (finite, so softmax and the
        z-loss stay finite).
    """
    logits = torch.full((num_slots,), -1e4)
    logits[list(selected)] = 0.0
    return logits


@register_router("static")
class StaticRouter(Router):
    """Fixed routing: the same ``top_k`` slots for every input, each selected real expert with gate 1.

    With the gate rule of :mod:`rankmoe.routers.selection` a uniform choice over the selected slots gives
    every selected real expert gate 1 (selected zero slots still take their share of the normaliser, so with
    ``z`` zero slots among the ``top_k`` selected the real experts get gate 1 each and the zero slots add
    nothing). Because the gates do not depend on the input, a layer with a static router can be merged.

    Args:
        layout: Slot layout.
        spec: Geometry of the adapted layer (unused).
        selected: The ``top_k`` distinct slot indices to use; defaults to the first ``top_k`` slots (real experts
            come before zero slots).
    """

    level = "sample"
    is_static = True
    reads_input = False

    def __init__(self, layout: SlotLayout, spec: LayerSpec, selected: list[int] | None = None) -> None:
        super().__init__(layout, spec)
        if selected is None:
            selected = list(range(layout.top_k))
        self.register_buffer("logits", static_logits(selected, layout.num_slots), persistent=False)

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any], layout: SlotLayout) -> None:
        super().check_kwargs(kwargs, layout)
        selected = kwargs.get("selected")
        if selected is None:
            return
        if not isinstance(selected, list):
            raise ValueError(f"router_kwargs['selected'] must be a list of slot indices, got {selected!r}")
        for index in selected:
            check_int("router_kwargs['selected'] entries", index, minimum=0)
            if index >= layout.num_slots:
                raise ValueError(
                    f"router_kwargs['selected'] contains slot {index}, but there are only num_slots="
                    f"{layout.num_slots} slots (valid: 0..{layout.num_slots - 1})"
                )
        if len(set(selected)) != len(selected) or len(selected) != layout.top_k:
            raise ValueError(
                f"router_kwargs['selected'] must hold exactly top_k={layout.top_k} distinct slots, got {selected!r}"
            )

    def fixed_logits(self) -> torch.Tensor:
        """The logits ``(s,)`` used for every input."""
        return self.logits

    def forward(self, inputs: RoutingInputs) -> torch.Tensor:
        """Logits ``(b, s)``, the same row for every sample."""
        return self.logits.unsqueeze(0).expand(inputs.batch_size, -1)
