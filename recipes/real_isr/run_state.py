"""Training checkpoints of ``train.py``: adapter-only weights plus what a resume needs, written atomically.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds

- ``adapters.safetensors`` + ``adapters.json`` (:meth:`OneStepSR.save_adapters`: the generator's adapters and
  ``conv_in``) and ``recipe.json`` (model folder, estimator, prompt: what ``infer.py`` needs);
- ``regularizer.safetensors`` (the VSD score UNet's LoRA) and ``discriminator.safetensors`` (GAN head), when
  they train;
- ``optimizers.pt`` (every optimiser's and learning-rate scheduler's state, the fp16 grad scaler's);
- ``training_state.json`` (global step, world size, batch sizes) and ``rng_state_<rank>.pt`` per process.

Only the trained tensors are saved, never the frozen Stable Diffusion weights (a few MB instead of 5 GB). The
folder is written as ``checkpoint-<step>.tmp`` and renamed when complete, so an interrupted save never looks like
a checkpoint; ``latest`` is the highest complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "STATE_FILE_NAME",
    "checkpoint_folders",
    "load_training_state",
    "prune_checkpoints",
    "resolve_resume",
    "save_training_state",
]

STATE_FILE_NAME = "training_state.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)`` under ``output_dir``, oldest first (``.tmp`` folders ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike[str], value: str | None) -> Path | None:
    """The checkpoint to resume from: ``None`` (fresh run), ``"latest"`` (newest, or ``None`` when there is none)
    or a folder.

    Raises:
        FileNotFoundError: If a named folder does not exist or is not a training checkpoint.
    """
    if value is None:
        return None
    if value == "latest":
        folders = checkpoint_folders(output_dir)
        return folders[-1][1] if folders else None
    folder = Path(value)
    if not (folder / STATE_FILE_NAME).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={value!r} is not a training checkpoint (no {STATE_FILE_NAME}); pass 'latest' "
            f"or a checkpoint-<step> folder of an output_dir"
        )
    return folder


def prune_checkpoints(output_dir: str | os.PathLike[str], limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``limit`` remain; returns the deleted folders."""
    if limit is None:
        return []
    folders = checkpoint_folders(output_dir)
    removed = [folder for _, folder in folders[: max(0, len(folders) - limit)]]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def _lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in module.named_parameters() if p.requires_grad}


def save_training_state(
    folder: Path,
    *,
    model: Any,
    regularizer: nn.Module | None,
    discriminator: nn.Module | None,
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    scaler: Any,
    state: dict[str, Any],
    recipe: dict[str, Any],
    is_main_process: bool,
    process_index: int,
) -> None:
    """Write every file of a checkpoint into ``folder`` (the caller renames it into place).

    Weights and optimiser states are written by the main process only (they are equal on every process after
    DDP's all-reduce); each process writes its own RNG state.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"python": None, "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               folder / f"rng_state_{process_index}.pt")
    if not is_main_process:
        return
    model.save_adapters(folder)
    try:
        from .trained import write_recipe_file
    except ImportError:
        from trained import write_recipe_file  # type: ignore[no-redef]
    write_recipe_file(folder, **recipe)
    if regularizer is not None:
        save_file(_lora_state(regularizer), folder / "regularizer.safetensors")
    if discriminator is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()},
                  folder / "discriminator.safetensors")
    torch.save({
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }, folder / "optimizers.pt")
    (folder / STATE_FILE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"checkpoint file {path} is corrupt or truncated ({error}); delete the checkpoint folder "
                         "and resume from an earlier one") from error


def _copy_into(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path, trainable_only: bool) -> None:
    own = dict(module.named_parameters()) if trainable_only else module.state_dict()
    expected = {k: v for k, v in own.items() if not trainable_only or v.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match this run (nothing was loaded from it): missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatches {sorted(shapes)[:3]}"
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])


def load_training_state(
    folder: Path,
    *,
    model: Any,
    regularizer: nn.Module | None,
    discriminator: nn.Module | None,
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    scaler: Any,
    process_index: int,
    expected: dict[str, Any],
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_training_state`; returns its ``training_state.json``.

    Everything is checked against this run first (``expected``: world size and batch sizes, the adapter configs
    through ``load_adapters``), so a mismatched checkpoint is refused with a message naming the difference.

    Raises:
        ValueError: For a corrupt file or a checkpoint of a different run.
        FileNotFoundError: For a missing file.
    """
    state_file = folder / STATE_FILE_NAME
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{state_file} is not valid JSON ({error})") from error
    different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if different:
        described = ", ".join(f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in different.items())
        raise ValueError(f"checkpoint {folder} was written by a run with other settings ({described}); resuming "
                         "would not continue the same training")
    regularizer_tensors = _load_tensors(folder / "regularizer.safetensors") if regularizer is not None else None
    discriminator_tensors = _load_tensors(folder / "discriminator.safetensors") if discriminator is not None else None
    try:
        saved = torch.load(folder / "optimizers.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError / UnpicklingError / EOFError for a damaged file
        raise ValueError(f"{folder / 'optimizers.pt'} is corrupt or truncated ({error})") from error
    names = set(saved["optimizers"])
    if names != set(optimizers):
        raise ValueError(f"checkpoint {folder} has optimisers {sorted(names)}, this run {sorted(optimizers)}")
    model.load_adapters(folder)
    if regularizer is not None:
        _copy_into(regularizer, regularizer_tensors, folder / "regularizer.safetensors", trainable_only=True)
    if discriminator is not None:
        _copy_into(discriminator, discriminator_tensors, folder / "discriminator.safetensors", trainable_only=False)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(saved["schedulers"][name])
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    rng_file = folder / f"rng_state_{process_index}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state
