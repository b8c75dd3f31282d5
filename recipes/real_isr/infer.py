"""Super-resolve images with a trained checkpoint: ``python recipes/real_isr/infer.py --checkpoint DIR ...``.

```
python recipes/real_isr/infer.py --checkpoint runs/mor/final --input lr/ --output sr/ [--pretrained_model SD_DIR]
    [--scale 4] [--tile 96 --overlap 32 --tile_batch_size 4] [--color_fix adain|wavelet|none] [--vae_tiling]
    [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--min_lr_size 128] [--save_scores]
```

Per input image (a folder's images, directly in it, or one file), in file-name order:

```
lr (1, 3, h, w)  --(h or w < min_lr_size: bicubic so that the shorter side = min_lr_size)-->  lr' (1, 3, h', w')
scores = estimator(lr')                          one degradation estimate per image, on the whole LR image
sr = super_resolve(model, lr', scale, condition=scores, tile=..., ...)      (1, 3, h' scale, w' scale)
sr -> bicubic (antialiased) back to (h scale, w scale) when lr was enlarged;  saved as <output>/<stem>.png
```

- **Small inputs** (``--min_lr_size``, OSEDiff's ``process_size // upscale`` rule, default 128; 0 turns it off):
  an LR whose shorter side is below the size is enlarged first and the result is resized back, so the output is
  always exactly ``scale`` times the input. The estimator scores the LR the model receives (the enlarged one):
  the weight-free estimator needs at least 128 x 128 pixels, which the default guarantees.
- **Scores** (``--save_scores``): ``<output>/scores.json`` holds the settings and, per image, the estimator's named
  scores, the severity, the LR size (and the enlarged size), the seconds taken, and the mean active ranks of each
  routed part (``rankmoe.routing_stats`` of the last call of that part: with latent tiling, the last chunk of
  tiles; the same for every tile when routing on the condition). JSON has no NaN: a missing number is ``null``.
- **Errors** before the model is loaded: a missing input, a folder without images, an unreadable image or one of
  an unsupported mode (``images.check_mode``), two inputs with one stem, an output path that is a file, or an
  output that would overwrite an input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: model.py imports ``real_isr.*``, so recipes/ must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

import rankmoe
from rankmoe.conditioning.base import DegradationEstimator

try:  # imported as ``real_isr.infer`` (tests; scripts with recipes/ on sys.path)
    from .images import IMAGE_EXTENSIONS, _read, check_mode, list_folder, load_image, save_image
    from .tiling import super_resolve
    from .trained import DTYPES, load_trained
except ImportError:  # run as a script / imported flat from inside recipes/real_isr
    from images import IMAGE_EXTENSIONS, _read, check_mode, list_folder, load_image, save_image  # type: ignore
    from tiling import super_resolve  # type: ignore[no-redef]
    from trained import DTYPES, load_trained  # type: ignore[no-redef]

__all__ = ["COLOR_FIX_CHOICES", "SCORES_FILE_NAME", "collect_inputs", "enlarge_to_min_size", "main", "parse_args",
           "prepare_output", "run_inference", "super_resolve_image"]

SCORES_FILE_NAME = "scores.json"
"""Written into the output folder with ``--save_scores``."""
COLOR_FIX_CHOICES = {"adain": "adain", "wavelet": "wavelet", "none": None}
"""``--color_fix`` values and the ``color_fix`` argument of ``super_resolve`` they stand for."""


def collect_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The images to super-resolve: the image files directly in a folder (sorted by name), or one image file.

    Every file's header is read, so unreadable files and unsupported modes fail here, before any model loads.

    Args:
        path: A folder or an image file (endings of ``images.IMAGE_EXTENSIONS``).

    Returns:
        Absolute paths, sorted by file name.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For a folder without images, a file of another ending, an unreadable image, an unsupported
            mode, or two images with the same stem (both would be written to ``<stem>.png``).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"input {source} not found (pass an image folder or an image file)")
    if source.is_dir():
        paths = [Path(p) for p in list_folder(source, recursive=False)]
    elif source.name.lower().endswith(IMAGE_EXTENSIONS):
        paths = [source.resolve()]
    else:
        raise ValueError(f"input {source} is neither a folder nor an image file ({', '.join(IMAGE_EXTENSIONS)})")
    for image_path in paths:
        _read(image_path, lambda image, p=image_path: check_mode(image, p))
    stems: dict[str, list[str]] = {}
    for image_path in paths:
        stems.setdefault(image_path.stem, []).append(image_path.name)
    clashes = [names for names in stems.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"input images share a stem (outputs are <stem>.png): {clashes}; rename or move them")
    return paths


def prepare_output(output: str | os.PathLike[str], inputs: Sequence[Path]) -> Path:
    """Create the output folder after checking that it is not a file and that no input would be overwritten.

    Args:
        output: The output folder (created with its parents if missing).
        inputs: The input files (from :func:`collect_inputs`).

    Returns:
        ``Path(output)``.

    Raises:
        ValueError: If ``output`` is an existing file, or ``<output>/<stem>.png`` is one of the inputs.
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} exists and is not a folder; pass a folder for the SR images")
    clobbered = [str(p) for p in inputs if (folder / f"{p.stem}.png").resolve() == p.resolve()]
    if clobbered:
        raise ValueError(f"output folder {folder} would overwrite the input(s) {clobbered}; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def enlarge_to_min_size(lr: torch.Tensor, min_size: int) -> torch.Tensor:
    """OSEDiff's small-input rule: enlarge (bicubic) so that the shorter side is ``min_size``; else unchanged.

    The new size is ``round(h * f) x round(w * f)`` with ``f = min_size / min(h, w)`` (the shorter side exactly
    ``min_size``), values clamped to ``[0, 1]``.

    Args:
        lr: ``(b, 3, h, w)`` LR images in ``[0, 1]``.
        min_size: Minimum shorter side; 0 keeps every image as it is.

    Returns:
        ``(b, 3, h', w')``: ``lr`` itself when ``min(h, w) >= min_size``.

    Example:
        >>> enlarge_to_min_size(torch.rand(1, 3, 24, 32), 128).shape
        torch.Size([1, 3, 128, 171])
    """
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    height, width = lr.shape[-2:]
    if min(height, width) >= min_size:
        return lr
    factor = min_size / min(height, width)
    size = (max(min_size, round(height * factor)), max(min_size, round(width * factor)))
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _mean_active_ranks(model: nn.Module) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for part in model.routed_models():
        name = "unet" if part is model.unet else "vae"
        value = rankmoe.overall_active_ranks(rankmoe.routing_stats(part))
        result[name] = None if math.isnan(value) else value
    return result


def super_resolve_image(
    model: nn.Module,
    estimator: DegradationEstimator | None,
    lr: torch.Tensor,
    *,
    scale: int = 4,
    min_lr_size: int = 128,
    name: str = "image",
    **settings: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Super-resolve one LR image with one degradation estimate (see the module docstring).

    Args:
        model: A :class:`real_isr.model.OneStepSR` in ``eval()`` mode.
        estimator: The degradation estimator (called once, on the whole LR), or ``None`` (no condition).
        lr: ``(3, h, w)`` LR image in ``[0, 1]``.
        scale: SR factor.
        min_lr_size: See :func:`enlarge_to_min_size`.
        name: The image's name for error messages.
        **settings: ``tile``, ``overlap``, ``tile_batch_size``, ``color_fix``, ``vae_tiling`` of
            :func:`real_isr.tiling.super_resolve`.

    Returns:
        ``(sr, record)``: ``sr`` ``(3, h * scale, w * scale)`` float32 in ``[0, 1]`` on the CPU; ``record`` with
        ``lr_size``, ``enlarged_to`` (or ``None``), ``scores`` (name -> score), ``severity`` and
        ``mean_active_ranks`` (part -> ranks).

    Raises:
        ValueError: When the estimator refuses the image (e.g. smaller than the weight-free minimum of 128 px; the
            message names the image and ``--min_lr_size``), or for settings ``super_resolve`` refuses.
    """
    device = next(model.parameters()).device
    height, width = lr.shape[-2:]
    batch = enlarge_to_min_size(lr[None].to(device=device, dtype=torch.float32), min_lr_size)
    record: dict[str, Any] = {"lr_size": [height, width], "sr_size": [height * scale, width * scale],
                              "enlarged_to": list(batch.shape[-2:]) if batch.shape[-2:] != lr.shape[-2:] else None}
    scores = None
    if estimator is not None:
        try:
            scores = estimator(batch)
        except ValueError as error:
            raise ValueError(
                f"{name}: the degradation estimator refused the {batch.shape[-2]}x{batch.shape[-1]} LR image: {error}."
                " Enlarge small inputs first: --min_lr_size 128 (OSEDiff's rule; min_lr_size= in code)"
            ) from error
        record["scores"] = {key: float(value[0]) for key, value in scores.as_dict().items() if key != "severity"}
        record["severity"] = float(scores.severity[0])
    sr = super_resolve(model, batch, scale, scores, **settings)
    if record["enlarged_to"] is not None:
        sr = F.interpolate(sr, size=(height * scale, width * scale), mode="bicubic", antialias=True).clamp(0, 1)
    record["mean_active_ranks"] = _mean_active_ranks(model)
    return sr[0].float().cpu(), record


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run_inference(
    model: nn.Module,
    estimator: DegradationEstimator | None,
    inputs: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    scale: int = 4,
    min_lr_size: int = 128,
    save_scores: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, dict[str, Any]]:
    """Super-resolve files into ``output_dir`` as ``<stem>.png`` (one image at a time).

    Args:
        model: A :class:`real_isr.model.OneStepSR` in ``eval()`` mode.
        estimator: Degradation estimator (one call per image) or ``None``.
        inputs: Image files (e.g. from :func:`collect_inputs`).
        output_dir: Output folder (see :func:`prepare_output`).
        scale: SR factor.
        min_lr_size: See :func:`enlarge_to_min_size`.
        save_scores: Also write ``scores.json`` (settings + per-image records).
        metadata: Extra top-level entries of ``scores.json`` (checkpoint, settings).
        progress: Show a tqdm progress bar.
        **settings: Passed to :func:`real_isr.tiling.super_resolve` (``tile``, ``overlap``, ...).

    Returns:
        ``{stem: record}`` as :func:`super_resolve_image` returns them, plus ``input``, ``output`` and ``seconds``.
    """
    from tqdm.auto import tqdm

    paths = [Path(p) for p in inputs]
    folder = prepare_output(output_dir, paths)
    records: dict[str, dict[str, Any]] = {}
    for path in tqdm(paths, desc="super-resolve", unit="image", disable=not progress):
        start = time.perf_counter()
        sr, record = super_resolve_image(
            model, estimator, load_image(path), scale=scale, min_lr_size=min_lr_size, name=str(path), **settings
        )
        target = save_image(sr, folder / f"{path.stem}.png")
        records[path.stem] = {"input": str(path), "output": str(target), **record,
                              "seconds": time.perf_counter() - start}
    if save_scores:
        content = {**(metadata or {}), "scale": scale, "min_lr_size": min_lr_size, "settings": settings,
                   "images": records}
        (folder / SCORES_FILE_NAME).write_text(json.dumps(_jsonable(content), indent=2, allow_nan=False) + "\n")
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring); ``argparse`` exits with status 2 on bad flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training output folder")
    parser.add_argument("--input", required=True, help="LR image folder (images directly in it) or one image file")
    parser.add_argument("--output", required=True, help="folder for <stem>.png SR images (created)")
    parser.add_argument("--pretrained_model", default=None, help="base model folder (default: the recipe's)")
    parser.add_argument("--scale", type=int, default=None, help="SR factor (default: the recipe's)")
    parser.add_argument("--tile", type=int, default=96, help="latent tile side")
    parser.add_argument("--overlap", type=int, default=32, help="latent tile overlap")
    parser.add_argument("--tile_batch_size", type=int, default=4, help="tiles per UNet call")
    parser.add_argument("--color_fix", choices=sorted(COLOR_FIX_CHOICES), default="adain")
    parser.add_argument("--vae_tiling", action="store_true", help="diffusers' tiled VAE (memory; faint seams)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--min_lr_size", type=int, default=128,
                        help="enlarge LR whose shorter side is smaller, resize the output back (0: off)")
    parser.add_argument("--save_scores", action="store_true", help=f"write {SCORES_FILE_NAME}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    checks = [("--scale", args.scale is None or args.scale >= 1, ">= 1"), ("--tile", args.tile >= 1, ">= 1"),
              ("--overlap", 0 <= args.overlap < args.tile, f"in [0, --tile) = [0, {args.tile})"),
              ("--tile_batch_size", args.tile_batch_size >= 1, ">= 1"),
              ("--min_lr_size", args.min_lr_size >= 0, ">= 0")]
    for flag, ok, valid in checks:
        if not ok:
            parser.error(f"{flag} must be {valid}, got {getattr(args, flag[2:])}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: check the inputs and output, load the checkpoint, super-resolve every image.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success (errors raise, with messages naming the file or flag).
    """
    args = parse_args(argv)
    inputs = collect_inputs(args.input)
    prepare_output(args.output, inputs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    model, estimator, recipe = load_trained(args.checkpoint, args.pretrained_model, device=device, dtype=args.dtype)
    scale = recipe["scale"] if args.scale is None else args.scale
    settings = {"tile": args.tile, "overlap": args.overlap, "tile_batch_size": args.tile_batch_size,
                "color_fix": COLOR_FIX_CHOICES[args.color_fix], "vae_tiling": args.vae_tiling}
    metadata = {"checkpoint": recipe["checkpoint"], "step": recipe["step"], "estimator": recipe["estimator"],
                "device": str(device), "dtype": args.dtype}
    run_inference(model, estimator, inputs, args.output, scale=scale, min_lr_size=args.min_lr_size,
                  save_scores=args.save_scores, metadata=metadata, progress=not args.quiet, **settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
