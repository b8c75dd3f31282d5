"""Run ``train.py`` in one process of a ``torchrun`` group and save this rank's adapter weights.

Usage: ``torchrun --nproc_per_node 2 ddp_train_worker.py OUT_DIR -- <train.py flags>``. Writes
``OUT_DIR/rank<k>_start.pt`` (adapter weights right after building, before any step) and ``OUT_DIR/rank<k>_end.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "recipes"))

import real_isr.train as train_script  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    rank = int(os.environ.get("RANK", "0"))
    original = train_script.build_parts

    def build_parts(*args, **kwargs):
        parts = original(*args, **kwargs)
        torch.save({k: v.clone() for k, v in parts.model.adapter_state_dict().items()}, out / f"rank{rank}_start.pt")
        return parts

    train_script.build_parts = build_parts
    result = train_script.main(argv)
    torch.save(result["model"].adapter_state_dict(), out / f"rank{rank}_end.pt")


if __name__ == "__main__":
    main()
