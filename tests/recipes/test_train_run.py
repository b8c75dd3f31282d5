"""train.py end to end on the tiny SD-shaped model: every loss on, checkpoints, resume, gradient accumulation and
checkpointing, mixed precision, two processes over gloo, and the errors of a bad resume."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("accelerate")

import real_isr.train as train_script  # noqa: E402
from real_isr.tiny import build_tiny_sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "real_isr" / "configs" / "tiny.yaml"
WORKER = Path(__file__).resolve().parent / "scripts" / "ddp_train_worker.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, astronaut):
    """A tiny SD folder and 4 HR photographs (160 x 160 crops of the astronaut) for training, 2 for validation."""
    from real_isr.images import save_image

    root = tmp_path_factory.mktemp("train-assets")
    folder = build_tiny_sd(root / "tiny-sd", seed=0)
    for i in range(4):
        save_image(astronaut[0, :, 60 * i: 60 * i + 160, 50 * i: 50 * i + 160], root / "hr" / f"{i}.png")
    for i in range(2):
        save_image(astronaut[0, :, 300: 460, 100 + 200 * i: 260 + 200 * i], root / "val" / f"{i}.png")
    return folder, root / "hr", root / "val"


def _argv(assets, out, *extra: str) -> list[str]:
    folder, hr, _ = assets
    return ["--config", str(TINY), "--pretrained_model", str(folder), "--train_data", str(hr), "--output_dir",
            str(out), *extra]


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapters.safetensors")


def _rows(path: Path) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            table.setdefault(row["key"], {})[int(row["step"])] = float(row["value"])
    return table


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    """The tiny preset as shipped: 20 steps, every loss on (L2, LPIPS, VSD, GAN, balance + z-loss)."""
    _, _, val = assets
    out = tmp_path_factory.mktemp("tiny-run")
    result = train_script.main(_argv(assets, out, "--validation_data", str(val), "--checkpointing_steps", "5"))
    return out, result


def test_tiny_preset_trains_with_every_loss(tiny_run):
    out, result = tiny_run
    assert result["global_step"] == 20
    table = _rows(out / "logs" / "metrics.csv")
    for key in ("l2", "lpips", "vsd", "gan", "aux", "total", "regularizer", "discriminator"):
        values = table[f"loss/{key}"]
        assert sorted(values) == [5, 10, 15, 20], key
        assert all(math.isfinite(v) and v != 0 for v in values.values()), (key, values)
    assert 2.0 <= table["rankmoe/active_ranks"][20] <= 4.0  # 2 shared + top-2 of 6 rank-1 experts / 2 zero slots
    # total = l2 + 2 lpips + vsd + 0.1 gan + aux (means over the same steps, so the identity holds for the means)
    for step in (5, 20):
        parts = {k: table[f"loss/{k}"][step] for k in ("l2", "lpips", "vsd", "gan", "aux")}
        expected = parts["l2"] + 2 * parts["lpips"] + parts["vsd"] + 0.1 * parts["gan"] + parts["aux"]
        assert table["loss/total"][step] == pytest.approx(expected, rel=1e-5)


def test_checkpoints_every_n_steps_with_a_limit(tiny_run):
    out, _ = tiny_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]  # limit 2
    expected = {"adapters.safetensors", "adapters.json", "recipe.json", "regularizer.safetensors",
                "discriminator.safetensors", "optimizers.pt", "training_state.json", "rng_state_0.pt"}
    assert {p.name for p in (out / "checkpoint-20").iterdir()} == expected
    size = sum(p.stat().st_size for p in (out / "checkpoint-20").iterdir())
    assert size < 20e6  # adapters and optimiser states only, never the frozen model
    final, last = _adapters(out / "final"), _adapters(out / "checkpoint-20")
    assert final.keys() == last.keys()
    assert all(torch.equal(v, last[k]) for k, v in final.items())


def test_validation_grid_and_plots(tiny_run):
    from PIL import Image

    out, _ = tiny_run
    grids = sorted((out / "validation").glob("*.png"))
    assert [p.name for p in grids] == ["step-0000010.png", "step-0000020.png"]
    assert Image.open(grids[-1]).size == (3 * 128, 2 * 128)  # columns LR | SR | HR, one row per image
    table = _rows(out / "logs" / "metrics.csv")
    assert sorted(table["val/psnr"]) == [10, 20] and all(math.isfinite(v) for v in table["val/psnr"].values())
    assert {p.name for p in (out / "plots").glob("*.png")} == {
        "routing_slot_load.png", "routing_active_ranks.png", "routing_severity.png"}


def test_final_checkpoint_reloads_to_the_trained_model(tiny_run, assets):
    from real_isr.trained import load_trained

    out, result = tiny_run
    model, estimator, recipe = load_trained(out / "final")
    assert recipe["step"] == 20 and estimator is not None
    trained = result["model"].eval()
    lr = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = estimator(lr)
        torch.testing.assert_close(model(lr, scores), trained(lr, scores), rtol=0, atol=0)


def _interrupt_after(monkeypatch, micro_steps: int) -> None:
    original = train_script._train_micro_step
    calls = []

    def step(*args, **kwargs):
        if len(calls) == micro_steps:
            raise KeyboardInterrupt("stopped by the test")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_script, "_train_micro_step", step)


def test_resume_equals_an_uninterrupted_run(assets, tmp_path, monkeypatch):
    common = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1",
              "--train_batch_size", "1", "--checkpoints_total_limit", "null")
    straight = train_script.main(_argv(assets, tmp_path / "straight", *common))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)  # dies in step 4 of 4 — after checkpoint-2, before checkpoint-4
        with pytest.raises(KeyboardInterrupt):
            train_script.main(_argv(assets, tmp_path / "resumed", *common))
    assert not (tmp_path / "resumed" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train_script.main(_argv(assets, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    assert resumed["global_step"] == straight["global_step"] == 4
    a, b = _adapters(tmp_path / "straight" / "final"), _adapters(tmp_path / "resumed" / "final")
    start = _adapters(tmp_path / "straight" / "checkpoint-2")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert any(not torch.equal(a[k], start[k]) for k in a)  # steps 3-4 changed something
    for name in ("regularizer.safetensors", "discriminator.safetensors"):
        from safetensors.torch import load_file

        x = load_file(tmp_path / "straight" / "checkpoint-4" / name)
        y = load_file(tmp_path / "resumed" / "checkpoint-4" / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    # the logged losses of steps 3 and 4 are the same numbers too
    s, r = _rows(tmp_path / "straight" / "logs" / "metrics.csv"), _rows(tmp_path / "resumed" / "logs" / "metrics.csv")
    assert [s["loss/total"][k] for k in (3, 4)] == [r["loss/total"][k] for k in (3, 4)]


@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-run")
    train_script.main(_argv(assets, out, "--max_train_steps", "1", "--checkpointing_steps", "1",
                            "--train_batch_size", "1", "--vsd_weight", "0", "--gan_weight", "0"))
    return out


def _resume(assets, source: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    return train_script.main(_argv(assets, out, "--max_train_steps", "1", "--train_batch_size", "1",
                                   "--vsd_weight", "0", "--gan_weight", "0", "--resume_from_checkpoint", "latest",
                                   *extra))


def test_resume_refuses_a_corrupt_checkpoint(assets, checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "src")
    weights = tmp_path / "src" / "checkpoint-1" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapters.safetensors is corrupt or truncated"):
        _resume(assets, tmp_path / "src", tmp_path)


def test_resume_refuses_other_settings_and_other_adapters(assets, checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"other settings \(train_batch_size: checkpoint 1, this run 2\)"):
        _resume(assets, checkpoint, tmp_path / "a", "--train_batch_size", "2")
    other = ('{"type": "rankmoe", "r": 12, "lora_alpha": 12, "num_shared_ranks": 2, "top_k": 2, '
             '"num_zero_experts": 2, "router": "condition", "router_kwargs": {"condition_dim": 4}}')
    with pytest.raises(ValueError, match=r"does not match this model \(nothing was loaded\): .*unet config r: "
                                         r"checkpoint 8, model 12"):
        _resume(assets, checkpoint, tmp_path / "b", "--unet_adapter", other)
    with pytest.raises(FileNotFoundError, match="is not a training checkpoint"):
        train_script.main(_argv(assets, tmp_path / "c", "--resume_from_checkpoint", str(tmp_path)))


def test_missing_model_folder_is_named(assets, tmp_path):
    folder, hr, _ = assets
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        train_script.main(["--config", str(TINY), "--pretrained_model", str(tmp_path / "nowhere"),
                           "--train_data", str(hr), "--output_dir", str(tmp_path / "out")])


def test_gradient_accumulation_counts_micro_batches(assets, tmp_path, monkeypatch):
    calls = []
    original = train_script._train_micro_step
    monkeypatch.setattr(train_script, "_train_micro_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = train_script.main(_argv(assets, tmp_path, "--max_train_steps", "2", "--gradient_accumulation_steps",
                                     "2", "--train_batch_size", "1", "--logging_steps", "1", "--vsd_weight", "0",
                                     "--gan_weight", "0"))
    assert result["global_step"] == 2 and len(calls) == 4
    assert sorted(_rows(tmp_path / "logs" / "metrics.csv")["loss/total"]) == [1, 2]


def test_gradient_checkpointing_and_bf16_autocast(assets, tmp_path):
    common = ("--max_train_steps", "1", "--train_batch_size", "1", "--vsd_weight", "0", "--gan_weight", "0",
              "--learning_rate", "1e-3")
    plain = train_script.main(_argv(assets, tmp_path / "plain", *common))["model"].adapter_state_dict()
    checkpointed = train_script.main(_argv(assets, tmp_path / "ckpt", *common, "--gradient_checkpointing", "true"))
    assert checkpointed["model"].unet.is_gradient_checkpointing
    for key, value in checkpointed["model"].adapter_state_dict().items():
        torch.testing.assert_close(value, plain[key], rtol=1e-5, atol=1e-7)
    bf16 = train_script.main(_argv(assets, tmp_path / "bf16", *common, "--mixed_precision", "bf16"))
    assert all(math.isfinite(v) for v in bf16["losses"].values())
    moved = [k for k, v in bf16["model"].adapter_state_dict().items() if "lora_B" in k or "rankmoe_B" in k]
    assert moved and all(bf16["model"].adapter_state_dict()[k].dtype == torch.float32 for k in moved)


def test_two_processes_end_with_identical_weights(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path), "--", *_argv(assets, tmp_path / "out", "--max_train_steps", "2",
                                                        "--train_batch_size", "1", "--checkpointing_steps", "2")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    start, rank0, rank1 = (torch.load(tmp_path / f"{name}.pt") for name in ("rank0_start", "rank0_end", "rank1_end"))
    assert rank0.keys() == rank1.keys() == start.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    changed = [k for k in rank0 if not torch.equal(rank0[k], start[k])]
    assert len(changed) > len(rank0) // 2  # every tensor but the (unused) selection biases
    assert all("selection_bias" in k for k in rank0 if k not in changed)
    assert (tmp_path / "out" / "checkpoint-2" / "rng_state_1.pt").is_file()


def test_infer_and_evaluate_on_the_trained_model(tiny_run, assets, tmp_path):
    """The trained tiny run through infer.py (one estimate per image, tiling) and evaluate.py (PSNR / SSIM)."""
    import json

    import torch.nn.functional as F
    from real_isr import evaluate, infer
    from real_isr.images import load_image, save_image
    from real_isr.metrics import psnr

    out, _ = tiny_run
    _, _, val = assets
    for path in sorted(val.glob("*.png")):  # LR = 4x area-downscaled HR, 40 x 40
        hr = load_image(path)[None]
        save_image(F.interpolate(hr, scale_factor=0.25, mode="area")[0], tmp_path / "lr" / path.name)
    assert infer.main(["--checkpoint", str(out), "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "sr"),
                       "--save_scores", "--quiet"]) == 0
    scores = json.loads((tmp_path / "sr" / "scores.json").read_text())
    assert sorted(p.name for p in (tmp_path / "sr").glob("*.png")) == ["0.png", "1.png"]
    assert load_image(tmp_path / "sr" / "0.png").shape == (3, 160, 160)
    assert sorted(scores["images"]) == ["0", "1"]
    for record in scores["images"].values():  # one weight-free estimate per image: 4 named scores and a severity
        assert sorted(record["scores"]) == ["blur", "jpeg", "noise", "resolution"]
        assert 0 <= record["severity"] <= 1 and 2 <= record["mean_active_ranks"]["unet"] <= 4
    assert evaluate.main(["--sr", str(tmp_path / "sr"), "--hr", str(val), "--output", str(tmp_path / "eval"),
                          "--quiet"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    table = (tmp_path / "eval" / "metrics.md").read_text()
    rows = table.splitlines()
    assert rows[0].split("|")[1:5] == [" image ", " PSNR ↑ ", " SSIM ↑ ", " NIQE ↓ "]
    assert [row.split("|")[1].strip() for row in rows[2:5]] == ["0", "1", "**mean**"]
    sr, hr = load_image(tmp_path / "sr" / "0.png")[None].double(), load_image(val / "0.png")[None].double()
    assert result["images"]["0"]["psnr"] == pytest.approx(float(psnr(sr, hr, crop_border=4)), rel=1e-6)
    assert result["images"]["0"]["niqe"] is None  # 160 x 160 holds fewer than two 96 x 96 blocks: noted, not scored
