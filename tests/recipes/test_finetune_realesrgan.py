"""finetune_realesrgan.py: the offline main job on the bundled photographs (short runs; the full run is timed in the
issue note, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

import real_isr.finetune_realesrgan as job  # noqa: E402
from real_isr.photos import PHOTOS, TEST_PHOTOS, TRAIN_PHOTOS, load_photo, write_photos  # noqa: E402
from real_isr.rrdbnet import RRDBNet  # noqa: E402
from real_isr.sr_finetune import adapt, rrdb_target_modules, sr_forward, untouched  # noqa: E402

import rankmoe  # noqa: E402

PRESET = Path(__file__).resolve().parents[2] / "recipes" / "real_isr" / "configs" / "realesrgan-mor.yaml"


def test_bundled_photographs_load_offline_and_split_cleanly(tmp_path):
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS) and set(TRAIN_PHOTOS) | set(TEST_PHOTOS) <= set(PHOTOS)
    for name in (*TRAIN_PHOTOS, *TEST_PHOTOS):
        image = load_photo(name)
        assert image.dtype.name == "uint8" and image.shape[-1] == 3 and min(image.shape[:2]) >= 256, name
    paths = write_photos(tmp_path, TEST_PHOTOS[:2])
    assert [p.name for p in paths] == [f"{n}.png" for n in TEST_PHOTOS[:2]]
    with pytest.raises(ValueError, match="unknown photograph 'lena'; bundled ones"):
        load_photo("lena")


def _tiny_rrdb() -> RRDBNet:
    torch.manual_seed(0)
    return RRDBNet(num_feat=8, num_block=3, num_grow_ch=4)


def test_target_modules_are_the_last_blocks_and_the_tail():
    names = rrdb_target_modules(_tiny_rrdb(), 1)
    assert names == [f"body.2.rdb{i}.conv{j}" for i in (1, 2, 3) for j in range(1, 6)] + [
        "conv_body", "conv_up1", "conv_up2", "conv_hr"]
    assert len(rrdb_target_modules(_tiny_rrdb(), 0)) == 4
    with pytest.raises(ValueError, match=r"last_blocks must be an int in \[0, 3\], got 4"):
        rrdb_target_modules(_tiny_rrdb(), 4)


def test_adapter_starts_as_the_pretrained_network_and_routes_by_condition():
    base = _tiny_rrdb()
    lr = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = base(lr)
    model = adapt(base, job._mor_adapter(), rrdb_target_modules(base, 1))
    scores = torch.rand(2, 4)
    assert all("rankmoe_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(sr_forward(model, lr, scores), expected)  # B = 0 at the start
        for layer in (m for m in model.modules() if isinstance(m, rankmoe.RankMoELayer)):
            layer.rankmoe_B["default"].normal_()
        changed = sr_forward(model, lr, scores)
        with untouched(model) as pretrained:
            torch.testing.assert_close(sr_forward(pretrained, lr, scores), expected)
    assert not torch.allclose(changed, expected)
    with pytest.raises(ValueError, match="adapter type must be 'rankmoe' or 'lora'"):
        adapt(_tiny_rrdb(), {"type": "dora"}, ["conv_body"])


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--scale", "2", "scale must be 4"),
    ("--crop_size", "130", "crop_size must be a multiple of scale=4"),
    ("--adapter", '{"r": 4}', "adapter must be a mapping with type"),
    ("--steps", "0", "steps must be an int >= 1"),
    ("--lpips_weight", "1.0", "lpips_weight > 0 needs lpips_vgg16 and lpips_heads"),
])
def test_bad_options_are_named(flag, value, message):
    with pytest.raises(ValueError, match=message):
        job.parse_settings(["--config", str(PRESET), flag, value])
    with pytest.raises(ValueError, match=r"unknown option\(s\) in the command line: 'step' \(did you mean steps"):
        job.parse_settings(["--step", "3"])


def test_main_job_runs_end_to_end_with_a_tiny_network(tmp_path, monkeypatch):
    """The whole job (data, before / after scoring, training, report files) with a tiny RRDBNet in place of x4plus."""
    import real_isr.realesrgan_weights as weights

    monkeypatch.setattr(weights, "load_realesrgan_x4plus", lambda *a, **k: _tiny_rrdb().requires_grad_(False))
    result = job.main(["--config", str(PRESET), "--output_dir", str(tmp_path), "--steps", "6", "--logging_steps",
                       "3", "--adapted_blocks", "1", "--test_crop", "128", "--learning_rate", "1e-2"])
    assert result["names"] == list(TEST_PHOTOS)
    for before, after in zip(result["before"], result["after"], strict=True):
        assert set(before) == {"psnr", "ssim", "niqe", "severity"} and before["psnr"] > 0
        assert after["psnr"] != before["psnr"]  # the adapter moved
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mean_psnr_gain"] == pytest.approx(result["mean_psnr_gain"])
    table = (tmp_path / "metrics.md").read_text()
    assert table.count("\n| ") == 2 + len(TEST_PHOTOS)  # header, separator, one row per image, mean
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == sorted(f"{n}.png" for n in TEST_PHOTOS)
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {
        "routing_slot_load.png", "routing_active_ranks.png", "routing_severity.png"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "loss/l1" in (tmp_path / "logs" / "metrics.csv").read_text()


def test_sr_loss_terms_add_up():
    from real_isr.lpips import LPIPS
    from real_isr.sr_finetune import sr_loss

    from rankmoe.conditioning.base import DegradationScores

    base = _tiny_rrdb()
    model = adapt(base, job._mor_adapter(), rrdb_target_modules(base, 1))
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    scores = DegradationScores(torch.rand(2, 4), torch.tensor([0.2, 0.9]), ("blur", "noise", "jpeg", "resolution"))
    sr = sr_forward(model, lr, scores)
    terms = sr_loss(sr, hr, model, l1_weight=1.0, l2_weight=0.5, lpips=LPIPS(allow_random=True), lpips_weight=2.0)
    assert terms["aux"] > 0 and terms["lpips"] > 0
    torch.testing.assert_close(terms["l1"], (sr - hr).abs().mean())
    torch.testing.assert_close(terms["total"], terms["l1"] + 0.5 * terms["l2"] + 2 * terms["lpips"] + terms["aux"])
