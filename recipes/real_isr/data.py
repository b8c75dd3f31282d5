"""Real-ISR training data: HR images degraded on the fly into LR/HR pairs, with ``collate`` and ``worker_init_fn``.

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
- **Image modes:** see ``images.py`` (``load_image``; both datasets read files the same way).
- **Errors.** A missing path raises ``FileNotFoundError`` (naming it); everything else that is wrong with the
  data (no images, unreadable file, unsupported mode, image smaller than the crop, unmatched or mis-sized pairs)
  raises ``ValueError`` naming the file(s) and the offending value.

Axis legend: ``b`` batch, ``H``/``W`` HR (crop) size, ``h``/``w`` LR size (``H / scale``), ``c`` crop size.

Image I/O and file listing live in ``images.py``, the paired LR/HR test folders (``PairedImageDataset``) in
``paired.py``; this module re-exports their public names.

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

try:  # imported as ``real_isr.data`` (tests; scripts with recipes/ on sys.path)
    from .degradations import DegradationParams, RealESRGANDegradation, quantize
    from .images import (
        ALPHA_BACKGROUND,  # noqa: F401  (re-exported)
        IMAGE_EXTENSIONS,
        SUPPORTED_MODES,  # noqa: F401  (re-exported)
        _normalize_extensions,
        _positive_int,
        _read,
        check_mode,
        collect_images,
        image_to_tensor,
        list_folder,  # noqa: F401  (re-exported)
        load_image,  # noqa: F401  (re-exported)
        read_image_list,  # noqa: F401  (re-exported)
        save_image,  # noqa: F401  (re-exported)
    )
    from .paired import PairedImageDataset  # noqa: F401  (re-exported)
except ImportError:  # imported flat from inside recipes/real_isr
    from degradations import DegradationParams, RealESRGANDegradation, quantize  # type: ignore[no-redef]
    from images import (  # type: ignore[no-redef]
        ALPHA_BACKGROUND,  # noqa: F401
        IMAGE_EXTENSIONS,
        SUPPORTED_MODES,  # noqa: F401
        _normalize_extensions,
        _positive_int,
        _read,
        check_mode,
        collect_images,
        image_to_tensor,
        list_folder,  # noqa: F401
        load_image,  # noqa: F401
        read_image_list,  # noqa: F401
        save_image,  # noqa: F401
    )
    from paired import PairedImageDataset  # type: ignore[no-redef]  # noqa: F401


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

