"""Real-ISR image files: read and write ``[0, 1]`` tensors with fixed PIL mode rules, and list image files.

``load_image`` / ``image_to_tensor`` / ``check_mode`` convert PIL images, ``save_image`` writes 8-bit files, and
``list_folder`` / ``read_image_list`` / ``collect_images`` turn folders and ``.txt`` lists into deterministic path
lists for the datasets (``data.py``, ``paired.py``; ``data.py`` re-exports every public name here).

- **Value range.** Every tensor here is float32 in ``[0, 1]`` (``load_image``, ``save_image``).
- **Image modes** (``load_image`` and both datasets): ``RGB``; ``L`` and ``1`` (grey repeated over 3 channels);
  ``P`` (palette; with a transparent colour handled as ``RGBA``); ``RGBA``, ``LA``, ``PA`` (alpha composited over
  a white background, ``ALPHA_BACKGROUND``: an opaque pixel keeps its colour exactly, a transparent pixel's
  stored colour is arbitrary, and white is what viewers show); ``RGBX`` (padding byte dropped); 16-bit grey
  (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` read from a PNG) divided by 65535. Pillow reads 16-bit
  RGB(A) PNGs as 8-bit ``RGB(A)`` (the top byte, ``v >> 8``): correctly scaled, 8 bits of precision. Every other
  mode (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``F``, 32-bit ``I``, premultiplied ``RGBa``/``La``) raises
  ``ValueError`` naming the file and the mode. EXIF orientation is not applied (pixels in stored order, as PIL
  and most SR code read them; LR and HR of a pair stay aligned).
- **Errors.** A missing path raises ``FileNotFoundError`` (naming it); an unreadable file, an unsupported mode or
  a source without images raises ``ValueError`` naming the file(s) and the offending value.

Axis legend: ``H``/``W`` image size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

#: File name endings (lower case) that folder sources and ``PairedImageDataset`` pick up.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Background value (white) that alpha channels are composited over.
ALPHA_BACKGROUND = 1.0
#: PIL modes ``load_image`` converts (see the module docstring for how).
SUPPORTED_MODES = ("RGB", "L", "1", "P", "RGBA", "LA", "PA", "RGBX", "I;16", "I;16L", "I;16B", "I;16N", "I (PNG)")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------------ image I/O


def _listing(items: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _read(path: str | Path, action: Callable[[Image.Image], _T]) -> _T:
    """Open ``path`` with PIL and run ``action`` on it, turning PIL's read errors into errors naming the file."""
    try:
        with Image.open(path) as image:
            return action(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except _READ_ERRORS as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def check_mode(image: Image.Image, name: str | Path = "image") -> str:
    """The conversion ``image_to_tensor`` will use for ``image``'s mode; ``ValueError`` for an unsupported mode.

    Args:
        image: an opened PIL image (only its header is read).
        name: file name for the error message.

    Returns:
        ``"rgb"``, ``"grey"``, ``"alpha"``, ``"palette"``, ``"palette_alpha"`` or ``"uint16"``.
    """
    mode = image.mode
    if mode in ("RGB", "RGBX"):
        return "rgb"
    if mode in ("L", "1"):
        return "grey"
    if mode in ("RGBA", "LA", "PA"):
        return "alpha"
    if mode == "P":
        return "palette_alpha" if "transparency" in image.info else "palette"
    if mode in _SIXTEEN_BIT or (mode == "I" and image.format == "PNG"):
        return "uint16"
    raise ValueError(
        f"{name}: unsupported image mode {mode!r} (supported: {', '.join(SUPPORTED_MODES)}); "
        f"convert the file to RGB first, e.g. PIL.Image.open(path).convert('RGB').save(new_path)"
    )


def image_to_tensor(image: Image.Image, name: str | Path = "image", kind: str | None = None) -> torch.Tensor:
    """Convert a PIL image to ``(3, H, W)`` float32 in ``[0, 1]`` with the module's mode rules.

    Args:
        image: a PIL image of a supported mode.
        name: file name for error messages.
        kind: the result of ``check_mode`` on the opened file (pass it for a crop, which loses ``image.format``).

    Returns:
        ``(3, H, W)`` float32 in ``[0, 1]``.
    """
    kind = kind if kind is not None else check_mode(image, name)
    if kind == "palette":
        kind, image = "rgb", image.convert("RGB")
    elif kind == "palette_alpha":
        kind, image = "alpha", image.convert("RGBA")
    if kind == "rgb":
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.float32) / 255.0
    elif kind == "grey":
        grey = np.asarray(image.convert("L") if image.mode != "L" else image, dtype=np.float32) / 255.0
        array = np.repeat(grey[..., None], 3, axis=-1)
    elif kind == "alpha":
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        array = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
    elif kind == "uint16":
        grey = np.asarray(image).astype(np.float32) / 65535.0
        array = np.repeat(grey[..., None], 3, axis=-1)
    else:
        raise ValueError(f"{name}: unknown conversion {kind!r}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp_(0.0, 1.0)


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``(3, H, W)`` float32 in ``[0, 1]``.

    Modes are converted as the module docstring says (grey repeated, alpha over white, 16-bit grey / 65535);
    other modes raise ``ValueError`` naming the file and the mode, a missing file ``FileNotFoundError``.

    Args:
        path: the image file.

    Returns:
        ``(3, H, W)`` float32 in ``[0, 1]``.
    """
    return _read(path, lambda image: image_to_tensor(image, path))


def save_image(image: torch.Tensor, path: str | Path, **save_kwargs: Any) -> Path:
    """Write a ``[0, 1]`` image tensor as an 8-bit file (format from the suffix; parent folders created).

    Args:
        image: ``(3, H, W)``, ``(1, 3, H, W)``, ``(1, H, W)`` or ``(H, W)``; float values are clamped to ``[0, 1]``
            and rounded to 8 bits, ``uint8`` values are written as they are.
        path: output file; ``.png`` is lossless, JPEG gets ``quality=95`` unless ``save_kwargs`` says otherwise.
        **save_kwargs: passed to ``PIL.Image.save``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    x = image.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W), (1, 3, H, W), (1, H, W) or (H, W), got {tuple(image.shape)}")
    if x.is_floating_point():
        x = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise TypeError(f"image must be floating point in [0, 1] or uint8, got {x.dtype}")
    pixels = x.permute(1, 2, 0).numpy()
    pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 95)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, **save_kwargs)
    return path


# ------------------------------------------------------------------------------------------------ sources


def _normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not out:
        raise ValueError("extensions must name at least one file ending, got none")
    return out


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def list_folder(folder: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS, recursive: bool = True) -> list[str]:
    """Image files under ``folder``, sorted by their POSIX path relative to it (code-point order).

    Names starting with ``.`` (files and folders, e.g. macOS ``._x.png`` forks) are skipped; symbolic links to
    folders are followed; the extension test ignores case.

    Args:
        folder: the folder.
        extensions: file endings to keep.
        recursive: also list sub-folders.

    Returns:
        Absolute, normalised paths; ``FileNotFoundError`` if ``folder`` does not exist, ``ValueError`` if it holds
        no image.
    """
    root = os.path.abspath(folder)
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not os.path.isdir(root):
        raise ValueError(f"{folder} is not a folder")
    extensions = _normalize_extensions(extensions)
    found = []
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.relpath(os.path.join(current, name), root).replace(os.sep, "/"))
    if not found:
        where = "under" if recursive else "in"
        raise ValueError(f"no image files ({', '.join(extensions)}) found {where} {folder}")
    return [os.path.normpath(os.path.join(root, rel)) for rel in sorted(found)]


def read_image_list(list_file: str | Path) -> list[str]:
    """Paths listed in a text file, one per line, in file order.

    Blank lines and lines whose first non-blank character is ``#`` are ignored (no trailing comments: ``#`` may be
    part of a file name); surrounding whitespace is stripped, ``~`` expanded, and relative paths are resolved
    against the list file's folder. Every entry must be an existing file (any extension).

    Args:
        list_file: the ``.txt`` file.

    Returns:
        Absolute, normalised paths; ``FileNotFoundError`` naming the list and its missing entries (with line
        numbers), ``ValueError`` if it lists nothing.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list file not found: {list_file}")
    base = list_file.resolve().parent
    paths, missing = [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        if not os.path.isfile(path):
            missing.append(f"line {number}: {entry}")
        paths.append(path)
    if missing:
        raise FileNotFoundError(f"{list_file}: {len(missing)} listed file(s) not found: {_listing(missing)}")
    if not paths:
        raise ValueError(f"image list file {list_file} lists no files")
    return paths


def collect_images(
    sources: str | Path | Sequence[str | Path], extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """Resolve folders, ``.txt`` list files and single image files into one deterministic list of paths.

    Order and duplicates: sources in the order given; a folder contributes its images sorted by their path
    relative to the folder (``list_folder``, recursive); a ``.txt`` file its entries in file order
    (``read_image_list``); an image file itself. A file met again (same absolute, normalised path; symbolic links
    are not resolved) is dropped and keeps its first position.

    Args:
        sources: one source or a sequence of them.
        extensions: file endings of images in folders (and of a single-file source).

    Returns:
        Absolute, normalised paths.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("sources must name at least one folder, list file or image, got none")
    extensions = _normalize_extensions(extensions)
    seen: set[str] = set()
    paths: list[str] = []
    for source in sources:
        if not isinstance(source, str | os.PathLike):
            raise TypeError(f"a source must be a str or Path, got {type(source).__name__}: {source!r}")
        text = os.fspath(source)
        if not os.path.exists(text):
            raise FileNotFoundError(f"image source not found: {text}")
        if os.path.isdir(text):
            found = list_folder(text, extensions)
        elif text.lower().endswith(".txt"):
            found = read_image_list(text)
        elif text.lower().endswith(extensions):
            found = [os.path.normpath(os.path.abspath(text))]
        else:
            raise ValueError(
                f"source {text} is neither a folder, a .txt list nor an image file ({', '.join(extensions)})"
            )
        for path in found:
            key = _key(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ argument checks


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value

