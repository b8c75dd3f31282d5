"""Score SR images against HR references: ``python recipes/real_isr/evaluate.py --sr SR_DIR [--hr HR_DIR] ...``.

```
python recipes/real_isr/evaluate.py --sr sr/ --hr hr/ [--output DIR] [--crop_border 4] [--metrics psnr ssim niqe]
    [--niqe_luma ycbcr|yiq] [--lpips_vgg16 vgg16-397923af.pth --lpips_heads vgg.pth] [--fid_inception PATH]
    [--dists_weights PATH] [--musiq_weights PATH] [--maniqa_weights PATH] [--clipiqa_weights RN50.pt]
    [--sr_suffix S] [--hr_suffix S] [--device cpu]
```

SR and HR files are matched by stem (``paired.py``'s rule: files directly in each folder, a suffix such as ``_HR``
dropped first); every SR image needs an HR image of the same size and vice versa. Per image and mean over images
(``metrics.json``, ``metrics.md``; the markdown table is also printed):

| metric | needs | implementation |
|---|---|---|
| PSNR, SSIM | HR | ``real_isr.metrics`` on Y (BT.601, MATLAB ``rgb2ycbcr``), ``crop_border`` removed |
| NIQE | nothing (offline) | ``real_isr.metrics.niqe`` (vendored MATLAB model), whole image, ``--niqe_luma`` |
| LPIPS | HR, local weights | ``real_isr.lpips.LPIPS`` (VGG, v0.1), ``--lpips_vgg16`` + ``--lpips_heads``, whole image |
| FID | HR, local weights | :func:`fid_from_features` of torchvision ``inception_v3`` pool3 (2048-d) features |
| DISTS, MUSIQ, MANIQA, CLIPIQA | pyiqa, local weights | :data:`PYIQA_METRICS` |

- **Defaults** (``metrics=None``): PSNR and SSIM with HR, NIQE always, and each optional metric whose weights are
  given. A listed metric whose HR folder or weights are missing is an error naming the flag.
- **NIQE on small images** needs two whole 96 x 96 blocks (at least 96 x 192): smaller images get NaN (``null`` in
  ``metrics.json``, ``n/a`` in the table) and a note; the NIQE mean is over the other images.
- **Non-finite numbers in JSON**: identical images have PSNR ``+inf``, written as the string ``"inf"``
  (``"-inf"`` likewise); NaN (not computed) as ``null``. Means include ``inf`` and skip NaN.
- **FID** is one number for the SR set against the HR set (at least 2 images each, else NaN and a note): the
  Fréchet distance (:func:`frechet_distance`; for sets smaller than 2048 an exact low-rank form of it,
  :func:`fid_from_features`). Its features come from torchvision's ImageNet Inception-v3, not the TF-Inception of
  pytorch-fid / clean-fid / pyiqa: the numbers are not comparable with papers' FID.
- **pyiqa** (optional; PolyForm-Noncommercial licence) gets the local file through ``pyiqa.create_metric(name,
  as_loss=False, device=..., <argument>=path)`` (pyiqa hands keyword arguments to the network). Some pyiqa networks
  load backbone weights on their own (DISTS: torchvision VGG16; MANIQA: timm ViT-B/8): these must be cached locally.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make ``real_isr`` importable, as infer.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

try:  # imported as ``real_isr.evaluate`` (tests; scripts with recipes/ on sys.path)
    from . import metrics as M
    from .fid import InceptionFeatures, fid_from_features, frechet_distance  # noqa: F401  (re-exported)
    from .images import IMAGE_EXTENSIONS, _read, check_mode, load_image
    from .lpips import LPIPS
    from .niqe import BLOCK, MIN_BLOCKS
    from .paired import _stems
except ImportError:  # run as a script / imported flat from inside recipes/real_isr
    import metrics as M  # type: ignore[no-redef]
    from fid import InceptionFeatures, fid_from_features, frechet_distance  # type: ignore[no-redef]  # noqa: F401
    from images import IMAGE_EXTENSIONS, _read, check_mode, load_image  # type: ignore[no-redef]
    from lpips import LPIPS  # type: ignore[no-redef]
    from niqe import BLOCK, MIN_BLOCKS  # type: ignore[no-redef]
    from paired import _stems  # type: ignore[no-redef]

__all__ = ["METRICS", "PYIQA_METRICS", "InceptionFeatures", "evaluate_folders", "fid_from_features",
           "frechet_distance", "main", "markdown_table", "write_reports"]


class PyiqaMetric(NamedTuple):
    """How a metric is created through pyiqa: its pyiqa name, the keyword taking the local weight file, FR or NR."""

    name: str
    weight_argument: str
    needs_reference: bool


PYIQA_METRICS = {
    "dists": PyiqaMetric("dists", "pretrained_model_path", True),
    "musiq": PyiqaMetric("musiq", "pretrained_model_path", False),  # KonIQ-10k MUSIQ
    "maniqa": PyiqaMetric("maniqa-pipal", "pretrained_model_path", False),  # OSEDiff's variant
    "clipiqa": PyiqaMetric("clipiqa", "backbone", False),  # the OpenAI CLIP RN50 file (CLIPIQA has no other weights)
}
"""Optional metrics through pyiqa (``pyiqa_weights`` maps the key to a local file)."""
_COLUMNS = {"psnr": ("PSNR ↑", 2), "ssim": ("SSIM ↑", 4), "lpips": ("LPIPS ↓", 4), "niqe": ("NIQE ↓", 4),
            "dists": ("DISTS ↓", 4), "musiq": ("MUSIQ ↑", 2), "maniqa": ("MANIQA ↑", 4), "clipiqa": ("CLIPIQA ↑", 4)}
METRICS = (*_COLUMNS, "fid")
"""Every metric name ``metrics=`` accepts (``fid`` is one number per folder pair, the others per image)."""
_NEEDS_HR = {"psnr", "ssim", "lpips", "fid", "dists"}
_Y_LUMA = "Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (BT.601, MATLAB rgb2ycbcr), unrounded"


# ------------------------------------------------------------------------------------------------ evaluation


def _import_pyiqa() -> Any:
    try:
        import pyiqa
    except ImportError as error:
        raise ImportError(
            "DISTS / MUSIQ / MANIQA / CLIPIQA need the pyiqa package: pip install pyiqa (PolyForm-Noncommercial "
            "licence; `pip install --no-deps pyiqa` avoids its heavy requirements), or leave these metrics out"
        ) from error
    return pyiqa


def _select(metrics: Sequence[str] | None, has_hr: bool, weights: dict[str, Any]) -> list[str]:
    if metrics is None:
        chosen = (["psnr", "ssim"] if has_hr else []) + ["niqe"]
        chosen += [name for name in ("lpips", "fid", *PYIQA_METRICS) if weights.get(name) is not None]
    else:
        chosen = list(dict.fromkeys(metrics))
    unknown = [name for name in chosen if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    flags = {"lpips": "--lpips_vgg16 and --lpips_heads", "fid": "--fid_inception",
             **{k: f"--{k}_weights" for k in PYIQA_METRICS}}
    for name in chosen:
        if name in _NEEDS_HR and not has_hr:
            raise ValueError(f"metric {name!r} compares with references: pass an HR folder (hr_dir / --hr)")
        if name in flags and weights.get(name) is None:
            raise ValueError(f"metric {name!r} needs local weights: pass {flags[name]}")
    return chosen


def _check_pairs(names: list[str], sr: dict[str, str], hr: dict[str, str] | None) -> None:
    problems = []
    for name in names:
        try:
            size = _read(sr[name], lambda image, p=sr[name]: (check_mode(image, p), image.size)[1])
            if hr is not None:
                ref = _read(hr[name], lambda image, p=hr[name]: (check_mode(image, p), image.size)[1])
                if ref != size:
                    problems.append(f"{sr[name]} is {size[0]}x{size[1]} but {hr[name]} is {ref[0]}x{ref[1]} (WxH)")
        except (ValueError, FileNotFoundError) as error:
            problems.append(str(error))
    if problems:
        raise ValueError(f"{len(problems)} unusable SR / HR image(s):\n  " + "\n  ".join(problems))


def evaluate_folders(
    sr_dir: str | os.PathLike[str],
    hr_dir: str | os.PathLike[str] | None = None,
    *,
    crop_border: int = 4,
    metrics: Sequence[str] | None = None,
    niqe_luma: str = "ycbcr",
    lpips_weights: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    fid_inception: str | os.PathLike[str] | None = None,
    pyiqa_weights: dict[str, str | os.PathLike[str]] | None = None,
    sr_suffix: str = "",
    hr_suffix: str = "",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Score the SR images of a folder, per image and on average (see the module docstring).

    Args:
        sr_dir: Folder of SR images.
        hr_dir: Folder of HR references (same stems and sizes), or ``None`` (no-reference metrics only).
        crop_border: Pixels removed on every side for PSNR and SSIM (the SR scale, by convention).
        metrics: Names from :data:`METRICS`, or ``None`` for the defaults.
        niqe_luma: ``"ycbcr"`` (BasicSR) or ``"yiq"`` (pyiqa's default) luminance for NIQE.
        lpips_weights: ``(vgg16 state dict file, lpips heads file)`` for LPIPS.
        fid_inception: torchvision ``inception_v3`` state dict file for FID.
        pyiqa_weights: ``{"dists" | "musiq" | "maniqa" | "clipiqa": local weight file}`` (see :data:`PYIQA_METRICS`).
        sr_suffix: Stem suffix of SR files dropped before matching.
        hr_suffix: Stem suffix of HR files dropped before matching.
        device: Device of the network metrics.
        progress: Show a tqdm progress bar.

    Returns:
        ``{"settings", "images": {name: {metric: value}}, "mean": {metric: value}, "fid"?, "count", "notes"}``
        with float values (``inf`` / ``nan`` as computed; :func:`write_reports` converts them for JSON).

    Raises:
        FileNotFoundError: For a missing folder or weight file.
        ValueError: For unmatched or unreadable images, different SR / HR sizes, an unknown metric, or a metric
            whose HR folder or weights are missing.
        ImportError: When a pyiqa metric is asked for and pyiqa is not installed.
    """
    from tqdm.auto import tqdm

    pyiqa_weights = dict(pyiqa_weights or {})
    unknown = sorted(set(pyiqa_weights) - set(PYIQA_METRICS))
    if unknown:
        raise ValueError(f"pyiqa_weights has unknown metric(s) {unknown}; choose from {sorted(PYIQA_METRICS)}")
    weights = {"lpips": lpips_weights, "fid": fid_inception, **pyiqa_weights}
    chosen = _select(metrics, hr_dir is not None, weights)
    for name in (n for n in chosen if n in weights):
        for path in list(weights[name]) if name == "lpips" else [weights[name]]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"weight file {path} for metric {name!r} not found")
    if niqe_luma not in M.LUMAS:
        raise ValueError(f"niqe_luma must be one of {list(M.LUMAS)}, got {niqe_luma!r}")
    sr = _stems(Path(sr_dir), IMAGE_EXTENSIONS, sr_suffix, "SR")
    hr = _stems(Path(hr_dir), IMAGE_EXTENSIONS, hr_suffix, "HR") if hr_dir is not None else None
    if hr is not None and set(sr) != set(hr):
        raise ValueError(f"unmatched images in {sr_dir} / {hr_dir}: SR without HR {sorted(set(sr) - set(hr))}, "
                         f"HR without SR {sorted(set(hr) - set(sr))}")
    names = sorted(sr)
    _check_pairs(names, sr, hr)

    implementations = {"psnr": f"real_isr.metrics.psnr, {_Y_LUMA}", "ssim": f"real_isr.metrics.ssim, {_Y_LUMA}",
                       "niqe": f"real_isr.metrics.niqe (MATLAB pristine model), luma={niqe_luma}, no crop"}
    networks: dict[str, Any] = {}
    if "lpips" in chosen:
        networks["lpips"] = LPIPS(*lpips_weights).to(device)  # type: ignore[misc]
        implementations["lpips"] = "real_isr.lpips.LPIPS (VGG, v0.1), no crop"
    if "fid" in chosen:
        networks["fid"] = InceptionFeatures(fid_inception).to(device)  # type: ignore[arg-type]
        implementations["fid"] = "fid_from_features of torchvision inception_v3 pool3 features (not TF-Inception)"
    if any(name in PYIQA_METRICS for name in chosen):
        pyiqa = _import_pyiqa()
        for name in (n for n in chosen if n in PYIQA_METRICS):
            spec, path = PYIQA_METRICS[name], str(pyiqa_weights[name])
            kwargs = {spec.weight_argument: path}
            networks[name] = pyiqa.create_metric(spec.name, as_loss=False, device=device, **kwargs)
            version = getattr(pyiqa, "__version__", "?")
            implementations[name] = f"pyiqa {version} {spec.name!r}, {spec.weight_argument}={path}"

    per_image: dict[str, dict[str, float]] = {}
    features: dict[str, list[torch.Tensor]] = {"sr": [], "hr": []}
    too_small: list[str] = []
    for name in tqdm(names, desc="evaluate", unit="image", disable=not progress):
        image = load_image(sr[name])[None].to(device)
        ref = load_image(hr[name])[None].to(device) if hr is not None else None
        values: dict[str, float] = {}
        try:
            if "psnr" in chosen:
                values["psnr"] = float(M.psnr(image, ref, crop_border=crop_border))
            if "ssim" in chosen:
                values["ssim"] = float(M.ssim(image, ref, crop_border=crop_border))
        except ValueError as error:
            raise ValueError(f"{sr[name]}: {error}") from error
        if "lpips" in chosen:
            values["lpips"] = float(networks["lpips"](2 * image - 1, 2 * ref - 1))
        if "niqe" in chosen:
            height, width = image.shape[-2:]
            if (height // BLOCK) * (width // BLOCK) < MIN_BLOCKS:
                values["niqe"] = math.nan
                too_small.append(f"{name} ({height}x{width})")
            else:
                values["niqe"] = float(M.niqe(image, luma=niqe_luma))
        for key in (n for n in chosen if n in PYIQA_METRICS):
            out = networks[key](image, ref) if PYIQA_METRICS[key].needs_reference else networks[key](image)
            values[key] = float(torch.as_tensor(out).detach().float().mean())
        if "fid" in chosen:
            features["sr"].append(networks["fid"](image))
            features["hr"].append(networks["fid"](ref))
        per_image[name] = {key: values[key] for key in chosen if key in values}

    notes = []
    if too_small:
        notes.append(f"NIQE needs two whole {BLOCK}x{BLOCK} blocks (at least {BLOCK}x{2 * BLOCK}); not computed (NaN) "
                     f"for {', '.join(too_small)}; the NIQE mean is over the other images")
    if any(math.isinf(v.get("psnr", 0.0)) for v in per_image.values()):
        notes.append("PSNR is inf where an SR image equals its reference (after the crop)")
    mean = {}
    for key in (n for n in chosen if n != "fid"):
        defined = [v[key] for v in per_image.values() if not math.isnan(v[key])]
        mean[key] = float(np.mean(defined)) if defined else math.nan
    result: dict[str, Any] = {
        "settings": {"sr_dir": str(sr_dir), "hr_dir": None if hr_dir is None else str(hr_dir),
                     "crop_border": crop_border, "luma": _Y_LUMA, "niqe_luma": niqe_luma, "metrics": chosen,
                     "implementations": implementations, "device": str(device)},
        "images": per_image, "mean": mean, "count": len(names), "notes": notes,
    }
    if "fid" in chosen:
        if len(names) < 2:
            result["fid"] = math.nan
            notes.append("FID needs at least 2 images per set; not computed")
        else:
            result["fid"] = fid_from_features(*(torch.cat(features[k]).cpu().numpy() for k in ("sr", "hr")))
    return result


# ------------------------------------------------------------------------------------------------ reports


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def _cell(value: float, digits: int) -> str:
    if math.isnan(value):
        return "n/a"
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_folders`' result: one row per image, a **mean** row, then FID and notes.

    Numbers: PSNR and MUSIQ with 2 decimals, the others with 4; ``inf`` as ``inf``, NaN as ``n/a``.
    """
    columns = [key for key in result["settings"]["metrics"] if key in _COLUMNS]
    lines = ["| image | " + " | ".join(_COLUMNS[k][0] for k in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    rows = [*result["images"].items(), ("**mean**", result["mean"])]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(values[k], _COLUMNS[k][1]) for k in columns) + " |")
    if "fid" in result:
        lines += ["", f"FID ↓ (SR vs HR, {result['count']} images each): {_cell(result['fid'], 4)}"]
    if result["notes"]:
        lines += ["", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``metrics.json`` (``inf`` as ``"inf"``, NaN as ``null``) and ``metrics.md`` into ``folder``.

    Returns:
        The two paths.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    json_path, md_path = target / "metrics.json", target / "metrics.md"
    json_path.write_text(json.dumps(_json_number(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(result), encoding="utf-8")
    return json_path, md_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sr", required=True, help="folder of SR images")
    parser.add_argument("--hr", default=None, help="folder of HR references (same stems and sizes)")
    parser.add_argument("--output", default=None, help="folder for metrics.json / metrics.md (default: --sr)")
    parser.add_argument("--crop_border", type=int, default=4, help="pixels cropped on every side for PSNR / SSIM")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None, help="default: see the docs")
    parser.add_argument("--niqe_luma", choices=M.LUMAS, default="ycbcr")
    parser.add_argument("--lpips_vgg16", default=None, help="torchvision VGG16 state dict (vgg16-397923af.pth)")
    parser.add_argument("--lpips_heads", default=None, help="lpips' weights/v0.1/vgg.pth")
    parser.add_argument("--fid_inception", default=None, help="torchvision inception_v3 state dict")
    for name, spec in PYIQA_METRICS.items():
        parser.add_argument(f"--{name}_weights", default=None, help=f"pyiqa {spec.name!r} {spec.weight_argument}")
    parser.add_argument("--sr_suffix", default="")
    parser.add_argument("--hr_suffix", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.lpips_vgg16 is None) != (args.lpips_heads is None):
        parser.error("LPIPS needs both --lpips_vgg16 and --lpips_heads")
    if args.crop_border < 0:
        parser.error(f"--crop_border must be >= 0, got {args.crop_border}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: evaluate, write ``metrics.json`` and ``metrics.md``, print the table. Returns 0."""
    args = parse_args(argv)
    result = evaluate_folders(
        args.sr, args.hr, crop_border=args.crop_border, metrics=args.metrics, niqe_luma=args.niqe_luma,
        lpips_weights=None if args.lpips_vgg16 is None else (args.lpips_vgg16, args.lpips_heads),
        fid_inception=args.fid_inception, device=args.device, progress=not args.quiet,
        pyiqa_weights={k: getattr(args, f"{k}_weights") for k in PYIQA_METRICS if getattr(args, f"{k}_weights")},
        sr_suffix=args.sr_suffix, hr_suffix=args.hr_suffix,
    )
    write_reports(result, args.output or args.sr)
    print(markdown_table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
