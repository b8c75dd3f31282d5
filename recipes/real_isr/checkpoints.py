"""Adapter-only checkpoints of the one-step generator: file names, config serialisation and the mismatch check.

A checkpoint folder holds ``adapters.safetensors`` (tensors keyed ``unet.<peft key>``, ``vae.<peft key>`` and
``conv_in.{weight,bias}``) and ``adapters.json`` (format version, per adapter its name, config class and config
dict, and ``train_conv_in``). :meth:`real_isr.model.OneStepSR.load_adapters` refuses a checkpoint for which
:func:`checkpoint_mismatches` reports anything, before copying a single tensor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ADAPTERS_CONFIG_NAME", "ADAPTERS_WEIGHTS_NAME", "FORMAT", "checkpoint_mismatches", "config_dict"]

ADAPTERS_WEIGHTS_NAME = "adapters.safetensors"
ADAPTERS_CONFIG_NAME = "adapters.json"
FORMAT = 1
_IGNORED_CONFIG_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "runtime_config"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # enums (PeftType, TaskType) and other objects


def config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as plain JSON data (sets sorted, enums as strings), without bookkeeping keys."""
    return {k: v for k, v in _jsonable(config.to_dict()).items() if k not in _IGNORED_CONFIG_KEYS}


def checkpoint_mismatches(
    saved: dict[str, Any], current: dict[str, Any], state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> list[str]:
    """Every difference between a checkpoint and a model, as readable lines (empty: compatible).

    Args:
        saved: The checkpoint's ``adapters.json`` content.
        current: The model's metadata in the same form.
        state: The checkpoint's tensors.
        expected: The model's adapter tensors (names and shapes to match).

    Returns:
        Lines such as ``"unet config r: checkpoint 4, model 8"`` or ``"1 missing tensor(s), e.g. [...]"``.
    """
    problems = []
    if set(saved["adapters"]) != set(current["adapters"]):
        problems.append(f"adapters: checkpoint has {sorted(saved['adapters'])}, model {sorted(current['adapters'])}")
    for part in sorted(set(saved["adapters"]) & set(current["adapters"])):
        old, new = saved["adapters"][part], current["adapters"][part]
        if old["type"] != new["type"]:
            problems.append(f"{part} adapter type: checkpoint {old['type']}, model {new['type']}")
            continue
        for key in sorted(set(old["config"]) | set(new["config"])):
            if old["config"].get(key) != new["config"].get(key):
                problems.append(
                    f"{part} config {key}: checkpoint {old['config'].get(key)!r}, model {new['config'].get(key)!r}"
                )
    if saved.get("train_conv_in") != current["train_conv_in"]:
        problems.append(f"train_conv_in: checkpoint {saved.get('train_conv_in')}, model {current['train_conv_in']}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    return problems
