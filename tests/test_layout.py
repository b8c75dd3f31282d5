"""Repository layout rules that pytest itself does not report clearly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_modules_have_unique_basenames() -> None:
    """Test folders have no ``__init__.py``: two test modules with one basename make pytest fail to collect."""
    names = Counter(path.name for path in TESTS.rglob("test_*.py") if "upstream" not in path.relative_to(TESTS).parts)
    assert [name for name, count in names.items() if count > 1] == []
