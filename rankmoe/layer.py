"""RankMoE tuner layers: a LoRA whose ranks are gated per token or per sample by a router.

Axis legend: ``b`` batch, ``n`` tokens, ``d`` features, ``r`` ranks, ``s`` slots.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from rankmoe.config import RankMoEConfig
from rankmoe.functional import gated_conv_delta, gated_delta_weight, gated_linear_delta
from rankmoe.losses.modules import BalanceSettings
from rankmoe.records import ConditionState, RoutingRecord
from rankmoe.routers.base import LayerSpec, RoutingInputs, SlotLayout
from rankmoe.routers.registry import get_router_class
from rankmoe.routers.selection import select_top_k

SUPPORTED_LAYER_TYPES = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "transformers.pytorch_utils.Conv1D")


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class RankMoELayer(BaseTunerLayer):
    """Mixin holding the RankMoE adapters of one base layer (PEFT's ``BaseTunerLayer`` contract).

    Per adapter it owns ``rankmoe_A`` ``(r, d_in[, *kernel])``, ``rankmoe_B`` ``(d_out, r[, 1, ...])`` and, when
    something is routed, ``rankmoe_router``. It also keeps the last :class:`~rankmoe.records.RoutingRecord` of
    each adapter and the condition set with :func:`rankmoe.condition`.
    """

    adapter_layer_names = ("rankmoe_A", "rankmoe_B", "rankmoe_router")
    other_param_names = (
        "r", "lora_alpha", "scaling", "slot_layout", "router_name", "rankmoe_dropout", "balance_settings"
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.slot_layout: dict[str, SlotLayout] = {}
        self.router_name: dict[str, str] = {}
        self.balance_settings: dict[str, BalanceSettings] = {}
        self.rankmoe_dropout = nn.ModuleDict({})
        self.rankmoe_A = nn.ParameterDict({})
        self.rankmoe_B = nn.ParameterDict({})
        self.rankmoe_router = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        self._rankmoe_condition: ConditionState | None = None
        self._rankmoe_records: dict[str, RoutingRecord] = {}
        self._rankmoe_stash: ConditionState | None = None
        self._rankmoe_stash_consumed = True
        self._rankmoe_stash_ambiguous = False
        base = self.get_base_layer()
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            self.spec = LayerSpec.from_conv(base)
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif _is_transformers_conv1d(base):
            self.in_features, self.out_features = base.weight.shape
            self.spec = LayerSpec(kind="linear", in_features=self.in_features)
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.spec = LayerSpec(kind="linear", in_features=self.in_features)
        else:
            raise TypeError(
                f"RankMoE cannot adapt a {type(base).__module__}.{type(base).__name__}; "
                f"supported layer types: {', '.join(SUPPORTED_LAYER_TYPES)}"
            )

    # ------------------------------------------------------------------ adapters
    def _adapter_weight_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kernel = self.spec.kernel_size
        ones = (1,) * len(kernel)
        return (r, self.in_features, *kernel), (self.out_features, r, *ones)

    def update_layer(self, adapter_name: str, config: RankMoEConfig, **kwargs: Any) -> None:
        """Create (or replace) adapter ``adapter_name`` on this layer from ``config``.

        Raises:
            ValueError: If ``adapter_name`` clashes with a method of the adapter containers (``keys``, ``copy``, ...).
        """
        if hasattr(nn.ParameterDict, adapter_name) or hasattr(nn.ModuleDict, adapter_name):
            raise ValueError(
                f"adapter_name={adapter_name!r} cannot be used: it is the name of a container method; choose another"
            )
        layout = config.slot_layout
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.slot_layout[adapter_name] = layout
        self.router_name[adapter_name] = config.router
        self.balance_settings[adapter_name] = BalanceSettings.from_config(config)
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.rankmoe_dropout[adapter_name] = dropout
        shape_a, shape_b = self._adapter_weight_shapes(config.r)
        self.rankmoe_A[adapter_name] = nn.Parameter(torch.empty(shape_a))
        self.rankmoe_B[adapter_name] = nn.Parameter(torch.empty(shape_b))
        if layout.is_routed:
            router_cls = get_router_class(config.router)
            self.rankmoe_router[adapter_name] = router_cls(layout, self.spec, **config.router_kwargs)
        elif adapter_name in self.rankmoe_router:
            del self.rankmoe_router[adapter_name]
        self.reset_rankmoe_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_rankmoe_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Initialise ``A`` Kaiming-uniform and ``B`` to zero (``init_weights=False``: ``B`` random as well)."""
        if adapter_name not in self.rankmoe_A:
            return
        nn.init.kaiming_uniform_(self.rankmoe_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.rankmoe_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.rankmoe_B[adapter_name], a=math.sqrt(5))
        if adapter_name in self.rankmoe_router:
            self.rankmoe_router[adapter_name].reset_parameters(init_weights)

    # ------------------------------------------------------------------ routing
    def _batch_size(self, x: torch.Tensor) -> int:
        unbatched_dim = 1 if self.spec.kind == "linear" else self.spec.conv_dim + 1
        return 1 if x.dim() <= unbatched_dim else int(x.shape[0])

    def _resolve_condition(self) -> ConditionState | None:
        """The condition to route with.

        A forward with gradients remembers its condition, so an activation-checkpoint recomputation during
        ``backward()`` replays exactly that condition, even after the ``with rankmoe.condition(...)`` block exited or
        inside another one. The replay is refused when it would be ambiguous (several gradient-enabled forwards with
        different conditions before one backward); an evaluation forward (no gradients, ``eval()`` mode) in between
        forgets the remembered condition, and the active condition, if any, is used.
        """
        state = self._rankmoe_condition
        if torch.compiler.is_compiling():
            return state
        stash = self._rankmoe_stash
        if torch._C._current_graph_task_id() != -1:  # inside backward: activation-checkpoint recomputation
            if stash is not None and not self._rankmoe_stash_ambiguous:
                self._rankmoe_stash_consumed = True
                return stash
            if self._rankmoe_stash_ambiguous:
                raise RuntimeError(
                    "activation checkpointing recomputes a RankMoE layer, but several forwards with gradients and "
                    "different conditions ran before this backward, so the condition to replay is ambiguous; run "
                    "one backward per conditioned training forward, and run evaluation forwards in eval() mode "
                    "under torch.no_grad()"
                )
            return state
        if state is None or state is stash:
            return state
        if torch.is_grad_enabled() or self.training:  # may be replayed (reentrant checkpointing runs under no_grad)
            self._rankmoe_stash_ambiguous = stash is not None and not self._rankmoe_stash_consumed
            self._rankmoe_stash = state
            self._rankmoe_stash_consumed = False
        else:
            # an evaluation forward is never replayed; the remembered condition may no longer be the last
            self._rankmoe_stash = None
            self._rankmoe_stash_ambiguous = False
        return state

    def _route(
        self, adapter: str, x: torch.Tensor, state: ConditionState | None, dtype: torch.dtype
    ) -> torch.Tensor | float:
        """Gates for ``adapter`` with the scaling folded in, shaped to broadcast against ``A x``."""
        layout = self.slot_layout[adapter]
        scaling = self.scaling[adapter]
        if not layout.is_routed:
            return scaling
        router = self.rankmoe_router[adapter]
        batch_size = self._batch_size(x)
        if router.requires_condition and (state is None or state.condition is None):
            raise ValueError(
                f"router {self.router_name[adapter]!r} of adapter {adapter!r} needs a per-sample condition but none "
                "is set; wrap the call in `with rankmoe.condition(model, cond): ...` or call "
                "rankmoe.set_condition(model, cond)"
            )
        if state is not None and state.batch_size != batch_size:
            grown = state.expanded(batch_size)
            if grown is None:
                raise ValueError(
                    f"the condition set with rankmoe.condition has batch size {state.batch_size}, but layer input "
                    f"{tuple(x.shape)} has batch size {batch_size}; pass one condition row per sample, or "
                    "repeat='tile' (classifier-free guidance) / repeat='interleave' (several images per prompt) "
                    "when the model sees a multiple of the condition's batch"
                )
            state = grown
        inputs = RoutingInputs(
            x=x,
            batch_size=batch_size,
            condition=None if state is None else state.condition,
            severity=None if state is None else state.severity,
        )
        logits = router(inputs)
        routing = select_top_k(logits, layout, router.selection_bias)
        self._rankmoe_records[adapter] = RoutingRecord(
            layout=layout,
            level=router.level,
            logits=logits,
            probs=routing.probs,
            top_indices=routing.top_indices,
            slot_gates=routing.slot_gates,
            batch_size=batch_size,
            severity=inputs.severity,
        )
        gates = (routing.rank_gates * scaling).to(dtype)
        return self._place_gates(gates, router.level, x)

    def _place_gates(self, gates: torch.Tensor, level: str, x: torch.Tensor) -> torch.Tensor:
        """Reshape gates so they broadcast against the r-wide intermediate of ``x``."""
        if self.spec.kind == "conv":
            if level == "token":
                return gates.movedim(-1, 1)
            return gates.reshape(*gates.shape, *([1] * self.spec.conv_dim))
        if level == "token":
            return gates
        if x.dim() == 1:
            return gates.reshape(-1)
        return gates.reshape(gates.shape[0], *([1] * (x.dim() - 2)), gates.shape[-1])

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
        if _is_transformers_conv1d(self.get_base_layer()):
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

    # ------------------------------------------------------------------ forward
    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the gated update of every active adapter."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        state = self._resolve_condition()
        for adapter in self.active_adapters:
            if adapter in self.rankmoe_A:
                # add in the wider dtype (fp32 adapters on a bf16 base), round once, as PEFT's LoRA does
                result = result + self._adapter_delta(x, adapter, state)
        return result.to(result_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        state = self._resolve_condition()
        for adapter in sorted(set(adapter_names)):
            if adapter not in self.rankmoe_A:
                continue
            rows = [index for index, name in enumerate(adapter_names) if name == adapter]
            sub_state = None if state is None else state.rows(rows)
            delta = self._adapter_delta(x[rows], adapter, sub_state)
            result[rows] = result[rows] + delta.to(result.dtype)
        return result



class Linear(nn.Module, RankMoELayer):
    """RankMoE on a ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is stored transposed).

    Input ``(..., d_in)``, output ``(..., d_out)``.
    """

    forward = RankMoELayer.forward

    def __repr__(self) -> str:
        return "rankmoe." + super().__repr__()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RankMoEConfig, **kwargs: Any) -> None:
        super().__init__()
        RankMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _adapter_delta(self, x: torch.Tensor, adapter: str, state: ConditionState | None) -> torch.Tensor:
        lora_a, lora_b = self.rankmoe_A[adapter], self.rankmoe_B[adapter]
        x_in = self.rankmoe_dropout[adapter](self._cast_input_dtype(x, lora_a.dtype))
        gates = self._route(adapter, x, state, lora_a.dtype)
        return gated_linear_delta(x_in, lora_a, lora_b, gates)


class Conv(nn.Module, RankMoELayer):
    """RankMoE on a ``nn.Conv1d`` / ``nn.Conv2d``: ``A`` is a convolution with the base kernel, ``B`` a 1x1.

    Input ``(b, d_in, *spatial)`` (or unbatched ``(d_in, *spatial)``), output ``(b, d_out, *spatial_out)``.
    """

    forward = RankMoELayer.forward

    def __repr__(self) -> str:
        return "rankmoe." + super().__repr__()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RankMoEConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if base.groups != 1:
            raise ValueError(
                f"RankMoE supports convolutions with groups=1 only; {type(base).__name__} has groups={base.groups}"
            )
        super().__init__()
        RankMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _adapter_delta(self, x: torch.Tensor, adapter: str, state: ConditionState | None) -> torch.Tensor:
        unbatched = x.dim() == self.spec.conv_dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        lora_a, lora_b = self.rankmoe_A[adapter], self.rankmoe_B[adapter]
        base = self.get_base_layer()
        x_in = self.rankmoe_dropout[adapter](self._cast_input_dtype(x, lora_a.dtype))
        padding = base.padding
        if base.padding_mode != "zeros":
            x_in = F.pad(x_in, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        gates = self._route(adapter, x, state, lora_a.dtype)
        delta = gated_conv_delta(x_in, lora_a, lora_b, gates, base.stride, padding, base.dilation)
        return delta.squeeze(0) if unbatched else delta


def create_rankmoe_module(target: nn.Module, adapter_name: str, config: RankMoEConfig) -> nn.Module:
    """Wrap ``target`` in the RankMoE layer type that fits it.

    Raises:
        TypeError: For unsupported layer types, naming the type and the supported ones.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return Conv(target, adapter_name, config)
    if isinstance(base, nn.Linear) or _is_transformers_conv1d(base):
        return Linear(target, adapter_name, config)
    raise TypeError(
        f"RankMoE cannot adapt module of type {type(base).__module__}.{type(base).__name__}; supported layer "
        f"types: {', '.join(SUPPORTED_LAYER_TYPES)}. Adjust target_modules."
    )
