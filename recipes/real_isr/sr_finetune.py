"""Fine-tune a feed-forward SR network with a RankMoE (or LoRA) adapter: the parts of ``finetune_realesrgan.py``.

The network maps an LR batch ``(b, 3, h, w)`` in ``[0, 1]`` to ``(b, 3, s h, s w)`` (Real-ESRGAN's RRDBNet). The
adapter routes per image on degradation scores of the LR, the same estimator and balance losses as the diffusion
recipe; the objective is ``l1_weight L1 + l2_weight L2 (+ lpips_weight LPIPS) + rankmoe.aux_loss``.

Degradation scores are taken on the LR *enlarged to the output size* (bicubic): the weight-free estimator needs at
least 128 x 128 pixels, and training crops are small, so training and inference score the same kind of image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import rankmoe
from rankmoe.conditioning.base import DegradationEstimator, DegradationScores

try:
    from .metrics import psnr, ssim
except ImportError:
    from metrics import psnr, ssim  # type: ignore[no-redef]

__all__ = [
    "adapt",
    "estimate",
    "has_rankmoe",
    "rrdb_target_modules",
    "sr_forward",
    "sr_loss",
    "super_resolve_quantized",
    "untouched",
    "y_metrics",
]


def rrdb_target_modules(model: nn.Module, last_blocks: int) -> list[str]:
    """The convolutions of the last ``last_blocks`` RRDB blocks and of the tail (``conv_body``, ``conv_up1``,
    ``conv_up2``, ``conv_hr``) of an RRDBNet, by full name.

    Adapting the tail only keeps the backward pass short: nothing before the first adapted layer needs gradients.
    ``conv_first`` and ``conv_last`` (3 channels) stay frozen.

    Raises:
        ValueError: If ``last_blocks`` is not in ``[0, number of blocks]``.
    """
    blocks = len(model.body)
    if isinstance(last_blocks, bool) or not isinstance(last_blocks, int) or not 0 <= last_blocks <= blocks:
        raise ValueError(f"last_blocks must be an int in [0, {blocks}], got {last_blocks!r}")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        pieces = name.split(".")
        if pieces[0] == "body" and int(pieces[1]) >= blocks - last_blocks:
            names.append(name)
        elif name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            names.append(name)
    return names


def adapt(model: nn.Module, spec: dict[str, Any], target_modules: list[str]) -> PeftModel:
    """Wrap ``model`` in a PEFT model with the adapter ``spec`` (``{"type": "rankmoe" | "lora", **kwargs}``).

    Only adapter parameters (routers included) require grad.

    Raises:
        ValueError: For an unknown type or arguments the config rejects.
    """
    kind = spec.get("type")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if kind not in ("rankmoe", "lora"):
        raise ValueError(f"adapter type must be 'rankmoe' or 'lora', got {kind!r}")
    cls = rankmoe.RankMoEConfig if kind == "rankmoe" else LoraConfig
    try:
        config = cls(target_modules=list(target_modules), **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter: invalid {cls.__name__} arguments {kwargs}: {error}") from error
    return get_peft_model(model, config)


def estimate(estimator: DegradationEstimator | None, lr: torch.Tensor, scale: int) -> DegradationScores | None:
    """Degradation scores of ``lr`` ``(b, 3, h, w)``, taken on its bicubic enlargement to ``(s h, s w)``."""
    if estimator is None:
        return None
    with torch.no_grad():
        big = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        return estimator(big)


def has_rankmoe(model: nn.Module) -> bool:
    """Whether ``model`` carries RankMoE layers (a LoRA-adapted or bare network does not)."""
    return any(isinstance(m, rankmoe.RankMoELayer) for m in model.modules())


def _routes_on_condition(model: nn.Module) -> bool:
    return any(getattr(router, "requires_condition", False) for m in model.modules()
               if isinstance(m, rankmoe.RankMoELayer) for router in m.rankmoe_router.values())


def sr_forward(model: nn.Module, lr: torch.Tensor, scores: DegradationScores | None) -> torch.Tensor:
    """``model(lr)`` inside ``rankmoe.condition(model, scores)`` when the adapter routes on a condition.

    Returns:
        ``(b, 3, s h, s w)`` (not clamped).
    """
    if scores is not None and _routes_on_condition(model):
        with rankmoe.condition(model, scores):
            return model(lr)
    return model(lr)


def sr_loss(sr: torch.Tensor, hr: torch.Tensor, model: nn.Module, *, l1_weight: float = 1.0,
            l2_weight: float = 0.0, lpips: nn.Module | None = None, lpips_weight: float = 0.0
            ) -> dict[str, torch.Tensor]:
    """``{"l1", "l2", "lpips", "aux", "total"}`` scalars; ``aux`` from the routing of the last forward."""
    zero = sr.new_zeros(())
    terms = {
        "l1": F.l1_loss(sr, hr) if l1_weight else zero,
        "l2": F.mse_loss(sr, hr) if l2_weight else zero,
        "lpips": lpips(sr.clamp(0, 1) * 2 - 1, hr * 2 - 1).mean() if lpips is not None and lpips_weight else zero,
        "aux": rankmoe.aux_loss(model).total if has_rankmoe(model) else zero,
    }
    terms["total"] = l1_weight * terms["l1"] + l2_weight * terms["l2"] + lpips_weight * terms["lpips"] + terms["aux"]
    return terms


@contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """The pretrained network: adapters disabled inside the context (``PeftModel.disable_adapter``)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


@torch.no_grad()
def super_resolve_quantized(model: nn.Module, lr: torch.Tensor, scores: DegradationScores | None) -> torch.Tensor:
    """Eval-mode SR clamped to ``[0, 1]`` and rounded to 8 bits, as an image file would hold it."""
    training = model.training
    model.eval()
    try:
        return (sr_forward(model, lr, scores).clamp(0, 1) * 255).round() / 255
    finally:
        model.train(training)


def y_metrics(sr: torch.Tensor, hr: torch.Tensor, crop_border: int) -> dict[str, float]:
    """PSNR and SSIM on Y (BT.601) of one image pair ``(1, 3, H, W)``."""
    return {"psnr": float(psnr(sr.double(), hr.double(), crop_border=crop_border)),
            "ssim": float(ssim(sr.double(), hr.double(), crop_border=crop_border))}
