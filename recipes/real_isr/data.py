"""Real-ISR data: HR training images with on-the-fly degradation, paired LR/HR test folders, image I/O.

Training (OSEDiff, ``shared/notes/real-isr.md`` §1.5): HR images listed by folders and/or ``.txt`` list files
(LSDIR + FFHQ), a random ``crop_size`` crop and a horizontal flip, then the Real-ESRGAN second-order degradation
per sample in ``Dataset.__getitem__``, with the LR resized back to the HR size (OSEDiff's ``resize_bak=True``).

Conventions every caller must know:

- **Value range.** Every tensor here is float32 in ``[0, 1]`` (HR, LR, ``load_image``, ``save_image``). The
  degradation, the degradation estimators (``rankmoe.conditioning``) and the metrics all work in ``[0, 1]``;
  OSEDiff's VAE takes ``[-1, 1]``: convert in the model (``x * 2 - 1`` in, ``(y + 1) / 2`` out), not here.
- **Randomness.** ``HRImageDataset`` never touches a global RNG. Item ``index`` of epoch ``epoch`` draws its crop,
  flip and degradation from generators seeded from ``(seed, epoch, index)`` (``numpy.random.SeedSequence``), so
  the same ``(seed, epoch, index)`` gives the same pair in any process, worker or order: bit for bit at the same
  intra-op thread count (``worker_init_fn`` sets 1; another count may move a few LR pixels by 1/255, float sums
  rounded differently before quantisation). Call ``dataset.set_epoch(e)`` yourself before iterating an epoch
  (``accelerate``'s prepared loader forwards its ``set_epoch`` to the dataset only when its sampler has none,
  and a shuffling sampler has one). The epoch lives in a shared-memory tensor, so ``DataLoader`` workers see it
  too, persistent ones (``persistent_workers=True``) included, as long as it is set before ``iter(loader)``.
- **Image modes** (``load_image`` and both datasets): ``RGB``; ``L`` and ``1`` (grey repeated over 3 channels);
  ``P`` (palette; with a transparent colour handled as ``RGBA``); ``RGBA``, ``LA``, ``PA`` (alpha composited over
  a white background, ``ALPHA_BACKGROUND``: an opaque pixel keeps its colour exactly, a transparent pixel's
  stored colour is arbitrary, and white is what viewers show); ``RGBX`` (padding byte dropped); 16-bit grey
  (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` read from a PNG) divided by 65535. Pillow reads 16-bit
  RGB(A) PNGs as 8-bit ``RGB(A)`` (the top byte, ``v >> 8``): correctly scaled, 8 bits of precision. Every other
  mode (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``F``, 32-bit ``I``, premultiplied ``RGBa``/``La``) raises
  ``ValueError`` naming the file and the mode. EXIF orientation is not applied (pixels in stored order, as PIL
  and most SR code read them; LR and HR of a pair stay aligned).
- **Errors.** A missing path raises ``FileNotFoundError`` (naming it); everything else that is wrong with the
  data (no images, unreadable file, unsupported mode, image smaller than the crop, unmatched or mis-sized pairs)
  raises ``ValueError`` naming the file(s) and the offending value.

Axis legend: ``b`` batch, ``H``/``W`` HR (crop) size, ``h``/``w`` LR size (``H / scale``), ``c`` crop size.

Example:
    >>> from torch.utils.data import DataLoader
    >>> data = HRImageDataset(["/data/LSDIR", "/data/ffhq10k.txt"], crop_size=512, seed=0)  # doctest: +SKIP
    >>> loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=4, collate_fn=collate,
    ...                     worker_init_fn=worker_init_fn)  # doctest: +SKIP
    >>> for epoch in range(2):  # doctest: +SKIP
    ...     data.set_epoch(epoch)
    ...     for batch in loader:
    ...         hr, lr = batch["hr"], batch["lr"]  # (b, 3, 512, 512) each, in [0, 1]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

try:  # imported as ``real_isr.data`` (tests; scripts with recipes/ on sys.path)
    from .degradations import DegradationParams, RealESRGANDegradation, quantize
except ImportError:  # imported flat from inside recipes/real_isr
    from degradations import DegradationParams, RealESRGANDegradation, quantize  # type: ignore[no-redef]

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


# ------------------------------------------------------------------------------------------------ training data


def _seed(*entropy: int) -> int:
    """A 64-bit seed from non-negative integers (``numpy.random.SeedSequence``: well mixed, platform independent)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0])


def _flip_prob(flip: bool | float) -> float:
    if isinstance(flip, bool):
        return 0.5 if flip else 0.0
    if not isinstance(flip, int | float) or not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be a bool or a probability in [0, 1], got {flip!r}")
    return float(flip)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class HRImageDataset(Dataset):
    """HR training images: random crop + horizontal flip, degraded on the fly into an LR/HR pair.

    Args:
        sources: folders (recursive), ``.txt`` list files and/or image files; see ``collect_images`` for the order
            and duplicate rule.
        crop_size: side ``c`` of the square HR crop; a multiple of ``scale``.
        scale: SR factor; must equal the degradation's ``params.scale``.
        degradation: a preset name of ``configs/degradations`` (``"realesrgan"``, ``"mild"``), a
            ``DegradationParams``, a ``RealESRGANDegradation`` (copied; this dataset's ``resize_back`` wins), or
            None for a clean bicubic downscale (antialiased; ``{"kind": "bicubic"}`` in the record).
        resize_back: resize the LR back to ``c x c`` (OSEDiff; random mode per sample, bicubic for None).
        flip: horizontal-flip probability; True is 0.5, False 0.
        seed: non-negative integer; with the epoch and the index it fixes every draw of an item.
        extensions: file endings picked up in folders.
        upscale_small: images whose shorter side is below ``c`` raise ``ValueError`` (default); with True they
            are first enlarged (bicubic, aspect kept) so that the shorter side is ``c``.

    Items are dicts:

    - ``"hr"``: ``(3, c, c)`` float32 in ``[0, 1]``;
    - ``"lr"``: ``(3, c, c)`` with ``resize_back``, else ``(3, c / scale, c / scale)``, float32 multiples of
      1/255 in ``[0, 1]``;
    - ``"path"`` (str), ``"index"`` and ``"epoch"`` (int), ``"crop"`` (``(top, left)`` in the source image, after
      any enlargement), ``"flip"`` (bool);
    - ``"seed"``: the degradation's seed, ``RealESRGANDegradation(...)(hr[None], seed)`` reproduces ``"lr"``;
    - ``"degradation"``: the drawn parameters as plain Python values (``DegradationRecord.sample(0)``).

    Use ``collate`` as the ``DataLoader``'s ``collate_fn`` (the default collate fails on the nested records).
    """

    def __init__(
        self,
        sources: str | Path | Sequence[str | Path],
        crop_size: int = 512,
        scale: int = 4,
        degradation: str | DegradationParams | RealESRGANDegradation | None = "realesrgan",
        resize_back: bool = True,
        flip: bool | float = True,
        seed: int = 0,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        upscale_small: bool = False,
    ) -> None:
        self.crop_size = _positive_int("crop_size", crop_size)
        self.scale = _positive_int("scale", scale)
        if crop_size % scale:
            raise ValueError(f"crop_size {crop_size} must be a multiple of scale {scale}")
        self.resize_back = bool(resize_back)
        self.flip_prob = _flip_prob(flip)
        self.seed = _non_negative_int("seed", seed)
        self.upscale_small = bool(upscale_small)
        self.extensions = _normalize_extensions(extensions)
        self.degradation = self._build_degradation(degradation)
        self.paths = collect_images(sources, self.extensions)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by DataLoader workers

    @property
    def epoch(self) -> int:
        """The epoch ``__getitem__`` draws for (``set_epoch``)."""
        return int(self._epoch)

    def _build_degradation(
        self, degradation: str | DegradationParams | RealESRGANDegradation | None
    ) -> RealESRGANDegradation | None:
        if degradation is None:
            return None
        if isinstance(degradation, str | DegradationParams):
            built = RealESRGANDegradation(degradation, resize_back=self.resize_back)
        elif isinstance(degradation, RealESRGANDegradation):
            built = copy.copy(degradation)
            built.resize_back = self.resize_back
        else:
            raise TypeError(
                "degradation must be a preset name, DegradationParams, RealESRGANDegradation or None, "
                f"got {type(degradation).__name__}"
            )
        if built.params.scale != self.scale:
            raise ValueError(f"scale {self.scale} differs from the degradation's scale {built.params.scale}")
        return built

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        kind = "bicubic" if self.degradation is None else "RealESRGANDegradation"
        return (
            f"{type(self).__name__}({len(self)} images, crop_size={self.crop_size}, scale={self.scale}, "
            f"degradation={kind}, resize_back={self.resize_back}, flip={self.flip_prob}, seed={self.seed}, "
            f"epoch={self.epoch})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``__getitem__`` returns (call before ``iter(loader)``, as for samplers).

        The value is written into shared memory, so workers already started (persistent ones) read it too.
        """
        self._epoch.fill_(_non_negative_int("epoch", epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` of the current epoch (see the class docstring for its keys)."""
        return self.get_item(index, self.epoch)

    def get_item(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """Item ``index`` of ``epoch`` (the current epoch for None), independent of any global state.

        Args:
            index: in ``[-len, len)``.
            epoch: non-negative epoch.

        Returns:
            The item dict (see the class docstring).
        """
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        epoch = self.epoch if epoch is None else _non_negative_int("epoch", epoch)
        path = self.paths[index]
        augment = torch.Generator().manual_seed(_seed(self.seed, epoch, index, 0))
        hr, crop = _read(path, lambda image: self._crop(image, path, augment))
        flip = bool(torch.rand((), generator=augment, dtype=torch.float64) < self.flip_prob)
        if flip:
            hr = hr.flip(-1)
        hr = hr.contiguous()
        seed = _seed(self.seed, epoch, index, 1)
        if self.degradation is None:
            lr, record = self._bicubic(hr), {"kind": "bicubic"}
        else:
            out = self.degradation(hr[None], torch.Generator().manual_seed(seed))
            lr, record = out.lr[0], out.record.sample(0)
        return {
            "hr": hr,
            "lr": lr.contiguous(),
            "path": path,
            "index": index,
            "epoch": epoch,
            "crop": crop,
            "flip": flip,
            "seed": seed,
            "degradation": record,
        }

    def _crop(self, image: Image.Image, path: str, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        """Random ``c x c`` crop of an opened image as ``(3, c, c)`` and its ``(top, left)``."""
        kind = check_mode(image, path)
        c = self.crop_size
        width, height = image.size
        if min(width, height) < c:
            if not self.upscale_small:
                raise ValueError(
                    f"image {path} is {width}x{height} (width x height), smaller than crop_size {c}; remove it, "
                    "lower crop_size, or pass upscale_small=True to enlarge such images"
                )
            factor = c / min(width, height)
            size = (max(c, round(height * factor)), max(c, round(width * factor)))
            full = image_to_tensor(image, path, kind)
            full = F.interpolate(full[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
            top, left = self._corner(size[0], size[1], generator)
            return full[:, top : top + c, left : left + c], (top, left)
        top, left = self._corner(height, width, generator)
        return image_to_tensor(image.crop((left, top, left + c, top + c)), path, kind), (top, left)

    def _corner(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int]:
        top = int(torch.randint(height - self.crop_size + 1, (), generator=generator))
        left = int(torch.randint(width - self.crop_size + 1, (), generator=generator))
        return top, left

    def _bicubic(self, hr: torch.Tensor) -> torch.Tensor:
        """Clean LR: antialiased bicubic downscale by ``scale`` (and bicubic back up with ``resize_back``)."""
        c = self.crop_size
        lr = F.interpolate(hr[None], size=(c // self.scale,) * 2, mode="bicubic", antialias=True, align_corners=False)
        if self.resize_back:
            lr = F.interpolate(lr, size=(c, c), mode="bicubic", align_corners=False)
        return quantize(lr)[0]

    def validate(self, limit: int | None = None) -> None:
        """Read every header (mode and size, no pixels) and raise one ``ValueError`` listing all bad files.

        Optional early check before a long run (``__getitem__`` raises the same errors lazily, file by file).

        Args:
            limit: check only the first ``limit`` files (None: all).
        """
        problems = []
        for path in self.paths[:limit]:
            try:
                _read(path, lambda image, p=path: self._check_header(image, p))
            except (ValueError, FileNotFoundError) as err:
                problems.append(str(err))
        if problems:
            raise ValueError(f"{len(problems)} unusable image(s):\n  " + "\n  ".join(problems))

    def _check_header(self, image: Image.Image, path: str) -> None:
        check_mode(image, path)
        width, height = image.size
        if min(width, height) < self.crop_size and not self.upscale_small:
            raise ValueError(
                f"image {path} is {width}x{height} (width x height), smaller than crop_size {self.crop_size}"
            )


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader`` worker set-up: one intra-op torch thread per worker (items draw from their own generators)."""
    del worker_id
    torch.set_num_threads(1)


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch item dicts: tensors are stacked to ``(b, ...)``, every other value becomes a list of ``b``.

    Args:
        items: dicts with the same keys (``HRImageDataset`` or ``PairedImageDataset`` items).

    Returns:
        A dict with the same keys.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = list(items[0])
    for item in items[1:]:
        if list(item) != keys:
            raise ValueError(f"items have different keys: {keys} and {list(item)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot stack {key!r} of different shapes {sorted(shapes)}; use batch_size=1 for images of "
                    "different sizes"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# ------------------------------------------------------------------------------------------------ test data


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
