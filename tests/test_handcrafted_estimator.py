"""The weight-free degradation estimator on real photographs, and its contract.

The photographs ship inside the scikit-image wheel (no download): ``astronaut``, ``coffee``, ``chelsea``,
``rocket`` and the left view of ``stereo_motorcycle``, as 256 x 256 centre crops. Each is degraded along four
synthetic sweeps (every result stored as 8-bit, as real images are):

- Gaussian blur sigma 0, 0.5, 1, 1.5, 2, 3 px (``scipy.ndimage.gaussian_filter``, reflect border);
- Gaussian noise sigma 0, 2, 5, 10, 15, 25 levels of 255, independent per channel, clipped;
- JPEG quality 95, 75, 50, 30, 20, 10 (Pillow, in memory);
- bicubic down-scaling by 1, 1.5, 2, 3, 4 (antialiased) and bicubic up-scaling back to 256 x 256.

Claims: per photograph, each dimension's score rises with its own degradation (Spearman rho >= 0.9), and over
the photographs the own dimension's mean rise (strongest level minus the first) is at least twice the mean
absolute change of every other dimension. ``python tests/test_handcrafted_estimator.py`` prints the tables.

Axis legend: ``b`` images, ``h`` / ``w`` height and width, ``D`` dimensions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from rankmoe.conditioning import measures
from rankmoe.conditioning.handcrafted import DEFAULT_CALIBRATION, Calibration, WeightFreeDegradationEstimator

CROP = 256
DIMS = ("blur", "noise", "jpeg", "resolution")
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    # sweep name = the dimension it should raise: (what the level is, levels from clean to strongest)
    "blur": ("Gaussian blur sigma (px)", (0, 0.5, 1, 1.5, 2, 3)),
    "noise": ("Gaussian noise sigma (of 255)", (0, 2, 5, 10, 15, 25)),
    "jpeg": ("JPEG quality", (95, 75, 50, 30, 20, 10)),
    "resolution": ("bicubic down-and-up factor", (1, 1.5, 2, 3, 4)),
}
MIN_RHO = 0.9
MIN_DOMINANCE = 2.0


# ------------------------------------------------------------------------------------------------- photographs
@cache
def photos() -> dict[str, np.ndarray]:
    """``{name: (256, 256, 3) uint8}`` centre crops of scikit-image's colour photographs."""
    data = pytest.importorskip("skimage.data")
    full = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
    }
    crops = {}
    for name, image in full.items():
        top, left = (image.shape[0] - CROP) // 2, (image.shape[1] - CROP) // 2
        crops[name] = np.ascontiguousarray(image[top : top + CROP, left : left + CROP, :3])
    return crops


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(h, w, 3)`` uint8 -> ``(3, h, w)`` float32 in ``[0, 1]``."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(3, h, w)`` float in ``[0, 1]`` -> ``(h, w, 3)`` uint8 (rounded, clipped)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def blur(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if sigma == 0:
        return image
    out = gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    x = to_tensor(image)
    generator = torch.Generator().manual_seed(seed)
    return to_uint8(x + torch.randn(x.shape, generator=generator) * sigma / 255)


def jpeg(image: np.ndarray, quality: float, seed: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.array(Image.open(buffer).convert("RGB"))


def downscale(image: np.ndarray, factor: float, seed: int) -> np.ndarray:
    if factor == 1:
        return image
    x = to_tensor(image)[None]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(round(h / factor), round(w / factor)), mode="bicubic", antialias=True)
    return to_uint8(F.interpolate(small, size=(h, w), mode="bicubic")[0])


DEGRADE: dict[str, Callable[[np.ndarray, float, int], np.ndarray]] = {
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "resolution": downscale,
}


@cache
def sweep_scores() -> dict[str, np.ndarray]:
    """``{sweep: (photos, levels, D)}`` scores of the default estimator, one batch per photograph and sweep."""
    estimator = WeightFreeDegradationEstimator()
    out = {}
    for sweep, (_, levels) in SWEEPS.items():
        rows = []
        for seed, image in enumerate(photos().values()):
            batch = torch.stack([to_tensor(DEGRADE[sweep](image, level, seed)) for level in levels])
            rows.append(estimator(batch).scores.numpy())
        out[sweep] = np.stack(rows)
    return out


def spearman(values: np.ndarray) -> float:
    """Spearman rho of ``values`` (levels,) against the level order."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.arange(len(values)), values)[0])


def sweep_tables() -> str:
    """Markdown tables: mean rise per dimension and sweep, the dominance ratios, the mean score per level."""
    scores = sweep_scores()
    lines = [
        "Mean change of each score from the first (clean) to the strongest level of each sweep, over "
        f"{len(photos())} photographs (own dimension in bold):",
        "",
        "| dimension | " + " | ".join(f"{sweep} sweep" for sweep in SWEEPS) + " |",
        "|---|" + "---|" * len(SWEEPS),
    ]
    rises = {sweep: (s[:, -1] - s[:, 0]).mean(axis=0) for sweep, s in scores.items()}
    for j, dim in enumerate(DIMS):
        cells = [f"**{rises[sweep][j]:+.3f}**" if sweep == dim else f"{rises[sweep][j]:+.3f}" for sweep in SWEEPS]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    lines += ["", "| sweep | own rise / largest other change | Spearman rho of the own score per photograph |"]
    lines.append("|---|---|---|")
    for sweep, s in scores.items():
        j = DIMS.index(sweep)
        other = max(abs(rises[sweep][k]) for k in range(len(DIMS)) if k != j)
        rhos = ", ".join(f"{spearman(s[p, :, j]):.2f}" for p in range(s.shape[0]))
        lines.append(f"| {sweep} | {rises[sweep][j] / other:.1f} | {rhos} |")
    for sweep, (what, levels) in SWEEPS.items():
        mean = scores[sweep].mean(axis=0)
        lines += ["", f"Sweep `{sweep}` ({what}), mean score per level:", ""]
        lines += ["| level | " + " | ".join(DIMS) + " |", "|---|" + "---|" * len(DIMS)]
        for level, row in zip(levels, mean, strict=True):
            lines.append(f"| {level:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_own_score_rises_with_its_degradation(sweep: str) -> None:
    scores = sweep_scores()[sweep][:, :, DIMS.index(sweep)]  # (photos, levels)
    rhos = {name: spearman(row) for name, row in zip(photos(), scores, strict=True)}
    assert all(rho >= MIN_RHO for rho in rhos.values()), f"{sweep}: Spearman rho per photograph {rhos}"
    rise = (scores[:, -1] - scores[:, 0]).mean()
    assert rise >= 0.5, f"{sweep}: mean rise {rise:.3f}"


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_other_scores_move_clearly_less(sweep: str) -> None:
    scores = sweep_scores()[sweep]
    rises = (scores[:, -1] - scores[:, 0]).mean(axis=0)  # (D,)
    own = rises[DIMS.index(sweep)]
    others = {dim: float(rises[j]) for j, dim in enumerate(DIMS) if dim != sweep}
    worst = max(abs(v) for v in others.values())
    print(f"\n{sweep} sweep: own rise {own:.3f}, others {others}, ratio {own / worst:.1f}")
    assert own >= MIN_DOMINANCE * worst, f"{sweep}: own rise {own:.3f} vs others {others}"


def test_clean_photographs_score_low() -> None:
    estimator = WeightFreeDegradationEstimator()
    batch = torch.stack([to_tensor(image) for image in photos().values()])
    scores = estimator(batch).scores
    assert float(scores.mean()) < 0.1, scores
    assert float(scores.max()) < 0.3, scores


# ------------------------------------------------------------------------------------------------- contract
def textured(b: int, h: int = 160, w: int = 144, seed: int = 0) -> torch.Tensor:
    """``(b, 3, h, w)`` smooth random images with edges, in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 16, w // 16, generator=generator)
    x = F.interpolate(coarse, size=(h, w), mode="nearest")  # step edges
    x = x + 0.03 * torch.randn(b, 3, h, w, generator=generator)
    return x.clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_shapes_dtype_device_follow_the_images(dtype: torch.dtype) -> None:
    estimator = WeightFreeDegradationEstimator()
    images = textured(3).to(dtype)
    out = estimator(images)
    assert out.names == DIMS
    assert out.scores.shape == (3, 4) and out.severity.shape == (3,)
    assert out.scores.dtype == dtype and out.severity.dtype == dtype
    assert out.scores.device == images.device
    assert bool(((out.scores >= 0) & (out.scores <= 1)).all())
    torch.testing.assert_close(out.severity, out.scores.mean(dim=1))
    reference = estimator(images.float()).scores
    torch.testing.assert_close(out.scores.float(), reference, atol=2e-2 if dtype.itemsize == 2 else 1e-5, rtol=0)


def test_batch_equals_one_by_one() -> None:
    estimator = WeightFreeDegradationEstimator()
    images = textured(4, seed=1)
    images[1] = images[1].pow(2)
    images[2] = F.avg_pool2d(images[2][None], 5, 1, 2)[0]
    batch = estimator(images)
    single = torch.cat([estimator(images[i : i + 1]).scores for i in range(4)])
    torch.testing.assert_close(batch.scores, single, atol=1e-5, rtol=0)
    raw_batch = estimator.measure(images)
    for name, value in raw_batch.items():
        singles = torch.cat([estimator.measure(images[i : i + 1])[name] for i in range(4)])
        torch.testing.assert_close(value, singles, atol=1e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_deterministic_no_parameters_no_gradients() -> None:
    estimator = WeightFreeDegradationEstimator()
    assert list(estimator.parameters()) == [] and list(estimator.buffers()) == []
    assert estimator.state_dict() == {}
    images = textured(2, seed=2).requires_grad_(True)
    first, second = estimator(images), estimator(images)
    assert torch.equal(first.scores, second.scores)
    assert not first.scores.requires_grad and first.scores.grad_fn is None
    estimator.train()
    assert not estimator.training


@pytest.mark.parametrize("size", [(127, 200), (200, 100), (64, 64)])
def test_too_small_images_raise(size: tuple[int, int]) -> None:
    estimator = WeightFreeDegradationEstimator()
    images = torch.rand(1, 3, *size)
    with pytest.raises(ValueError, match=r"at least 128x128 pixels.*got \d+x\d+"):
        estimator(images)
    with pytest.raises(ValueError, match="at least 128x128"):
        measures.edge_blur(images)


def test_minimum_and_odd_sizes_work() -> None:
    estimator = WeightFreeDegradationEstimator()
    for size in [(128, 128), (131, 257), (300, 451)]:
        out = estimator(textured(1, *size))
        assert out.scores.shape == (1, 4) and bool(torch.isfinite(out.scores).all())


def test_bad_images_raise() -> None:
    estimator = WeightFreeDegradationEstimator()
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        estimator(torch.rand(1, 4, 128, 128))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        estimator(torch.rand(1, 3, 128, 128) * 2)
    with pytest.raises(TypeError, match="floating tensor"):
        estimator(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        measures.noise_level(torch.full((1, 3, 128, 128), float("nan")))


def test_dims_subset_severity_and_calibration() -> None:
    images = textured(2, seed=3)
    full = WeightFreeDegradationEstimator()(images)
    subset = WeightFreeDegradationEstimator(dims=["noise", "blur"], severity="max")(images)
    assert subset.names == ("noise", "blur")
    torch.testing.assert_close(subset.scores, full.scores[:, [1, 0]])
    torch.testing.assert_close(subset.severity, subset.scores.amax(dim=1))
    strict = WeightFreeDegradationEstimator(calibration={"noise": Calibration(midpoint=0.01, scale=0.4, log=True)})
    assert bool((strict(images).scores[:, 1] > full.scores[:, 1]).all())
    torch.testing.assert_close(strict(images).scores[:, [0, 2, 3]], full.scores[:, [0, 2, 3]])
    assert "names=['blur', 'noise', 'jpeg', 'resolution']" in repr(WeightFreeDegradationEstimator())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dims": ["blur", "sharpness"]}, ValueError, "unknown: \\['sharpness'\\]"),
        ({"dims": ["blur", "blur"]}, ValueError, "distinct"),
        ({"dims": []}, ValueError, "distinct"),
        ({"dims": ["blur"], "calibration": {"noise": DEFAULT_CALIBRATION["noise"]}}, ValueError, "not among"),
        ({"calibration": {"noise": (4.0, 0.4)}}, TypeError, "Calibration"),
        ({"severity": [1.0, 2.0]}, ValueError, "4 non-negative numbers"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WeightFreeDegradationEstimator(**kwargs)


def test_calibration() -> None:
    linear = Calibration(midpoint=2.0, scale=0.25)
    expected = torch.sigmoid(torch.tensor([0.0, 3.0, -3.0]))
    torch.testing.assert_close(linear(torch.tensor([2.0, 2.75, 1.25])), expected)
    logistic = Calibration(midpoint=4.0, scale=0.4, log=True)
    expected = torch.sigmoid((torch.tensor([4.0, 8.0, 1e-3]).log() - math.log(4.0)) / 0.4)
    torch.testing.assert_close(logistic(torch.tensor([4.0, 8.0, 0.0])), expected)  # raw clamped to >= 1e-3
    bad_arguments = [
        {"midpoint": 1.0, "scale": 0.0},
        {"midpoint": float("nan"), "scale": 1.0},
        {"midpoint": 0.0, "scale": 1.0, "log": True},
    ]
    for bad in bad_arguments:
        with pytest.raises(ValueError):
            Calibration(**bad)


# ------------------------------------------------------------------------------------------------- measures
def test_measures_api() -> None:
    images = textured(2, seed=4)
    raw = measures.measure(images)
    assert list(raw) == list(measures.MEASURES)
    for name, value in raw.items():
        assert value.shape == (2,) and value.dtype == torch.float32, name
    torch.testing.assert_close(raw["blur"], measures.edge_blur(images))
    torch.testing.assert_close(raw["noise"], measures.noise_level(images))
    torch.testing.assert_close(raw["jpeg"], measures.blockiness(images))
    torch.testing.assert_close(raw["high_frequency"], measures.high_frequency_loss(images))
    torch.testing.assert_close(raw["resolution"], measures.resolution_loss(images))
    with pytest.raises(ValueError, match="unknown measure names"):
        measures.measure(images, ["sharpness"])


@pytest.mark.parametrize("grey", [False, True])
def test_noise_level_reads_the_noise_sigma(grey: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    for sigma in (2.0, 5.0, 10.0):
        shape = (2, 1, 192, 192) if grey else (2, 3, 192, 192)
        noisy = (0.5 + torch.randn(shape, generator=generator) * sigma / 255).expand(2, 3, 192, 192)
        estimate = measures.noise_level(((noisy.clamp(0, 1) * 255).round() / 255).contiguous())
        torch.testing.assert_close(estimate, torch.full((2,), sigma), rtol=0.12, atol=0.0)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_edge_blur_reads_the_blur_of_step_edges(sigma: float) -> None:
    from scipy.ndimage import gaussian_filter

    steps = np.zeros((192, 192))
    steps[:, 96:] = 1.0
    steps[96:, :] = 1.0 - steps[96:, :]  # a vertical and a horizontal step edge
    blurred = gaussian_filter(0.2 + 0.6 * steps, sigma, mode="reflect")
    images = torch.from_numpy(blurred).float().expand(1, 3, 192, 192)
    assert abs(float(measures.edge_blur(images)) - sigma) < 0.15 * sigma + 0.1


def test_blockiness_finds_a_shifted_grid() -> None:
    image = photos()["astronaut"]
    compressed = to_tensor(jpeg(image, 20, 0))
    base = float(measures.blockiness(compressed[None]))
    shifted = float(measures.blockiness(compressed[None, :, 3:, 5:]))
    clean = float(measures.blockiness(to_tensor(image)[None]))
    assert base > 0.3 and abs(shifted - base) < 0.05 and clean < 0.15


@given(
    st.integers(128, 180),
    st.integers(128, 180),
    st.sampled_from(["uniform", "constant", "binary", "ramp", "dark"]),
    st.integers(0, 1000),
)
def test_any_content_gives_finite_scores_in_range(h: int, w: int, kind: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        images = torch.rand(2, 3, h, w, generator=generator)
    elif kind == "constant":
        images = torch.rand(2, 3, 1, 1, generator=generator).expand(2, 3, h, w)
    elif kind == "binary":
        images = (torch.rand(2, 1, h, w, generator=generator) > 0.5).float().expand(2, 3, h, w)
    elif kind == "ramp":
        images = torch.linspace(0, 1, w).expand(2, 3, h, w)
    else:
        images = torch.rand(2, 3, h, w, generator=generator) * 0.01
    out = WeightFreeDegradationEstimator()(images.contiguous())
    assert out.scores.shape == (2, 4) and bool(torch.isfinite(out.scores).all())
    assert bool(((out.scores >= 0) & (out.scores <= 1)).all())
    raw = measures.measure(images.contiguous())
    assert all(bool(torch.isfinite(value).all()) for value in raw.values()), raw


def test_flat_image() -> None:
    flat = torch.full((1, 3, 128, 128), 0.5)
    out = WeightFreeDegradationEstimator()(flat)
    blur, noise_, jpeg_, _ = out.scores[0].tolist()
    assert blur > 0.99 and noise_ < 0.01 and jpeg_ < 0.05  # no edges reads as blurred; no noise, no blocking


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu() -> None:
    estimator = WeightFreeDegradationEstimator()
    images = torch.stack([to_tensor(downscale(image, 2, 0)) for image in photos().values()])
    cpu = estimator(images)
    gpu = estimator(images.cuda())
    assert gpu.scores.device.type == "cuda"
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, atol=1e-3, rtol=0)


if __name__ == "__main__":
    print(sweep_tables())
