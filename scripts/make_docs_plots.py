"""Regenerate the routing plots shown in docs/concepts/balancing.md (made by rankmoe.plot_routing).

Trains the small conditioned model of tests/test_balancing_behaviour.py with the degradation-aware loss for
200 steps, tracks the routing of 8 evaluation batches and writes the three PNGs to docs/assets/.

    python scripts/make_docs_plots.py
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from tqdm import trange

import rankmoe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "assets")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    frozen, teacher = copy.deepcopy(base), nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    shift = torch.randn(16)
    config = rankmoe.RankMoEConfig(
        r=12, num_shared_ranks=4, top_k=4, num_zero_experts=4, target_modules=["0", "2"],
        router="condition", router_kwargs={"condition_dim": 3},
        balance_loss="degradation_aware", balance_loss_weight=0.1,
    )
    model = get_peft_model(base, config)

    def batch(size: int):
        x = torch.randn(size, 16) + shift
        severity = torch.rand(size)
        cond = torch.stack([severity, severity.square(), torch.randn(size)], dim=-1)
        with torch.no_grad():
            y = frozen(x) + 0.5 * teacher(x)
        return x, severity, cond, y

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in trange(args.steps, desc="training"):
        x, severity, cond, y = batch(64)
        with rankmoe.condition(model, cond, severity=severity):
            loss = (model(x) - y).square().mean() + rankmoe.aux_loss(model).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    tracker = rankmoe.RoutingTracker(model)
    for _ in range(8):
        x, severity, cond, _ = batch(256)
        with torch.no_grad(), rankmoe.condition(model, cond, severity=severity):
            model(x)
        tracker.update()
    print(tracker.summary())
    for kind, path in rankmoe.plot_routing(tracker, args.out, prefix="balancing").items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
