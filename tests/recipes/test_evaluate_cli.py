"""The evaluation CLI (``real_isr.evaluate``): metrics per image and on average, reports, optional metrics, FID."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from real_isr import evaluate
from real_isr.images import load_image
from real_isr.lpips import LPIPS, vgg16_features
from real_isr.metrics import niqe

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One intra-op thread: the CPUs are shared, and spinning OpenMP threads slow small models down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, astronaut: torch.Tensor) -> tuple[Path, Path]:
    """``hr/`` and ``sr/`` with a (96 x 200, noisy SR), b (100 x 120: too small for NIQE), c (96 x 192, SR = HR)."""
    root = tmp_path_factory.mktemp("evaluate")
    generator = torch.Generator().manual_seed(0)
    crops = {"a": (0, 96, 0, 200), "b": (200, 300, 200, 320), "c": (300, 396, 300, 492)}
    for name, (top, bottom, left, right) in crops.items():
        hr = astronaut[0, :, top:bottom, left:right]
        noise = 0.0 if name == "c" else 0.04 * torch.randn(hr.shape, generator=generator)
        save_png(root / "hr" / f"{name}.png", hr)
        save_png(root / "sr" / f"{name}.png", (hr + noise).clamp(0, 1))
    return root / "sr", root / "hr"


def y_channel(path: Path, crop: int) -> np.ndarray:
    """BT.601 Y (MATLAB rgb2ycbcr) of an 8-bit file, float64 in [0, 1], ``crop`` pixels removed on every side."""
    rgb = np.asarray(Image.open(path), dtype=np.float64) / 255
    y = (16 + rgb @ np.array([65.481, 128.553, 24.966])) / 255
    return y[crop:-crop, crop:-crop]


def test_psnr_ssim_niqe_match_hand_computations(folders: tuple[Path, Path]) -> None:
    from skimage.metrics import structural_similarity

    sr, hr = folders
    result = evaluate.evaluate_folders(sr, hr, crop_border=4, progress=False)
    assert result["settings"]["metrics"] == ["psnr", "ssim", "niqe"] and result["count"] == 3
    images = result["images"]
    for name in ("a", "b"):
        x, y = y_channel(sr / f"{name}.png", 4), y_channel(hr / f"{name}.png", 4)
        expected = 10 * math.log10(1 / np.mean((x - y) ** 2))
        assert images[name]["psnr"] == pytest.approx(expected, rel=1e-7)  # load_image gives float32
        reference = structural_similarity(x * 255, y * 255, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)
        assert images[name]["ssim"] == pytest.approx(reference, abs=1e-6)
    assert images["c"]["psnr"] == math.inf and images["c"]["ssim"] == pytest.approx(1.0)
    assert 20 < images["a"]["psnr"] < 35 and images["a"]["ssim"] < 0.95  # the noise is visible
    for name in ("a", "c"):
        assert images[name]["niqe"] == float(niqe(load_image(sr / f"{name}.png")[None]))
    assert math.isnan(images["b"]["niqe"])  # 100 x 120 holds one 96 x 96 block, NIQE needs two
    mean = result["mean"]
    assert mean["psnr"] == math.inf
    assert mean["ssim"] == pytest.approx(np.mean([images[n]["ssim"] for n in "abc"]))
    assert mean["niqe"] == pytest.approx((images["a"]["niqe"] + images["c"]["niqe"]) / 2)
    assert any("b (100x120)" in note and "NIQE" in note for note in result["notes"])


def test_reports_json_and_markdown(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sr, hr = folders
    assert evaluate.main(["--sr", str(sr), "--hr", str(hr), "--output", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    result = evaluate.evaluate_folders(sr, hr, progress=False)
    assert report["images"]["c"]["psnr"] == "inf" and report["mean"]["psnr"] == "inf"  # JSON has no inf
    assert report["images"]["b"]["niqe"] is None  # nor NaN
    assert report["images"]["a"]["psnr"] == result["images"]["a"]["psnr"]
    assert report["settings"]["crop_border"] == 4 and "rgb2ycbcr" in report["settings"]["luma"]
    assert report["settings"]["metrics"] == ["psnr", "ssim", "niqe"]

    table = (tmp_path / "metrics.md").read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0] == "| image | PSNR ↑ | SSIM ↑ | NIQE ↓ |" and lines[1] == "|---|---:|---:|---:|"
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [row[0] for row in rows] == ["| a", "| b", "| c", "| **mean**"]
    values = result["images"]["a"]
    assert rows[0][1:] == [f"{values['psnr']:.2f}", f"{values['ssim']:.4f}", f"{values['niqe']:.4f} |"]
    assert rows[1][3] == "n/a |" and rows[2][1] == "inf" and rows[3][1] == "inf"
    assert lines[6] == "" and lines[7].startswith("- NIQE needs two whole 96x96 blocks")


def test_selection_matching_and_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    sr, hr = folders
    assert evaluate.evaluate_folders(sr, progress=False)["settings"]["metrics"] == ["niqe"]  # no HR: NR only
    suffixed = tmp_path / "hr_suffixed"
    suffixed.mkdir()
    for name in "abc":
        shutil.copy(hr / f"{name}.png", suffixed / f"{name}_HR.png")
    plain = evaluate.evaluate_folders(sr, hr, metrics=["psnr"], progress=False)
    assert evaluate.evaluate_folders(sr, suffixed, metrics=["psnr"], hr_suffix="_HR", progress=False)["images"] == (
        plain["images"])

    with pytest.raises(ValueError, match="metric 'psnr' compares with references"):
        evaluate.evaluate_folders(sr, metrics=["psnr"])
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['psnr_y'\]"):
        evaluate.evaluate_folders(sr, hr, metrics=["psnr_y"])
    with pytest.raises(ValueError, match="metric 'lpips' needs local weights: pass --lpips_vgg16 and --lpips_heads"):
        evaluate.evaluate_folders(sr, hr, metrics=["lpips"])
    with pytest.raises(FileNotFoundError, match="weight file .*nowhere.pth for metric 'fid' not found"):
        evaluate.evaluate_folders(sr, hr, fid_inception=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match=r"pyiqa_weights has unknown metric\(s\) \['niqe'\]"):
        evaluate.evaluate_folders(sr, hr, pyiqa_weights={"niqe": "x"})
    partial = tmp_path / "hr_partial"
    shutil.copytree(hr, partial)
    (partial / "c.png").unlink()
    with pytest.raises(ValueError, match=r"SR without HR \['c'\]"):
        evaluate.evaluate_folders(sr, partial)
    save_png(partial / "c.png", torch.rand(3, 96, 96))
    with pytest.raises(ValueError, match=r"c.png is 192x96 but .*c.png is 96x96 \(WxH\)"):
        evaluate.evaluate_folders(sr, partial)
    with pytest.raises(ValueError, match=r"a.png: .*leaves 0x104 pixels"):
        evaluate.evaluate_folders(sr, hr, crop_border=48, metrics=["psnr"], progress=False)
    with pytest.raises(FileNotFoundError, match="SR folder not found"):
        evaluate.evaluate_folders(tmp_path / "missing")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--sr", str(sr), "--lpips_vgg16", "x"])  # both LPIPS files or none


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), 0.5 + rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert evaluate.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
    # singular, commuting covariances: sum of (sqrt(a_i) - sqrt(b_i))^2 + |mu1 - mu2|^2 = (0 - 1) + 0 + (2 - 0)^2 + 3
    distance = evaluate.frechet_distance(np.zeros(3), np.diag([0.0, 1, 4]), np.array([1.0, 1, 1]), np.diag([1.0, 1, 0]))
    assert distance == pytest.approx(1 + 4 + 3, rel=1e-12)
    with pytest.raises(ValueError, match="need mu"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


@pytest.mark.parametrize(("n1", "n2", "d"), [(4, 7, 10), (30, 40, 5), (3, 3, 3)])
def test_fid_from_features_equals_the_covariance_formula(n1: int, n2: int, d: int) -> None:
    """Fewer samples than dimensions (nuclear-norm route), more (covariance route), and the boundary."""
    rng = np.random.default_rng(n1)
    f1, f2 = rng.normal(size=(n1, d)), 0.3 + 2 * rng.normal(size=(n2, d))
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert evaluate.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert evaluate.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="n >= 2"):
        evaluate.fid_from_features(f1[:1], f2)


def test_lpips_and_fid_from_local_weight_files(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    sr, hr = folders
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "heads.pth")
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")

    result = evaluate.evaluate_folders(sr, hr, metrics=["lpips", "fid"], progress=False, fid_inception=tmp_path /
                                       "inception.pth", lpips_weights=(tmp_path / "vgg16.pth", tmp_path / "heads.pth"))
    lpips = LPIPS(tmp_path / "vgg16.pth", tmp_path / "heads.pth")
    for name in "abc":
        x, y = load_image(sr / f"{name}.png")[None], load_image(hr / f"{name}.png")[None]
        assert result["images"][name]["lpips"] == pytest.approx(float(lpips(2 * x - 1, 2 * y - 1)), rel=1e-6)
    assert result["images"]["c"]["lpips"] == 0 < result["images"]["a"]["lpips"]

    net.fc = torch.nn.Identity()
    net.eval()

    def features(folder: Path) -> np.ndarray:
        resize = torch.nn.functional.interpolate
        images = torch.cat([resize(load_image(folder / f"{n}.png")[None], size=(299, 299), mode="bilinear")
                            for n in "abc"])
        with torch.no_grad():  # torchvision's transform_input maps ImageNet-normalised input to 2 x - 1, as here
            return net(2 * images - 1).double()

    expected = evaluate.fid_from_features(features(sr).numpy(), features(hr).numpy())  # checked on its own below
    assert result["fid"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert "FID ↓ (SR vs HR, 3 images each)" in evaluate.markdown_table(result)


def fake_pyiqa(created: list) -> types.ModuleType:
    """A stand-in for pyiqa: NR metrics score the image mean, FR ones the mean absolute difference."""
    module = types.ModuleType("pyiqa")
    module.__version__ = "9.9-fake"

    def create_metric(name: str, as_loss: bool = False, device: object = None, **kwargs: object) -> object:
        created.append((name, as_loss, device, kwargs))
        if name == "dists":
            return lambda x, y: (x - y).abs().mean(dim=(1, 2, 3))
        return lambda x: x.mean(dim=(1, 2, 3))[:, None]  # (b, 1), as several pyiqa metrics return

    module.create_metric = create_metric
    return module


def test_pyiqa_metrics_get_the_local_weight_paths(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sr, hr = folders
    files = {name: tmp_path / f"{name}.pth" for name in evaluate.PYIQA_METRICS}
    for path in files.values():
        path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # not installed
    with pytest.raises(ImportError, match="pip install pyiqa"):
        evaluate.evaluate_folders(sr, pyiqa_weights={"musiq": files["musiq"]})
    with pytest.raises(ImportError, match="pip install pyiqa"):
        evaluate.main(["--sr", str(sr), "--clipiqa_weights", str(files["clipiqa"]), "--quiet"])

    created: list = []
    monkeypatch.setitem(sys.modules, "pyiqa", fake_pyiqa(created))
    result = evaluate.evaluate_folders(sr, hr, pyiqa_weights=files, progress=False)
    assert result["settings"]["metrics"] == ["psnr", "ssim", "niqe", "dists", "musiq", "maniqa", "clipiqa"]
    assert created == [
        ("dists", False, "cpu", {"pretrained_model_path": str(files["dists"])}),
        ("musiq", False, "cpu", {"pretrained_model_path": str(files["musiq"])}),
        ("maniqa-pipal", False, "cpu", {"pretrained_model_path": str(files["maniqa"])}),
        ("clipiqa", False, "cpu", {"backbone": str(files["clipiqa"])}),
    ]
    for name in "abc":
        x, y = load_image(sr / f"{name}.png"), load_image(hr / f"{name}.png")
        values = result["images"][name]
        assert values["dists"] == pytest.approx(float((x - y).abs().mean()), rel=1e-6)
        assert values["musiq"] == values["maniqa"] == values["clipiqa"] == pytest.approx(float(x.mean()), rel=1e-6)
    assert "pyiqa 9.9-fake 'maniqa-pipal'" in result["settings"]["implementations"]["maniqa"]
    assert "| DISTS ↓ | MUSIQ ↑ | MANIQA ↑ | CLIPIQA ↑ |" in evaluate.markdown_table(result)
    with pytest.raises(ValueError, match="metric 'dists' compares with references"):
        evaluate.evaluate_folders(sr, pyiqa_weights=files)


def test_script_runs_from_any_folder(folders: tuple[Path, Path], tmp_path: Path) -> None:
    sr, _ = folders
    done = subprocess.run([sys.executable, evaluate.__file__, "--sr", str(sr), "--output", str(tmp_path), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| image | NIQE ↓ |") and (tmp_path / "metrics.json").is_file()
