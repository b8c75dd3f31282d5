"""Real-ISR test data: ``PairedImageDataset``, LR test images matched by file stem to their HR references.

Files are read with the mode rules of ``images.py``; ``data.py`` re-exports ``PairedImageDataset``.

Axis legend: ``h``/``w`` LR size, ``scale`` SR factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

try:  # imported as ``real_isr.paired`` (tests; scripts with recipes/ on sys.path)
    from .images import IMAGE_EXTENSIONS, _listing, _normalize_extensions, _positive_int, _read, check_mode, load_image
except ImportError:  # imported flat from inside recipes/real_isr
    from images import (  # type: ignore[no-redef]
        IMAGE_EXTENSIONS,
        _listing,
        _normalize_extensions,
        _positive_int,
        _read,
        check_mode,
        load_image,
    )


def _stems(folder: Path, extensions: tuple[str, ...], suffix: str, side: str) -> dict[str, str]:
    """Map matching key (stem without ``suffix``) -> path for the images directly in ``folder``."""
    if not folder.exists():
        raise FileNotFoundError(f"{side} folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{side} folder {folder} is not a folder")
    found: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or not name.lower().endswith(extensions):
            continue
        stem = path.stem
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(name)
    if not found:
        rule = f" whose stem ends with {suffix!r}" if suffix else ""
        raise ValueError(f"no image files ({', '.join(extensions)}){rule} in the {side} folder {folder}")
    clashes = [f"{stem}: {', '.join(names)}" for stem, names in found.items() if len(names) > 1]
    if clashes:
        raise ValueError(f"{side} folder {folder}: several files share a name: {_listing(clashes)}")
    return {stem: str(folder / names[0]) for stem, names in found.items()}


class PairedImageDataset(Dataset):
    """LR test images, optionally with their HR references, matched by file stem (no crop, no augmentation).

    Only the files directly in each folder are used (sorted by name). With ``lr_suffix`` / ``hr_suffix`` only the
    files whose stem ends with the suffix are taken and the suffix is dropped before matching, e.g. RealSR's
    ``Canon_001_LR4.png`` / ``Canon_001_HR.png`` with ``lr_suffix="_LR4", hr_suffix="_HR"`` (both folders may be
    the same). The constructor reads every header and raises one ``ValueError`` listing unmatched names (on
    either side), unsupported modes, or pairs whose HR size is not ``scale`` times the LR size.

    Args:
        lr_dir: folder of LR images.
        hr_dir: folder of HR images, or None (inference only).
        scale: SR factor, checked when ``hr_dir`` is given.
        extensions: file endings to pick up.
        lr_suffix: stem suffix of LR files (see above).
        hr_suffix: stem suffix of HR files.

    Items are dicts: ``"lr"`` ``(3, h, w)``, ``"hr"`` ``(3, h * scale, w * scale)`` (only with ``hr_dir``), float32
    in ``[0, 1]``; ``"name"`` (the matching key), ``"lr_path"`` and ``"hr_path"`` (with ``hr_dir``).
    """

    def __init__(
        self,
        lr_dir: str | Path,
        hr_dir: str | Path | None = None,
        scale: int = 4,
        *,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        lr_suffix: str = "",
        hr_suffix: str = "",
    ) -> None:
        self.scale = _positive_int("scale", scale)
        extensions = _normalize_extensions(extensions)
        lr = _stems(Path(lr_dir), extensions, lr_suffix, "LR")
        hr = _stems(Path(hr_dir), extensions, hr_suffix, "HR") if hr_dir is not None else None
        self.names = sorted(lr)
        if hr is not None:
            lr_only, hr_only = sorted(set(lr) - set(hr)), sorted(set(hr) - set(lr))
            if lr_only or hr_only:
                parts = [f"LR without HR: {_listing(lr_only)}" if lr_only else "",
                         f"HR without LR: {_listing(hr_only)}" if hr_only else ""]
                raise ValueError(f"unmatched test images in {lr_dir} / {hr_dir}: " + "; ".join(p for p in parts if p))
        self.lr_paths = [lr[n] for n in self.names]
        self.hr_paths = [hr[n] for n in self.names] if hr is not None else None
        self._check()

    def _check(self) -> None:
        problems = []
        for i, lr_path in enumerate(self.lr_paths):
            try:
                lr_size = _read(lr_path, lambda image, p=lr_path: (check_mode(image, p), image.size)[1])
                if self.hr_paths is None:
                    continue
                hr_path = self.hr_paths[i]
                hr_size = _read(hr_path, lambda image, p=hr_path: (check_mode(image, p), image.size)[1])
            except (ValueError, FileNotFoundError) as err:
                problems.append(str(err))
                continue
            expected = (lr_size[0] * self.scale, lr_size[1] * self.scale)
            if hr_size != expected:
                problems.append(
                    f"{hr_path} is {hr_size[0]}x{hr_size[1]} but {lr_path} is {lr_size[0]}x{lr_size[1]} "
                    f"(width x height), so the HR should be {expected[0]}x{expected[1]} at scale {self.scale}"
                )
        if problems:
            raise ValueError(f"{len(problems)} unusable test pair(s):\n  " + "\n  ".join(problems))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, scale={self.scale}, hr={self.hr_paths is not None})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"lr", "hr"?, "name", "lr_path", "hr_path"?}`` of pair ``index`` (see the class docstring)."""
        item: dict[str, Any] = {"lr": load_image(self.lr_paths[index])}
        if self.hr_paths is not None:
            item["hr"] = load_image(self.hr_paths[index])
        item["name"] = self.names[index]
        item["lr_path"] = self.lr_paths[index]
        if self.hr_paths is not None:
            item["hr_path"] = self.hr_paths[index]
        return item
