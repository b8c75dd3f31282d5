"""Recipe tests: put ``recipes/`` on ``sys.path`` so ``real_isr`` imports as a (PEP 420 namespace) package.

Recipe code is not part of the installed ``rankmoe`` package and has no ``__init__.py``; importing it as
``real_isr.<module>`` (rather than adding ``recipes/real_isr`` itself) keeps generic module names such as
``kernels`` or ``data`` out of the top-level namespace of the test session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.append(str(RECIPES))


@pytest.fixture(scope="session")
def astronaut() -> torch.Tensor:
    """``skimage.data.astronaut()`` (public domain, offline) as ``(1, 3, 512, 512)`` float32 in [0, 1]."""
    from skimage import data

    return torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255.0
