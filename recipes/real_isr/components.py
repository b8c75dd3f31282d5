"""What ``train.py`` builds from its settings: adapter configs, the generator, losses, optimisers and data.

Everything here is a plain function of :class:`~real_isr.settings.TrainSettings`, so tests and notebooks can build
the same parts as the script without running it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from torch import nn
from torch.utils.data import DataLoader, Sampler

import rankmoe
from rankmoe.conditioning.base import DegradationEstimator

try:  # imported as ``real_isr.components`` (tests; train.py puts recipes/ on sys.path)
    from .data import HRImageDataset, collate, worker_init_fn
    from .losses import FrozenUNet, GANLoss, GeneratorLoss, NoiseSchedule, make_regularizer_unet
    from .lpips import LPIPS
    from .model import OneStepSR
    from .settings import TrainSettings
except ImportError:  # imported flat from inside recipes/real_isr
    from data import HRImageDataset, collate, worker_init_fn  # type: ignore[no-redef]
    from losses import FrozenUNet, GANLoss, GeneratorLoss, NoiseSchedule, make_regularizer_unet  # type: ignore
    from lpips import LPIPS  # type: ignore[no-redef]
    from model import OneStepSR  # type: ignore[no-redef]
    from settings import TrainSettings  # type: ignore[no-redef]

__all__ = [
    "EpochShuffleSampler",
    "Parts",
    "adapter_config",
    "build_estimator",
    "build_parts",
    "build_train_loader",
    "build_validation_batch",
]


def adapter_config(spec: dict[str, Any] | None, option: str) -> rankmoe.RankMoEConfig | LoraConfig | None:
    """An adapter config from a settings mapping ``{"type": "rankmoe" | "lora", **config kwargs}``.

    Args:
        spec: The mapping, or ``None`` (no adapter).
        option: The option's name, for error messages (``"unet_adapter"``).

    Returns:
        A ``rankmoe.RankMoEConfig``, a ``peft.LoraConfig`` or ``None``.

    Raises:
        ValueError: If the config rejects an argument or a value (the message names the option).
    """
    if spec is None:
        return None
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = rankmoe.RankMoEConfig if spec.get("type") == "rankmoe" else LoraConfig
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{option}: invalid {cls.__name__} arguments {kwargs}: {error}") from error


def build_estimator(settings: TrainSettings) -> DegradationEstimator | None:
    """The degradation estimator of the settings (``None`` when ``estimator`` is null)."""
    if settings.estimator is None:
        return None
    from rankmoe.conditioning import degradation_estimator

    spec = dict(settings.estimator)
    kind = spec.pop("kind")
    try:
        return degradation_estimator(kind, **spec)
    except TypeError as error:
        raise ValueError(f"estimator: invalid settings {settings.estimator}: {error}") from error


def _check_condition_dim(config: Any, estimator: DegradationEstimator | None, option: str) -> None:
    if not isinstance(config, rankmoe.RankMoEConfig) or config.router != "condition":
        return
    dim = (config.router_kwargs or {}).get("condition_dim")
    if estimator is None:
        raise ValueError(f"{option} routes on a condition (router='condition') but estimator is null")
    if dim != len(estimator.names):
        raise ValueError(
            f"{option}: router_kwargs.condition_dim={dim} but the estimator gives {len(estimator.names)} scores "
            f"{list(estimator.names)}; set condition_dim to {len(estimator.names)}"
        )


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: the same order in every process and on resume.

    ``accelerate`` shards the batches of this sampler across processes; call :meth:`set_epoch` before each epoch.

    Args:
        num_items: Dataset length ``n``.
        seed: Base seed.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


def build_train_loader(settings: TrainSettings) -> tuple[HRImageDataset, EpochShuffleSampler, DataLoader]:
    """Training data: ``HRImageDataset`` (on-the-fly degradation), its sampler and the ``DataLoader``.

    Raises:
        ValueError: If there are fewer images than one batch.
    """
    dataset = HRImageDataset(settings.train_data, crop_size=settings.crop_size, scale=settings.scale,
                             degradation=settings.degradation, seed=settings.seed)
    if len(dataset) < settings.train_batch_size:
        raise ValueError(
            f"train_data holds {len(dataset)} image(s), fewer than train_batch_size={settings.train_batch_size}"
        )
    sampler = EpochShuffleSampler(len(dataset), settings.seed)
    loader = DataLoader(dataset, batch_size=settings.train_batch_size, sampler=sampler, drop_last=True,
                        num_workers=settings.dataloader_num_workers, collate_fn=collate,
                        worker_init_fn=worker_init_fn if settings.dataloader_num_workers else None)
    return dataset, sampler, loader


def build_validation_batch(settings: TrainSettings) -> dict[str, torch.Tensor] | None:
    """The fixed validation pairs: the first ``num_validation_images`` items of epoch 0, degraded with ``seed + 1``.

    Returns:
        ``{"lr", "hr"}`` ``(v, 3, c, c)`` each, or ``None`` without ``validation_data``.
    """
    if not settings.validation_data or not settings.num_validation_images:
        return None
    data = HRImageDataset(settings.validation_data, crop_size=settings.crop_size, scale=settings.scale,
                          degradation=settings.degradation, seed=settings.seed + 1, flip=False)
    items = [data.get_item(i, epoch=0) for i in range(min(len(data), settings.num_validation_images))]
    batch = collate(items)
    return {"lr": batch["lr"], "hr": batch["hr"]}


@dataclass
class Parts:
    """The trainable and frozen pieces of one run.

    Attributes:
        model: The generator (``OneStepSR``) with its adapters.
        estimator: Degradation estimator (or ``None``).
        frozen_unet: The base UNet view used by VSD and the GAN features.
        regularizer: The VSD score UNet (LoRA), or ``None`` when ``vsd_weight`` is 0.
        discriminator: The GAN head, or ``None`` when ``gan_weight`` is 0.
        loss: The generator objective.
        schedule: Noise schedule.
        text_pos: ``(1, n, d)`` prompt embedding; text_neg: ``(1, n, d)`` negative prompt embedding.
    """

    model: OneStepSR
    estimator: DegradationEstimator | None
    frozen_unet: FrozenUNet
    regularizer: nn.Module | None
    discriminator: GANLoss | None
    loss: GeneratorLoss
    schedule: NoiseSchedule
    text_pos: torch.Tensor
    text_neg: torch.Tensor


def build_parts(settings: TrainSettings, device: torch.device | str = "cpu") -> Parts:
    """Load the model folder and build the generator, estimator, VSD regulariser, GAN head and losses.

    Seed the global RNG first (``accelerate.utils.set_seed``): adapter initialisation draws from it.

    Raises:
        ValueError: For adapter settings the configs reject or a condition router whose ``condition_dim`` does not
            match the estimator.
        FileNotFoundError / OSError: For a missing or incomplete model folder (naming the part).
    """
    unet_config = adapter_config(settings.unet_adapter, "unet_adapter")
    vae_config = adapter_config(settings.vae_adapter, "vae_adapter")
    estimator = build_estimator(settings)
    _check_condition_dim(unet_config, estimator, "unet_adapter")
    _check_condition_dim(vae_config, estimator, "vae_adapter")
    model = OneStepSR.from_pretrained(settings.pretrained_model, unet_config=unet_config, vae_config=vae_config,
                                      train_conv_in=settings.train_conv_in, prompt=settings.prompt,
                                      timestep=settings.timestep)
    if settings.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    frozen_unet = FrozenUNet(model.unet, no_grad=not settings.gan_weight)
    schedule = NoiseSchedule.from_pretrained(settings.pretrained_model)
    regularizer = None
    if settings.vsd_weight:
        regularizer = make_regularizer_unet(settings.pretrained_model, r=settings.regularizer_rank)
    discriminator = None
    if settings.gan_weight:
        channels = int(model.unet.config.block_out_channels[-1])
        discriminator = GANLoss(frozen_unet, schedule, channels)
    if settings.lpips_weight:
        lpips = LPIPS(settings.lpips_vgg16, settings.lpips_heads, allow_random=settings.lpips_allow_random)
    else:
        lpips = None
    loss = GeneratorLoss(lpips, schedule, regularizer, frozen_unet, gan=discriminator,
                         l2_weight=settings.l2_weight, lpips_weight=settings.lpips_weight,
                         vsd_weight=settings.vsd_weight, gan_weight=settings.gan_weight, cfg=settings.cfg_scale)
    with torch.no_grad():
        text_pos = model.prompts.encode([settings.prompt])
        text_neg = model.prompts.encode([settings.negative_prompt])
    model.to(device)
    for module in (regularizer, discriminator, lpips, estimator):
        if module is not None:
            module.to(device)
    if discriminator is not None:  # the head's frozen copies (conv_in) live outside the module tree
        for frozen in frozen_unet.frozen.values():
            frozen.to(device)
    return Parts(model, estimator, frozen_unet, regularizer, discriminator, loss, schedule,
                 text_pos.to(device), text_neg.to(device))


def build_optimizers(settings: TrainSettings, parts: Parts) -> dict[str, torch.optim.Optimizer]:
    """AdamW for the generator, the regulariser (VSD) and the GAN head, each present only when it trains."""
    def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=lr, betas=(settings.adam_beta1, settings.adam_beta2),
                                 weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)

    optimizers = {"generator": adamw(parts.model.trainable_parameters(), settings.learning_rate)}
    if parts.regularizer is not None:
        params = [p for p in parts.regularizer.parameters() if p.requires_grad]
        optimizers["regularizer"] = adamw(params, settings.regularizer_learning_rate)
    if parts.discriminator is not None:
        optimizers["discriminator"] = adamw(list(parts.discriminator.head.parameters()),
                                            settings.discriminator_learning_rate)
    return optimizers


def num_update_steps_per_epoch(num_batches: int, settings: TrainSettings) -> int:
    """Optimizer steps per epoch of ``num_batches`` (per-process) micro-batches."""
    return max(1, math.floor(num_batches / settings.gradient_accumulation_steps))
