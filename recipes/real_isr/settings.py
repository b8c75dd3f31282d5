"""Options of the Real-ISR training script: one dataclass, YAML presets and the matching command line.

Every option is a field of :class:`TrainSettings`. Values come from three layers, later ones winning:

1. the dataclass defaults (OSEDiff / MoR values where the papers give them);
2. a YAML preset (``--config configs/sd21-mor.yaml``): a flat mapping of field names to values; an unknown key is
   an error that names the key, the file and the closest field names;
3. command-line flags (``--learning_rate 1e-4``), one per field. Dict-valued fields take JSON
   (``--unet_adapter '{"type": "lora", "r": 4}'``), list-valued fields take several words, booleans take
   ``true`` / ``false``.

:meth:`TrainSettings.validate` checks every value once, before anything is built, so a bad option fails in the
first second of a run and not after the model has loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

try:
    from . import options
except ImportError:
    import options  # type: ignore[no-redef]

__all__ = [
    "LOG_TARGETS",
    "MIXED_PRECISIONS",
    "OSEDIFF_NEGATIVE_PROMPT",
    "TrainSettings",
    "build_parser",
    "load_preset",
    "parse_settings",
]

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOG_TARGETS = ("csv", "tensorboard", "all", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
ADAPTER_TYPES = ("rankmoe", "lora")

OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth"
)
"""The negative prompt of OSEDiff's VSD term (classifier-free guidance of the frozen UNet)."""


def _mor_unet_adapter() -> dict[str, Any]:
    """MoR's UNet adapter: r = 40 = 8 shared + 32 rank-1 experts, top-8 of 36 slots (4 zero), condition router."""
    return {
        "type": "rankmoe", "r": 40, "lora_alpha": 40, "num_shared_ranks": 8, "expert_rank": 1, "top_k": 8,
        "num_zero_experts": 4, "router": "condition", "router_kwargs": {"condition_dim": 4},
        "balance_loss": "degradation_aware", "balance_loss_weight": 0.01,
    }


@dataclass
class TrainSettings:
    """Every option of ``train.py`` (see the module docstring for how presets and flags combine).

    Model:
        pretrained_model: Diffusers-layout folder (or hub id) of Stable Diffusion 2.1-base.
        unet_adapter: ``{"type": "rankmoe", **RankMoEConfig kwargs}`` or ``{"type": "lora", **LoraConfig kwargs}``;
            ``target_modules`` defaults to OSEDiff's UNet list. ``None``: no UNet adapter.
        vae_adapter: The same for the VAE encoder (OSEDiff: LoRA rank 4); ``None``: frozen VAE.
        train_conv_in: Train the UNet's ``conv_in`` fully (OSEDiff).
        prompt: Fixed prompt of the generator (OSEDiff uses DAPE tags; ``""`` is the empty prompt).
        negative_prompt: Negative prompt of the VSD guidance.
        timestep: The single diffusion step of the generator.
        estimator: ``{"kind": ..., **settings}`` of ``rankmoe.conditioning.degradation_estimator`` (``kind`` null:
            the weight-free estimator), or ``None`` for an adapter that routes on no condition.

    Data:
        train_data: HR image folders, list files or images.
        validation_data: HR images degraded once with a fixed seed for the validation grid (empty: none).
        crop_size, scale, degradation: See ``real_isr.data.HRImageDataset``.
        num_validation_images: Images in the validation grid.
        dataloader_num_workers: ``DataLoader`` workers.

    Losses: l2_weight, lpips_weight, vsd_weight, gan_weight (OSEDiff: 1, 2, 1, 0; MoR adds a GAN term), cfg_scale
        (VSD guidance), lpips_vgg16 / lpips_heads (local weight files), lpips_allow_random (tests only),
        regularizer_rank, regularizer_learning_rate, discriminator_learning_rate.

    Optimisation: learning_rate, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon, lr_scheduler,
        lr_warmup_steps, train_batch_size (per process), gradient_accumulation_steps, max_train_steps,
        max_grad_norm, mixed_precision, gradient_checkpointing, seed.

    Checkpoints and logs: output_dir, checkpointing_steps, checkpoints_total_limit, resume_from_checkpoint
        (``"latest"`` or a folder), logging_steps, report_to, validation_steps.
    """

    # model
    pretrained_model: str = "stabilityai/stable-diffusion-2-1-base"
    unet_adapter: dict[str, Any] | None = field(default_factory=_mor_unet_adapter)
    vae_adapter: dict[str, Any] | None = field(default_factory=lambda: {"type": "lora", "r": 4, "lora_alpha": 4,
                                                                        "init_lora_weights": "gaussian"})
    train_conv_in: bool = True
    prompt: str = ""
    negative_prompt: str = OSEDIFF_NEGATIVE_PROMPT
    timestep: int = 999
    estimator: dict[str, Any] | None = field(default_factory=lambda: {"kind": None})
    # data
    train_data: list[str] = field(default_factory=list)
    validation_data: list[str] = field(default_factory=list)
    crop_size: int = 512
    scale: int = 4
    degradation: str = "realesrgan"
    num_validation_images: int = 4
    dataloader_num_workers: int = 0
    # losses
    l2_weight: float = 1.0
    lpips_weight: float = 2.0
    vsd_weight: float = 1.0
    gan_weight: float = 0.0
    cfg_scale: float = 7.5
    lpips_vgg16: str | None = None
    lpips_heads: str | None = None
    lpips_allow_random: bool = False
    regularizer_rank: int = 4
    regularizer_learning_rate: float = 5e-5
    discriminator_learning_rate: float = 1e-5
    # optimisation
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 25_000
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    # checkpoints and logs
    output_dir: str = "outputs/real_isr"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    report_to: str = "csv"
    validation_steps: int = 500

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every option, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The options as plain data (JSON / YAML serialisable)."""
        return dataclasses.asdict(self)

    def validate(self) -> TrainSettings:
        """Check every value; returns ``self``.

        Raises:
            ValueError: Naming the first invalid option, its value and what would be valid.
        """
        for name in ("crop_size", "scale", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "checkpointing_steps", "logging_steps", "validation_steps", "regularizer_rank"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_validation_images", "dataloader_num_workers", "lr_warmup_steps", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.checkpoints_total_limit is not None:
            _check_int("checkpoints_total_limit", self.checkpoints_total_limit, minimum=1)
        if not 0 <= _check_int("timestep", self.timestep, minimum=0) < 1000:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        for name in ("l2_weight", "lpips_weight", "vsd_weight", "gan_weight", "cfg_scale", "max_grad_norm",
                     "adam_weight_decay"):
            _check_float(name, getattr(self, name), minimum=0.0)
        for name in ("learning_rate", "regularizer_learning_rate", "discriminator_learning_rate", "adam_epsilon"):
            if _check_float(name, getattr(self, name), minimum=0.0) == 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= _check_float(name, getattr(self, name), minimum=0.0) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.crop_size % self.scale or (self.crop_size // 8) * 8 != self.crop_size:
            raise ValueError(f"crop_size must be a multiple of 8 and of scale={self.scale}, got {self.crop_size}")
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_choice("report_to", self.report_to, LOG_TARGETS)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        if not self.train_data:
            raise ValueError("train_data is empty: give HR image folders, list files or images (--train_data DIR)")
        if not self.pretrained_model:
            raise ValueError("pretrained_model is empty: give a diffusers-layout folder of SD 2.1-base")
        for name in ("unet_adapter", "vae_adapter"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if not isinstance(spec, dict) or spec.get("type") not in ADAPTER_TYPES:
                raise ValueError(
                    f"{name} must be null or a mapping with type one of {list(ADAPTER_TYPES)} plus the config's "
                    f"arguments, got {spec!r}"
                )
        if self.unet_adapter is None and self.vae_adapter is None and not self.train_conv_in:
            raise ValueError("nothing to train: unet_adapter and vae_adapter are null and train_conv_in is false")
        if self.estimator is not None and (not isinstance(self.estimator, dict) or "kind" not in self.estimator):
            raise ValueError(
                f"estimator must be null or a mapping with a 'kind' key (null: weight-free), got {self.estimator!r}"
            )
        if self.lpips_weight and not self.lpips_allow_random and not (self.lpips_vgg16 and self.lpips_heads):
            raise ValueError(
                "lpips_weight > 0 needs lpips_vgg16 (torchvision vgg16-397923af.pth) and lpips_heads (the lpips "
                "package's weights/v0.1/vgg.pth) as local files; set lpips_weight 0 to train without LPIPS"
            )
        return self


# ------------------------------------------------------------------------------------------------ checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ------------------------------------------------------------------------------------------------ presets and flags


def load_preset(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML preset of :class:`TrainSettings` options (see :func:`real_isr.options.load_preset`)."""
    return options.load_preset(path, TrainSettings)


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser: ``--config`` plus one flag per :class:`TrainSettings` field."""
    return options.build_parser(
        TrainSettings, prog="train.py",
        description="Train MoR (RankMoE adapters routed by degradation) on a one-step Stable Diffusion SR model.",
        presets="configs/sd21-mor.yaml, sd21-lora.yaml, tiny.yaml")


def parse_settings(argv: list[str] | None = None) -> TrainSettings:
    """Defaults, then the ``--config`` preset, then the flags; validated (see :func:`real_isr.options.parse`).

    Raises:
        SystemExit: For a malformed flag (argparse's usage message).
        ValueError, FileNotFoundError: For a bad preset or value.
    """
    return options.parse(TrainSettings, build_parser(), argv)
