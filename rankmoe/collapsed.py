"""The result of :func:`rankmoe.collapse`: per-layer LoRA pairs that can be merged or exported.

Axis legend: ``r`` ranks of the adapter, ``k`` active ranks of one layer, ``d_in`` / ``d_out`` features
(channels for convolutions), ``c`` condition width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankmoe.config import RankMoEConfig
from rankmoe.layer import RankMoELayer

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

    Built by :func:`rankmoe.collapse.collapse`. Layer names are relative to the adapted model itself (a ``PeftModel``'s
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


def _base_module(root: nn.Module, name: str) -> nn.Module:
    """Module ``name`` of ``root``, unwrapped to its base layer if it is a PEFT tuner layer."""
    try:
        module = root.get_submodule(name) if name else root
    except AttributeError as error:
        raise ValueError(f"the model has no module named {name!r} to merge into") from error
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module
