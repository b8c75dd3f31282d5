"""Real-ISR recipe degradations: kernels, filtering, noise, JPEG, the second-order pipeline and its parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from real_isr import degradations as deg
from real_isr import kernels as kern
from real_isr.degradations import DegradationParams, RealESRGANDegradation
from real_isr.kernels import KERNEL_TYPES, KernelParams
from scipy import ndimage, special

TOL = 1e-9  # slack for float64 range checks


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in a DataLoader worker; it also spares tiny ops an OpenMP wake-up on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


odd_sizes = st.integers(0, 12).map(lambda i: 2 * i + 1)
sigmas = st.floats(0.1, 6.0)
betas = st.floats(0.3, 6.0)
angles = st.floats(-math.pi, math.pi)
cutoffs = st.floats(0.2, math.pi)


def crop(image: torch.Tensor, size: int, top: int = 180, left: int = 190) -> torch.Tensor:
    return image[..., top : top + size, left : left + size].contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


def in_range(values: torch.Tensor, bounds: tuple[float, float]) -> bool:
    values = values[~values.isnan()]
    return bool(((values >= bounds[0] - TOL) & (values <= bounds[1] + TOL)).all())


# ---------------------------------------------------------------------------------------------------- kernels


@given(size=odd_sizes, sx=sigmas, sy=sigmas, theta=angles, beta=betas, cutoff=cutoffs)
def test_every_kernel_sums_to_one_with_the_requested_odd_shape(size, sx, sy, theta, beta, cutoff):
    built = [
        kern.gaussian_kernel(size, sx),
        kern.gaussian_kernel(size, sx, sy, theta),
        kern.generalized_gaussian_kernel(size, sx, None, 0.0, beta),
        kern.generalized_gaussian_kernel(size, sx, sy, theta, beta),
        kern.plateau_kernel(size, sx, None, 0.0, beta),
        kern.plateau_kernel(size, sx, sy, theta, beta),
        kern.sinc_kernel(size, cutoff),
        kern.pulse_kernel(size),
    ]
    for kernel in built:
        assert kernel.shape == (size, size)
        assert kernel.dtype == torch.float32
        assert torch.isfinite(kernel).all()
        assert abs(float(kernel.double().sum()) - 1.0) < 1e-5


@given(size=odd_sizes, sx=sigmas, beta=betas, cutoff=cutoffs)
def test_isotropic_kernels_are_symmetric(size, sx, beta, cutoff):
    for kernel in (
        kern.gaussian_kernel(size, sx),
        kern.generalized_gaussian_kernel(size, sx, beta=beta),
        kern.plateau_kernel(size, sx, beta=beta),
        kern.sinc_kernel(size, cutoff),
    ):
        torch.testing.assert_close(kernel, kernel.T, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kernel, kernel.flip(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kernel, kernel.flip(1), rtol=1e-5, atol=1e-7)


@given(size=odd_sizes, sx=sigmas, sy=sigmas, theta=angles, beta=betas)
def test_rotation_is_a_rotation(size, sx, sy, theta, beta):
    # a quarter turn swaps the axes; a half turn changes nothing; point symmetry always holds
    for build in (kern.gaussian_kernel, kern.generalized_gaussian_kernel, kern.plateau_kernel):
        extra = {} if build is kern.gaussian_kernel else {"beta": beta}
        quarter = build(size, sx, sy, math.pi / 2, **extra)
        torch.testing.assert_close(quarter, build(size, sy, sx, 0.0, **extra), rtol=1e-4, atol=1e-7)
        turned = build(size, sx, sy, theta, **extra)
        torch.testing.assert_close(turned, build(size, sx, sy, theta + math.pi, **extra), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(turned, turned.flip(0, 1), rtol=1e-4, atol=1e-7)


def test_gaussian_and_sinc_match_their_closed_forms():
    size, sigma = 9, 1.7
    ax = np.arange(size) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    expected = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    np.testing.assert_allclose(kern.gaussian_kernel(size, sigma, dtype=torch.float64), expected / expected.sum())

    size, omega = 15, 1.3
    kernel = kern.sinc_kernel(size, omega, dtype=torch.float64).numpy()
    c = size // 2
    centre = omega**2 / (4 * np.pi)
    for dy, dx in [(0, 1), (1, 1), (2, 3), (0, 7), (5, 6), (-4, 2)]:
        r = math.hypot(dx, dy)
        closed = omega * special.j1(omega * r) / (2 * np.pi * r)
        assert kernel[c + dy, c + dx] / kernel[c, c] == pytest.approx(closed / centre, rel=1e-6)


def test_batched_builders_match_scalar_ones():
    sx, sy, theta, beta = (
        torch.tensor([0.5, 2.0]),
        torch.tensor([1.0, 3.0]),
        torch.tensor([0.3, -1.0]),
        torch.tensor([0.7, 2.5]),
    )
    batch = kern.generalized_gaussian_kernel(11, sx, sy, theta, beta)
    assert batch.shape == (2, 11, 11)
    for i in range(2):
        torch.testing.assert_close(
            batch[i], kern.generalized_gaussian_kernel(11, float(sx[i]), float(sy[i]), float(theta[i]), float(beta[i]))
        )
    sinc = kern.sinc_kernel(7, torch.tensor([1.0, 2.0, 3.0]))
    assert sinc.shape == (3, 7, 7)
    torch.testing.assert_close(sinc[1], kern.sinc_kernel(7, 2.0))


def test_kernel_builders_reject_bad_arguments():
    for size in (0, 4, -3):
        with pytest.raises(ValueError, match="odd"):
            kern.gaussian_kernel(size, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        kern.gaussian_kernel(5, 0.0)
    with pytest.raises(ValueError, match="beta"):
        kern.plateau_kernel(5, 1.0, beta=0.0)
    with pytest.raises(ValueError, match="cutoff"):
        kern.sinc_kernel(5, -1.0)
    padded = kern.pad_kernel(kern.pulse_kernel(3), 9)
    assert padded.shape == (9, 9) and padded[4, 4] == 1 and padded.sum() == 1
    with pytest.raises(ValueError):
        kern.pad_kernel(kern.pulse_kernel(9), 5)


@st.composite
def kernel_params(draw) -> KernelParams:
    kinds = tuple(draw(st.lists(st.sampled_from(KERNEL_TYPES), min_size=1, max_size=4, unique=True)))
    weights = draw(st.lists(st.integers(0, 3), min_size=len(kinds), max_size=len(kinds)).filter(any))
    lo = draw(st.integers(0, 10)) * 2 + 1
    hi = lo + 2 * draw(st.integers(0, 3))
    return KernelParams(
        kernel_list=kinds,
        kernel_prob=tuple(w / sum(weights) for w in weights),
        kernel_size_range=(lo, hi),
        sigma_range=draw(narrow(0.1, 4.0)),
        rotation_range=draw(narrow(-math.pi, math.pi)),
        betag_range=draw(narrow(0.3, 5.0)),
        betap_range=draw(narrow(0.5, 3.0)),
        sinc_prob=draw(st.sampled_from([0.0, 1.0, 0.5])),
        sinc_cutoff_range=draw(narrow(0.2, math.pi)),
        sinc_cutoff_range_large=draw(narrow(0.2, math.pi)),
        sinc_large_size=draw(st.integers(1, 25)),
    )


def narrow(low: float, high: float):
    """A sub-range ``(a, b)`` of ``[low, high]``, sometimes a single point."""
    return st.tuples(st.floats(low, high), st.floats(0.0, 0.25)).map(
        lambda t: (t[0], min(high, t[0] + t[1] * (high - low)))
    )


def check_kernel_record(record, kernels, params: KernelParams, b: int) -> None:
    big = params.padded_size
    assert kernels.shape == (b, big, big)
    torch.testing.assert_close(
        kernels.double().sum(dim=(-2, -1)), torch.ones(b, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert all(int(s) % 2 == 1 for s in record.size)
    assert in_range(record.size.double(), params.kernel_size_range)
    for i, kind in enumerate(record.kind):
        size = int(record.size[i])
        outside = torch.ones(big, big, dtype=torch.bool)
        pad = (big - size) // 2
        outside[pad : pad + size, pad : pad + size] = False
        assert (kernels[i][outside] == 0).all(), "kernel support larger than its drawn size"
        assert kind in params.kernel_list or kind == kern.SINC
        if kind == kern.SINC:
            bounds = params.sinc_cutoff_range if size < params.sinc_large_size else params.sinc_cutoff_range_large
            assert in_range(record.cutoff[i : i + 1], bounds) and not record.cutoff[i].isnan()
            assert record.sigma_x[i].isnan() and record.beta[i].isnan()
        elif kind == "pulse":
            assert kernels[i][big // 2, big // 2] == 1
        else:
            assert in_range(record.sigma_x[i : i + 1], params.sigma_range)
            assert in_range(record.sigma_y[i : i + 1], params.sigma_range)
            if "aniso" in kind:
                assert in_range(record.theta[i : i + 1], params.rotation_range) and not record.theta[i].isnan()
            else:
                assert record.sigma_y[i] == record.sigma_x[i] and record.theta[i].isnan()
            if kind.startswith("generalized"):
                assert in_range(record.beta[i : i + 1], params.betag_range) and not record.beta[i].isnan()
            elif kind.startswith("plateau"):
                assert in_range(record.beta[i : i + 1], params.betap_range) and not record.beta[i].isnan()
            else:
                assert record.beta[i].isnan()
            assert record.cutoff[i].isnan()
    sinc = torch.tensor([k == kern.SINC for k in record.kind])
    if params.sinc_prob in (0.0, 1.0):
        assert bool((sinc == (params.sinc_prob == 1.0)).all())
    for kind, prob in zip(params.kernel_list, params.kernel_prob, strict=True):
        if prob == 0:
            assert kind not in record.kind


@given(params=kernel_params(), seed=st.integers(0, 2**31 - 1))
def test_random_mixed_kernel_honours_its_ranges(params, seed):
    g = torch.Generator().manual_seed(seed)
    kernels, record = kern.random_mixed_kernel(params, g, batch_size=6)
    check_kernel_record(record, kernels, params, 6)
    again, _ = kern.random_mixed_kernel(params, torch.Generator().manual_seed(seed), batch_size=6)
    assert torch.equal(kernels, again)


def test_beta_draw_splits_around_one_like_basicsr():
    g = torch.Generator().manual_seed(0)
    beta = kern.draw_beta(g, 4000, (0.5, 4.0))
    assert in_range(beta, (0.5, 4.0))
    assert 0.45 < float((beta < 1).double().mean()) < 0.55  # half below 1 although [0.5, 1] is 1/7 of the range
    plateau = kern.draw_beta(g, 4000, (1.0, 2.0))
    assert in_range(plateau, (1.0, 2.0)) and 0.45 < float((plateau == 1).double().mean()) < 0.55


# ---------------------------------------------------------------------------------------------------- filter2d


@given(b=st.integers(1, 3), h=st.integers(12, 20), w=st.integers(12, 20), size=odd_sizes)
def test_filter2d_with_a_pulse_is_the_identity(b, h, w, size):
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    torch.testing.assert_close(kern.filter2d(x, kern.pulse_kernel(size)), x)
    torch.testing.assert_close(kern.filter2d(x, kern.pulse_kernel(size, b)), x)
    torch.testing.assert_close(kern.filter2d(x, kern.pad_kernel(kern.pulse_kernel(3), 21)[None]), x)


def test_filter2d_per_sample_equals_a_loop_of_reflect_padded_correlations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 29, generator=g, dtype=torch.float64)
    kernels = torch.rand(3, 7, 7, generator=g, dtype=torch.float64)
    kernels[0, :, 0] = 0  # asymmetric and not trimmable as a whole
    out = kern.filter2d(x, kernels)
    assert out.shape == x.shape
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], kern.filter2d(x[i : i + 1], kernels[i]))
        for c in range(3):  # torch 'reflect' padding is scipy's 'mirror'; conv2d is a correlation
            ref = ndimage.correlate(x[i, c].numpy(), kernels[i].numpy(), mode="mirror")
            np.testing.assert_allclose(out[i, c].numpy(), ref, rtol=1e-10, atol=1e-12)
    padded = kern.pad_kernel(kernels, 21)
    torch.testing.assert_close(kern.filter2d(x, padded), out)  # zero rings trimmed: same result


def test_filter2d_on_images_smaller_than_the_padding_and_bad_shapes():
    x = torch.rand(2, 3, 5, 6)
    out = kern.filter2d(x, kern.gaussian_kernel(21, 3.0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        kern.filter2d(x, torch.ones(4, 4))
    with pytest.raises(ValueError):
        kern.filter2d(x, torch.ones(3, 5, 5))


# ---------------------------------------------------------------------------------------------------- noise, JPEG


def test_poisson_noise_keeps_the_mean_and_has_the_basicsr_variance(astronaut):
    x = crop(astronaut, 64).expand(32, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    scale = torch.full((32,), 1.0)
    noise = deg.poisson_noise(x, scale, torch.zeros(32, dtype=torch.bool), g)
    q = deg.quantize(x)
    levels = len(torch.unique(q[0]))
    vals = 2 ** math.ceil(math.log2(levels))
    n = noise.numel()
    expected_var = float(q.mean()) / vals  # Poisson(v * vals) / vals has variance v / vals
    assert abs(float(noise.mean())) < 4 * math.sqrt(expected_var / n)
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.05)
    # per pixel, the noisy image averages back to the input
    noisy_mean = (q + noise).mean(dim=0)
    assert float((noisy_mean - q[0]).abs().mean()) < 3 * math.sqrt(expected_var / 32)
    half = deg.poisson_noise(x, scale * 0.5, torch.zeros(32, dtype=torch.bool), torch.Generator().manual_seed(0))
    torch.testing.assert_close(half, noise * 0.5)
    gray = deg.poisson_noise(x[:2], scale[:2], torch.tensor([True, False]), g)
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])
    assert not torch.equal(gray[1, 0], gray[1, 1])


def test_gaussian_noise_level_and_grey_option():
    x = torch.zeros(2, 3, 128, 128)
    g = torch.Generator().manual_seed(0)
    noise = deg.gaussian_noise(x, torch.tensor([10.0, 25.0]), torch.tensor([False, True]), g)
    assert float(noise[0].std()) == pytest.approx(10 / 255, rel=0.03)
    assert float(noise[1].std()) == pytest.approx(25 / 255, rel=0.03)
    assert abs(float(noise[0].mean())) < 4 * (10 / 255) / math.sqrt(noise[0].numel())
    assert torch.equal(noise[1, 0], noise[1, 2]) and not torch.equal(noise[0, 0], noise[0, 1])


def test_jpeg_quality_95_is_close_and_10_is_far(astronaut):
    x = crop(astronaut, 128).expand(2, -1, -1, -1)
    out = deg.jpeg_compress(x, [95, 10])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, deg.quantize(out))
    assert psnr(out[0], x[0]) > 35  # 37.3 dB on this detailed crop (4:2:0 chroma subsampling included)
    assert psnr(out[1], x[1]) < 28  # 25.4 dB
    assert psnr(out[0], x[0]) - psnr(out[1], x[1]) > 8


def test_resize_modes_per_sample():
    x = torch.rand(3, 3, 20, 24)
    out = deg.resize(x, (10, 7), ["area", "bicubic", "area"])
    assert out.shape == (3, 3, 10, 7)
    torch.testing.assert_close(out[1:2], deg.resize(x[1:2], (10, 7), "bicubic"))
    with pytest.raises(ValueError):
        deg.resize(x, (10, 7), "lanczos")


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("resize_back", [False, True])
def test_pipeline_shapes_ranges_and_seeds(astronaut, resize_back):
    hr = torch.cat([crop(astronaut, 128), crop(astronaut, 128, 40, 300)])
    degrade = RealESRGANDegradation(resize_back=resize_back)
    lr, record = degrade(hr, 7)
    assert lr.shape == ((2, 3, 128, 128) if resize_back else (2, 3, 32, 32))
    assert lr.dtype == hr.dtype and lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, deg.quantize(lr)), "values are multiples of 1/255"
    assert torch.equal(lr, degrade(hr, 7).lr)
    assert torch.equal(lr, degrade(hr, torch.Generator().manual_seed(7)).lr)
    assert not torch.equal(lr, degrade(hr, 8).lr)
    assert record.batch_size == 2 and set(record.sample(1)) == {"stage1", "stage2", "final", "gray", "no_degradation"}
    assert not torch.equal(lr[0], lr[1])


def test_pipeline_many_seeds_stay_valid(astronaut):
    degrade, hr = RealESRGANDegradation(), crop(astronaut, 64)
    for seed in range(12):
        lr, record = degrade(hr, seed)
        assert lr.shape == (1, 3, 16, 16) and torch.isfinite(lr).all()
        assert torch.equal(lr, deg.quantize(lr))


def identity_params(**overrides) -> DegradationParams:
    """Every degradation switched off: pulse kernels, no resize, zero noise, JPEG at quality 100."""
    values = dict(
        kernel_list=("pulse",), kernel_prob=(1.0,), sinc_prob=0.0, kernel_list2=("pulse",), kernel_prob2=(1.0,),
        sinc_prob2=0.0, resize_prob=(0.0, 0.0, 1.0), resize_prob2=(0.0, 0.0, 1.0), resize_range2=(0.5, 1.0),
        gaussian_noise_prob=1.0, noise_range=(0.0, 0.0), gaussian_noise_prob2=1.0, noise_range2=(0.0, 0.0),
        jpeg_range=(100, 100), jpeg_range2=(100, 100), final_sinc_prob=0.0, resize_modes=("area",),
    )  # fmt: skip
    return DegradationParams(**(values | overrides))


def test_pipeline_with_every_degradation_off_is_an_area_downscale(astronaut):
    hr = deg.rgb_to_gray(crop(astronaut, 128)).expand(-1, 3, -1, -1).contiguous()  # grey: JPEG q100 ~ lossless
    lr, _ = RealESRGANDegradation(identity_params())(hr, 0)
    clean = torch.nn.functional.interpolate(hr, size=(32, 32), mode="area")
    assert psnr(lr, clean) > 40
    stage2_half, _ = RealESRGANDegradation(identity_params(resize_prob2=(0.0, 1.0, 0.0), resize_range2=(0.5, 0.5)))(
        hr, 0
    )
    assert psnr(stage2_half, clean) < psnr(lr, clean) - 3  # the stage-2 resize runs (down to 16 px and back up)


def test_forced_branches(astronaut):
    hr = crop(astronaut, 64).expand(3, -1, -1, -1)
    lr, rec = RealESRGANDegradation(identity_params(gray_prob=1.0))(hr, 0)
    assert bool(rec.gray.all()) and torch.equal(lr[:, 0], lr[:, 1]) and torch.equal(lr[:, 1], lr[:, 2])
    lr, rec = RealESRGANDegradation(DegradationParams(no_degradation_prob=1.0), resize_back=True)(hr, 0)
    assert torch.equal(lr, deg.quantize(hr))
    lr, rec = RealESRGANDegradation(DegradationParams(no_degradation_prob=1.0))(hr, 0)
    assert lr.shape == (3, 3, 16, 16)
    heavy, _ = RealESRGANDegradation(identity_params(noise_range=(30.0, 30.0)))(hr, 0)
    light, _ = RealESRGANDegradation(identity_params())(hr, 0)
    assert psnr(heavy, light) < 35


# ---------------------------------------------------------------------------------------------------- parameters


@st.composite
def degradation_params(draw) -> DegradationParams:
    def prob():
        return draw(st.sampled_from([0.0, 1.0, 0.5]))

    def onehot(n: int) -> tuple[float, ...]:
        i = draw(st.integers(0, n - 1))
        return tuple(float(j == i) for j in range(n))

    def odd_range(low: int, high: int) -> tuple[int, int]:
        a = draw(st.integers(low // 2, high // 2)) * 2 + 1
        return a, min(high, a + 2 * draw(st.integers(0, 2)))

    def resize(probs: tuple[float, ...]) -> tuple[float, float]:
        if probs[0] == 1.0:  # up
            return draw(narrow(1.0, 1.5))
        if probs[1] == 1.0:  # down
            return draw(narrow(0.3, 1.0))
        return draw(narrow(0.3, 1.5))  # keep: the range is unused

    values = {}
    for s in ("", "2"):
        kinds = tuple(draw(st.lists(st.sampled_from(KERNEL_TYPES), min_size=1, max_size=3, unique=True)))
        probs = onehot(3)
        q = draw(st.integers(10, 100))
        values |= {
            f"kernel_list{s}": kinds, f"kernel_prob{s}": onehot(len(kinds)),
            f"kernel_size_range{s}": odd_range(3, 21), f"sinc_prob{s}": prob(),
            f"blur_sigma{s}": draw(narrow(0.2, 3.0)), f"rotation_range{s}": draw(narrow(-3.0, 3.0)),
            f"betag_range{s}": draw(narrow(0.5, 4.0)), f"betap_range{s}": draw(narrow(1.0, 2.0)),
            f"resize_prob{s}": probs, f"resize_range{s}": resize(probs), f"gaussian_noise_prob{s}": prob(),
            f"noise_range{s}": draw(narrow(0.0, 30.0)), f"poisson_scale_range{s}": draw(narrow(0.05, 3.0)),
            f"gray_noise_prob{s}": prob(), f"jpeg_range{s}": (q, min(100, q + draw(st.integers(0, 5)))),
        }  # fmt: skip
    values |= {
        "second_blur_prob": prob(), "sinc_cutoff_range": draw(narrow(0.5, math.pi)),
        "sinc_cutoff_range_large": draw(narrow(0.3, math.pi)), "sinc_large_size": draw(st.integers(1, 21)),
        "final_sinc_prob": prob(), "final_sinc_size_range": odd_range(3, 21),
        "final_sinc_cutoff_range": draw(narrow(0.5, math.pi)), "sinc_first_prob": prob(),
        "resize_modes": tuple(draw(st.lists(st.sampled_from(deg.RESIZE_MODES), min_size=1, max_size=3, unique=True))),
        "gray_prob": prob(), "no_degradation_prob": draw(st.sampled_from([0.0, 0.0, 1.0])),
    }  # fmt: skip
    return DegradationParams(**values)


def check_stage(stage, p: DegradationParams, s: str) -> None:
    check_kernel_record(stage.kernel, stage.kernel.kernel, p.kernel_params(1 if s == "" else 2), len(stage.blur))
    probs, (low, high) = getattr(p, f"resize_prob{s}"), getattr(p, f"resize_range{s}")
    assert stage.resize_type == deg.RESIZE_TYPES[probs.index(1.0)]
    bounds = {"up": (max(low, 1.0), high), "down": (low, min(high, 1.0)), "keep": (1.0, 1.0)}[stage.resize_type]
    assert bounds[0] - TOL <= stage.resize_scale <= bounds[1] + TOL
    assert set(stage.resize_mode) <= set(p.resize_modes)
    assert in_range(stage.noise_sigma, getattr(p, f"noise_range{s}"))
    assert in_range(stage.poisson_scale, getattr(p, f"poisson_scale_range{s}"))
    assert bool((stage.noise_sigma.isnan() != stage.gaussian).all())
    assert bool((stage.poisson_scale.isnan() == stage.gaussian).all())
    assert in_range(stage.jpeg_quality.double(), getattr(p, f"jpeg_range{s}"))
    assert stage.jpeg_quality.dtype == torch.int64
    for flags, prob in (
        (stage.gaussian, getattr(p, f"gaussian_noise_prob{s}")),
        (stage.gray_noise, getattr(p, f"gray_noise_prob{s}")),
    ):
        if prob in (0.0, 1.0):
            assert bool((flags == (prob == 1.0)).all())


@given(params=degradation_params(), seed=st.integers(0, 2**31 - 1))
def test_every_sampled_parameter_lies_in_its_configured_range(params, seed):
    degrade = RealESRGANDegradation(params)
    record = degrade.sample(4, seed)
    check_stage(record.stage1, params, "")
    check_stage(record.stage2, params, "2")
    assert bool(record.stage1.blur.all())
    if params.second_blur_prob in (0.0, 1.0):
        assert bool((record.stage2.blur == (params.second_blur_prob == 1.0)).all())
    check_kernel_record(record.final_kernel, record.final_kernel.kernel, params.kernel_params("final"), 4)
    assert set(record.final_kernel.kind) <= {"sinc", "pulse"}
    assert in_range(record.final_jpeg_quality.double(), params.jpeg_range2)
    assert set(record.final_resize_mode) <= set(params.resize_modes)
    for flags, prob in (
        (record.sinc_first, params.sinc_first_prob),
        (record.gray, params.gray_prob),
        (record.no_degradation, params.no_degradation_prob),
    ):
        if prob in (0.0, 1.0):
            assert bool((flags == (prob == 1.0)).all())
    assert record.sample(3)["final"]["jpeg_quality"] == int(record.final_jpeg_quality[3])
    # the same parameters run through the pixels on a small image, every forced branch included
    hr = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    lr = degrade.apply(hr, record, seed)
    assert lr.shape == (4, 3, 8, 8) and torch.equal(lr, deg.quantize(lr))
    assert torch.equal(lr, degrade.apply(hr, record, seed))


def test_presets_load():
    assert DegradationParams.preset("realesrgan") == DegradationParams()
    mild = DegradationParams.preset("mild")
    assert mild.resize_range == (0.3, 1.5) and mild.noise_range == (1.0, 15.0) and mild.jpeg_range2 == (60, 100)
    assert mild.second_blur_prob == 0.5 and mild.blur_sigma2 == (0.2, 1.0) and mild.no_degradation_prob == 0.01
    assert RealESRGANDegradation("mild").params == mild
    assert DegradationParams.from_dict(DegradationParams().to_dict()) == DegradationParams()
    with pytest.raises(ValueError, match="available: .*mild.*realesrgan"):
        DegradationParams.preset("nope")


def test_unknown_keys_and_bad_ranges_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown degradation parameter 'noise_rnage'; valid keys: .*noise_range"):
        DegradationParams.from_dict({"noise_rnage": [1, 2]})
    path = tmp_path / "bad.yaml"
    path.write_text("scale: 4\ncolor_jitter_prob: 0.0\n")
    with pytest.raises(ValueError, match="'color_jitter_prob'.*valid keys"):
        DegradationParams.from_yaml(path)
    bad = {
        "noise_range": [30, 1],
        "blur_sigma2": [0.0, 1.0],
        "jpeg_range": [30, 101],
        "jpeg_range2": [30.5, 90],
        "kernel_size_range": [6, 21],
        "kernel_prob": [0.5, 0.5],
        "kernel_list2": ["iso", "box"],
        "resize_prob": [0.2, 0.7, 0.2],
        "resize_range": [0.2, 0.9],  # 'up' has probability 0.2 but cannot go above 1
        "sinc_prob2": 1.5,
        "final_sinc_cutoff_range": [1.0, 4.0],
        "resize_modes": ["lanczos"],
        "scale": 0,
        "betap_range": [1.0],
    }
    for key, value in bad.items():
        with pytest.raises(ValueError, match=f"'{key}'"):
            DegradationParams.from_dict({key: value})
    with pytest.raises(TypeError):
        RealESRGANDegradation()(torch.rand(1, 3, 16, 16), "seed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RealESRGANDegradation()(torch.rand(1, 4, 16, 16), 0)
