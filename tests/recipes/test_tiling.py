"""Latent tiling, colour fix and the inference driver (``real_isr.tiling``) on the tiny SD folder (offline).

Measured on the tiny random UNet (latent 40x24 from a 80x48 LR at x4; untiled x0 std 4.63): tiled x0 minus untiled
x0, max abs / mean abs: tile 16 overlap 8: 15.7 / 1.81; tile 24 overlap 8: 8.06 / 0.96; tile 32 overlap 16:
4.68 / 0.53. The interior (more than 2 latent px from any inner tile edge) is *not* closer than the tile borders
(tile 16: interior max 15.7 vs border max 12.1; tile 32: 4.68 vs 3.28): the tiny UNet's GroupNorm and
self-attention see the whole input, so a tile never reproduces the full-latent output. The blending itself is
checked exactly with a UNet of known receptive field (a 3x3 conv): there tiled equals untiled to rounding wherever
every covering tile holds the position at least one pixel inside its edges.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")  # carrier of the CLIP BPE vocabulary of the tiny tokenizer

from real_isr import tiling  # noqa: E402
from real_isr.model import OneStepSR  # noqa: E402
from real_isr.tiny import build_tiny_sd  # noqa: E402

import rankmoe  # noqa: E402
from rankmoe.conditioning.base import DegradationScores  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-tiling"), seed=0)


@pytest.fixture(scope="module")
def plain(folder) -> OneStepSR:
    return OneStepSR.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def routed(folder) -> OneStepSR:
    torch.manual_seed(0)
    config = rankmoe.RankMoEConfig(
        r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, router="condition", router_kwargs={"condition_dim": 4}
    )
    model = OneStepSR.from_pretrained(folder, unet_config=config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B so that routing changes the output
        for param in model.trainable_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def latents(model: OneStepSR, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
    with torch.no_grad():
        return model.encode(up), model.prompts(up)


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize(("size", "tile", "overlap"), [(200, 96, 32), (96, 96, 32), (40, 96, 32), (40, 16, 8),
                                                       (97, 96, 0), (25, 16, 15), (1, 1, 0)])
def test_tile_positions_cover_the_range(size: int, tile: int, overlap: int) -> None:
    starts = tiling.tile_positions(size, tile, overlap)
    side = min(tile, size)
    assert starts[0] == 0 and starts[-1] == size - side and starts == sorted(set(starts))
    covered = torch.zeros(size, dtype=torch.bool)
    for start in starts:
        covered[start : start + side] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    assert all(b - a >= 1 for a, b in zip(starts, starts[1:], strict=False))


def test_tile_positions_and_weights_errors() -> None:
    assert tiling.tile_positions(200, 96, 32) == [0, 64, 104]
    for args in ((0, 8, 2), (10, 0, 0), (10, 8, 8), (10, 8, -1), (10, 8, 1.5)):
        with pytest.raises(ValueError):
            tiling.tile_positions(*args)
    with pytest.raises(ValueError, match="sigma_frac"):
        tiling.gaussian_weights(8, 0.0)
    with pytest.raises(ValueError, match="tile"):
        tiling.gaussian_weights(0)


def test_gaussian_weights_positive_symmetric() -> None:
    weights = tiling.gaussian_weights(96)
    assert weights.shape == (96, 96) and (weights > 0).all() and weights.max() <= 1
    torch.testing.assert_close(weights, weights.T)
    torch.testing.assert_close(weights, weights.flip(0).flip(1))
    edge = torch.exp(torch.tensor(-((47.5 / 96) ** 2) / 0.02)).item()  # OSEDiff's variance 0.01
    assert weights[0, 0] / weights[47, 47] == pytest.approx(edge**2, rel=1e-3)
    assert tiling.gaussian_weights((4, 6)).shape == (4, 6)


# ------------------------------------------------------------------------------------------------ tiled UNet


class LocalUNet(torch.nn.Module):
    """A 'UNet' with a 3x3 receptive field and the diffusers call signature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.config = types.SimpleNamespace(out_channels=4)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    def forward(self, z, t, encoder_hidden_states):  # noqa: ANN001, ANN201
        return types.SimpleNamespace(sample=self.conv(z))


def test_blending_exact_where_receptive_field_fits(plain: OneStepSR) -> None:
    stub = types.SimpleNamespace(
        unet=LocalUNet(), timestep=999, routed_models=lambda: [], x0_from_prediction=plain.x0_from_prediction
    )
    z = torch.randn(2, 4, 40, 24, generator=torch.Generator().manual_seed(4))
    text = torch.zeros(1, 3, 8)
    with torch.no_grad():
        full = tiling.tiled_unet_x0(stub, z, text, tile=64)
        tiled = tiling.tiled_unet_x0(stub, z, text, tile=16, overlap=8, tile_batch_size=3)
    # exact (to rounding) where no covering tile has the position on its inner edge: rows/cols 1..6 of the 40x24
    # latent are held 1+ px inside by every tile (tile starts 0, 8, 16, 24 (rows); 0, 8 (cols))
    edges = torch.zeros(40, 24, dtype=torch.bool)
    for r in tiling.tile_positions(40, 16, 8):
        for e in (r, r + 15):
            if 0 < e < 39:
                edges[e, :] = True
    for c in tiling.tile_positions(24, 16, 8):
        for e in (c, c + 15):
            if 0 < e < 23:
                edges[:, e] = True
    diff = (tiled - full).abs().amax(dim=(0, 1))
    assert diff[~edges].max() < 1e-3  # x0 amplifies eps by 1/sqrt(abar) ~ 15: rounding of the blend only
    # the tile edges (zero padding inside the conv) barely count with Gaussian weights (edge weight ~5e-6) but do
    # with nearly flat weights
    with torch.no_grad():
        flat = tiling.tiled_unet_x0(stub, z, text, tile=16, overlap=8, sigma_frac=100.0)
    flat_diff = (flat - full).abs().amax(dim=(0, 1))
    assert flat_diff[~edges].max() < 1e-3 and flat_diff[edges].max() > 1e-2


def test_tiled_single_tile_is_untiled(plain: OneStepSR) -> None:
    lr = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = plain(torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1))
        z, text = latents(plain, lr)
        assert z.shape[-2:] == (16, 12)
        prediction = plain.unet(z, torch.full((1,), 999), encoder_hidden_states=text).sample
        x0 = tiling.tiled_unet_x0(plain, z, text, tile=16, overlap=8)
        assert torch.equal(x0, plain.x0_from_prediction(z, prediction))
        sr = tiling.super_resolve(plain, lr, tile=16, overlap=8, color_fix=None)
    assert torch.equal(sr, expected)


def test_tiled_inference_size_and_measured_difference(plain: OneStepSR) -> None:
    lr = torch.rand(1, 3, 80, 48, generator=torch.Generator().manual_seed(0))
    z, text = latents(plain, lr)
    with torch.no_grad():
        full = tiling.tiled_unet_x0(plain, z, text, tile=96)
        tiled = tiling.tiled_unet_x0(plain, z, text, tile=16, overlap=8)
    diff = (tiled - full).abs()
    assert torch.isfinite(tiled).all() and diff.max() > 0
    assert diff.mean() < 0.6 * full.std()  # measured 1.81 vs std 4.63 (see the module docstring)
    with torch.no_grad():
        for shape, fixes in (((1, 3, 75, 50), ("adain",)), ((1, 3, 15, 17), tiling.COLOR_FIXES)):
            for fix in fixes:  # 300x200 -> padded to 304x200; 60x68 -> 64x72
                sr = tiling.super_resolve(plain, torch.rand(shape), tile=16, overlap=8, color_fix=fix)
                assert sr.shape == (1, 3, shape[2] * 4, shape[3] * 4) and 0 <= sr.min() and sr.max() <= 1


def test_condition_per_image_reaches_every_tile(routed: OneStepSR) -> None:
    generator = torch.Generator().manual_seed(8)
    lr = torch.rand(2, 3, 48, 32, generator=generator)  # latent 24x16: 2 tiles of 16
    scores = DegradationScores(torch.rand(2, 4, generator=generator), torch.rand(2, generator=generator),
                               ("a", "b", "c", "d"))
    z, text = latents(routed, lr)
    with torch.no_grad():
        both = tiling.tiled_unet_x0(routed, z, text, scores, tile=16, overlap=8, tile_batch_size=5)
        for i in range(2):
            alone = tiling.tiled_unet_x0(routed, z[i : i + 1], text[i : i + 1], scores[i], tile=16, overlap=8)
            torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-3, atol=1e-3)  # measured 1.5e-4
        swapped = tiling.tiled_unet_x0(routed, z, text, scores[[1, 0]], tile=16, overlap=8)
        assert not torch.allclose(swapped, both, atol=1e-3)  # the condition matters
        with pytest.raises(ValueError, match="routes on a condition"):
            tiling.tiled_unet_x0(routed, z, text, tile=16, overlap=8)
        sr = tiling.super_resolve(routed, lr[:1], condition=scores[0], tile=16, overlap=8)
        assert sr.shape == (1, 3, 192, 128)


def test_padding_reflect_or_replicate() -> None:
    image = torch.rand(1, 3, 20, 13)
    padded = tiling._pad_to_multiple(image, 8)
    assert padded.shape == (1, 3, 24, 16) and torch.equal(padded[..., :20, :13], image)
    torch.testing.assert_close(padded[..., 20, :13], image[..., 18, :])  # reflect
    tiny = tiling._pad_to_multiple(torch.rand(1, 3, 2, 3), 8)
    assert tiny.shape == (1, 3, 8, 8) and torch.equal(tiny[..., 7, 2], tiny[..., 1, 2])  # replicate


def test_errors_for_wrong_shapes(plain: OneStepSR) -> None:
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="lr_image"):
        tiling.super_resolve(plain, torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="lr_image"):
        tiling.super_resolve(plain, torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="scale"):
        tiling.super_resolve(plain, torch.rand(1, 3, 16, 16), scale=0)
    with pytest.raises(ValueError, match="color_fix"):
        tiling.super_resolve(plain, torch.rand(1, 3, 16, 16), color_fix="histogram")
    with pytest.raises(ValueError, match="no RankMoE adapter"):
        tiling.super_resolve(plain, torch.rand(1, 3, 16, 16), condition=torch.rand(1, 4))
    with pytest.raises(ValueError, match="z must be"):
        tiling.tiled_unet_x0(plain, torch.zeros(4, 8, 8), torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="text_emb"):
        tiling.tiled_unet_x0(plain, torch.zeros(2, 4, 8, 8), torch.zeros(3, 77, 32))
    with pytest.raises(ValueError, match="overlap"):
        tiling.tiled_unet_x0(plain, z, torch.zeros(1, 77, 32), tile=4, overlap=4)
    with pytest.raises(ValueError, match="same shape"):
        tiling.wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="same batch"):
        tiling.adain_color_fix(torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        tiling.adain_color_fix(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


# ------------------------------------------------------------------------------------------------ colour fix


def test_adain_matches_reference_statistics() -> None:
    generator = torch.Generator().manual_seed(9)
    output = torch.rand(2, 3, 40, 30, generator=generator) * 0.3
    reference = torch.rand(2, 3, 20, 24, generator=generator) * 0.8 + 0.1
    fixed = tiling.adain_color_fix(output, reference)
    assert fixed.shape == output.shape
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed.flatten(2).std(-1), reference.flatten(2).std(-1), rtol=1e-3, atol=1e-4)


def test_wavelet_transfers_low_and_keeps_high_frequencies() -> None:
    size = 96
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((ii + jj) % 2 * 2 - 1).float() * 0.05  # highest frequency: every level's low-pass removes it
    output = (0.7 + checker).expand(1, 3, size, size)
    reference = torch.full((1, 3, size, size), 0.2)
    fixed = tiling.wavelet_color_fix(output, reference)
    interior = (slice(None), slice(None), slice(32, -32), slice(32, -32))  # 1+2+4+8+16 = 31 px of border effects
    torch.testing.assert_close(fixed[interior], (0.2 + checker).expand(1, 3, size, size)[interior])
    # a constant reference transfers exactly everywhere when the output is constant too
    torch.testing.assert_close(tiling.wavelet_color_fix(torch.full_like(reference, 0.9), reference), reference)
    # identity: an image fixed against itself, and high + low = image
    image = torch.rand(2, 3, 50, 40, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(tiling.wavelet_color_fix(image, image), image)
    high, low = tiling.wavelet_decomposition(image)
    torch.testing.assert_close(high + low, image)
    with pytest.raises(ValueError, match="method|color_fix"):
        tiling.apply_color_fix(image, image, "nofix")
