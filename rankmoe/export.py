"""Export a collapsed RankMoE adapter as a plain LoRA that peft and diffusers load without rankmoe.

Axis legend: ``k`` active ranks of one layer, ``d_in`` / ``d_out`` features (channels for convolutions).

The LoRA is exact: each layer keeps its own rank ``k`` (PEFT's ``rank_pattern``), its ``lora_alpha`` equals its
rank (``alpha_pattern``) so the scaling is exactly 1, and the gates are already folded into ``lora_B``. Pattern keys
are anchored (``^`` plus the escaped module name) and ``target_modules`` is a regular expression of the exact module
names, so one layer's entry never matches another layer whose name ends the same way (``lin`` and ``inner.lin``).

Two on-disk formats:

- ``"peft"``: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``, loaded by ``PeftModel.from_pretrained(base, dir)``;
- ``"diffusers"``: ``pytorch_lora_weights.safetensors`` with keys ``<prefix>.<name>.lora_A.weight`` and the LoRA
  config in the file's ``lora_adapter_metadata`` header (keys ``<prefix>.r``, ...), loaded by
  ``model.load_lora_adapter(dir, prefix=prefix, weight_name="pytorch_lora_weights.safetensors")`` or, with
  ``prefix="unet"``, by a Stable Diffusion pipeline's ``load_lora_weights(dir)``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankmoe.collapse import CollapsedLoRA, collapse

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
"""File name of the weights in the ``"peft"`` format (what ``PeftModel.from_pretrained`` reads)."""
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""Default file name in the ``"diffusers"`` format (what diffusers' LoRA loaders look for)."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""safetensors header entry holding the JSON LoRA config that diffusers reads."""
FORMATS = ("peft", "diffusers")


def module_pattern(name: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that matches module ``name`` and no other module.

    PEFT matches a pattern key ``p`` against a module name with ``re.match(rf"(.*\\.)?({p})$", name)``; the leading
    ``^`` forbids any prefix, ``re.escape`` makes the dots literal.

    Example:
        >>> module_pattern("inner.lin")
        '^inner\\\\.lin'
    """
    return "^" + re.escape(name)


def lora_config(collapsed: CollapsedLoRA) -> LoraConfig:
    """The PEFT ``LoraConfig`` of a collapsed adapter (rank per layer, scaling exactly 1).

    ``r`` and ``lora_alpha`` are the most common rank; layers of another rank get ``rank_pattern`` and
    ``alpha_pattern`` entries. ``fan_in_fan_out`` is set when the layers are transformers ``Conv1D`` (PEFT switches it
    per layer, with a warning, when the model mixes layer types); ``bias="all"`` when trained biases are carried.

    Raises:
        ValueError: If no layer has an active rank, or a convolution cannot be expressed as a PEFT LoRA (dilation
            other than 1 or a padding mode other than ``"zeros"``: PEFT's LoRA convolution ignores both).
    """
    from peft import LoraConfig

    _check_exportable(collapsed)
    ranks = collapsed.ranks
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {module_pattern(name): rank for name, rank in ranks.items() if rank != r}
    fan_in_fan_out = sum(layer.fan_in_fan_out for layer in collapsed.layers.values()) * 2 > len(collapsed.layers)
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules="(?:" + "|".join(re.escape(name) for name in sorted(ranks)) + ")",
        lora_dropout=0.0,
        bias="all" if collapsed.biases else "none",
        fan_in_fan_out=fan_in_fan_out,
        task_type=collapsed.task_type,
        base_model_name_or_path=collapsed.base_model_name_or_path,
    )


def lora_state_dict(collapsed: CollapsedLoRA, key_prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """LoRA weights in PEFT's checkpoint key format.

    Args:
        collapsed: The collapsed adapter.
        key_prefix: Prepended to every key: ``"base_model.model."`` (PEFT checkpoints), ``""`` (diffusers' loaders
            with ``prefix=None``) or ``"unet."``-style component prefixes.

    Returns:
        ``{key_prefix + name + ".lora_A.weight": (k, d_in[, *kernel]), ... ".lora_B.weight": (d_out, k[, 1, 1])}``,
        plus the trained biases (``key_prefix + name + ".base_layer.bias"`` for adapted layers).
    """
    state = {}
    for name, layer in collapsed.layers.items():
        state[f"{key_prefix}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().clone()
        state[f"{key_prefix}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().clone()
    for name, value in collapsed.biases.items():
        module, _, param = name.rpartition(".")
        if module in collapsed.layers:
            name = f"{module}.base_layer.{param}"
        state[f"{key_prefix}{name}"] = value.detach().contiguous().clone()
    return state


def to_peft_lora(
    collapsed: CollapsedLoRA, key_prefix: str = "base_model.model."
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT ``LoraConfig`` and state dict equal to ``collapsed`` (see :func:`lora_config`, :func:`lora_state_dict`).

    ``set_peft_model_state_dict(inject_adapter_in_model(config, base), state)`` or diffusers'
    ``model.load_lora_adapter(state, prefix=None, metadata=config.to_dict())`` (with ``key_prefix=""``) load them.

    Raises:
        ValueError: See :func:`lora_config`.
    """
    return lora_config(collapsed), lora_state_dict(collapsed, key_prefix=key_prefix)


def save_lora(
    collapsed: CollapsedLoRA,
    directory: str | Path,
    format: str = "peft",
    *,
    prefix: str | None = "unet",
    weight_name: str | None = None,
) -> Path:
    """Write ``collapsed`` as a plain LoRA adapter that peft or diffusers load without rankmoe installed.

    Args:
        collapsed: The collapsed adapter.
        directory: Output directory (created if missing).
        format: ``"peft"`` (``adapter_config.json`` + ``adapter_model.safetensors``, for
            ``PeftModel.from_pretrained``) or ``"diffusers"`` (one safetensors file with the config in its metadata,
            for ``load_lora_adapter`` / ``load_lora_weights``).
        prefix: ``"diffusers"`` only: component prefix of the keys and metadata (``"unet"`` for a Stable Diffusion
            UNet, ``"transformer"`` for DiT pipelines, ``None`` for none). Pass the same ``prefix`` to
            ``load_lora_adapter``.
        weight_name: ``"diffusers"`` only: file name (default ``pytorch_lora_weights.safetensors``).

    Returns:
        The path of the written weights file.

    Raises:
        ValueError: On an unknown ``format``, ``weight_name`` with ``"peft"``, trained biases with ``"diffusers"``
            (its LoRA loaders do not load base biases), or see :func:`lora_config`.
    """
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    config = lora_config(collapsed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = json.dumps({
        "adapter_name": collapsed.adapter_name,
        "condition": None if collapsed.condition is None else collapsed.condition.tolist(),
        "skipped": list(collapsed.skipped),
    })
    if format == "peft":
        if weight_name is not None:
            raise ValueError(f"weight_name={weight_name!r} is for format='diffusers'; PEFT reads {PEFT_WEIGHTS_NAME}")
        config.save_pretrained(str(directory))
        path = directory / PEFT_WEIGHTS_NAME
        save_file(lora_state_dict(collapsed), str(path), metadata={"format": "pt", "rankmoe_collapsed": source})
        return path
    if collapsed.biases:
        raise ValueError(
            "the adapter trains biases (bias='all'), which diffusers' LoRA loaders do not load; export with "
            "format='peft' or merge with merge_and_unload()"
        )
    key_prefix = "" if prefix is None else f"{prefix}."
    metadata = {f"{key_prefix}{key}": value for key, value in config.to_dict().items()}
    path = directory / (weight_name or DIFFUSERS_WEIGHTS_NAME)
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True, default=_json_default),
              "rankmoe_collapsed": source}
    save_file(lora_state_dict(collapsed, key_prefix=key_prefix), str(path), metadata=header)
    return path


def export_lora(
    model: nn.Module,
    directory: str | Path,
    cond: torch.Tensor | None = None,
    *,
    adapter_name: str | None = None,
    from_last_forward: bool = False,
    format: str = "peft",
    prefix: str | None = "unet",
    weight_name: str | None = None,
) -> CollapsedLoRA:
    """Collapse ``model``'s RankMoE adapter for ``cond`` and write it as a plain LoRA.

    Shorthand for ``collapse(model, cond, ...).save_pretrained(directory, format, ...)``; an adapter with static
    routing needs no ``cond``.

    Args:
        model: See :func:`rankmoe.collapse.collapse`.
        directory: Output directory.
        cond: One condition, ``(c,)`` or ``(1, c)``, when a layer routes on a condition.
        adapter_name: See :func:`rankmoe.collapse.collapse`.
        from_last_forward: See :func:`rankmoe.collapse.collapse`.
        format: See :func:`save_lora`.
        prefix: See :func:`save_lora`.
        weight_name: See :func:`save_lora`.

    Returns:
        The :class:`~rankmoe.collapsed.CollapsedLoRA` that was written.

    Raises:
        ValueError: See :func:`rankmoe.collapse.collapse` and :func:`save_lora`.
    """
    collapsed = collapse(model, cond, adapter_name=adapter_name, from_last_forward=from_last_forward)
    save_lora(collapsed, directory, format=format, prefix=prefix, weight_name=weight_name)
    return collapsed


def _check_exportable(collapsed: CollapsedLoRA) -> None:
    if not collapsed.layers:
        raise ValueError(
            f"no layer of adapter {collapsed.adapter_name!r} has an active rank for this condition (skipped: "
            f"{list(collapsed.skipped)}): the update is zero and the base model is already exact"
        )
    for name, layer in collapsed.layers.items():
        if any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros":
            raise ValueError(
                f"layer {name!r} is a convolution with dilation={layer.dilation} and padding_mode="
                f"{layer.padding_mode!r}; PEFT's LoRA convolution ignores both, so the exported LoRA would not be "
                "exact. Merge it with merge_and_unload() instead"
            )


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
