"""The one-step super-resolution generator (OSEDiff structure) with RankMoE adapters on the UNet and VAE encoder.

Forward pass (``shared/notes/real-isr.md`` §1.1):

```
lr_up (b, 3, H, W) in [0, 1]  ->  x = 2 lr_up - 1
z   = vae.encode(x).latent_dist.{sample | mode}() * scaling_factor          (b, 4, H/8, W/8)
eps = unet(z, t=999, text_embedding)        [inside rankmoe.condition(unet, condition)]
z0  = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)       (epsilon prediction;  v: sqrt(abar) z - sqrt(1-abar) v)
sr  = (vae.decode(z0 / scaling_factor).clamp(-1, 1) + 1) / 2                (b, 3, H, W) in [0, 1]
```

Decisions (documented here, chosen for the recipe):

- **Input size.** ``forward`` takes the LR image *already upsampled to the HR size* (OSEDiff's ``resize_bak``;
  ``data.py`` does it in training, ``infer.py`` with bicubic before calling). Height and width must be multiples
  of 8 (the VAE's factor); anything else raises ``ValueError``.
- **x0 at t = 999** is computed directly from ``abar_t`` (``alphas_cumprod`` of the scheduler built from its
  config) instead of ``scheduler.step``: with SD-2.1-base's ``leading`` spacing ``set_timesteps(1)`` gives
  timestep 1 and diffusers >= 0.31 raises ``IndexError`` in ``step(eps, 999, z)``. The formula equals ``step``'s
  ``pred_original_sample`` (tested against a ``trailing`` scheduler).
- **Latent.** ``latent="auto"`` (default) samples the posterior in ``train()`` mode, as OSEDiff does, and takes its
  mode in ``eval()`` mode (deterministic inference and validation); ``"sample"`` / ``"mode"`` force one.
- **Adapters.** The UNet gets a :class:`rankmoe.RankMoEConfig` adapter named ``"default"`` on the OSEDiff target
  list (``rankmoe.integrations.diffusers.add_rankmoe``); the VAE encoder gets adapter ``"vae"`` (a RankMoE config,
  e.g. all-shared = plain LoRA, or a peft ``LoraConfig`` as OSEDiff's rank-4 LoRA). Everything else is frozen;
  ``train_conv_in=True`` also trains the UNet's ``conv_in`` weights fully (OSEDiff).
- **Condition.** When a UNet (or VAE) adapter routes on a condition, ``forward`` needs ``condition`` (a
  ``DegradationScores`` or a ``(b, c)`` tensor plus optional ``severity``) and wraps the adapted model's call in
  ``rankmoe.condition``.

Axis legend: ``b`` batch, ``H``/``W`` image size (HR), ``h = H/8``/``w = W/8`` latent size, ``n`` text tokens,
``d`` text width.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from rankmoe.integrations.diffusers import add_rankmoe, vae_encoder_target_modules
from real_isr.checkpoints import (
    ADAPTERS_CONFIG_NAME,
    ADAPTERS_WEIGHTS_NAME,
    checkpoint_mismatches,
    config_dict,
)
from real_isr.checkpoints import (
    FORMAT as _FORMAT,
)
from real_isr.prompts import PromptEncoder, PromptSource
from torch import nn

import rankmoe
from rankmoe.conditioning.base import DegradationScores

__all__ = ["OneStepSR", "SUBFOLDERS"]

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
"""The diffusers-layout subfolders :meth:`OneStepSR.from_pretrained` reads."""
_LATENT_MODES = ("auto", "sample", "mode")


def _check_folder(path: str | os.PathLike[str]) -> str:
    """Local folder: must exist with every subfolder. Anything else that looks like a path: FileNotFoundError."""
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model folder {text} has no {', '.join(m + '/' for m in missing)} subfolder(s); a Stable Diffusion "
                f"folder in diffusers layout has {', '.join(s + '/' for s in SUBFOLDERS)} (e.g. a snapshot of "
                "stabilityai/stable-diffusion-2-1-base, or real_isr.tiny.build_tiny_sd for tests)"
            )
        return str(folder)
    looks_local = folder.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1 or "\\" in text
    if looks_local:
        raise FileNotFoundError(
            f"model folder {text} does not exist (or is not a folder); pass a local folder in diffusers layout "
            f"({', '.join(s + '/' for s in SUBFOLDERS)}) or a Hugging Face hub id such as "
            "'stabilityai/stable-diffusion-2-1-base'"
        )
    return text  # a hub id: resolved by from_pretrained (cache, or download when online)


def _add_adapter(model: nn.Module, config: Any, adapter_name: str, preset: str) -> list[str]:
    if isinstance(config, rankmoe.RankMoEConfig):
        return add_rankmoe(model, config, adapter_name=adapter_name, preset=preset)
    if isinstance(config, LoraConfig):
        if preset != "vae_encoder" and config.target_modules is None:
            from rankmoe.integrations.diffusers import unet_target_modules

            names = unet_target_modules(model)
        else:
            names = vae_encoder_target_modules(model) if config.target_modules is None else None
        if names is not None:
            config = copy.deepcopy(config)
            config.target_modules = names
        model.add_adapter(config, adapter_name=adapter_name)
        model.set_adapter(adapter_name)
        return sorted(config.target_modules)
    raise TypeError(f"adapter config must be a rankmoe.RankMoEConfig or a peft.LoraConfig, got {type(config).__name__}")


class OneStepSR(nn.Module):
    """One-step diffusion SR generator: VAE encode -> UNet at ``t`` -> x0 -> VAE decode, with RankMoE adapters.

    Build it with :meth:`from_pretrained`; the constructor takes already loaded parts (and adds the adapters).

    Args:
        tokenizer: ``CLIPTokenizer``.
        text_encoder: ``CLIPTextModel`` (frozen).
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL``.
        scheduler: A diffusers noise scheduler (``DDPMScheduler``); only its ``alphas_cumprod``,
            ``config.num_train_timesteps`` and ``config.prediction_type`` are read.
        unet_config: Adapter of the UNet (``RankMoEConfig``, or ``LoraConfig``; ``None``: no UNet adapter). Target
            modules default to OSEDiff's UNet list.
        vae_config: Adapter of the VAE encoder (``RankMoEConfig`` or ``LoraConfig``; ``None``: none). Target
            modules default to OSEDiff's VAE-encoder list (+ ``quant_conv``).
        train_conv_in: Also train the UNet's ``conv_in`` weight and bias (its base weights when adapted).
        prompt: Prompt source: ``""`` (empty), a fixed string, or a callable ``lr -> list of b strings``.
        timestep: The single diffusion timestep (999 as OSEDiff).
        latent: ``"auto"`` (sample in training, mode in eval), ``"sample"`` or ``"mode"``.

    Raises:
        ValueError: For a timestep outside the schedule, an unknown ``latent`` or ``prediction_type``.
        TypeError: For an adapter config of another type, or a prompt that is neither a string nor callable.
    """

    UNET_ADAPTER = "default"
    VAE_ADAPTER = "vae"

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: nn.Module,
        unet: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        *,
        unet_config: rankmoe.RankMoEConfig | LoraConfig | None = None,
        vae_config: rankmoe.RankMoEConfig | LoraConfig | None = None,
        train_conv_in: bool = False,
        prompt: PromptSource = "",
        timestep: int = 999,
        latent: str = "auto",
    ) -> None:
        super().__init__()
        num_steps = int(scheduler.config.num_train_timesteps)
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < num_steps:
            raise ValueError(f"timestep must be an int in [0, {num_steps - 1}], got {timestep!r}")
        if latent not in _LATENT_MODES:
            raise ValueError(f"latent must be one of {list(_LATENT_MODES)}, got {latent!r}")
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; expected 'epsilon', "
                "'v_prediction' or 'sample'"
            )
        self.timestep = timestep
        self.latent = latent
        alpha_bar = float(scheduler.alphas_cumprod[timestep].double())
        self.sqrt_alpha_bar = math.sqrt(alpha_bar)
        self.sqrt_one_minus_alpha_bar = math.sqrt(1.0 - alpha_bar)
        self.prompts = PromptEncoder(tokenizer, text_encoder, prompt)
        self.unet = unet.requires_grad_(False)
        self.vae = vae.requires_grad_(False)
        self.train_conv_in = bool(train_conv_in)
        self.unet_config = unet_config
        self.vae_config = vae_config
        self.adapted_modules: dict[str, list[str]] = {}
        for part, model, config, name, preset in self._parts(unet_config, vae_config):
            self.adapted_modules[part] = _add_adapter(model, config, name, preset)
            model.requires_grad_(False)
            for param_name, param in model.named_parameters():
                pieces = param_name.split(".")  # e.g. encoder.conv_in.rankmoe_A.vae, ....rankmoe_router.vae.proj.weight
                if name in pieces and any(piece.startswith(("rankmoe_", "lora_")) for piece in pieces):
                    param.requires_grad_(True)
        if self.train_conv_in:
            for param in self._conv_in().parameters():
                param.requires_grad_(True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        unet_config: rankmoe.RankMoEConfig | LoraConfig | None = None,
        vae_config: rankmoe.RankMoEConfig | LoraConfig | None = None,
        train_conv_in: bool = False,
        prompt: PromptSource = "",
        timestep: int = 999,
        latent: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> OneStepSR:
        """Load tokenizer, text encoder, UNet, VAE and scheduler config from a diffusers-layout folder or hub id.

        Every part goes through ``<Class>.from_pretrained(path, subfolder=...)``, the same call for a local folder,
        a cached hub id and (when online) a download.

        Args:
            path: A local folder with ``tokenizer/ text_encoder/ unet/ vae/ scheduler/`` (SD 2.1 layout) or a hub id.
            unet_config, vae_config, train_conv_in, prompt, timestep, latent: See :class:`OneStepSR`.
            dtype: Dtype of the whole model, adapters included (default: as loaded, float32). Train in float32
                with autocast (``accelerate --mixed_precision fp16/bf16``); ``float16`` suits inference.
            device: Where to put the model (default: CPU).

        Returns:
            The model, in ``train()`` mode (frozen parts stay frozen; call ``eval()`` for inference).

        Raises:
            FileNotFoundError: For a missing local folder or a missing subfolder (the message names it).
            OSError: When a part cannot be loaded (the message names the part; the cause is chained).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source = _check_folder(path)
        loaders = {
            "tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel,
            "vae": AutoencoderKL, "scheduler": DDPMScheduler,
        }
        parts: dict[str, Any] = {}
        for name, loader in loaders.items():
            try:
                parts[name] = loader.from_pretrained(source, subfolder=name)
            except OSError as error:
                raise OSError(
                    f"could not load {name} ({loader.__name__}) from {os.fspath(path)!r}, subfolder {name!r}: {error}"
                ) from error
        model = cls(
            parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
            unet_config=unet_config, vae_config=vae_config, train_conv_in=train_conv_in, prompt=prompt,
            timestep=timestep, latent=latent,
        )
        return model.to(device=device, dtype=dtype)

    def _parts(self, unet_config: Any = None, vae_config: Any = None) -> list[tuple[str, nn.Module, Any, str, str]]:
        """``(part, model, config, adapter_name, preset)`` of each adapter that exists."""
        unet_config = self.unet_config if unet_config is None else unet_config
        vae_config = self.vae_config if vae_config is None else vae_config
        parts = []
        if unet_config is not None:
            parts.append(("unet", self.unet, unet_config, self.UNET_ADAPTER, "unet"))
        if vae_config is not None:
            parts.append(("vae", self.vae, vae_config, self.VAE_ADAPTER, "vae_encoder"))
        return parts

    def _conv_in(self) -> nn.Module:
        conv_in = self.unet.conv_in
        return conv_in.get_base_layer() if isinstance(conv_in, BaseTunerLayer) else conv_in

    # ------------------------------------------------------------------ parameters
    @property
    def prompt(self) -> PromptSource:
        """The prompt source (assignable: ``model.prompt = "a photo"``)."""
        return self.prompts.source

    @prompt.setter
    def prompt(self, value: PromptSource) -> None:
        self.prompts.source = value

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, as a list (adapters of the UNet and VAE encoder, and ``conv_in`` when on)."""
        return [param for _, param in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every trainable parameter, as a list (e.g. for weight-decay groups)."""
        return [(name, param) for name, param in self.named_parameters() if param.requires_grad]

    def routed_models(self) -> list[nn.Module]:
        """The adapted models (UNet, VAE) that carry RankMoE layers: pass them to ``rankmoe.aux_loss`` /
        ``rankmoe.routing_stats``."""
        return [model for _, model, config, _, _ in self._parts() if isinstance(config, rankmoe.RankMoEConfig)]

    def _needs_condition(self, model: nn.Module) -> bool:
        return any(
            getattr(router, "requires_condition", False)
            for _, layer in rankmoe.rankmoe_layers(model)
            for router in layer.rankmoe_router.values()
        )

    # ------------------------------------------------------------------ forward
    def x0_from_prediction(self, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate at the model's timestep.

        Args:
            latents: ``(b, 4, h, w)`` noisy latents ``z_t``.
            prediction: ``(b, 4, h, w)`` UNet output (epsilon, v or x0 per the scheduler's ``prediction_type``).

        Returns:
            ``(b, 4, h, w)`` x0: ``(z - sqrt(1 - abar) eps) / sqrt(abar)`` (epsilon) or
            ``sqrt(abar) z - sqrt(1 - abar) v`` (v-prediction).
        """
        if self.prediction_type == "epsilon":
            return (latents - self.sqrt_one_minus_alpha_bar * prediction) / self.sqrt_alpha_bar
        if self.prediction_type == "v_prediction":
            return self.sqrt_alpha_bar * latents - self.sqrt_one_minus_alpha_bar * prediction
        return prediction

    def encode(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE-encode an upsampled LR batch: ``(b, 3, H, W)`` in ``[0, 1]`` -> scaled latents ``(b, 4, h, w)``."""
        dist = self.vae.encode(lr.to(self.vae.dtype) * 2 - 1).latent_dist
        sample = self.latent == "sample" or (self.latent == "auto" and self.training)
        z = dist.sample(generator=generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents ``(b, 4, h, w)`` -> images ``(b, 3, H, W)`` in ``[0, 1]``."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        image = self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        return (image.clamp(-1, 1) + 1) / 2

    def forward(
        self,
        lr: torch.Tensor,
        condition: DegradationScores | torch.Tensor | None = None,
        severity: torch.Tensor | None = None,
        *,
        prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        return_latents: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Super-resolve an LR batch already upsampled to the output size.

        Args:
            lr: ``(b, 3, H, W)`` in ``[0, 1]``, ``H`` and ``W`` multiples of 8.
            condition: Routing condition of the RankMoE adapters: a ``DegradationScores`` (scores + severity) or a
                ``(b, c)`` tensor; required when an adapter routes on a condition.
            severity: ``(b,)`` in ``[0, 1]`` for the degradation-aware balance loss (overrides the scores').
            prompts: ``b`` prompts overriding the prompt source for this call.
            generator: RNG for sampling the VAE posterior.
            return_latents: Also return the predicted clean latent ``z_hat`` (for the VSD / GAN losses); call the
                model this way rather than through an attribute so that wrappers such as DDP see one forward.

        Returns:
            ``(b, 3, H, W)`` SR images in ``[0, 1]`` (float, the VAE's dtype); with ``return_latents`` the pair
            ``(sr, z_hat)`` with ``z_hat`` ``(b, 4, h, w)`` the scaled latent that was decoded.

        Raises:
            ValueError: For a wrong shape, a size that is not a multiple of 8, a missing condition, or a condition
                given to a model with no RankMoE adapter.
        """
        if not isinstance(lr, torch.Tensor) or lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(
                f"lr must be a (b, 3, H, W) tensor, got {type(lr).__name__} {tuple(getattr(lr, 'shape', ()))}"
            )
        height, width = lr.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not a multiple of 8 (the VAE's factor); crop or pad it"
            )
        routed = self.routed_models()
        if condition is None and severity is None:
            needing = [type(m).__name__ for m in routed if self._needs_condition(m)]
            if needing:
                raise ValueError(
                    f"the RankMoE adapter of {' and '.join(needing)} routes on a condition but none was given; pass "
                    "condition=DegradationScores (estimator(lr)) or a (b, condition_dim) tensor"
                )
        elif not routed:
            raise ValueError("a condition was given but the model has no RankMoE adapter to route with it")
        with contextlib.ExitStack() as stack:
            if condition is not None or severity is not None:
                for model in routed:
                    stack.enter_context(rankmoe.condition(model, condition, severity))
            latents = self.encode(lr, generator)
            text = self.prompts(lr, prompts).to(self.unet.dtype)
            t = torch.full((lr.shape[0],), self.timestep, device=latents.device, dtype=torch.long)
            prediction = self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=text).sample
        z_hat = self.x0_from_prediction(latents, prediction).to(self.vae.dtype)
        sr = self.decode(z_hat)
        return (sr, z_hat) if return_latents else sr

    # ------------------------------------------------------------------ checkpoints
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only weights: ``unet.<peft key>``, ``vae.<peft key>`` and ``conv_in.{weight,bias}`` (when on)."""
        from peft import get_peft_model_state_dict

        state: dict[str, torch.Tensor] = {}
        for part, model, _, name, _ in self._parts():
            for key, value in get_peft_model_state_dict(model, adapter_name=name).items():
                state[f"{part}.{key}"] = value
        if self.train_conv_in:
            for key, value in self._conv_in().state_dict().items():
                state[f"conv_in.{key}"] = value
        return state

    def _metadata(self) -> dict[str, Any]:
        adapters = {}
        for part, model, config, name, _ in self._parts():
            adapters[part] = {"adapter_name": name, "type": type(config).__name__,
                              "config": config_dict(model.peft_config[name])}
        return {"format": _FORMAT, "adapters": adapters, "train_conv_in": self.train_conv_in}

    def save_adapters(self, directory: str | os.PathLike[str]) -> Path:
        """Write an adapter-only checkpoint: ``adapters.safetensors`` (weights) and ``adapters.json`` (configs).

        Args:
            directory: Created if missing; the two files are overwritten.

        Returns:
            ``Path(directory)``.
        """
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(state, folder / ADAPTERS_WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / ADAPTERS_CONFIG_NAME).write_text(json.dumps(self._metadata(), indent=2, sort_keys=True) + "\n")
        return folder

    def load_adapters(self, directory: str | os.PathLike[str]) -> None:
        """Load a checkpoint written by :meth:`save_adapters` into this model's adapters (and ``conv_in``).

        Everything is checked before anything is copied, so a refused checkpoint leaves the model unchanged.

        Raises:
            FileNotFoundError: If the folder or one of its two files is missing.
            ValueError: If a file is corrupt, or the adapters, their configs, ``train_conv_in``, the tensor names or
                shapes differ from this model's (the message names the file or the first differences).
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(directory)
        for name in (ADAPTERS_CONFIG_NAME, ADAPTERS_WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"adapter checkpoint {folder} has no {name}")
        try:
            saved = json.loads((folder / ADAPTERS_CONFIG_NAME).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{folder / ADAPTERS_CONFIG_NAME} is not valid JSON ({error}); nothing was loaded"
            ) from error
        current = self._metadata()
        if saved.get("format") != _FORMAT:
            raise ValueError(
                f"{folder / ADAPTERS_CONFIG_NAME} has format {saved.get('format')!r}, expected {_FORMAT}"
            )
        try:
            state = load_file(folder / ADAPTERS_WEIGHTS_NAME)
        except Exception as error:  # safetensors raises SafetensorError (and OSError) for damaged files
            raise ValueError(
                f"{folder / ADAPTERS_WEIGHTS_NAME} is corrupt or truncated and cannot be read ({error}); nothing "
                "was loaded"
            ) from error
        problems = checkpoint_mismatches(saved, current, state, self.adapter_state_dict())
        if problems:
            raise ValueError(
                f"adapter checkpoint {folder} does not match this model (nothing was loaded): "
                + "; ".join(problems[:8])
            )
        with torch.no_grad():
            for part, model, _, name, _ in self._parts():
                prefix = f"{part}."
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                result = set_peft_model_state_dict(model, sub, adapter_name=name)
                unexpected_keys = getattr(result, "unexpected_keys", [])
                if unexpected_keys:  # cannot happen after the checks above; never ignore it silently
                    raise RuntimeError(f"peft did not place {part} tensor(s) {unexpected_keys[:3]}")
            if self.train_conv_in:
                for key, param in self._conv_in().named_parameters():
                    param.copy_(state[f"conv_in.{key}"])
