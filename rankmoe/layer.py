"""RankMoE tuner layers: a LoRA whose ranks are gated per token or per sample by a router.

Axis legend: ``b`` batch, ``n`` tokens, ``d`` features, ``r`` ranks, ``s`` slots.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankmoe.config import RankMoEConfig
from rankmoe.dispatch import AdapterGates, ExecutionPath, choose_execution_path, kernel_positions
from rankmoe.layer_merge import StaticAdapterMixin, is_transformers_conv1d
from rankmoe.layer_routing import RoutingMixin
from rankmoe.losses.modules import BalanceSettings
from rankmoe.paths import dense_conv, dense_linear, gather_conv, gather_linear, merged_conv, merged_linear
from rankmoe.records import ConditionState, RoutingRecord
from rankmoe.routers.base import LayerSpec, SlotLayout
from rankmoe.routers.registry import get_router_class

SUPPORTED_LAYER_TYPES = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "transformers.pytorch_utils.Conv1D")


class RankMoELayer(RoutingMixin, StaticAdapterMixin, BaseTunerLayer):
    """Mixin holding the RankMoE adapters of one base layer (PEFT's ``BaseTunerLayer`` contract).

    Per adapter it owns ``rankmoe_A`` ``(r, d_in[, *kernel])``, ``rankmoe_B`` ``(d_out, r[, 1, ...])`` and, when
    something is routed, ``rankmoe_router``. It also keeps the last :class:`~rankmoe.records.RoutingRecord` of
    each adapter and the condition set with :func:`rankmoe.condition`.

    Each forward computes every active adapter on one of three paths (:mod:`rankmoe.paths`), chosen per call by
    :func:`rankmoe.dispatch.choose_execution_path` from the adapter's ``execution_path``: dense-masked in training
    and for per-token routing; fixed-k gather or a per-sample merged weight at inference with per-sample routing.

    Attributes:
        execution_path: Configured path per adapter (``"auto"``, ``"dense"``, ``"gather"`` or ``"merge"``); may
            be changed on a live layer.
        last_execution_paths: Path each adapter took in the last forward (``"dense"``, ``"gather"``,
            ``"merge"``).
    """

    adapter_layer_names = ("rankmoe_A", "rankmoe_B", "rankmoe_router")
    other_param_names = (
        "r", "lora_alpha", "scaling", "slot_layout", "router_name", "rankmoe_dropout", "balance_settings",
        "execution_path",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.slot_layout: dict[str, SlotLayout] = {}
        self.router_name: dict[str, str] = {}
        self.balance_settings: dict[str, BalanceSettings] = {}
        self.execution_path: dict[str, str] = {}
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
        self._rankmoe_routing_cache: dict[str, tuple[Any, ...]] = {}
        self.last_execution_paths: dict[str, str] = {}
        self._rankmoe_stash: ConditionState | None = None
        self._rankmoe_stash_consumed = True
        self._rankmoe_stash_ambiguous = False
        base = self.get_base_layer()
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            self.spec = LayerSpec.from_conv(base)
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif is_transformers_conv1d(base):
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
        self.execution_path[adapter_name] = config.execution_path
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
        dropout.train(self.training)
        if adapter_name in self.rankmoe_router:
            self.rankmoe_router[adapter_name].train(self.training)
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

    def _tokens_per_gate_set(self, x: torch.Tensor, gates: AdapterGates) -> int:
        """Tokens (output positions for convolutions) that share one gate set in this call."""
        if self.spec.kind == "conv":
            tokens = 1
            for size, step in zip(x.shape[-self.spec.conv_dim:], self.spec.stride, strict=True):
                tokens *= max(1, size // step)
        else:
            tokens = x.numel() // max(1, x.shape[-1]) // gates.batch_size
        return tokens * gates.batch_size if gates.level == "static" else tokens

    def _execution_path(self, x: torch.Tensor, gates: AdapterGates) -> ExecutionPath:
        """The path (``dense``, ``gather`` or ``merge``) of one adapter for this call (:mod:`rankmoe.dispatch`)."""
        adapter = gates.adapter
        dropout_active = self.training and isinstance(self.rankmoe_dropout[adapter], nn.Dropout)
        path = choose_execution_path(
            self.execution_path.get(adapter, "auto"),
            level=gates.level,
            tokens_per_gate_set=self._tokens_per_gate_set(x, gates),
            in_features=self.in_features,
            out_features=self.out_features,
            kernel_numel=kernel_positions(self.spec.kernel_size),
            batch_size=gates.batch_size,
            is_conv=self.spec.kind == "conv",
            device_type=x.device.type,
            training=self.training or torch.is_grad_enabled(),
            rank=self.r[adapter],
            gathered_rank=self.slot_layout[adapter].gathered_rank,
        )
        if path == "merge" and dropout_active:
            raise ValueError(
                f"execution_path='merge' of adapter {adapter!r} cannot apply lora_dropout: the merged weight sees "
                "the undropped input; call eval() for inference, or use execution_path='auto' or 'dense' to train"
            )
        if path == "gather" and gates.level == "static":
            path = "dense"  # gathering every rank is the dense path
        self.last_execution_paths[adapter] = path
        return path

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
        """Base output plus the gated update of every active adapter, on the path :mod:`rankmoe.dispatch` picks."""
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
        state = self._resolve_condition()
        routed = [self._route(name, x, state) for name in self.active_adapters if name in self.rankmoe_A]
        paths = [self._execution_path(x, gates) for gates in routed]
        if len(routed) == 1 and paths[0] == "merge" and self._can_bypass_base_layer(args, kwargs):
            return self._merged_forward(x, routed[0])
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for gates, path in zip(routed, paths, strict=True):
            # several adapters: each one's update is added unmerged (a merge would bypass the others)
            unmerged = path if path != "merge" else ("gather" if gates.level == "sample" else "dense")
            self.last_execution_paths[gates.adapter] = unmerged
            result = self._accumulate(result, x, gates, unmerged)
        return result.to(result_dtype)

    def _can_bypass_base_layer(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the merged path may run the base computation itself (no extra arguments, no hooks)."""
        base = self.get_base_layer()
        return (
            not args and not kwargs and base is self.base_layer
            and not (base._forward_hooks or base._forward_pre_hooks)
            and base.weight.dtype.is_floating_point
        )

    def _adapter_inputs(
        self, result: torch.Tensor, x: torch.Tensor, adapter: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(result, x_in, A, B)`` in the dtype the update is added in (the wider of base output and adapter)."""
        lora_a, lora_b = self.rankmoe_A[adapter], self.rankmoe_B[adapter]
        dtype = torch.promote_types(result.dtype, lora_a.dtype)
        x_in = self.rankmoe_dropout[adapter](self._cast_input_dtype(x, lora_a.dtype))
        return result.to(dtype), x_in.to(dtype), lora_a.to(dtype), lora_b.to(dtype)

    def _merge_inputs(
        self, gates: AdapterGates
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | float]:
        """``(A, B, rank_index, rank_gates)`` of the merged path, in float32 or the adapter's wider dtype."""
        lora_a, lora_b = self.rankmoe_A[gates.adapter], self.rankmoe_B[gates.adapter]
        compute = torch.promote_types(lora_a.dtype, torch.float32)
        if gates.level == "static":
            return lora_a.to(compute), lora_b.to(compute), None, gates.scaling
        index, rank_gates = gates.gathered(self.slot_layout[gates.adapter], compute)
        return lora_a.to(compute), lora_b.to(compute), index, rank_gates

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
            gates = self._route(adapter, x[rows], sub_state)
            result[rows] = self._accumulate(result[rows], x[rows], gates, "dense").to(result.dtype)
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
        self.train(self.get_base_layer().training)  # a new wrapper inherits the mode of the layer it wraps

    def _accumulate(self, result: torch.Tensor, x: torch.Tensor, gates: AdapterGates, path: str) -> torch.Tensor:
        result, x_in, lora_a, lora_b = self._adapter_inputs(result, x, gates.adapter)
        if path == "gather":
            index, rank_gates = gates.gathered(self.slot_layout[gates.adapter], lora_a.dtype)
            return gather_linear(result, x_in, lora_a, lora_b, index, rank_gates)
        dense = gates.dense(lora_a.dtype)
        return dense_linear(result, x_in, lora_a, lora_b, dense, gates.level)

    def _merged_forward(self, x: torch.Tensor, gates: AdapterGates) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight.T if is_transformers_conv1d(base) else base.weight
        x = self._cast_input_dtype(x, weight.dtype)
        return merged_linear(x, weight, base.bias, *self._merge_inputs(gates))


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
        self.train(self.get_base_layer().training)  # a new wrapper inherits the mode of the layer it wraps

    def _conv_geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``x`` padded as the base layer pads it (non-zero padding modes) and the padding left to apply."""
        base = self.get_base_layer()
        if base.padding_mode != "zeros":
            return F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        return x, base.padding

    def _accumulate(self, result: torch.Tensor, x: torch.Tensor, gates: AdapterGates, path: str) -> torch.Tensor:
        unbatched = x.dim() == self.spec.conv_dim + 1
        if unbatched:
            x, result = x.unsqueeze(0), result.unsqueeze(0)
        base = self.get_base_layer()
        result, x_in, lora_a, lora_b = self._adapter_inputs(result, x, gates.adapter)
        x_in, padding = self._conv_geometry(x_in)
        geometry = (base.stride, padding, base.dilation)
        if path == "gather":
            index, rank_gates = gates.gathered(self.slot_layout[gates.adapter], lora_a.dtype)
            out = gather_conv(result, x_in, lora_a, lora_b, index, rank_gates, *geometry)
        else:
            dense = gates.dense(lora_a.dtype)
            out = dense_conv(result, x_in, lora_a, lora_b, dense, gates.level, *geometry)
        return out.squeeze(0) if unbatched else out

    def _merged_forward(self, x: torch.Tensor, gates: AdapterGates) -> torch.Tensor:
        unbatched = x.dim() == self.spec.conv_dim + 1
        base = self.get_base_layer()
        x, padding = self._conv_geometry(self._cast_input_dtype(x.unsqueeze(0) if unbatched else x, base.weight.dtype))
        out = merged_conv(x, base.weight, base.bias, *self._merge_inputs(gates), base.stride, padding, base.dilation)
        return out.squeeze(0) if unbatched else out


def create_rankmoe_module(target: nn.Module, adapter_name: str, config: RankMoEConfig) -> nn.Module:
    """Wrap ``target`` in the RankMoE layer type that fits it.

    Raises:
        TypeError: For unsupported layer types, naming the type and the supported ones.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return Conv(target, adapter_name, config)
    if isinstance(base, nn.Linear) or is_transformers_conv1d(base):
        return Linear(target, adapter_name, config)
    raise TypeError(
        f"RankMoE cannot adapt module of type {type(base).__module__}.{type(base).__name__}; supported layer "
        f"types: {', '.join(SUPPORTED_LAYER_TYPES)}. Adjust target_modules."
    )
