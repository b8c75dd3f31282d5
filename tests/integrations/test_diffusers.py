"""diffusers presets and add_rankmoe on tiny SD-shaped models built from configs."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from rankmoe.integrations.diffusers import (
    UNET_TARGET_SUFFIXES,
    add_rankmoe,
    unet_target_modules,
    vae_encoder_target_modules,
)

import rankmoe
from tests.conftest import tiny_unet


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16,
    ).eval()


def test_unet_preset_selects_osediff_modules_and_parts_partition_it() -> None:
    unet = tiny_unet()
    names = unet_target_modules(unet)
    modules = dict(unet.named_modules())
    assert all(any(n == s or n.endswith("." + s) for s in UNET_TARGET_SUFFIXES) for n in names)
    assert {"conv_in", "conv_out"} <= set(names)
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert all(isinstance(modules[n], (torch.nn.Linear, torch.nn.Conv2d)) for n in names)
    assert not any("time_emb" in n or n.endswith("norm") for n in names)
    # every Linear / Conv2d whose name ends with a preset suffix is selected
    expected = {n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                and any(n == s or n.endswith("." + s) for s in UNET_TARGET_SUFFIXES)}
    assert set(names) == expected
    parts = [set(unet_target_modules(unet, part)) for part in ("down", "mid", "up", "other")]
    assert set().union(*parts) == set(names) and sum(map(len, parts)) == len(names)
    assert parts[3] == {"conv_in", "conv_out"}


def test_vae_preset_is_encoder_only() -> None:
    names = vae_encoder_target_modules(tiny_vae())
    assert "quant_conv" in names and "post_quant_conv" not in names
    assert all(n.startswith("encoder.") or n == "quant_conv" for n in names)
    assert "encoder.conv_in" in names and "encoder.conv_out" in names


def test_add_rankmoe_adapts_the_preset_and_routes_under_cfg() -> None:
    unet = tiny_unet()
    config = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, num_zero_experts=1, init_weights=False,
                                   router="condition", router_kwargs={"condition_dim": 3})
    names = add_rankmoe(unet, config)
    assert names == unet_target_modules(unet)
    assert config.target_modules is None  # the caller's config is not modified
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 5, 8)
    scores = torch.rand(2, 3)
    with torch.no_grad():
        with rankmoe.condition(unet, scores):
            single = unet(sample, t, encoder_hidden_states=text).sample
        # classifier-free guidance doubles the batch as [uncond; cond]: repeat="tile" reuses the rows
        with rankmoe.condition(unet, scores, repeat="tile"):
            doubled = unet(sample.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=text.repeat(2, 1, 1)).sample
    torch.testing.assert_close(doubled[:2], single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doubled[2:], single, rtol=1e-5, atol=1e-6)

    vae = tiny_vae()
    vae_names = add_rankmoe(vae, rankmoe.RankMoEConfig(r=4, num_shared_ranks=4, top_k=0), adapter_name="enc")
    assert vae_names == vae_encoder_target_modules(vae)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 16, 16)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)


def test_bad_arguments_are_clear_errors() -> None:
    unet = tiny_unet()
    config = rankmoe.RankMoEConfig(r=4, num_shared_ranks=4, top_k=0)
    with pytest.raises(ValueError, match="preset"):
        add_rankmoe(unet, config, preset="text_encoder")
    with pytest.raises(ValueError, match="part"):
        unet_target_modules(unet, "middle")
    with pytest.raises(TypeError, match="get_peft_model"):
        add_rankmoe(torch.nn.Linear(4, 4), config)
    with pytest.raises(ValueError, match="UNet preset"):
        unet_target_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="VAE-encoder preset"):
        vae_encoder_target_modules(unet)
