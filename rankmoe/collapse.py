"""Collapse a routed RankMoE adapter into a plain LoRA for one condition (or for static routing).

Axis legend: ``b`` batch, ``r`` ranks of the adapter, ``k`` active ranks of one layer, ``d_in`` / ``d_out``
features (channels for convolutions), ``c`` condition width.

With per-sample routing every position of a sample uses the same rank gates ``g`` ``(r,)`` (scaling folded in), so
the update of a layer for that sample is ``B diag(g) A``, and only the ``k`` ranks with ``g != 0`` contribute.
Keeping those ranks and folding their gates into ``B`` gives an exact static LoRA of rank ``k`` and scaling 1:

    lora_A = A[active]               # (k, d_in[, *kernel])
    lora_B = B[:, active] * g[active]  # (d_out, k[, 1, 1])

``k`` differs from layer to layer. The result, a :class:`CollapsedLoRA`, can be merged into the base weights
(:meth:`CollapsedLoRA.merge_and_unload`) or exported as a plain PEFT LoRA adapter that peft and diffusers load
without rankmoe (:meth:`CollapsedLoRA.save_pretrained`, see :mod:`rankmoe.export`). An adapter with static
routing (``router="static"`` or every rank shared) collapses the same way, without a condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankmoe.condition import rankmoe_layers
from rankmoe.config import RankMoEConfig
from rankmoe.layer import RankMoELayer, _is_transformers_conv1d
from rankmoe.routers.base import RoutingInputs
from rankmoe.routers.selection import expand_rank_gates, select_top_k

if TYPE_CHECKING:
    from pathlib import Path

    from peft import LoraConfig


@dataclass(frozen=True, eq=False)
class CollapsedLayer:
    """The collapsed update of one layer: a LoRA pair whose ``lora_B`` carries the gates and the scaling.

    The layer's update is ``lora_B @ lora_A`` (scaling 1); for convolutions ``lora_A`` is a convolution with the
    base layer's kernel, stride, padding and dilation and ``lora_B`` a 1x1 convolution, as in PEFT's LoRA.

    Attributes:
        lora_A: Rows of the adapter's ``A`` at the active ranks, ``(k, d_in)`` or ``(k, d_in, *kernel)``.
        lora_B: Matching columns of ``B`` times their gates, ``(d_out, k)`` or ``(d_out, k, 1[, 1])``.
        active_ranks: Indices ``(k,)`` of the kept ranks among the adapter's ``r``.
        fan_in_fan_out: Whether the base layer stores its weight as ``(d_in, d_out)`` (transformers ``Conv1D``).
        dilation: Dilation of a convolutional base layer (``()`` for linear layers).
        padding_mode: Padding mode of a convolutional base layer.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    active_ranks: tuple[int, ...]
    fan_in_fan_out: bool = False
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @property
    def rank(self) -> int:
        """``k``, the number of active ranks."""
        return int(self.lora_A.shape[0])

    def __repr__(self) -> str:
        return (f"CollapsedLayer(rank={self.rank}, lora_A={tuple(self.lora_A.shape)}, "
                f"lora_B={tuple(self.lora_B.shape)}, dtype={self.lora_A.dtype})")

    def delta_weight(self) -> torch.Tensor:
        """Dense update ``lora_B @ lora_A`` in the base weight's layout and the adapter's dtype.

        Returns:
            ``(d_out, d_in)``, ``(d_out, d_in, *kernel)`` for convolutions, or ``(d_in, d_out)`` for a transformers
            ``Conv1D``.
        """
        dtype = self.lora_A.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        lora_a, lora_b = self.lora_A.to(compute), self.lora_B.to(compute)
        weight = lora_b.reshape(lora_b.shape[0], self.rank) @ lora_a.reshape(self.rank, -1)
        weight = weight.reshape(lora_b.shape[0], *lora_a.shape[1:])
        if self.fan_in_fan_out:
            weight = weight.T
        return weight.to(dtype)


@dataclass(eq=False)
class CollapsedLoRA:
    """An exact static LoRA equal to a RankMoE adapter for one condition (or to a static adapter).

    Built by :func:`collapse`. Layer names are relative to the adapted model itself (a ``PeftModel``'s
    ``base_model.model.`` prefix is not part of them), so they are the module names of the plain base model.

    Attributes:
        layers: Collapsed layers by module name; layers whose gates are all zero are left out.
        adapter_name: The RankMoE adapter that was collapsed.
        skipped: Adapted layers left out because no rank was active.
        biases: Trained biases ``(d_out,)`` by parameter name (``"lin0.bias"``) when the adapter trains biases
            (``bias="all"``), else empty.
        condition: The condition ``(c,)`` used, or ``None``.
        task_type: PEFT task type of the source adapter (``"CAUSAL_LM"``, ...), or ``None``.
        base_model_name_or_path: Base model recorded in the source adapter's config, or ``None``.
    """

    layers: dict[str, CollapsedLayer]
    adapter_name: str
    skipped: tuple[str, ...] = ()
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    condition: torch.Tensor | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    @property
    def ranks(self) -> dict[str, int]:
        """Active ranks ``k`` per collapsed layer."""
        return {name: layer.rank for name, layer in self.layers.items()}

    def __repr__(self) -> str:
        return (f"CollapsedLoRA(adapter_name={self.adapter_name!r}, ranks={self.ranks}, skipped={self.skipped}, "
                f"biases={len(self.biases)})")

    def delta_weight(self, name: str) -> torch.Tensor:
        """Dense update of layer ``name`` in its base weight's layout (see :meth:`CollapsedLayer.delta_weight`).

        Raises:
            ValueError: If ``name`` is not a collapsed layer.
        """
        if name not in self.layers:
            skipped = " (it has no active rank and was skipped)" if name in self.skipped else ""
            raise ValueError(f"no collapsed layer named {name!r}{skipped}; layers: {sorted(self.layers)}")
        return self.layers[name].delta_weight()

    def merge_into(self, model: nn.Module) -> nn.Module:
        """Add every layer's update to the base weight of the module of the same name (and set trained biases).

        ``model`` is the model that was collapsed (a ``PeftModel``, or a diffusers / transformers / plain model
        carrying RankMoE layers; the updates go into the RankMoE layers' base layers) or a plain model with the same
        module names. RankMoE layers stay in place and keep adding their routed update: run the merged model with the
        adapters disabled (``with peft_model.disable_adapter():``, ``unet.disable_adapters()``), or use
        :meth:`merge_and_unload`. Nothing is modified if a module is missing or a shape differs.

        Args:
            model: The model to merge into.

        Returns:
            ``model``.

        Raises:
            ValueError: If a layer is missing from ``model`` or its weight shape differs from the update's.
        """
        self._apply(model, sign=1.0)
        return model

    def unmerge_from(self, model: nn.Module) -> nn.Module:
        """Subtract what :meth:`merge_into` added (up to float rounding), e.g. before merging the next condition.

        Args:
            model: The model merged into.

        Returns:
            ``model``.

        Raises:
            ValueError: If the collapsed adapter carries trained biases (their old values are unknown), or see
                :meth:`merge_into`.
        """
        if self.biases:
            raise ValueError(
                "this collapsed adapter sets trained biases (bias='all'); merging overwrote the old biases, so it "
                "cannot be unmerged. Merge into a copy of the model instead"
            )
        self._apply(model, sign=-1.0)
        return model

    def _apply(self, model: nn.Module, sign: float) -> None:
        """Add ``sign`` times every update to ``model``'s base weights (and set biases); validate everything first."""
        root = base_model_of(model)
        updates: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for name, layer in self.layers.items():
            weight = _base_module(root, name).weight
            delta = layer.delta_weight()
            if tuple(weight.shape) != tuple(delta.shape):
                raise ValueError(
                    f"layer {name!r}: the model's weight has shape {tuple(weight.shape)} but the collapsed update has "
                    f"shape {tuple(delta.shape)}; merge into the model the LoRA was collapsed from (or its base model)"
                )
            updates.append((weight, delta, False))
        for name, value in self.biases.items():
            module_name, _, param = name.rpartition(".")
            bias = getattr(_base_module(root, module_name), param, None)
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != tuple(value.shape):
                raise ValueError(f"trained bias {name!r} {tuple(value.shape)} has no matching parameter in the model")
            updates.append((bias, value, True))
        with torch.no_grad():
            for target, value, replace in updates:
                value = value.to(device=target.device, dtype=target.dtype)
                if replace:
                    target.copy_(value)
                else:
                    target.add_(value, alpha=sign)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """Merge into the base weights and replace every RankMoE layer by its base layer.

        Works on a ``PeftModel`` (the unwrapped base model is returned; do not use the ``PeftModel`` afterwards), on a
        diffusers or transformers model after ``add_adapter`` and on any model after ``inject_adapter_in_model``.
        Every RankMoE layer is removed, whatever adapters it holds, and RankMoE entries are dropped from the model's
        ``peft_config``.

        Args:
            model: The model to merge into (see :meth:`merge_into`).

        Returns:
            The plain model, whose output for any input equals the routed model's output under the collapsed
            condition.
        """
        root = base_model_of(model)
        self.merge_into(root)
        unload_rankmoe_layers(root)
        return root

    def to_peft_lora(self, key_prefix: str = "base_model.model.") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """A PEFT ``LoraConfig`` and LoRA state dict equal to this adapter (:func:`rankmoe.export.to_peft_lora`).

        Args:
            key_prefix: Prepended to every state-dict key (``"base_model.model."``: PEFT's checkpoint format).

        Returns:
            ``(config, state_dict)`` with keys ``<key_prefix><name>.lora_A.weight`` ``(k, d_in[, *kernel])`` and
            ``<key_prefix><name>.lora_B.weight`` ``(d_out, k[, 1, 1])``.

        Raises:
            ValueError: If no layer has an active rank, or a convolution uses dilation or a non-zero padding mode.
        """
        from rankmoe.export import to_peft_lora

        return to_peft_lora(self, key_prefix=key_prefix)

    def save_pretrained(
        self,
        directory: str | Path,
        format: str = "peft",
        *,
        prefix: str | None = "unet",
        weight_name: str | None = None,
    ) -> Path:
        """Write a plain LoRA adapter that peft or diffusers load without rankmoe (:func:`rankmoe.export.save_lora`).

        Args:
            directory: Output directory (created if missing).
            format: ``"peft"`` (for ``PeftModel.from_pretrained``) or ``"diffusers"`` (for ``load_lora_adapter`` /
                ``load_lora_weights``).
            prefix: ``"diffusers"`` only: component prefix of keys and metadata (``"unet"``, ``"transformer"``,
                ``None``).
            weight_name: ``"diffusers"`` only: file name (default ``pytorch_lora_weights.safetensors``).

        Returns:
            The path of the written weights file.

        Raises:
            ValueError: See :func:`rankmoe.export.save_lora`.
        """
        from rankmoe.export import save_lora

        return save_lora(self, directory, format=format, prefix=prefix, weight_name=weight_name)


def base_model_of(model: nn.Module) -> nn.Module:
    """The model whose module names collapsed layers use: a ``PeftModel``'s (or tuner's) inner model, else ``model``."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


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


def unload_rankmoe_layers(model: nn.Module) -> nn.Module:
    """Replace every RankMoE layer of ``model`` by its base layer (no merging) and drop RankMoE ``peft_config`` entries.

    Returns:
        ``model``.
    """
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, RankMoELayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and any(isinstance(cfg, RankMoEConfig) for cfg in configs.values()):
        remaining = {name: cfg for name, cfg in configs.items() if not isinstance(cfg, RankMoEConfig)}
        if remaining:
            model.peft_config = remaining
        else:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False
    return model


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
        fan_in_fan_out=_is_transformers_conv1d(base),
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


def _base_module(root: nn.Module, name: str) -> nn.Module:
    """Module ``name`` of ``root``, unwrapped to its base layer if it is a PEFT tuner layer."""
    try:
        module = root.get_submodule(name) if name else root
    except AttributeError as error:
        raise ValueError(f"the model has no module named {name!r} to merge into") from error
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module
