"""Real photographs that ship inside common Python wheels: an offline train / held-out split for the CPU main job.

No Real-ISR dataset can be downloaded here, and no package bundles one (``shared/notes/real-isr.md`` §5.2). These
colour photographs load from the installed packages alone:

| name | source | size (h x w) | licence |
|---|---|---|---|
| astronaut, rocket, hubble | ``skimage.data`` | 512², 427x640, 872x1000 | public domain |
| coffee, chelsea, retina | ``skimage.data`` | 400x600, 300x451, 1411² | CC0 |
| motorcycle | ``skimage.data.stereo_motorcycle()[0]`` | 500x741 | Middlebury 2014 |
| immunohistochemistry | ``skimage.data`` | 512² | public domain |
| china, flower | ``sklearn.datasets.load_sample_images()`` | 427x640 | CC-BY-2.0 |
| grace_hopper | matplotlib sample data | 600x512 | matplotlib sample data |

The default split keeps every source on both sides and holds out four photographs of different content (food,
architecture, a portrait, a flower) that the training photographs do not show.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "TEST_PHOTOS", "TRAIN_PHOTOS", "load_photo", "write_photos"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        return image[0] if name == "stereo_motorcycle" else image

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(name) as handle:
            return np.asarray(Image.open(handle).convert("RGB"))

    return load


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "rocket": _skimage("rocket"),
    "hubble": _skimage("hubble_deep_field"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "retina": _skimage("retina"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}
"""Every bundled photograph by name: a loader returning ``(h, w, 3)`` uint8."""

TRAIN_PHOTOS = ("astronaut", "rocket", "hubble", "chelsea", "retina", "motorcycle", "immunohistochemistry")
TEST_PHOTOS = ("coffee", "china", "grace_hopper", "flower")


def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` as ``(h, w, 3)`` uint8.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        ImportError: When the package that ships it is not installed (scikit-image, scikit-learn, matplotlib).
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; bundled ones: {sorted(PHOTOS)}")
    image = PHOTOS[name]()
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"photograph {name!r} is not an RGB uint8 image: {image.shape} {image.dtype}")
    return image


def write_photos(folder: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """Write photographs as PNG files ``<folder>/<name>.png`` (existing files are kept), for the image datasets.

    Returns:
        The paths, in the order of ``names``.
    """
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = root / f"{name}.png"
        if not path.is_file():
            Image.fromarray(load_photo(name)).save(path)
        paths.append(path)
    return paths
