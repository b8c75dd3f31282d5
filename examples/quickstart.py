"""Quickstart: adapt a frozen MLP with RankMoE on a made-up multi-task problem and look at the routing.

The task: inputs come from four clusters; the target for each cluster is the frozen base network plus its
own low-rank change of the first layer. A per-sample (``pooled``) router must learn which cluster a sample
belongs to and pick ranks accordingly, while shared ranks learn what all clusters have in common.

Run: ``python examples/quickstart.py [--steps 300] [--out quickstart_out]``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

import rankmoe
from rankmoe import RankMoEConfig

NUM_CLUSTERS = 4
DIM, HIDDEN, TOKENS = 32, 64, 8


class FrozenMLP(torch.nn.Module):
    """The base network: ``(b, n, 32) -> (b, n, 32)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(DIM, HIDDEN)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def make_task(base: FrozenMLP, generator: torch.Generator):
    """Cluster centres and each cluster's rank-2 change of the first layer's weight."""
    centres = torch.randn(NUM_CLUSTERS, DIM, generator=generator) * 2.0
    deltas = [
        torch.randn(HIDDEN, 2, generator=generator) @ torch.randn(2, DIM, generator=generator) * 0.15
        for _ in range(NUM_CLUSTERS)
    ]

    def sample(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cluster = torch.randint(0, NUM_CLUSTERS, (batch,), generator=generator)
        x = centres[cluster][:, None, :] + torch.randn(batch, TOKENS, DIM, generator=generator)
        with torch.no_grad():
            hidden = base.up(x) + torch.einsum("bnd,bhd->bnh", x, torch.stack(deltas)[cluster])
            y = base.down(base.act(hidden))
        return x, y, cluster

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("quickstart_out"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    base = FrozenMLP()
    sample = make_task(base, generator)

    config = RankMoEConfig(
        r=16, num_shared_ranks=4, top_k=4, num_zero_experts=2, lora_alpha=16,
        target_modules=["up", "down"], router="pooled",
        balance_loss="switch", balance_loss_weight=0.01, z_loss_weight=1e-3,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    x_val, y_val, cluster_val = sample(512)
    with torch.no_grad():
        base_mse = torch.nn.functional.mse_loss(base(x_val), y_val).item()
    tracker = rankmoe.RoutingTracker(model, window=50)  # routing of the last 50 training steps
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        x, y, _ = sample(args.batch_size)
        mse = torch.nn.functional.mse_loss(model(x), y)
        aux = rankmoe.aux_loss(model)  # Switch balance loss + router z-loss of both routed layers
        optimizer.zero_grad(set_to_none=True)
        (mse + aux.total).backward()
        optimizer.step()
        tracker.update()
        if step % 20 == 0:
            progress.set_postfix(mse=f"{mse.item():.4f}", aux=f"{aux.total.item():.4f}")
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        val_mse = torch.nn.functional.mse_loss(model(x_val), y_val).item()
    print(f"\nvalidation MSE: base network {base_mse:.4f} -> RankMoE {val_mse:.4f} "
          f"({args.steps} steps in {elapsed:.1f} s)")
    print("\nrouting on the validation batch:")
    print(rankmoe.routing_summary(model))
    print(f"\nrouting over the last {tracker.num_updates} training steps:")
    print(tracker.summary())

    record = model.base_model.model.up._rankmoe_records["default"]
    print("\nmost used experts of layer 'up' per cluster (slot index, share of samples):")
    for cluster in range(NUM_CLUSTERS):
        chosen = record.top_indices[cluster_val == cluster].flatten()
        counts = torch.bincount(chosen, minlength=config.num_slots).float()
        top = counts.topk(config.top_k)
        size = (cluster_val == cluster).sum()
        share = ", ".join(f"{int(i)}:{c / size:.2f}" for c, i in zip(top.values, top.indices, strict=True))
        print(f"  cluster {cluster}: {share}")

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        plots = rankmoe.plot_routing(tracker, args.out / "plots")
        print("\nrouting plots: " + ", ".join(str(path) for path in plots.values()))
    except ImportError as error:  # matplotlib is optional (pip install "rankmoe[plots]")
        print(f"\nno routing plots: {error}")
    model.save_pretrained(args.out)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), args.out).eval()
    with torch.no_grad():
        identical = torch.equal(reloaded(x_val), model(x_val))
    print(f"\nadapter saved to {args.out}/ and reloaded: outputs identical = {identical}")


if __name__ == "__main__":
    main()
