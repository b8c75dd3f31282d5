"""Static adapters of a RankMoE layer: fixed gates, diffusers-style scaling, and PEFT's merge / unmerge."""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from rankmoe.functional import gated_delta_weight
from rankmoe.routers.selection import select_top_k


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (a linear layer whose weight is stored ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class StaticAdapterMixin:
    """Methods of :class:`~rankmoe.RankMoELayer` that work on the adapter weights, not on an input.

    Static gates (no router, or a static router) make an adapter an ordinary low-rank update ``B diag(g) A`` that
    can be merged into the base weight; the scaling methods implement diffusers' adapter weights.
    """

    def is_static(self, adapter: str) -> bool:
        """Whether ``adapter``'s gates are the same for every input (no router, or a static router)."""
        layout = self.slot_layout[adapter]
        return not layout.is_routed or self.rankmoe_router[adapter].is_static

    def static_gates(self, adapter: str) -> torch.Tensor:
        """Rank gates ``(r,)`` of a static adapter, scaling folded in.

        Raises:
            ValueError: If the adapter's routing depends on the input.
        """
        if not self.is_static(adapter):
            raise ValueError(
                f"adapter {adapter!r} routes with router {self.router_name[adapter]!r}, whose gates depend on the "
                "input; merging and dense delta weights need static routing (router='static' or every rank shared)"
            )
        weight = self.rankmoe_A[adapter]
        layout = self.slot_layout[adapter]
        if not layout.is_routed:
            gates = torch.ones(layout.r, device=weight.device)
        else:
            logits = self.rankmoe_router[adapter].fixed_logits().unsqueeze(0)
            gates = select_top_k(logits, layout, self.rankmoe_router[adapter].selection_bias).rank_gates[0]
        return gates.to(weight.device) * self.scaling[adapter]

    # ------------------------------------------------------------------ scaling (diffusers' LoRA-style weights)
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set ``adapter``'s scaling to ``scale * lora_alpha / r`` (diffusers' ``set_adapters(weights=...)``)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * self.lora_alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by ``scale`` (diffusers' ``cross_attention_kwargs`` scale)."""
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.rankmoe_A:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer`: divide by ``scale``, or with ``None`` reset to ``lora_alpha / r``."""
        for adapter in self.active_adapters:
            if adapter not in self.rankmoe_A:
                continue
            if scale is None:
                self.scaling[adapter] = self.lora_alpha[adapter] / self.r[adapter]
            else:
                self.scaling[adapter] /= scale

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense update ``B diag(g) A`` of a static adapter, in the base weight's layout and dtype."""
        lora_a, lora_b = self.rankmoe_A[adapter], self.rankmoe_B[adapter]
        dtype = lora_b.dtype
        upcast = lora_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if upcast else dtype
        delta = gated_delta_weight(lora_a.to(compute), lora_b.to(compute), self.static_gates(adapter).to(compute))
        if is_transformers_conv1d(self.get_base_layer()):
            delta = delta.T
        return delta.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` works exactly when the adapter's routing is static."""
        return adapter_name in self.rankmoe_A and self.is_static(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the static adapters' updates to the base weight.

        Raises:
            ValueError: If an adapter routes per input (merging would be wrong for every other input), or, with
                ``safe_merge``, if the merged weight is not finite.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        adapters = [name for name in adapter_names if name in self.rankmoe_A]
        for adapter in adapters:
            self.static_gates(adapter)  # raises before anything is modified
        base = self.get_base_layer()
        for adapter in adapters:
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                        )
                    base.weight.data = merged
                else:
                    base.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.rankmoe_A:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)
