"""A tiny, randomly initialised model folder shaped like Stable Diffusion 2.1, in diffusers layout.

The folder has the layout of ``stabilityai/stable-diffusion-2-1-base`` (``model_index.json``, ``tokenizer/``,
``text_encoder/``, ``unet/``, ``vae/``, ``scheduler/``), every part written with ``save_pretrained``, so the recipe
loads it through exactly the ``from_pretrained(folder, subfolder=...)`` calls that load real weights. The module
names match SD 2.1 (4 down / up blocks, linear transformer projections, an 8x VAE), so adapter target presets
select the same kinds of modules; only the widths are tiny. Nothing is downloaded: the tokenizer is OpenAI CLIP's
real BPE tokenizer built from the vocabulary shipped with ``open_clip_torch``
(:func:`rankmoe.conditioning.clip_assets.build_clip_tokenizer`), with SD 2's pad token ``"!"``.

The weights are random: outputs are meaningless, shapes and code paths are real (tests, smoke runs, ``--tiny``).

Example:
    >>> folder = build_tiny_sd("/tmp/tiny-sd")  # doctest: +SKIP
    >>> model = OneStepSR.from_pretrained(folder, unet_config=cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["SD21_BASE_SCHEDULER", "TINY_TEXT_HIDDEN_SIZE", "build_tiny_sd"]

SD21_BASE_SCHEDULER: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
"""The noise-schedule settings of ``stabilityai/stable-diffusion-2-1-base`` (its ``scheduler_config.json``;
``set_alpha_to_one`` is read by DDIM / PNDM only and ignored by ``DDPMScheduler``)."""

TINY_TEXT_HIDDEN_SIZE = 32
"""Hidden size of the tiny CLIP text encoder, and hence the UNet's ``cross_attention_dim``."""


def build_tiny_sd(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny SD-2.1-shaped model (random weights) to ``folder`` in diffusers layout.

    Parts: a UNet with ``block_out_channels=(32, 32, 64, 64)``, three ``CrossAttnDownBlock2D`` and one
    ``DownBlock2D`` (mirrored going up), linear projections and ``cross_attention_dim=32`` (~2.5 M parameters); an
    ``AutoencoderKL`` with 4 blocks (8x down-sampling), 3 image and 4 latent channels, ``scaling_factor=0.18215``
    (~1 M); a 2-layer ``CLIPTextModel`` with hidden size 32 and the full 49,408-token vocabulary; OpenAI CLIP's BPE
    tokenizer; and a ``DDPMScheduler`` with SD-2.1-base's configuration (:data:`SD21_BASE_SCHEDULER`). About 20 MB
    on disk (the token embedding dominates), built in about a second.

    Args:
        folder: Where to write; created if missing (existing files of the same names are overwritten).
        seed: Seed of the random initialisation (the same seed writes the same weights).

    Returns:
        ``Path(folder)``.

    Raises:
        ImportError: If ``open_clip_torch`` (carrier of the BPE vocabulary) is not installed.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rankmoe.conditioning.clip_assets import build_clip_tokenizer

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(save_to=root / "tokenizer", pad_token="!")

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TINY_TEXT_HIDDEN_SIZE, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=49408, max_position_embeddings=77, projection_dim=TINY_TEXT_HIDDEN_SIZE,
                pad_token_id=1, bos_token_id=49406, eos_token_id=49407, hidden_act="gelu",
            )
        )
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=TINY_TEXT_HIDDEN_SIZE,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        )
    finally:
        torch.random.set_rng_state(state)
    text_encoder.save_pretrained(root / "text_encoder")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    # set_alpha_to_one is not a DDPMScheduler argument, but SD-2.1-base's scheduler_config.json carries it (the file
    # is shared with DDIM / PNDM); write it as the real file does, from_pretrained ignores it
    settings = {k: v for k, v in SD21_BASE_SCHEDULER.items() if k != "set_alpha_to_one"}
    DDPMScheduler(**settings).save_pretrained(root / "scheduler")
    config_file = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["set_alpha_to_one"] = SD21_BASE_SCHEDULER["set_alpha_to_one"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
