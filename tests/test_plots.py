"""plot_routing writes readable PNG files for models and trackers, with and without severity."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.plots import PLOT_KINDS, plot_routing
from rankmoe.tracker import RoutingTracker

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYOUT = {"r": 8, "num_shared_ranks": 2, "top_k": 2, "num_zero_experts": 2}


def check_pngs(paths: dict[str, Path], out_dir: Path, prefix: str = "routing") -> None:
    assert set(paths) == set(PLOT_KINDS)
    for kind, path in paths.items():
        assert path == out_dir / f"{prefix}_{kind}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1024, kind


def test_model_source_with_severity(mlp, tmp_path) -> None:
    config = RankMoEConfig(**LAYOUT, router="condition", router_kwargs={"condition_dim": 3},
                           target_modules=["lin0", "lin1"])
    model = get_peft_model(mlp, config)
    with rankmoe.condition(model, torch.randn(6, 3), severity=torch.rand(6)):
        model(torch.randn(6, 16))
    out = tmp_path / "new" / "folder"  # created on demand
    check_pngs(plot_routing(model, out), out)


def test_tracker_and_model_sources_without_severity(mlp, tmp_path) -> None:
    # two layers with different slot counts (8 and 3): the heatmap pads the shorter row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the second injection into the same model
        inject_adapter_in_model(RankMoEConfig(**LAYOUT, target_modules=["lin0"]), mlp)
        inject_adapter_in_model(RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, num_zero_experts=1,
                                              target_modules=["lin1"]), mlp)
    tracker = RoutingTracker(mlp, window=3)
    for _ in range(4):
        mlp(torch.randn(2, 5, 16))
        tracker.update()
    assert {name: load.numel() for name, load in tracker.slot_load().items()} == {"lin0": 8, "lin1": 3}
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    check_pngs(plot_routing(tracker, tmp_path, prefix="step4"), tmp_path, prefix="step4")
    check_pngs(plot_routing(mlp, tmp_path), tmp_path)  # a model without any severity: a note, no failure
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # no pyplot (global figure state) involved


def test_plot_routing_errors(mlp, tmp_path, monkeypatch) -> None:
    model = get_peft_model(mlp, RankMoEConfig(**LAYOUT, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="no routing recorded"):
        plot_routing(model, tmp_path)
    with pytest.raises(TypeError, match="source"):
        plot_routing(42, tmp_path)  # type: ignore[arg-type]
    model(torch.randn(2, 16))
    with pytest.raises(ValueError, match="prefix"):
        plot_routing(model, tmp_path, prefix="a/b")
    tracker = RoutingTracker(model)
    tracker.update()
    with pytest.raises(ValueError, match="adapter_name"):
        plot_routing(tracker, tmp_path, adapter_name="other")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install rankmoe\[plots\]"):
        plot_routing(tracker, tmp_path)
    assert not list(tmp_path.iterdir())
