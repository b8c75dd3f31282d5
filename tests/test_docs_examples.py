"""Every ```python block of the documentation runs: each page's blocks, in order, as one script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if FENCE.search(p.read_text()))


def test_pages_with_examples_exist() -> None:
    assert {"getting-started.md", "guides/conditions.md", "guides/custom-router.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path) -> None:
    blocks = FENCE.findall((DOCS / page).read_text())
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(f"# ---- block {i}\n{block}" for i, block in enumerate(blocks)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{page} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
