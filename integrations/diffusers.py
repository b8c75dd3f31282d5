"""diffusers support: target-module presets for the Stable Diffusion UNet and VAE encoder, and one-call adapters.

The presets follow OSEDiff, which MoR extends: every attention projection, feed-forward projection, transformer
``proj_in`` / ``proj_out`` and resnet / sampler convolution of the UNet, and the convolutions and attention
projections of the VAE *encoder* plus its ``quant_conv`` (the decoder stays frozen). Names are matched on the
last part of the module name, so the same presets fit SD 1.x / 2.x and SDXL-shaped UNets.

```python
from diffusers import UNet2DConditionModel
import rankmoe
from rankmoe.integrations.diffusers import add_rankmoe

unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
config = rankmoe.RankMoEConfig(r=40, num_shared_ranks=8, top_k=8, num_zero_experts=4, router="condition",
                               router_kwargs={"condition_dim": 7}, balance_loss="degradation_aware")
names = add_rankmoe(unet, config)            # target_modules filled from the UNet preset
with rankmoe.condition(unet, scores):         # DegradationScores of the batch
    noise_pred = unet(latents, t, encoder_hidden_states=text).sample
```

Inside a pipeline call the condition reaches the UNet the same way; with classifier-free guidance the UNet sees
twice the batch, so pass ``repeat="tile"``: ``with rankmoe.condition(pipe.unet, scores, repeat="tile"): pipe(...)``.
diffusers' LoRA scale controls work on RankMoE adapters too: ``unet.set_adapters([...], weights=[...])`` and
``cross_attention_kwargs={"scale": s}`` scale the whole update (shared and routed ranks).
"""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rankmoe.config import RankMoEConfig

__all__ = [
    "UNET_TARGET_SUFFIXES",
    "VAE_ENCODER_TARGET_SUFFIXES",
    "add_rankmoe",
    "unet_target_modules",
    "vae_encoder_target_modules",
]

UNET_TARGET_SUFFIXES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
)
"""Module-name endings adapted in the UNet (OSEDiff's list): attention, feed-forward, transformer projections and
every resnet / down- / up-sampler convolution, plus ``conv_in`` and ``conv_out``."""

VAE_ENCODER_TARGET_SUFFIXES: tuple[str, ...] = (
    "conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out", "to_q", "to_k", "to_v", "to_out.0",
)
"""Module-name endings adapted inside the VAE's ``encoder`` (OSEDiff's list); ``quant_conv`` is added as well."""

_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PARTS = ("all", "down", "mid", "up", "other")


def _ends_with(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _part_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "other")


def _adaptable(module: nn.Module) -> bool:
    """An ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1``, or a PEFT tuner layer around one."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(module, _ADAPTABLE) and getattr(module, "groups", 1) == 1


def unet_target_modules(
    unet: nn.Module, parts: str | Iterable[str] = "all", suffixes: Iterable[str] = UNET_TARGET_SUFFIXES
) -> list[str]:
    """Full names of the UNet modules the preset adapts.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (or any model with the same module names).
        parts: ``"all"`` or any of ``"down"`` (``down_blocks``), ``"mid"`` (``mid_block``), ``"up"``
            (``up_blocks``), ``"other"`` (``conv_in``, ``conv_out``, embeddings): OSEDiff puts one LoRA on each
            of down (+ ``conv_in``), up (+ ``conv_out``) and the rest.
        suffixes: Module-name endings to match (default :data:`UNET_TARGET_SUFFIXES`).

    Returns:
        Sorted module names (``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` only).

    Raises:
        ValueError: For an unknown part, or when nothing matches (not a UNet-shaped model).
    """
    wanted = {parts} if isinstance(parts, str) else set(parts)
    unknown = wanted - set(_PARTS)
    if unknown:
        raise ValueError(f"unknown UNet part(s) {sorted(unknown)}; choose from {list(_PARTS)}")
    names = sorted(
        name
        for name, module in unet.named_modules()
        if name and _adaptable(module) and _ends_with(name, suffixes)
        and ("all" in wanted or _part_of(name) in wanted)
    )
    if not names:
        raise ValueError(
            f"no module of {type(unet).__name__} matches the UNet preset (parts={sorted(wanted)}); is this a "
            "diffusers UNet2DConditionModel? Pass target_modules yourself for other models"
        )
    return names


def vae_encoder_target_modules(vae: nn.Module, suffixes: Iterable[str] = VAE_ENCODER_TARGET_SUFFIXES) -> list[str]:
    """Full names of the VAE-encoder modules the preset adapts: encoder convolutions / attention and ``quant_conv``.

    Args:
        vae: A diffusers ``AutoencoderKL`` (the decoder and ``post_quant_conv`` are never selected).
        suffixes: Module-name endings to match inside ``encoder`` (default :data:`VAE_ENCODER_TARGET_SUFFIXES`).

    Returns:
        Sorted module names.

    Raises:
        ValueError: When nothing matches (not an ``AutoencoderKL``-shaped model).
    """
    names = sorted(
        name
        for name, module in vae.named_modules()
        if _adaptable(module)
        and ((name.startswith("encoder.") and _ends_with(name, suffixes)) or name == "quant_conv")
    )
    if not names:
        raise ValueError(
            f"no module of {type(vae).__name__} matches the VAE-encoder preset; is this a diffusers AutoencoderKL?"
        )
    return names


def add_rankmoe(
    model: nn.Module,
    config: RankMoEConfig,
    adapter_name: str = "default",
    *,
    preset: str | None = None,
    parts: str | Iterable[str] = "all",
) -> list[str]:
    """Add a RankMoE adapter to a diffusers model in one call, with the preset's target modules.

    ``config.target_modules`` is used when set; otherwise it is filled from the preset and the config is left
    unchanged (a copy carries the names; PEFT may shorten a long list to the fewest name endings that select the
    same modules of this model, which is what a saved ``adapter_config.json`` then holds). The adapter is added
    with diffusers' ``model.add_adapter`` (so ``save_pretrained`` / ``set_adapters`` / ``disable_adapters`` work as
    for LoRA) and made active.

    Args:
        model: A diffusers ``UNet2DConditionModel`` or ``AutoencoderKL`` (anything with ``add_adapter``).
        config: The adapter's configuration.
        adapter_name: Name of the new adapter.
        preset: ``"unet"``, ``"vae_encoder"`` or ``None`` (guess from the model: ``AutoencoderKL``-like models with
            an ``encoder`` and ``quant_conv`` get the VAE preset, everything else the UNet preset).
        parts: UNet parts to adapt (see :func:`unet_target_modules`).

    Returns:
        The adapted module names.

    Raises:
        TypeError: If ``model`` has no ``add_adapter`` (not a diffusers model; use ``peft.get_peft_model``).
        ValueError: For an unknown preset or when the preset matches nothing.
    """
    if not hasattr(model, "add_adapter"):
        raise TypeError(
            f"{type(model).__name__} has no add_adapter; add_rankmoe is for diffusers models, use "
            "peft.get_peft_model(model, config) for others"
        )
    if preset is None:
        preset = "vae_encoder" if hasattr(model, "encoder") and hasattr(model, "quant_conv") else "unet"
    if preset not in ("unet", "vae_encoder"):
        raise ValueError(f"preset must be 'unet', 'vae_encoder' or None, got {preset!r}")
    if config.target_modules is None:
        names = unet_target_modules(model, parts) if preset == "unet" else vae_encoder_target_modules(model)
        config = RankMoEConfig(**{**config.to_dict(), "target_modules": names, "peft_type": None})
    model.add_adapter(config, adapter_name=adapter_name)
    model.set_adapter(adapter_name)
    from rankmoe.condition import rankmoe_layers

    return sorted(
        name for name, layer in rankmoe_layers(model) if adapter_name in getattr(layer, "rankmoe_A", {})
    )
