"""Ablation of MoR on a pretrained Real-ESRGAN x4plus at small scale, on a CPU (a benchmark, not a test).

Variants, all fine-tuned with the same data, steps, learning rate and seed list (``finetune_realesrgan.py``'s
preset otherwise), adapters on the last RRDB blocks and the tail, routed by weight-free degradation scores:

| variant | adapter | active ranks per image |
|---|---|---|
| pretrained | none (the untouched network) | 0 |
| lora | PEFT LoRA r = 4 | 4 |
| lora_experts | RankMoE r = 8 as 4 experts of rank 2 (whole-LoRA experts), top-2, switch loss | 4 |
| mor_no_zero | RankMoE 2 shared + 6 rank-1 experts, top-2, no zero slots, switch loss | 4 |
| mor | RankMoE 2 shared + 6 rank-1 experts + 2 zero slots, top-2, degradation-aware loss | 2 to 4 |

Held-out photographs (``photos.TEST_PHOTOS``, centre crops) are degraded at fixed named levels (``LEVELS``: mild /
medium / severe combinations and blur / noise / JPEG alone, first-order, deterministic per image). Reported per
variant and level: PSNR-Y, SSIM-Y (mean over images, then mean and spread over seeds), NIQE when the crop allows,
mean active ranks, and wall time of a run (training plus the job's own before / after scoring).

```
python benchmarks/ablation_realesrgan.py --seeds 0 1 2 --steps 60 --out benchmarks/results/ablation-realesrgan
```
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import device_name  # noqa: E402
from real_isr.finetune_realesrgan import FinetuneSettings, run  # noqa: E402
from real_isr.images import load_image  # noqa: E402
from real_isr.kernels import filter2d, gaussian_kernel  # noqa: E402
from real_isr.metrics import niqe  # noqa: E402
from real_isr.photos import TEST_PHOTOS, write_photos  # noqa: E402
from real_isr.pixel_ops import gaussian_noise, jpeg_compress, quantize  # noqa: E402
from real_isr.sr_finetune import (  # noqa: E402
    estimate,
    has_rankmoe,
    super_resolve_quantized,
    untouched,
    y_metrics,
)

import rankmoe  # noqa: E402

LEVELS: dict[str, dict[str, float]] = {
    "mild": {"blur": 1.0, "noise": 5.0, "jpeg": 85},
    "medium": {"blur": 2.0, "noise": 15.0, "jpeg": 55},
    "severe": {"blur": 3.0, "noise": 25.0, "jpeg": 30},
    "blur": {"blur": 2.5, "noise": 0.0, "jpeg": 100},
    "noise": {"blur": 0.0, "noise": 20.0, "jpeg": 100},
    "jpeg": {"blur": 0.0, "noise": 0.0, "jpeg": 25},
}
"""Named test degradations: Gaussian blur sigma (HR pixels), x4 area downscale, Gaussian noise sigma (8-bit
units), JPEG quality (100 = none)."""

_CONDITION = {"router": "condition", "router_kwargs": {"condition_dim": 4}}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "pretrained": None,
    "lora": {"type": "lora", "r": 4, "lora_alpha": 4},
    "lora_experts": {"type": "rankmoe", "r": 8, "lora_alpha": 8, "num_shared_ranks": 0, "expert_rank": 2,
                     "top_k": 2, "num_zero_experts": 0, "balance_loss": "switch", "balance_loss_weight": 0.01,
                     **_CONDITION},
    "mor_no_zero": {"type": "rankmoe", "r": 8, "lora_alpha": 8, "num_shared_ranks": 2, "top_k": 2,
                    "num_zero_experts": 0, "balance_loss": "switch", "balance_loss_weight": 0.01, **_CONDITION},
    "mor": {"type": "rankmoe", "r": 8, "lora_alpha": 8, "num_shared_ranks": 2, "top_k": 2, "num_zero_experts": 2,
            "balance_loss": "degradation_aware", "balance_loss_weight": 0.01, **_CONDITION},
}


def degrade(hr: torch.Tensor, level: dict[str, float], seed: int) -> torch.Tensor:
    """First-order test degradation of ``hr`` ``(1, 3, H, W)`` -> LR ``(1, 3, H/4, W/4)`` on the 8-bit grid."""
    x = hr
    if level["blur"]:
        size = 2 * math.ceil(3 * level["blur"]) + 1
        x = filter2d(x, gaussian_kernel(size, level["blur"])[None])
    x = F.interpolate(x, scale_factor=0.25, mode="area")
    if level["noise"]:
        g = torch.Generator().manual_seed(seed)
        x = x + gaussian_noise(x, torch.tensor([level["noise"]]), torch.tensor([False]), g)
    x = quantize(x.clamp(0, 1))
    if level["jpeg"] < 100:
        x = jpeg_compress(x, [int(level["jpeg"])])
    return x


def _test_set(folder: Path, crop: int) -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for path in write_photos(folder, TEST_PHOTOS):
        hr = load_image(path)[None]
        h, w = hr.shape[-2:]
        top, left = (h - crop) // 2, (w - crop) // 2
        pairs.append((path.stem, hr[..., top: top + crop, left: left + crop]))
    return pairs


def _active_ranks(model: torch.nn.Module) -> float:
    if not has_rankmoe(model):
        return math.nan
    return rankmoe.overall_active_ranks(rankmoe.routing_stats(model))


def evaluate(model: torch.nn.Module, estimator: Any, test: list[tuple[str, torch.Tensor]], lora_rank: int | None
             ) -> dict[str, dict[str, float]]:
    """Per level: mean PSNR-Y / SSIM-Y over the test images, mean active ranks."""
    out = {}
    for name, level in LEVELS.items():
        rows, ranks = [], []
        for index, (_, hr) in enumerate(test):
            lr = degrade(hr, level, seed=1000 + index)
            scores = estimate(estimator, lr, 4)
            sr = super_resolve_quantized(model, lr, scores)
            row = y_metrics(sr, hr, crop_border=4)
            row["niqe"] = float(niqe(sr.double()))  # no reference: the whole 192 px output (2 x 2 blocks of 96)
            rows.append(row)
            ranks.append(float(lora_rank) if lora_rank is not None else _active_ranks(model))
        out[name] = {"psnr": statistics.fmean(r["psnr"] for r in rows),
                     "ssim": statistics.fmean(r["ssim"] for r in rows),
                     "niqe": statistics.fmean(r["niqe"] for r in rows),
                     "active_ranks": statistics.fmean(ranks)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--test_crop", type=int, default=192)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/ablation-realesrgan")
    parser.add_argument("--reuse", action="store_true",
                        help="score the adapters a previous run saved under OUT/runs instead of training again")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = _test_set(out / "data" / "test", args.test_crop)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            spec = VARIANTS[variant]
            settings = FinetuneSettings(output_dir=str(out / "runs" / f"{variant}-{seed}"), seed=seed,
                                        steps=args.steps, adapter=spec or VARIANTS["lora"], test_crop=128)
            start = time.perf_counter()
            if spec is None:  # the untouched network: a 1-step run only builds it; scored with the adapter off
                settings.steps = 1
            if args.reuse:
                model, seconds = _reload(Path(settings.output_dir))
            else:
                result = run(settings.validate(), progress=False)
                seconds = time.perf_counter() - start
                model = result["model"]
            from real_isr.components import build_estimator

            estimator = build_estimator(settings)  # type: ignore[arg-type]
            if spec is None:
                with untouched(model) as plain:
                    levels = evaluate(plain, estimator, test, lora_rank=0)
            else:
                levels = evaluate(model, estimator, test, lora_rank=spec["r"] if spec["type"] == "lora" else None)
            results[variant].append({"seed": seed, "train_seconds": seconds if spec else 0.0, "levels": levels})
            print(f"{variant} seed {seed}: " + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in levels.items()),
                  flush=True)
    summary = summarize(results)
    machine = f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads"
    payload = {"machine": machine, "steps": args.steps, "seeds": args.seeds, "test_crop": args.test_crop,
               "levels": LEVELS, "runs": results, "summary": summary}
    (out.with_suffix(".json")).write_text(json.dumps(payload, indent=2) + "\n")
    (out.with_suffix(".md")).write_text(markdown(summary, payload))
    plot(summary, out.with_suffix(".png"))
    print(markdown(summary, payload))


def _reload(folder: Path) -> tuple[torch.nn.Module, float]:
    """The adapted network a previous run saved in ``folder/adapter`` and that run's wall time."""
    from peft import PeftModel
    from real_isr.realesrgan_weights import load_realesrgan_x4plus

    model = PeftModel.from_pretrained(load_realesrgan_x4plus(), str(folder / "adapter"))
    return model.eval(), float(json.loads((folder / "metrics.json").read_text())["seconds"])


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample standard deviation over seeds, per variant, level and metric."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for variant, runs in results.items():
        summary[variant] = {}
        for level in LEVELS:
            entry = {}
            for metric in ("psnr", "ssim", "niqe", "active_ranks"):
                values = [r["levels"][level][metric] for r in runs]
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[variant][level] = entry
        summary[variant]["train_seconds"] = {"mean": statistics.fmean(r["train_seconds"] for r in runs)}
    return summary


def markdown(summary: dict[str, Any], payload: dict[str, Any]) -> str:
    """PSNR-Y table (mean ± std over seeds) and mean active ranks per level."""
    levels = list(LEVELS)
    lines = [f"# Real-ESRGAN x4plus + adapters: ablation ({payload['machine']})", "",
             f"{payload['steps']} steps, seeds {payload['seeds']}, held-out crops {payload['test_crop']} px, "
             f"{len(TEST_PHOTOS)} photographs; PSNR-Y in dB (mean ± std over seeds).", "",
             "| variant | " + " | ".join(levels) + " | train s |", "|---|" + "---:|" * (len(levels) + 1)]
    for variant, entry in summary.items():
        cells = [f"{entry[lv]['psnr']:.2f} ± {entry[lv]['psnr_std']:.2f}" for lv in levels]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {entry['train_seconds']['mean']:.0f} |")
    lines += ["", "SSIM-Y:", "", "| variant | " + " | ".join(levels) + " |", "|---|" + "---:|" * len(levels)]
    for variant, entry in summary.items():
        lines.append(f"| {variant} | " + " | ".join(f"{entry[lv]['ssim']:.4f}" for lv in levels) + " |")
    lines += ["", "NIQE (lower is better; the whole 192 px output):", "", "| variant | " + " | ".join(levels) + " |",
              "|---|" + "---:|" * len(levels)]
    for variant, entry in summary.items():
        lines.append(f"| {variant} | " + " | ".join(f"{entry[lv]['niqe']:.3f}" for lv in levels) + " |")
    lines += ["", "Mean active ranks per image:", "", "| variant | " + " | ".join(levels) + " |",
              "|---|" + "---:|" * len(levels)]
    for variant, entry in summary.items():
        lines.append(f"| {variant} | " + " | ".join(f"{entry[lv]['active_ranks']:.2f}" for lv in levels) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars of PSNR-Y per level (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, variants = list(LEVELS), list(summary)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, variant in enumerate(variants):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [summary[variant][lv]["psnr"] for lv in levels], width,
               yerr=[summary[variant][lv]["psnr_std"] for lv in levels], label=variant, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], levels)
    low = min(summary[v][lv]["psnr"] for v in variants for lv in levels)
    ax.set_ylim(low - 1.0, None)
    ax.set_ylabel("PSNR-Y (dB)")
    ax.legend(ncol=len(variants), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
