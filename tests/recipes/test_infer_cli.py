"""Loading a trained checkpoint (``real_isr.trained``) and the inference CLI (``real_isr.infer``), offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")  # carrier of the CLIP BPE vocabulary of the tiny tokenizer

from peft import LoraConfig  # noqa: E402
from real_isr import infer, trained  # noqa: E402
from real_isr.model import OneStepSR  # noqa: E402
from real_isr.tiling import super_resolve  # noqa: E402
from real_isr.tiny import build_tiny_sd  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import rankmoe  # noqa: E402
from rankmoe.conditioning.base import DegradationEstimator  # noqa: E402

ROUTED = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, router="condition",
              router_kwargs={"condition_dim": 4})
ESTIMATOR = {"kind": "weight_free"}


class CountingEstimator(DegradationEstimator):
    """4 scores from the image mean ``m``: ``(m, 1 - m, m / 2, 0.25)``; records the shape of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.names = ("blur", "noise", "jpeg", "resolution")
        self.calls: list[tuple[int, ...]] = []

    def score(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(images.shape))
        m = images.mean(dim=(1, 2, 3))
        return torch.stack([m, 1 - m, m / 2, torch.full_like(m, 0.25)], dim=-1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One intra-op thread: the CPUs are shared, and spinning OpenMP threads slow small models down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny SD folder, a trained-looking model (random adapters) and its checkpoint in ``out/checkpoint-5``."""
    root = tmp_path_factory.mktemp("infer")
    folder = build_tiny_sd(root / "tiny-sd", seed=0)
    torch.manual_seed(0)
    model = OneStepSR.from_pretrained(
        folder, unet_config=rankmoe.RankMoEConfig(**ROUTED),
        vae_config=LoraConfig(r=4, init_lora_weights="gaussian"), train_conv_in=True,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    checkpoint = root / "out" / "checkpoint-5"
    model.save_adapters(checkpoint)
    trained.write_recipe_file(checkpoint, pretrained_model=folder, estimator=ESTIMATOR, prompt="", timestep=999,
                              scale=4, step=5)
    return {"folder": folder, "model": model, "out": root / "out", "checkpoint": checkpoint}


def save_png(path: Path, image: torch.Tensor, mode: str = "RGB") -> Path:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


# ------------------------------------------------------------------------------------------------ recipe.json


def test_recipe_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = trained.write_recipe_file(tmp_path, pretrained_model=tmp_path / "sd", estimator={"kind": None},
                                     prompt="a photo", timestep=999, scale=4, step=12, extra={"seed": 3})
    assert path == tmp_path / "recipe.json" and not list(tmp_path.glob(".*tmp"))
    expected = {"format": 1, "pretrained_model": str(tmp_path / "sd"), "estimator": {"kind": None},
                "prompt": "a photo", "timestep": 999, "scale": 4, "step": 12, "seed": 3}
    assert trained.read_recipe_file(tmp_path) == expected == json.loads(path.read_text())
    assert trained.read_recipe_file(path) == expected

    for change, message in (({"format": 2}, "format 2"), ({"timestep": "999"}, "timestep must be int"),
                            ({"estimator": {"kind": "dino"}}, "kind 'dino' is unknown")):
        path.write_text(json.dumps({**expected, **change}))
        with pytest.raises(ValueError, match=message):
            trained.read_recipe_file(tmp_path)
    path.write_text(json.dumps({k: v for k, v in expected.items() if k != "scale"}))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['scale'\]"):
        trained.read_recipe_file(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="recipe.json is not valid JSON"):
        trained.read_recipe_file(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing" / "recipe.json")):
        trained.read_recipe_file(tmp_path / "missing")
    common = dict(pretrained_model="sd", estimator=None, prompt="", timestep=999, scale=4, step=0)
    for change, message in (({"timestep": -1}, "timestep must be an int >= 0, got -1"),
                            ({"scale": 0}, "scale must be an int >= 1"), ({"prompt": None}, "prompt must be a str"),
                            ({"estimator": {"kind": "x"}}, "kind 'x' is unknown"),
                            ({"extra": {"step": 1}}, "may not replace"),
                            ({"estimator": {"kind": None, "severity": {1, 2}}}, "must be JSON data")):
        with pytest.raises(ValueError, match=message):
            trained.write_recipe_file(tmp_path, **{**common, **change})


def test_resolve_checkpoint_final_else_newest_complete(tmp_path: Path) -> None:
    def fake(folder: Path, files: tuple[str, ...] = trained.CHECKPOINT_FILES) -> Path:
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("x")
        return folder

    fake(tmp_path / "checkpoint-9")
    newest = fake(tmp_path / "checkpoint-10")  # numeric, not lexical order
    fake(tmp_path / "checkpoint-11", files=("adapters.json",))  # interrupted save: passed over
    assert trained.resolve_checkpoint(tmp_path) == newest
    assert trained.resolve_checkpoint(newest) == newest
    final = fake(tmp_path / "final")
    assert trained.resolve_checkpoint(tmp_path) == final
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        trained.resolve_checkpoint(tmp_path / "checkpoint-11")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trained.resolve_checkpoint(tmp_path / "nowhere")
    shutil.rmtree(final)
    fake(tmp_path / "final", files=("recipe.json",))
    with pytest.raises(FileNotFoundError, match=r"final lacks \['adapters.safetensors', 'adapters.json'\]"):
        trained.resolve_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ loading


def test_adapter_configs_rebuild_the_saved_configs(run: dict, tmp_path: Path) -> None:
    unet, vae, conv_in = trained.adapter_configs(run["checkpoint"])
    assert isinstance(unet, rankmoe.RankMoEConfig) and isinstance(vae, LoraConfig) and conv_in is True
    assert (unet.r, unet.num_shared_ranks, unet.top_k, unet.num_zero_experts, unet.router, unet.router_kwargs) == (
        8, 2, 2, 2, "condition", {"condition_dim": 4})
    assert (vae.r, vae.init_lora_weights) == (4, "gaussian")
    assert unet.target_modules == run["model"].unet.peft_config["default"].target_modules

    broken = shutil.copytree(run["checkpoint"], tmp_path / "broken")
    config = json.loads((broken / "adapters.json").read_text())
    config["adapters"]["vae"]["type"] = "IA3Config"
    (broken / "adapters.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapters.json: adapter 'vae' has type 'IA3Config'"):
        trained.adapter_configs(broken)
    (broken / "adapters.json").write_text('{"format": 1, "adapters": {')
    with pytest.raises(ValueError, match=r"adapters.json is not valid JSON"):
        trained.adapter_configs(broken)


def test_load_trained_round_trip_gives_identical_outputs(run: dict) -> None:
    model, estimator, recipe = trained.load_trained(run["out"])  # output dir -> newest checkpoint
    assert recipe["checkpoint"] == str(run["checkpoint"]) and recipe["step"] == 5
    assert isinstance(estimator, rankmoe.WeightFreeDegradationEstimator) and not model.training
    lr = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    scores = estimator(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3)))
    assert scores.names == ("blur", "noise", "jpeg", "resolution")
    expected = super_resolve(run["model"], lr, 4, scores)
    assert torch.equal(super_resolve(model, lr, 4, scores), expected)
    loaded = model.adapter_state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in run["model"].adapter_state_dict().items())
    untrained = OneStepSR.from_pretrained(run["folder"], unet_config=rankmoe.RankMoEConfig(**ROUTED),
                                          vae_config=LoraConfig(r=4, init_lora_weights="gaussian"),
                                          train_conv_in=True).eval()
    assert (super_resolve(untrained, lr, 4, scores) - expected).abs().max() > 1e-3  # the weights matter


def test_load_trained_refuses_truncated_and_mismatched_weights(run: dict, tmp_path: Path) -> None:
    truncated = shutil.copytree(run["checkpoint"], tmp_path / "truncated")
    weights = truncated / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated/adapters.safetensors is not a readable safetensors file"):
        trained.load_trained(truncated)

    mismatched = shutil.copytree(run["checkpoint"], tmp_path / "mismatched")
    state = load_file(mismatched / "adapters.safetensors")
    key = next(k for k in state if "rankmoe_A" in k)
    state[key] = state[key][:4].contiguous()  # rank 4 where the config says 8
    save_file(state, mismatched / "adapters.safetensors")
    with pytest.raises(ValueError, match=r"does not match this model \(nothing was loaded\).*shape mismatch"):
        trained.load_trained(mismatched)
    with pytest.raises(FileNotFoundError, match="model folder .*nowhere does not exist"):
        trained.load_trained(run["checkpoint"], tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ infer CLI


@pytest.fixture
def counting(run: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make ``infer.main`` load the checkpoint for real but score with a :class:`CountingEstimator` (the weight-free
    estimator needs LR images of 128 px or more, i.e. outputs of 512 px: too slow for a unit test)."""
    loaded: dict = {}

    def load(*args: object, **kwargs: object) -> tuple:
        model, estimator, recipe = trained.load_trained(*args, **kwargs)
        assert isinstance(estimator, rankmoe.WeightFreeDegradationEstimator)
        loaded.update(model=model, estimator=CountingEstimator(), recipe=recipe)
        return model, loaded["estimator"], recipe

    monkeypatch.setattr(infer, "load_trained", load)
    return loaded


def test_infer_main_writes_scale_times_outputs_with_one_estimate_per_image(
    run: dict, counting: dict, astronaut: torch.Tensor, tmp_path: Path
) -> None:
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    wide = save_png(lr_dir / "wide.png", astronaut[0, :, 100:150, 200:275])  # 50 x 75 (H x W)
    save_png(lr_dir / "small.png", astronaut[0, :, 300:324, 100:132], mode="L")  # grey, 24 x 32
    out = tmp_path / "sr"
    argv = ["--checkpoint", str(run["out"]), "--input", str(lr_dir), "--output", str(out), "--min_lr_size", "0",
            "--tile", "16", "--overlap", "4", "--save_scores", "--quiet", "--device", "cpu"]
    assert infer.main(argv) == 0
    with Image.open(out / "wide.png") as a, Image.open(out / "small.png") as b:
        assert (a.size, b.size, a.mode) == ((300, 200), (128, 96), "RGB")  # PIL: (W, H) = 4 x LR
    assert counting["estimator"].calls == [(1, 3, 24, 32), (1, 3, 50, 75)]  # whole LR, once each, name order

    lr = infer.load_image(wide)[None]
    scores = CountingEstimator()(lr)
    expected = super_resolve(counting["model"], lr, 4, scores, tile=16, overlap=4, color_fix="adain")
    written = torch.from_numpy(np.asarray(Image.open(out / "wide.png"), dtype=np.float32)).permute(2, 0, 1) / 255
    assert torch.equal(written, (expected[0] * 255).round() / 255)

    report = json.loads((out / "scores.json").read_text())
    assert sorted(report["images"]) == ["small", "wide"] and report["scale"] == 4 and report["step"] == 5
    m = float(lr.mean())
    record = report["images"]["wide"]
    assert record["scores"] == pytest.approx({"blur": m, "noise": 1 - m, "jpeg": m / 2, "resolution": 0.25})
    assert record["severity"] == pytest.approx((m + (1 - m) + m / 2 + 0.25) / 4)
    assert record["lr_size"] == [50, 75] and record["sr_size"] == [200, 300] and record["enlarged_to"] is None
    assert 2 <= record["mean_active_ranks"]["unet"] <= 4  # 2 shared + at most top_k = 2 routed experts


def test_min_lr_size_enlarges_then_restores_the_size(run: dict, counting: dict, tmp_path: Path) -> None:
    assert infer.enlarge_to_min_size(torch.rand(1, 3, 24, 32), 40).shape[-2:] == (40, 53)  # 32 * 40 / 24 = 53.3
    lr = torch.rand(1, 3, 30, 20)
    assert infer.enlarge_to_min_size(lr, 20) is lr and infer.enlarge_to_min_size(lr, 0) is lr
    image = save_png(tmp_path / "tiny.png", torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(4)))
    assert infer.main(["--checkpoint", str(run["checkpoint"]), "--input", str(image), "--output",
                       str(tmp_path / "sr"), "--min_lr_size", "40", "--scale", "2", "--quiet", "--save_scores"]) == 0
    with Image.open(tmp_path / "sr" / "tiny.png") as sr:
        assert sr.size == (64, 48)  # 2 x (32, 24), not 2 x the enlarged (53, 40)
    assert counting["estimator"].calls == [(1, 3, 40, 53)]  # the estimator scores what the model receives
    record = json.loads((tmp_path / "sr" / "scores.json").read_text())["images"]["tiny"]
    assert record["enlarged_to"] == [40, 53] and record["sr_size"] == [48, 64]


def test_infer_input_errors_come_before_loading(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no-checkpoint")  # loading it would fail differently: the checks run first

    def call(source: Path, output: Path | None = None) -> None:
        infer.main(["--checkpoint", nowhere, "--input", str(source), "--output", str(output or tmp_path / "o")])

    with pytest.raises(FileNotFoundError, match="input .*missing not found"):
        call(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files .* in .*empty"):
        call(tmp_path / "empty")
    cmyk = tmp_path / "cmyk"
    cmyk.mkdir()
    Image.new("CMYK", (8, 8)).save(cmyk / "a.jpg")
    with pytest.raises(ValueError, match="a.jpg: unsupported image mode 'CMYK'"):
        call(cmyk)
    rgb = save_png(tmp_path / "x.png", torch.rand(3, 8, 8))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output .*file exists and is not a folder"):
        call(rgb, tmp_path / "file")
    with pytest.raises(ValueError, match=r"would overwrite the input\(s\)"):
        call(rgb, tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*x.jpg"):
        call(tmp_path / "x.jpg")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            infer.main(["--checkpoint", nowhere, "--input", str(rgb), "--output", str(tmp_path / "o"), "--device",
                        "cuda"])
    with pytest.raises(SystemExit):
        infer.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--tile", "8", "--overlap", "8"])


def test_weight_free_estimator_on_small_lr_names_min_lr_size(run: dict, tmp_path: Path) -> None:
    image = save_png(tmp_path / "lr.png", torch.rand(3, 24, 32))
    with pytest.raises(ValueError, match=r"lr.png: the degradation estimator refused the 24x32 LR .*--min_lr_size"):
        infer.main(["--checkpoint", str(run["checkpoint"]), "--input", str(image), "--output", str(tmp_path / "sr"),
                    "--min_lr_size", "0", "--quiet"])


def test_default_min_lr_size_with_the_weight_free_estimator(run: dict, tmp_path: Path) -> None:
    """The real path: 24 x 32 LR -> enlarged to 128 x 171 (the estimator's minimum) -> x2 -> resized to 48 x 64."""
    image = save_png(tmp_path / "lr.png", torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(5)))
    assert infer.main(["--checkpoint", str(run["out"]), "--input", str(image), "--output", str(tmp_path / "sr"),
                       "--scale", "2", "--quiet", "--save_scores", "--color_fix", "wavelet"]) == 0
    with Image.open(tmp_path / "sr" / "lr.png") as sr:
        assert sr.size == (64, 48)
    report = json.loads((tmp_path / "sr" / "scores.json").read_text())
    record = report["images"]["lr"]
    assert record["enlarged_to"] == [128, 171] and report["settings"]["color_fix"] == "wavelet"
    enlarged = infer.enlarge_to_min_size(infer.load_image(image)[None], 128)
    expected = rankmoe.WeightFreeDegradationEstimator()(enlarged)
    assert record["scores"] == pytest.approx({k: float(v) for k, v in expected.as_dict().items() if k != "severity"})
    assert record["severity"] == pytest.approx(float(expected.severity))


def test_script_runs_from_any_folder(tmp_path: Path) -> None:
    script = Path(infer.__file__)
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--min_lr_size" in done.stdout and "--save_scores" in done.stdout
