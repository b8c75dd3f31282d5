"""Real-ISR recipe metrics: Y conversion, PSNR, SSIM (skimage, a loop, BasicSR numbers) and offline NIQE.

Reference numbers were produced once, outside the test environment, from the unmodified sources of
``basicsr-fixed`` 1.4.2 (sdist sha256 a9dd0989...0684; ``calculate_psnr``, ``calculate_ssim`` with a scipy
stand-in for ``cv2.getGaussianKernel`` / ``cv2.filter2D`` whose valid region is the same, ``calculate_niqe`` on
uint8 BGR images, crop_border 0) with numpy 2.4.6, scipy 1.17.1, torch 2.14.1, scikit-image 0.26.0.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from real_isr import metrics as M
from real_isr import niqe as N
from scipy import ndimage
from skimage import data
from skimage.metrics import structural_similarity

# BasicSR 1.4.2 on skimage.data.astronaut() against a posterised copy ((a // 32) * 32 + 16), crop_border 4
BASICSR_POSTERIZE = {True: (31.173035920921098, 0.9042163168672596), False: (27.85157358489633, 0.7324021367663917)}
# BasicSR 1.4.2 calculate_niqe(bgr_uint8, crop_border=0); our values in the comments
BASICSR_NIQE = {
    "chelsea": 2.625524,  # ours 2.625527
    "coffee": 4.115242,  # ours 4.115247
    "rocket": 6.969155,  # ours 6.969173
}
# pyiqa 0.1.16 ``NIQE(color_space="yiq")`` (its default ``niqe`` metric) with the same parameters, float64 input
PYIQA_YIQ_NIQE = {"chelsea": 2.572079, "hubble_deep_field": 7.632381}  # ours 2.572084, 7.632381
BASICSR_NIQE_ASTRONAUT = 3.064948  # ours 3.064599; shared/notes/real-isr.md quotes 3.0646
TEXTURED_TOL = 1e-4  # images without flat areas: the two implementations agree to float32 precision
FLAT_AREA_TOL = 2e-3  # astronaut has flat areas, where BasicSR's float32 rounding residues shift features
# (ours without the exact-zero rule of niqe.FLAT_TOL: 3.100; pyiqa 0.1.16 float64 ycbcr: 3.1236)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def to_tensor(image: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(h, w, 3)`` uint8 -> ``(1, 3, h, w)`` in [0, 1] (float64: ``k / 255`` without float32 rounding)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(dtype) / 255.0


def y255(image: np.ndarray) -> np.ndarray:
    """Hand formula: Y on 0-255 of an ``(h, w, 3)`` uint8 RGB image, float64, unrounded."""
    rgb = image.astype(np.float64) / 255.0
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 128 crop of astronaut and a distorted copy (noise + blur), both uint8 (h, w, 3)."""
    clean = data.astronaut()[100:196, 150:278]
    rng = np.random.default_rng(0)
    noisy = clean.astype(np.float64) + rng.normal(0, 12, clean.shape)
    noisy = ndimage.uniform_filter(noisy, size=(3, 1, 1))
    return clean, np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ Y


@pytest.mark.parametrize(
    ("rgb", "y"),
    [
        ((0, 0, 0), 16.0),
        ((255, 255, 255), 235.0),
        ((255, 0, 0), 16 + 65.481),
        ((0, 255, 0), 16 + 128.553),
        ((0, 0, 255), 16 + 24.966),
        ((128, 128, 128), 16 + 219 * 128 / 255),
        ((10, 200, 30), 16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 30) / 255),
    ],
)
def test_rgb_to_y_matches_hand_numbers(rgb, y):
    img = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1) / 255
    out = M.rgb_to_y(img)
    assert out.shape == (1, 1, 1, 1) and out.dtype == torch.float64
    assert out.item() * 255 == pytest.approx(y, abs=1e-12)


def test_rgb_to_y_keeps_dtype_and_batches(astronaut):
    out = M.rgb_to_y(astronaut.expand(2, -1, -1, -1))
    assert out.shape == (2, 1, 512, 512) and out.dtype == torch.float32
    np.testing.assert_allclose(out[1, 0].numpy() * 255, y255(data.astronaut()), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_equals_hand_formula_on_y(pair, crop):
    clean, noisy = pair
    sl = slice(crop, -crop) if crop else slice(None)
    mse = np.mean(((y255(noisy) - y255(clean)) / 255.0)[sl, sl] ** 2)
    out = M.psnr(to_tensor(noisy), to_tensor(clean), crop_border=crop)
    assert out.shape == (1,) and out.dtype == torch.float64
    assert out.item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-6)


def test_psnr_rgb_and_data_range(pair):
    clean, noisy = pair
    mse = np.mean(((noisy.astype(np.float64) - clean) / 255.0)[4:-4, 4:-4] ** 2)
    expected = 10 * math.log10(1 / mse)
    assert M.psnr(to_tensor(noisy), to_tensor(clean), test_y_channel=False).item() == pytest.approx(expected, abs=1e-6)
    scaled = M.psnr(
        to_tensor(noisy).double() * 255, to_tensor(clean).double() * 255, test_y_channel=False, data_range=255.0
    )
    assert scaled.item() == pytest.approx(expected, abs=1e-9)


def test_psnr_and_ssim_match_basicsr_numbers():
    clean = data.astronaut()
    poster = ((clean // 32) * 32 + 16).astype(np.uint8)
    for y_channel, (psnr_ref, ssim_ref) in BASICSR_POSTERIZE.items():
        assert M.psnr(to_tensor(poster), to_tensor(clean), 4, y_channel).item() == pytest.approx(psnr_ref, abs=1e-6)
        assert M.ssim(to_tensor(poster), to_tensor(clean), 4, y_channel).item() == pytest.approx(ssim_ref, abs=1e-6)


def test_psnr_identical_is_inf_and_batched(pair):
    clean, noisy = pair
    a = torch.cat([to_tensor(clean), to_tensor(noisy)])
    b = torch.cat([to_tensor(clean), to_tensor(clean)])
    out = M.psnr(a, b)
    assert out.shape == (2,) and math.isinf(out[0].item()) and out[0] > 0
    assert out[1].item() == pytest.approx(M.psnr(a[1:], b[1:]).item())


# ---------------------------------------------------------------------------------------------------- SSIM


def loop_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM by definition: for every 11 x 11 window inside the image, Gaussian-weighted statistics (0-255)."""
    r = np.arange(11) - 5
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            wx, wy = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (g * wx).sum(), (g * wy).sum()
            vx, vy = (g * (wx - mx) ** 2).sum(), (g * (wy - my) ** 2).sum()
            cxy = (g * (wx - mx) * (wy - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_skimage_on_y(pair):
    clean, noisy = pair
    out = M.ssim(to_tensor(noisy), to_tensor(clean), crop_border=4)
    ref = structural_similarity(
        y255(noisy)[4:-4, 4:-4],
        y255(clean)[4:-4, 4:-4],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert out.shape == (1,) and out.dtype == torch.float64
    assert 0.2 < ref < 0.95 and out.item() == pytest.approx(ref, abs=1e-4)
    assert out.item() == pytest.approx(ref, abs=1e-9)  # the same numbers, not only close
    out32 = M.ssim(to_tensor(noisy, torch.float32), to_tensor(clean, torch.float32), crop_border=4)
    assert out32.item() == pytest.approx(ref, abs=1e-7)  # float32 inputs: k / 255 rounded to float32


def test_ssim_equals_skimage_per_channel(pair):
    clean, noisy = pair
    out = M.ssim(to_tensor(noisy), to_tensor(clean), crop_border=0, test_y_channel=False)
    ref = structural_similarity(
        noisy.astype(np.float64),
        clean.astype(np.float64),
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert out.item() == pytest.approx(ref, abs=1e-9)


def test_ssim_equals_loop_computation(pair):
    clean, noisy = pair
    x, y = y255(noisy)[:30, :34], y255(clean)[:30, :34]
    out = M.ssim(to_tensor(noisy[:30, :34]), to_tensor(clean[:30, :34]), crop_border=0)
    assert out.item() == pytest.approx(loop_ssim(x, y), abs=1e-9)


def test_ssim_identical_is_one_and_batched(pair):
    clean, noisy = pair
    a = torch.cat([to_tensor(clean), to_tensor(noisy)])
    out = M.ssim(a, a)
    torch.testing.assert_close(out, torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    mixed = M.ssim(a, torch.cat([to_tensor(clean)] * 2))
    assert mixed[0].item() == pytest.approx(1.0) and mixed[1].item() < 0.95


def test_one_channel_input_is_used_as_is(pair):
    clean, noisy = pair
    yc = torch.from_numpy(y255(clean) / 255)[None, None]
    yn = torch.from_numpy(y255(noisy) / 255)[None, None]
    assert M.psnr(yn, yc).item() == pytest.approx(M.psnr(to_tensor(noisy), to_tensor(clean)).item(), abs=1e-5)
    assert M.ssim(yn, yc).item() == pytest.approx(M.ssim(to_tensor(noisy), to_tensor(clean)).item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- NIQE


@pytest.fixture
def offline(monkeypatch):
    """Any network connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_matlab_resize_weights_by_hand():
    # scale 0.5 with antialiasing: kernel 0.5 * cubic(0.5 d) at d = +-0.5, +-1.5, +-2.5, +-3.5 (sums to 1)
    w = [0.43359375, 0.11328125, -0.03515625, -0.01171875]  # d = 0.5, 1.5, 2.5, 3.5
    matrix = N.resize_matrix(16, 0.5)
    expected = np.zeros(16)
    expected[5:13] = w[::-1] + w  # output 5 (1-based) sits at input 9.5: taps 6..13
    np.testing.assert_allclose(matrix[4], expected, atol=1e-15)
    # output 1 sits at input 1.5: taps -2..5 (1-based), where -2, -1, 0 mirror to 3, 2, 1 (edge repeated)
    expected = [w[0] + w[1], w[0] + w[2], w[1] + w[3], w[2], w[3], 0.0]
    np.testing.assert_allclose(matrix[0, :6], expected, atol=1e-15)


def test_matlab_resize_keeps_ramps_and_constants():
    ramp = np.tile(np.arange(1, 41, dtype=np.float64), (24, 1))  # value = 1-based column index
    out = N.imresize_half(ramp)
    assert out.shape == (12, 20)
    np.testing.assert_allclose(out[:, 2:-2], np.tile(2 * np.arange(3, 19) - 0.5, (12, 1)), atol=1e-12)
    np.testing.assert_allclose(N.imresize_half(np.full((10, 7), 42.0)), np.full((5, 4), 42.0), atol=1e-12)


def test_aggd_grid_search_equals_brute_force_argmin():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 500)) * rng.uniform(0.2, 3, (40, 1))
    x = np.sign(x) * np.abs(x) ** rng.uniform(0.3, 3, (40, 1))
    x[0] = np.abs(x[0])  # no negative values: NaN target, shape 0.2 as MATLAB
    alpha, beta_l, beta_r = N.aggd_fit(x)
    for row, a in zip(x[1:], alpha[1:], strict=True):
        left, right = np.sqrt(np.mean(row[row < 0] ** 2)), np.sqrt(np.mean(row[row > 0] ** 2))
        g = left / right
        rhat = np.mean(np.abs(row)) ** 2 / np.mean(row**2)
        target = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
        assert a == N._GAM[np.argmin((N._R_GAM - target) ** 2)]
    assert alpha[0] == pytest.approx(0.2) and math.isnan(beta_l[0]) and np.isfinite(beta_r[0])


@pytest.mark.parametrize("name", sorted(BASICSR_NIQE))
def test_niqe_matches_basicsr_on_textured_photos(offline, name):
    out = M.niqe(to_tensor(getattr(data, name)()))
    assert out.shape == (1,) and out.dtype == torch.float64
    assert out.item() == pytest.approx(BASICSR_NIQE[name], abs=TEXTURED_TOL)


@pytest.mark.parametrize("name", sorted(PYIQA_YIQ_NIQE))
def test_niqe_yiq_matches_pyiqa_default_on_textured_photos(offline, name):
    out = M.niqe(to_tensor(getattr(data, name)(), torch.float32), luma="yiq")
    assert out.item() == pytest.approx(PYIQA_YIQ_NIQE[name], abs=TEXTURED_TOL)


def test_niqe_astronaut_reference(offline, astronaut):
    value = M.niqe(astronaut).item()
    assert value == pytest.approx(BASICSR_NIQE_ASTRONAUT, abs=FLAT_AREA_TOL)
    assert value == pytest.approx(3.0646, abs=5e-5)  # shared/notes/real-isr.md
    assert M.niqe(astronaut.double()).item() == value  # exact 8-bit Y: the same for float32 and float64 input


def test_niqe_rises_for_blur_and_noise(offline, astronaut):
    blurred = torch.from_numpy(ndimage.gaussian_filter(astronaut.numpy(), sigma=(0, 0, 3, 3)))
    noise = torch.randn(astronaut.shape, generator=torch.Generator().manual_seed(0)) * 25 / 255
    noisy = (astronaut + noise).clamp(0, 1)
    out = M.niqe(torch.cat([astronaut, blurred, noisy]))
    assert torch.isfinite(out).all()
    assert out[1] > out[0] + 2 and out[2] > out[0] + 2, out  # 3.06, 8.88, 10.46
    assert M.niqe(blurred).item() == pytest.approx(out[1].item(), abs=1e-12)  # batch = one at a time


def test_niqe_crop_one_channel_and_minimum_size(offline):
    camera = torch.from_numpy(data.camera()).double()[None, None] / 255  # (1, 1, 512, 512) grey
    full = M.niqe(camera).item()
    assert 2 < full < 10
    cropped = M.niqe(camera, crop_border=8).item()
    assert cropped == pytest.approx(M.niqe(camera[..., 8:-8, 8:-8]).item(), abs=1e-12) and cropped != full
    assert math.isfinite(M.niqe(camera[..., :96, :192]).item())  # two blocks: the minimum
    for shape in [(96, 96), (191, 191), (95, 400)]:
        with pytest.raises(ValueError, match="at least 2 whole 96x96 blocks"):
            M.niqe(camera[..., : shape[0], : shape[1]])
    with pytest.raises(ValueError, match="crop_border=1 leaves 94x190"):
        M.niqe(camera[..., :96, :192], crop_border=1)


def test_niqe_of_constant_image_is_nan():
    assert math.isnan(M.niqe(torch.full((1, 3, 192, 192), 0.5)).item())


def test_niqe_params_file_and_provenance(tmp_path):
    params = N.load_params()
    assert params.mu.shape == (36,) and params.cov.shape == (36, 36) and params.window.shape == (7, 7)
    r = np.arange(-3, 4)
    window = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (7 / 6) ** 2))
    np.testing.assert_allclose(params.window, window / window.sum(), atol=1e-15)  # fspecial('gaussian', 7, 7/6)
    np.testing.assert_allclose(params.cov, params.cov.T, atol=1e-12)
    with pytest.raises(FileNotFoundError):
        M.niqe(torch.zeros(1, 1, 192, 192), params=tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu_pris_param=np.zeros((1, 18)), cov_pris_param=np.eye(36), gaussian_window=np.ones((7, 7)))
    with pytest.raises(ValueError, match="mu_pris_param must have shape"):
        M.niqe(torch.zeros(1, 1, 192, 192), params=bad)


# -------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("metric", [M.psnr, M.ssim])
def test_pair_metric_errors(metric):
    good = torch.rand(2, 3, 32, 32)
    cases = [
        (torch.rand(3, 32, 32), torch.rand(3, 32, 32), ValueError, r"must have shape \(b, 3, h, w\)"),
        (torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32), ValueError, r"must have shape \(b, 3, h, w\)"),
        (good, torch.rand(2, 3, 32, 30), ValueError, r"same shape, got \(2, 3, 32, 32\) and \(2, 3, 32, 30\)"),
        (good, torch.rand(1, 3, 32, 32), ValueError, "same shape"),
        (good * 1.5, good, ValueError, r"pred must lie in \[0, 1.0\] \(clamp first\)"),
        (good, good - 0.5, ValueError, r"target must lie in \[0, 1.0\]"),
        (good.masked_fill(good > 0.9, float("nan")), good, ValueError, "NaN"),
        ((good * 255).to(torch.uint8), good, TypeError, "floating tensor"),
        (good.numpy(), good, TypeError, "must be a torch.Tensor"),
    ]
    for pred, target, error, message in cases:
        with pytest.raises(error, match=message):
            metric(pred, target)
    with pytest.raises(ValueError, match="crop_border must be a non-negative int"):
        metric(good, good, crop_border=-1)
    with pytest.raises(TypeError, match="crop_border must be an int"):
        metric(good, good, crop_border=2.0)
    with pytest.raises(ValueError, match="data_range must be a positive number"):
        metric(good, good, data_range=0)
    with pytest.raises(TypeError, match="data_range must be a number"):
        metric(good, good, data_range="1")
    with pytest.raises(ValueError, match="leaves 0x0 pixels"):
        metric(good, good, crop_border=16)


def test_ssim_needs_an_11x11_window_after_the_crop():
    img = torch.rand(1, 3, 20, 40)
    assert M.ssim(img, img, crop_border=4).item() == pytest.approx(1.0)  # 12x32 left
    with pytest.raises(ValueError, match="needs at least 11x11"):
        M.ssim(img, img, crop_border=5)


def test_niqe_input_errors():
    with pytest.raises(ValueError, match=r"must have shape"):
        M.niqe(torch.rand(3, 192, 192))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1.0\]"):
        M.niqe(torch.rand(1, 3, 192, 192) + 1)
    with pytest.raises(ValueError, match="luma must be one of"):
        M.niqe(torch.rand(1, 3, 192, 192), luma="gray")
    with pytest.raises(ValueError, match="rgb_to_y needs"):
        M.rgb_to_y(torch.rand(1, 1, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(pair, astronaut):
    clean, noisy = pair
    a, b = to_tensor(noisy), to_tensor(clean)
    for metric in (M.psnr, M.ssim):
        out = metric(a.cuda(), b.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), metric(a, b), atol=1e-9, rtol=0)
    out = M.niqe(astronaut.cuda())
    assert out.device.type == "cuda" and out.item() == M.niqe(astronaut).item()
