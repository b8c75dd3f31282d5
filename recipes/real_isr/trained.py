"""Load a trained one-step SR generator: the ``recipe.json`` of a checkpoint, its adapter configs, the model.

``train.py`` writes, in every ``<output_dir>/checkpoint-<step>/`` and in ``<output_dir>/final/``:

```
adapters.safetensors   adapter tensors (OneStepSR.save_adapters)
adapters.json          per part {adapter_name, type: "RankMoEConfig" | "LoraConfig", config}, train_conv_in
recipe.json            {"format": 1, "pretrained_model": str, "estimator": {"kind": str | null, ...} | null,
                        "prompt": str, "timestep": int, "scale": int, "step": int, ...}
```

:func:`load_trained` rebuilds everything from these three files and the base model folder: the adapter configs
from ``adapters.json`` (:func:`adapter_configs`), the generator with ``OneStepSR.from_pretrained`` (the recipe's
``pretrained_model`` unless another folder is given), the adapter weights with ``OneStepSR.load_adapters`` (which
refuses a checkpoint that does not match, before copying anything), and the degradation estimator from the
recipe's ``estimator`` entry (``rankmoe.conditioning.factory.degradation_estimator(kind, **settings)``).

Every malformed file gives a ``ValueError`` naming the file and what is wrong (a truncated
``adapters.safetensors`` included: safetensors' own ``SafetensorError`` is wrapped), a missing one a
``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

import rankmoe
from rankmoe.conditioning.base import DegradationEstimator
from rankmoe.conditioning.factory import ESTIMATOR_KINDS, degradation_estimator

try:  # imported as ``real_isr.trained`` (tests; scripts with recipes/ on sys.path)
    from .checkpoints import ADAPTERS_CONFIG_NAME, ADAPTERS_WEIGHTS_NAME
    from .checkpoints import FORMAT as ADAPTERS_FORMAT
    from .model import OneStepSR
except ImportError:  # imported flat from inside recipes/real_isr
    from checkpoints import ADAPTERS_CONFIG_NAME, ADAPTERS_WEIGHTS_NAME  # type: ignore[no-redef]
    from checkpoints import FORMAT as ADAPTERS_FORMAT  # type: ignore[no-redef]
    from model import OneStepSR  # type: ignore[no-redef]

__all__ = [
    "CHECKPOINT_FILES",
    "DTYPES",
    "RECIPE_FILE_NAME",
    "RECIPE_FORMAT",
    "adapter_configs",
    "load_trained",
    "parse_dtype",
    "read_recipe_file",
    "resolve_checkpoint",
    "write_recipe_file",
]

RECIPE_FILE_NAME = "recipe.json"
"""Name of the recipe file in every checkpoint folder."""
RECIPE_FORMAT = 1
"""The ``format`` value this module writes and reads."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Accepted dtype names (``--dtype``)."""
CHECKPOINT_FILES = (ADAPTERS_WEIGHTS_NAME, ADAPTERS_CONFIG_NAME, RECIPE_FILE_NAME)
"""The three files of a complete checkpoint folder."""
_CONFIG_TYPES: dict[str, type] = {"RankMoEConfig": rankmoe.RankMoEConfig, "LoraConfig": LoraConfig}
_PARTS = {"unet": OneStepSR.UNET_ADAPTER, "vae": OneStepSR.VAE_ADAPTER}
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


# ------------------------------------------------------------------------------------------------ recipe.json


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_estimator(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("kind", None), str | None):
        raise ValueError(
            f"{where}estimator must be null or a mapping {{'kind': str | null, **settings}}, got {value!r}"
        )
    kind = value.get("kind")
    if kind is not None and kind not in ESTIMATOR_KINDS:
        raise ValueError(f"{where}estimator kind {kind!r} is unknown; choose from {list(ESTIMATOR_KINDS)} or null")
    return dict(value)


def write_recipe_file(
    folder: str | os.PathLike[str],
    *,
    pretrained_model: str | os.PathLike[str],
    estimator: Mapping[str, Any] | None,
    prompt: str,
    timestep: int,
    scale: int,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<folder>/recipe.json`` (format 1), the settings :func:`load_trained` needs beside the adapters.

    The file is written to a temporary name first and then renamed, so a reader never sees half a file.

    Args:
        folder: The checkpoint folder (created if missing).
        pretrained_model: The base model folder (diffusers layout) or hub id the adapters were trained on.
        estimator: ``{"kind": str | None, **settings}`` for ``degradation_estimator(kind, **settings)`` (``kind``
            one of ``rankmoe.conditioning.factory.ESTIMATOR_KINDS`` or ``None`` = weight-free), or ``None`` when
            the model routes on no condition. Settings must be JSON data.
        prompt: The fixed prompt the generator was trained with (``""`` = empty prompt).
        timestep: The one-step diffusion timestep (999 in OSEDiff).
        scale: The SR factor of training (default ``--scale`` of ``infer.py``).
        step: The optimisation step the weights come from.
        extra: More JSON keys to store (they may not replace the keys above).

    Returns:
        The path of the written ``recipe.json``.

    Raises:
        ValueError: For a value of the wrong type or range (naming the argument), an unknown estimator kind,
            settings that are not JSON data, or ``extra`` keys that clash with the fixed ones.
    """
    if not isinstance(pretrained_model, str | os.PathLike) or not os.fspath(pretrained_model):
        raise ValueError(f"pretrained_model must be a non-empty path or hub id, got {pretrained_model!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str (the fixed training prompt), got {type(prompt).__name__}: {prompt!r}")
    recipe: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "pretrained_model": os.fspath(pretrained_model),
        "estimator": _check_estimator(estimator, ""),
        "prompt": prompt,
        "timestep": _check_int("timestep", timestep, 0),
        "scale": _check_int("scale", scale, 1),
        "step": _check_int("step", step, 0),
    }
    clashes = sorted(set(extra or {}) & set(recipe))
    if clashes:
        raise ValueError(f"extra may not replace the recipe keys {clashes}")
    recipe.update(extra or {})
    try:
        text = json.dumps(recipe, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe values must be JSON data (estimator settings, extra): {error}") from error
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    temporary = target / f".{RECIPE_FILE_NAME}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, target / RECIPE_FILE_NAME)
    return target / RECIPE_FILE_NAME


_RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,), "pretrained_model": (str,), "prompt": (str,), "timestep": (int,), "scale": (int,), "step": (int,),
}


def read_recipe_file(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint's ``recipe.json``.

    Args:
        folder: The checkpoint folder, or the ``recipe.json`` file itself.

    Returns:
        The recipe as a dict (every key of the file; the estimator entry is ``None`` or a dict).

    Raises:
        FileNotFoundError: If the file does not exist (the message names the path).
        ValueError: If it is not JSON, not an object, of another ``format``, lacks a key or holds a value of the
            wrong type (the message names the file, the key and the value).
    """
    path = Path(folder)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / RECIPE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found; train.py writes it in every checkpoint folder")
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(recipe).__name__}")
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(
            f"{path} has format {recipe.get('format')!r}; this version reads format {RECIPE_FORMAT} (a newer "
            "train.py may have written it)"
        )
    missing = sorted((set(_RECIPE_TYPES) | {"estimator"}) - set(recipe))
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}")
    for key, types in _RECIPE_TYPES.items():
        if isinstance(recipe[key], bool) or not isinstance(recipe[key], types):
            raise ValueError(f"{path}: {key} must be {types[0].__name__}, got {recipe[key]!r}")
    _check_estimator(recipe["estimator"], f"{path}: ")
    return recipe


# ------------------------------------------------------------------------------------------------ adapters.json


def adapter_configs(
    folder: str | os.PathLike[str],
) -> tuple[rankmoe.RankMoEConfig | LoraConfig | None, rankmoe.RankMoEConfig | LoraConfig | None, bool]:
    """Rebuild the adapter configs of a checkpoint from its ``adapters.json``.

    Args:
        folder: A checkpoint folder (with ``adapters.json``).

    Returns:
        ``(unet_config, vae_config, train_conv_in)``: ``RankMoEConfig`` / ``LoraConfig`` objects (``None`` for a
        part without adapter), as ``OneStepSR.from_pretrained`` takes them.

    Raises:
        FileNotFoundError: If ``adapters.json`` is missing.
        ValueError: If it is not JSON, of another format, names an unknown part or config type, or holds a config
            the class refuses (the message names the file and the part).
    """
    path = Path(folder) / ADAPTERS_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter config file {path} not found")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (corrupt checkpoint?): {error}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("adapters"), dict):
        raise ValueError(f"{path} must hold an object with an 'adapters' object")
    if saved.get("format") != ADAPTERS_FORMAT:
        raise ValueError(f"{path} has format {saved.get('format')!r}, expected {ADAPTERS_FORMAT}")
    if not isinstance(saved.get("train_conv_in"), bool):
        raise ValueError(f"{path}: train_conv_in must be true or false, got {saved.get('train_conv_in')!r}")
    configs: dict[str, Any] = {}
    for part, entry in saved["adapters"].items():
        if part not in _PARTS:
            raise ValueError(f"{path}: unknown adapter part {part!r}; expected {sorted(_PARTS)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise ValueError(f"{path}: adapter {part!r} must be an object with a 'config' object, got {entry!r}")
        if entry.get("adapter_name") != _PARTS[part]:
            raise ValueError(
                f"{path}: adapter {part!r} is named {entry.get('adapter_name')!r}, OneStepSR uses {_PARTS[part]!r}"
            )
        kind = entry.get("type")
        if kind not in _CONFIG_TYPES:
            raise ValueError(f"{path}: adapter {part!r} has type {kind!r}; expected one of {sorted(_CONFIG_TYPES)}")
        settings = {k: v for k, v in entry["config"].items() if k != "peft_type"}
        try:
            configs[part] = _CONFIG_TYPES[kind].from_peft_type(**settings)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: the {part} {kind} cannot be rebuilt: {error}") from error
    return configs.get("unet"), configs.get("vae"), saved["train_conv_in"]


# ------------------------------------------------------------------------------------------------ loading


def _is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder a path stands for.

    Args:
        path: A checkpoint folder (``adapters.safetensors``, ``adapters.json``, ``recipe.json``), or a training
            output folder: its ``final/`` when present, else its newest complete ``checkpoint-<step>/`` (largest
            step whose three files all exist; an incomplete one, e.g. from an interrupted save, is passed over).

    Returns:
        The checkpoint folder.

    Raises:
        FileNotFoundError: If ``path`` does not exist, ``final/`` lacks a file, or no checkpoint is found (the
            message names what was looked for).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist (or is not a folder)")
    if _is_checkpoint(folder):
        return folder
    final = folder / "final"
    if final.is_dir():
        missing = [name for name in CHECKPOINT_FILES if not (final / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {final} lacks {missing}")
        return final
    steps = [
        (int(match.group(1)), child)
        for child in folder.iterdir()
        if (match := _CHECKPOINT_DIR.fullmatch(child.name)) and child.is_dir() and _is_checkpoint(child)
    ]
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {folder}: expected {', '.join(CHECKPOINT_FILES)} in it, or a final/ or "
            "checkpoint-<step>/ subfolder holding them"
        )
    return max(steps)[1]


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype argument as a ``torch.dtype``.

    Args:
        dtype: ``None`` (keep the loaded dtype), a ``torch.dtype``, or a name of :data:`DTYPES`.

    Returns:
        The ``torch.dtype``, or ``None``.

    Raises:
        ValueError: For another name (the message lists the valid ones).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def _check_weights_file(path: Path) -> None:
    """Parse the safetensors header (cheap), turning safetensors' errors into one naming the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"adapter weight file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def load_trained(
    checkpoint: str | os.PathLike[str],
    pretrained_model: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[OneStepSR, DegradationEstimator | None, dict[str, Any]]:
    """Load a trained generator (in ``eval()`` mode) and its degradation estimator from a checkpoint.

    Args:
        checkpoint: A checkpoint folder or a training output folder (see :func:`resolve_checkpoint`).
        pretrained_model: The base model folder (diffusers layout) or hub id; default: the recipe's
            ``pretrained_model``.
        device: Where to put the model and the estimator (default: CPU).
        dtype: Dtype of the model (``torch.dtype`` or ``"float32"`` / ``"float16"`` / ``"bfloat16"``; default
            float32). The adapters are loaded in float32 first, then everything is cast. The estimator stays in
            float32.

    Returns:
        ``(model, estimator, recipe)``: the :class:`OneStepSR` in ``eval()`` mode, the estimator (``None`` when
        the recipe has none) and the recipe dict with ``"checkpoint"`` (the resolved folder, a str) added.

    Raises:
        FileNotFoundError: For a missing checkpoint, file or base model folder.
        ValueError: For a malformed ``recipe.json`` / ``adapters.json``, an unreadable ``adapters.safetensors``,
            estimator settings the estimator refuses, or adapters that do not match the model.
    """
    folder = resolve_checkpoint(checkpoint)
    recipe = read_recipe_file(folder)
    unet_config, vae_config, train_conv_in = adapter_configs(folder)
    _check_weights_file(folder / ADAPTERS_WEIGHTS_NAME)
    torch_dtype = parse_dtype(dtype)
    estimator = None
    if recipe["estimator"] is not None:
        settings = dict(recipe["estimator"])
        try:
            estimator = degradation_estimator(settings.pop("kind", None), **settings)
        except (TypeError, ValueError) as error:
            where = folder / RECIPE_FILE_NAME
            raise ValueError(f"{where}: cannot build the estimator {recipe['estimator']}: {error}") from error
    model = OneStepSR.from_pretrained(
        recipe["pretrained_model"] if pretrained_model is None else pretrained_model,
        unet_config=unet_config, vae_config=vae_config, train_conv_in=train_conv_in, prompt=recipe["prompt"],
        timestep=recipe["timestep"],
    )
    from safetensors import SafetensorError

    try:
        model.load_adapters(folder)
    except SafetensorError as error:  # the header check passed, the data did not
        raise ValueError(f"{folder / ADAPTERS_WEIGHTS_NAME} cannot be read: {error}") from error
    model.to(device=device, dtype=torch_dtype).eval()
    if estimator is not None:
        estimator.to(device=device)
    return model, estimator, {**recipe, "checkpoint": str(folder)}
