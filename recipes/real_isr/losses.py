"""Generator and regulariser losses of the Real-ISR recipe (OSEDiff + MoR's GAN and balance terms).

- :class:`NoiseSchedule`: ``alphas_cumprod`` of the diffusion scheduler (add noise, x0 from a prediction).
- :class:`FrozenUNet`: the *base* UNet as a view of the generator's UNet (adapters disabled for the call, and the
  few trainable base modules such as ``conv_in`` swapped for frozen copies) — no second full UNet in memory.
- :func:`make_regularizer_unet`: the VSD score network, a copy of the base UNet with one rank-4 LoRA (OSEDiff).
- :func:`vsd_loss` (OSEDiff's ``distribution_matching_loss``), :func:`diffusion_loss` (the regulariser's update).
- :class:`GANLoss`: optional hinge GAN with a small head on frozen-UNet mid-block features (off by default).
- :class:`GeneratorLoss`: ``l2 + 2 lpips + vsd + gan_weight * gan + sum aux_loss(routed).total``.
- :func:`forward_with_latents`: ``OneStepSR`` forward that also returns the predicted latent ``z_hat``.

Axes: b batch, c latent channels (4), h, w latent size; images ``(b, 3, H, W)``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import rankmoe

__all__ = [
    "FrozenUNet", "GANLoss", "GeneratorLoss", "NoiseSchedule", "diffusion_loss", "forward_with_latents",
    "make_regularizer_unet", "vsd_loss",
]


class NoiseSchedule:
    """The parts of a DDPM scheduler the losses need.

    Args:
        alphas_cumprod: ``(T,)`` cumulative products ``abar_t``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """From a diffusers scheduler (``alphas_cumprod``, ``config.prediction_type``)."""
        return cls(scheduler.alphas_cumprod, scheduler.config.prediction_type)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> NoiseSchedule:
        """From the ``scheduler/`` subfolder of a diffusers-layout folder (``DDPMScheduler``)."""
        from diffusers import DDPMScheduler

        return cls.from_scheduler(DDPMScheduler.from_pretrained(path, subfolder="scheduler"))

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[t.cpu()].to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) z + sqrt(1 - abar_t) noise``; ``z``, ``noise`` ``(b, c, h, w)``, ``t`` ``(b,)`` long."""
        a, s = self._coefficients(t, z)
        return a * z + s * noise

    def x0(self, noisy: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from a UNet prediction at per-sample timesteps ``t`` ``(b,)``; all tensors ``(b, c, h, w)``."""
        a, s = self._coefficients(t, noisy)
        if self.prediction_type == "epsilon":
            return (noisy - s * prediction) / a
        if self.prediction_type == "v_prediction":
            return a * noisy - s * prediction
        return prediction

    def target(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Training target of the prediction type (``noise``, ``v`` or ``z``)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a, s = self._coefficients(t, z)
            return a * noise - s * z
        return z


def _sample_t(b: int, low: int, high: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, (b,), generator=generator, device=gen_device).to(device)


def _randn_like(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else z.device
    return torch.randn(z.shape, generator=generator, device=gen_device, dtype=z.dtype).to(z.device)


class FrozenUNet:
    """Call the base UNet through the generator's adapted UNet, without a second copy.

    Memory choice: the frozen SD UNet of OSEDiff (``unet_fix``) *is* the generator's UNet with its adapters
    switched off, except for base modules the generator trains itself (``conv_in`` with ``train_conv_in=True``).
    Those (a few KB) are deep-copied at construction and swapped in for the call. During the call every
    ``BaseTunerLayer`` is disabled (``enable_adapters(False)``) and restored afterwards, with every parameter's
    ``requires_grad`` flag put back as it was. Routed layers do not record routing while disabled, so
    ``rankmoe.aux_loss`` still sees the generator's forward.

    Args:
        unet: The generator's UNet (``OneStepSR.unet``), before training changes its trainable base modules.
        keep: Names of base submodules to freeze a copy of (default: those with a trainable parameter outside any
            adapter, e.g. ``conv_in``).
        no_grad: Run under ``torch.no_grad`` (VSD); ``False`` lets gradients reach the *input* (GAN features).
    """

    def __init__(self, unet: nn.Module, keep: list[str] | None = None, no_grad: bool = True) -> None:
        self.unet = unet
        self.no_grad = no_grad
        if keep is None:
            keep = sorted({
                name.rsplit(".", 1)[0] for name, p in unet.named_parameters()
                if p.requires_grad and not any(piece.startswith(("lora_", "rankmoe_")) for piece in name.split("."))
            })
            keep = [name[: -len(".base_layer")] if name.endswith(".base_layer") else name for name in keep]
        self.frozen: dict[str, nn.Module] = {}
        for name in keep:
            module = unet.get_submodule(name)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            self.frozen[name] = copy.deepcopy(base).requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.unet.config

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Context in which ``self.unet`` computes the frozen base UNet."""
        flags = {p: p.requires_grad for p in self.unet.parameters()}
        layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
        originals = {name: self.unet.get_submodule(name) for name in self.frozen}
        try:
            for layer in layers:
                layer.enable_adapters(False)
            for name, module in self.frozen.items():
                parent, _, child = name.rpartition(".")
                setattr(self.unet.get_submodule(parent) if parent else self.unet, child, module)
            yield self.unet
        finally:
            for name, module in originals.items():
                parent, _, child = name.rpartition(".")
                setattr(self.unet.get_submodule(parent) if parent else self.unet, child, module)
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in flags.items():
                p.requires_grad_(flag)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        """Same signature and output as the UNet (``.sample``)."""
        with self.active() as unet, (torch.no_grad() if self.no_grad else contextlib.nullcontext()):
            return unet(sample, timestep, **kwargs)


def make_regularizer_unet(source: str | os.PathLike[str] | nn.Module, r: int = 4,
                          target_modules: list[str] | None = None) -> nn.Module:
    """The VSD score network ``eps_psi``: a base UNet copy + one LoRA (``LoraConfig(r=4, init="gaussian")``).

    OSEDiff splits the same module list into three rank-4 adapters (down / up / others); one adapter over the
    union is the same function class with one optimiser group. Only ``lora_*`` parameters require grad.

    Args:
        source: A diffusers-layout folder (its ``unet/`` is loaded) or a UNet module without adapters (deep copy).
        r: LoRA rank.
        target_modules: Module names (default: the recipe's UNet preset, ``unet_target_modules``).

    Raises:
        ValueError: If the module already carries adapters (pass the folder instead).
    """
    if isinstance(source, nn.Module):
        if any(isinstance(m, BaseTunerLayer) for m in source.modules()):
            raise ValueError("make_regularizer_unet needs the base UNet without adapters; pass the model folder")
        unet = copy.deepcopy(source)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    if target_modules is None:
        from rankmoe.integrations.diffusers import unet_target_modules

        target_modules = unet_target_modules(unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=r, init_lora_weights="gaussian", target_modules=list(target_modules)))
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
    return unet


def vsd_loss(z_hat: torch.Tensor, schedule: NoiseSchedule, reg_unet: Any, frozen_unet: Any, text_pos: torch.Tensor,
             text_neg: torch.Tensor, generator: torch.Generator | None = None, cfg: float = 7.5,
             t_range: tuple[int, int] = (20, 980)) -> torch.Tensor:
    """OSEDiff's VSD (distribution matching) loss of the generator.

    ``t ~ U[t_range)`` per sample; ``noisy = add_noise(z_hat, n, t)``; ``x0_update`` from ``reg_unet`` (positive
    prompt); ``x0_fix`` from ``frozen_unet`` with CFG ``neg + cfg (pos - neg)``; ``w = mean|z_hat - x0_fix|`` per
    sample; ``grad = (x0_update - x0_fix) / w``; loss ``= MSE(z_hat, stopgrad(z_hat - grad))``. Both UNets run
    without grad, so only ``z_hat``'s producer (the generator) receives a gradient.

    Args:
        z_hat: ``(b, c, h, w)`` generator latents (scaled, with grad).
        schedule: Noise schedule.
        reg_unet: Score UNet (``unet(x, t, encoder_hidden_states=e).sample``).
        frozen_unet: Frozen base UNet, same call (e.g. :class:`FrozenUNet`).
        text_pos: ``(b, n, d)`` positive prompt embeddings.
        text_neg: ``(b, n, d)`` or ``(1, n, d)`` negative prompt embeddings.
        generator: RNG for ``t`` and the noise.
        cfg: Guidance scale of the frozen UNet.
        t_range: ``[low, high)`` of the timesteps.

    Returns:
        Scalar loss.
    """
    b = z_hat.shape[0]
    t = _sample_t(b, t_range[0], t_range[1], generator, z_hat.device)
    noise = _randn_like(z_hat, generator)
    text_neg = text_neg.expand(b, *text_neg.shape[1:]) if text_neg.shape[0] == 1 else text_neg
    with torch.no_grad():
        noisy = schedule.add_noise(z_hat.detach(), noise, t)
        pred_update = reg_unet(noisy, t, encoder_hidden_states=text_pos).sample
        x0_update = schedule.x0(noisy, pred_update.to(noisy.dtype), t)
        both = frozen_unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                           encoder_hidden_states=torch.cat([text_neg, text_pos])).sample.to(noisy.dtype)
        uncond, cond = both.chunk(2)
        x0_fix = schedule.x0(noisy, uncond + cfg * (cond - uncond), t)
        weight = (z_hat.detach() - x0_fix).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = (x0_update - x0_fix) / weight
        target = (z_hat.detach() - grad).nan_to_num()
    return F.mse_loss(z_hat.float(), target.float())


def diffusion_loss(reg_unet: Any, z: torch.Tensor, text: torch.Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising loss of the regulariser on detached generator latents, ``t ~ U[0, T)`` (OSEDiff ``diff_loss``).

    Args:
        reg_unet: Score UNet (LoRA).
        z: ``(b, c, h, w)`` latents (detached inside).
        text: ``(b, n, d)`` prompt embeddings.
        schedule: Noise schedule (target per its prediction type; epsilon for SD 2.1-base).
        generator: RNG for ``t`` and the noise.

    Returns:
        Scalar MSE.
    """
    z = z.detach()
    t = _sample_t(z.shape[0], 0, schedule.num_steps, generator, z.device)
    noise = _randn_like(z, generator)
    pred = reg_unet(schedule.add_noise(z, noise, t), t, encoder_hidden_states=text).sample
    return F.mse_loss(pred.float(), schedule.target(z, noise, t).float())


class GANLoss(nn.Module):
    """Hinge GAN on frozen-UNet mid-block features (MoR's diffusion-feature discriminator; its D is unknown).

    Features: ``frozen_unet`` (a :class:`FrozenUNet` with ``no_grad=False``) run on latents noised at ``t`` (fixed
    per call, ``U[t_range)``), mid-block output captured by a forward hook. Head: conv3x3-GroupNorm-SiLU-conv1x1
    -> ``(b, 1, h', w')`` logits. Only the head trains (its own optimiser).

    Args:
        frozen_unet: :class:`FrozenUNet` built with ``no_grad=False``.
        schedule: Noise schedule.
        channels: Mid-block channels (``unet.config.block_out_channels[-1]``).
        t_range: Timesteps of the features.
    """

    def __init__(self, frozen_unet: FrozenUNet, schedule: NoiseSchedule, channels: int,
                 t_range: tuple[int, int] = (20, 500)) -> None:
        super().__init__()
        self.frozen_unet = frozen_unet
        self.schedule = schedule
        self.t_range = t_range
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(32, channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def logits(self, z: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Discriminator logits ``(b, 1, h', w')`` of latents ``z`` ``(b, c, h, w)``."""
        t = _sample_t(z.shape[0], self.t_range[0], self.t_range[1], generator, z.device)
        noisy = self.schedule.add_noise(z, _randn_like(z, generator), t)
        captured: list[torch.Tensor] = []
        handle = self.frozen_unet.unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.frozen_unet(noisy, t, encoder_hidden_states=text)
        finally:
            handle.remove()
        return self.head(captured[-1].float())

    def generator_loss(self, z_fake: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """``-mean D(fake)`` (gradient reaches the generator through the frozen features)."""
        return -self.logits(z_fake, text, generator).mean()

    def discriminator_loss(self, z_real: torch.Tensor, z_fake: torch.Tensor, text: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean relu(1 - D(real)) + mean relu(1 + D(fake))`` on detached latents."""
        real = self.logits(z_real.detach(), text, generator)
        fake = self.logits(z_fake.detach(), text, generator)
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def forward_with_latents(model: nn.Module, lr: torch.Tensor, *args: Any, **kwargs: Any
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``OneStepSR`` forward returning ``(sr (b, 3, H, W) in [0, 1], z_hat (b, c, h, w))``.

    ``z_hat`` is the scaled latent passed to ``model.decode``. ``model`` may be wrapped (DDP, ``accelerate``):
    the call goes through the wrapper with ``return_latents=True``.
    """
    return model(lr, *args, return_latents=True, **kwargs)


class GeneratorLoss(nn.Module):
    """``l2_weight L2 + lpips_weight LPIPS + vsd_weight VSD + gan_weight GAN + sum_m aux_loss(m).total``.

    L2 and LPIPS compare images mapped to ``[-1, 1]`` (as OSEDiff). Terms with weight 0 are not computed (logged
    as 0). ``aux_loss`` is read first, from the routing records of the generator's last forward.

    Args:
        lpips: An :class:`~real_isr.lpips.LPIPS` (or any ``(x, y) -> (b,)`` callable on ``[-1, 1]`` images).
        schedule: Noise schedule.
        reg_unet: Score UNet (:func:`make_regularizer_unet`).
        frozen_unet: Frozen base UNet (:class:`FrozenUNet`).
        gan: Optional :class:`GANLoss` (needed when ``gan_weight > 0``).
        l2_weight, lpips_weight, vsd_weight, gan_weight: Coefficients (OSEDiff: 1, 2, 1, 0).
        cfg: CFG scale of the frozen UNet in VSD.
        t_range: VSD timestep range.
    """

    def __init__(self, lpips: Any, schedule: NoiseSchedule, reg_unet: Any, frozen_unet: Any, *,
                 gan: GANLoss | None = None, l2_weight: float = 1.0, lpips_weight: float = 2.0,
                 vsd_weight: float = 1.0, gan_weight: float = 0.0, cfg: float = 7.5,
                 t_range: tuple[int, int] = (20, 980)) -> None:
        super().__init__()
        if gan_weight and gan is None:
            raise ValueError(f"gan_weight={gan_weight!r} needs a GANLoss (gan=...)")
        self.lpips, self.schedule, self.gan = lpips, schedule, gan
        self.reg_unet, self.frozen_unet = reg_unet, frozen_unet
        self.weights = {"l2": l2_weight, "lpips": lpips_weight, "vsd": vsd_weight, "gan": gan_weight}
        self.cfg, self.t_range = cfg, t_range

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, z_hat: torch.Tensor, routed_models: list[nn.Module],
                text_pos: torch.Tensor, text_neg: torch.Tensor, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """All terms.

        Args:
            sr: ``(b, 3, H, W)`` generator output in ``[0, 1]``.
            hr: ``(b, 3, H, W)`` targets in ``[0, 1]``.
            z_hat: ``(b, c, h, w)`` generator latents (:func:`forward_with_latents`).
            routed_models: ``model.routed_models()``.
            text_pos: ``(b, n, d)`` prompt embeddings; text_neg: ``(1 or b, n, d)`` negative prompt embeddings.
            generator: RNG of the VSD / GAN noise.

        Returns:
            ``{"l2", "lpips", "vsd", "gan", "aux", "total"}`` scalar tensors (``total`` differentiable).
        """
        zero = sr.new_zeros((), dtype=torch.float32)
        terms = {"aux": sum((rankmoe.aux_loss(m).total.float() for m in routed_models), zero)}
        x, y = sr.float() * 2 - 1, hr.float() * 2 - 1
        terms["l2"] = F.mse_loss(x, y) if self.weights["l2"] else zero
        terms["lpips"] = self.lpips(x, y).mean() if self.weights["lpips"] else zero
        terms["vsd"] = (vsd_loss(z_hat, self.schedule, self.reg_unet, self.frozen_unet, text_pos, text_neg, generator,
                                 self.cfg, self.t_range) if self.weights["vsd"] else zero)
        terms["gan"] = self.gan.generator_loss(z_hat, text_pos, generator) if self.weights["gan"] else zero
        terms["total"] = terms["aux"] + sum(self.weights[k] * terms[k] for k in ("l2", "lpips", "vsd", "gan"))
        return terms
