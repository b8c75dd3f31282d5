"""The one-step SR generator on a tiny SD-2.1-shaped folder loaded through ``from_pretrained`` (offline)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")  # carrier of the CLIP BPE vocabulary of the tiny tokenizer

from real_isr.checkpoints import ADAPTERS_WEIGHTS_NAME  # noqa: E402
from real_isr.model import OneStepSR  # noqa: E402
from real_isr.tiny import build_tiny_sd  # noqa: E402

import rankmoe  # noqa: E402
from rankmoe.conditioning.factory import degradation_estimator  # noqa: E402

UNET_CONFIG = dict(
    r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, router="condition", router_kwargs={"condition_dim": 4},
    balance_loss="degradation_aware", balance_loss_weight=0.01,
)


def unet_config(**changes: object) -> rankmoe.RankMoEConfig:
    return rankmoe.RankMoEConfig(**{**UNET_CONFIG, **changes})


def vae_config() -> rankmoe.RankMoEConfig:
    return rankmoe.RankMoEConfig(r=4, num_shared_ranks=4, top_k=0)  # all shared = plain LoRA


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="module")
def model(folder) -> OneStepSR:
    torch.manual_seed(0)
    return OneStepSR.from_pretrained(folder, unet_config=unet_config(), vae_config=vae_config(), train_conv_in=True)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=generator), torch.rand(2, 4, generator=generator), torch.rand(
        2, generator=generator
    )


def randomize_adapters(model: OneStepSR, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_tiny_folder_layout(folder) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (folder / sub).is_dir()
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 25e6


def test_forward_shape_range_and_weight_free_condition(model: OneStepSR, batch) -> None:
    lr, cond, severity = batch
    model.eval()
    with torch.no_grad():
        sr = model(lr, cond, severity)
        assert sr.shape == lr.shape and 0 <= sr.min() and sr.max() <= 1
        assert torch.equal(model.encode(lr), model.encode(lr))  # eval: posterior mode, deterministic
        image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
        scores = degradation_estimator()(image)  # weight-free, 4 scores
        assert model(image, scores).shape == image.shape
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.encode(lr), model.encode(lr))  # training: sampled latent (OSEDiff)


def test_x0_formula_equals_scheduler_step(folder) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = [cls.from_pretrained(folder, subfolder=name) for cls, name in (
        (CLIPTokenizer, "tokenizer"), (CLIPTextModel, "text_encoder"), (UNet2DConditionModel, "unet"),
        (AutoencoderKL, "vae"))]
    z, eps = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler.from_pretrained(
            folder, subfolder="scheduler", timestep_spacing="trailing", prediction_type=prediction_type
        )
        scheduler.set_timesteps(1)
        assert scheduler.timesteps.tolist() == [999]
        expected = scheduler.step(eps, 999, z).pred_original_sample
        plain = OneStepSR(*parts, scheduler)  # no adapters
        torch.testing.assert_close(plain.x0_from_prediction(z, eps), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no RankMoE adapter"):
        plain(torch.rand(1, 3, 64, 64), torch.rand(1, 4))


def test_gradients_reach_only_trainable_parameters(model: OneStepSR, batch) -> None:
    lr, cond, severity = batch
    model.train()
    model.zero_grad(set_to_none=True)
    trainable = model.named_trainable_parameters()
    names = [name for name, _ in trainable]
    assert isinstance(model.trainable_parameters(), list)
    assert any(name.startswith("unet.") and "rankmoe_" in name for name in names)
    assert any(name.startswith("vae.encoder") and "rankmoe_" in name for name in names)
    assert "unet.conv_in.base_layer.weight" in names and "unet.conv_in.base_layer.bias" in names
    assert not any(name.startswith(("prompts.", "vae.decoder")) for name in names)
    sr = model(lr, cond, severity)
    aux = rankmoe.aux_loss(model.unet)
    assert aux.total.item() != 0
    (sr.square().mean() + aux.total).backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == set(names)
    model.zero_grad(set_to_none=True)


def test_condition_required(model: OneStepSR, batch) -> None:
    with pytest.raises(ValueError, match="routes on a condition"):
        model(batch[0])


def test_sizes_must_be_multiples_of_8(model: OneStepSR) -> None:
    with pytest.raises(ValueError, match="60x64"):
        model(torch.rand(1, 3, 60, 64), torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        model(torch.rand(3, 64, 64), torch.rand(1, 4))


def test_prompt_sources(model: OneStepSR, batch) -> None:
    lr = batch[0]
    try:
        empty = model.prompts(lr)
        model.prompt = "a photo of a cat"
        fixed = model.prompts(lr)
        model.prompt = lambda images: [f"image {i}" for i in range(images.shape[0])]
        per_image = model.prompts(lr)
        assert empty.shape == fixed.shape == per_image.shape == (2, 77, 32)
        assert not torch.allclose(empty, fixed) and not torch.allclose(fixed, per_image)
        assert not torch.allclose(per_image[0], per_image[1]) and torch.equal(fixed[0], fixed[1])
        model.prompt = lambda images: ["only one"]
        with pytest.raises(ValueError, match="gave 1 prompt"):
            model.prompts(lr)
        with pytest.raises(TypeError, match="callable"):
            model.prompt = 3
    finally:
        model.prompt = ""
    torch.testing.assert_close(model.prompts(lr), empty)


def test_save_load_round_trip(model: OneStepSR, folder, batch, tmp_path) -> None:
    lr, cond, severity = batch
    randomize_adapters(model, seed=4)
    model.eval()
    with torch.no_grad():
        expected = model(lr, cond, severity)
    model.save_adapters(tmp_path / "ckpt")
    other = OneStepSR.from_pretrained(folder, unet_config=unet_config(), vae_config=vae_config(), train_conv_in=True)
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other(lr, cond, severity), expected)
        other.load_adapters(tmp_path / "ckpt")
        torch.testing.assert_close(other(lr, cond, severity), expected, rtol=0, atol=1e-6)


def test_mismatched_checkpoints_are_refused_untouched(model: OneStepSR, folder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model.save_adapters(tmp_path / "good")
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    smaller = OneStepSR.from_pretrained(folder, unet_config=unet_config(r=4), vae_config=vae_config())
    smaller.save_adapters(tmp_path / "r4")
    with pytest.raises(ValueError, match=r"nothing was loaded.*unet config r: checkpoint 4, model 8"):
        model.load_adapters(tmp_path / "r4")
    state = load_file(tmp_path / "good" / ADAPTERS_WEIGHTS_NAME)
    key = sorted(k for k in state if "rankmoe_A" in k)[0]
    for name, change in (("missing", lambda s: s.pop(key)), ("shape", lambda s: s.update({key: s[key][:1]}))):
        bad = tmp_path / name
        shutil.copytree(tmp_path / "good", bad)
        tampered = dict(state)
        change(tampered)
        save_file(tampered, bad / ADAPTERS_WEIGHTS_NAME)
        with pytest.raises(ValueError, match=name):
            model.load_adapters(bad)
    with pytest.raises(FileNotFoundError, match="adapters.json"):
        model.load_adapters(tmp_path / "nowhere")
    after = model.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_model_folder_and_subfolder(folder, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OneStepSR.from_pretrained(tmp_path / "no-such-model")
    partial = tmp_path / "partial"
    partial.mkdir()
    for sub in ("tokenizer", "text_encoder", "unet", "scheduler"):
        (partial / sub).symlink_to(folder / sub)
    with pytest.raises(FileNotFoundError, match=r"no vae/ subfolder"):
        OneStepSR.from_pretrained(partial)
