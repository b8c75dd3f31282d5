"""Recipe losses: LPIPS (offline weights), VSD, regulariser loss, GeneratorLoss on the tiny SD model."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")

from real_isr.losses import (  # noqa: E402
    FrozenUNet,
    GeneratorLoss,
    NoiseSchedule,
    diffusion_loss,
    forward_with_latents,
    make_regularizer_unet,
    vsd_loss,
)
from real_isr.lpips import LPIPS, vgg16_features  # noqa: E402
from real_isr.model import OneStepSR  # noqa: E402
from real_isr.tiny import build_tiny_sd  # noqa: E402

import rankmoe  # noqa: E402

UNET_CONFIG = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, router="condition",
                   router_kwargs={"condition_dim": 4}, balance_loss="degradation_aware", balance_loss_weight=0.01)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-losses"), seed=0)


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    return LPIPS(allow_random=True)


def test_lpips_properties(lpips_net):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lpips_net(x, x), torch.zeros(2))
    d = lpips_net(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips_net(y, x))
    assert not any(p.requires_grad for p in lpips_net.parameters())


def test_lpips_needs_files():
    with pytest.raises(ValueError, match="local weight files"):
        LPIPS()


def test_lpips_files_round_trip_and_hand_computation(lpips_net, tmp_path):
    torch.manual_seed(1)
    features = vgg16_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)  # ignored
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(state, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    net = LPIPS(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    for block in net.slices:
        for local, module in block.named_children():  # slices keep torchvision's indices
            if hasattr(module, "weight"):
                assert torch.equal(module.weight, state[f"features.{local}.weight"])
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, expected = (x - shift) / scale, (y - shift) / scale, 0.0
    with torch.no_grad():
        for k, (a, b) in enumerate(zip((0, 4, 9, 16, 23), (4, 9, 16, 23, 30), strict=True)):
            hx, hy = features[a:b](hx), features[a:b](hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            expected += ((nx - ny) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean()
    torch.testing.assert_close(net(x, y), expected.view(1), rtol=1e-4, atol=1e-6)


def _schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return NoiseSchedule(torch.cumprod(1 - betas, 0))


def test_vsd_matches_hand_computation_with_stub_unets():
    schedule = _schedule()
    reg = lambda x, t, encoder_hidden_states: SimpleNamespace(sample=0.5 * x + encoder_hidden_states.mean())  # noqa: E731
    fix = lambda x, t, encoder_hidden_states: SimpleNamespace(  # noqa: E731
        sample=torch.tanh(x) * encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    pos, neg = torch.rand(2, 3, 5, generator=g), torch.rand(1, 3, 5, generator=g)
    loss = vsd_loss(z, schedule, reg, fix, pos, neg, torch.Generator().manual_seed(7), cfg=7.5)
    g2 = torch.Generator().manual_seed(7)
    t = torch.randint(20, 980, (2,), generator=g2)
    noise = torch.randn(z.shape, generator=g2)
    ab = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    zd = z.detach()
    noisy = ab.sqrt() * zd + (1 - ab).sqrt() * noise
    x0 = lambda eps: (noisy - (1 - ab).sqrt() * eps) / ab.sqrt()  # noqa: E731
    x0_up = x0(reg(noisy, t, pos).sample)
    un, co = fix(noisy, t, neg.expand(2, -1, -1)).sample, fix(noisy, t, pos).sample
    x0_fix = x0(un + 7.5 * (co - un))
    grad = (x0_up - x0_fix) / (zd - x0_fix).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = ((zd - (zd - grad)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * grad / grad.numel(), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def setup(folder):
    torch.manual_seed(0)
    model = OneStepSR.from_pretrained(folder, unet_config=rankmoe.RankMoEConfig(**UNET_CONFIG), train_conv_in=True)
    frozen = FrozenUNet(model.unet)
    reg = make_regularizer_unet(folder)
    schedule = NoiseSchedule.from_pretrained(folder)
    text = model.prompts.encode(["a photo", "a photo"])
    neg = model.prompts.encode(["painting"])
    return model, frozen, reg, schedule, text, neg


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 4, generator=g)


def test_frozen_unet_is_base_unet(folder, setup):
    from diffusers import UNet2DConditionModel

    model, frozen, _, _, text, _ = setup
    assert set(frozen.frozen) == {"conv_in"}
    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        model.unet.conv_in.base_layer.weight.add_(0.1)  # the generator trains conv_in: frozen view keeps the copy
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
        flags = [p.requires_grad for p in model.unet.parameters()]
        torch.testing.assert_close(frozen(x, t, encoder_hidden_states=text).sample,
                                   base(x, t, encoder_hidden_states=text).sample)
        model.unet.conv_in.base_layer.weight.sub_(0.1)
    assert flags == [p.requires_grad for p in model.unet.parameters()]
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(not m.disable_adapters for m in model.unet.modules() if isinstance(m, BaseTunerLayer))


def test_vsd_and_diffusion_gradients(setup):
    model, frozen, reg, schedule, text, neg = setup
    model.zero_grad(set_to_none=True)
    reg.zero_grad(set_to_none=True)
    lr, _, cond = _batch(0)
    _, z_hat = forward_with_latents(model, lr, cond, torch.rand(2))
    loss = vsd_loss(z_hat, schedule, reg, frozen, text, neg, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is None for p in reg.parameters())
    dl = diffusion_loss(reg, z_hat, text, schedule, torch.Generator().manual_seed(1))
    assert torch.isfinite(dl)
    model.zero_grad(set_to_none=True)
    dl.backward()
    with_grad = {n for n, p in reg.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad is None for p in model.parameters())


def test_generator_loss_two_steps(setup, lpips_net):
    model, frozen, reg, schedule, text, neg = setup
    loss_fn = GeneratorLoss(lpips_net, schedule, reg, frozen)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    for step in range(2):
        lr, hr, cond = _batch(step)
        sr, z_hat = forward_with_latents(model, lr, cond, torch.rand(2))
        terms = loss_fn(sr, hr, z_hat, model.routed_models(), text, neg, torch.Generator().manual_seed(step))
        assert all(torch.isfinite(v) for v in terms.values()), terms
        assert terms["aux"].item() != 0
        expected = terms["l2"] + 2 * terms["lpips"] + terms["vsd"] + terms["aux"]
        torch.testing.assert_close(terms["total"], expected)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
