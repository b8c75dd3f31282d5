"""train.py options: presets, flags, precedence and the errors for bad values (no model is built here)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml")

from real_isr.components import EpochShuffleSampler, _check_condition_dim, adapter_config  # noqa: E402
from real_isr.settings import TrainSettings, load_preset, parse_settings  # noqa: E402

import rankmoe  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "real_isr" / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_defaults_then_preset_then_flags(tmp_path):
    preset = _write(tmp_path, "learning_rate: 5e-5\nmax_train_steps: 7\ntrain_data: [/a, /b]\nlpips_weight: 0\n")
    settings = parse_settings(["--config", str(preset)])
    assert settings.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string: coerced for float options
    assert settings.max_train_steps == 7 and settings.train_data == ["/a", "/b"]
    assert settings.adam_beta2 == TrainSettings().adam_beta2  # untouched default
    settings = parse_settings(["--config", str(preset), "--max_train_steps", "9", "--train_data", "/c",
                               "--unet_adapter", '{"type": "lora", "r": 4}', "--gradient_checkpointing", "true",
                               "--checkpoints_total_limit", "null"])
    assert settings.max_train_steps == 9 and settings.train_data == ["/c"]
    assert settings.unet_adapter == {"type": "lora", "r": 4}
    assert settings.gradient_checkpointing is True and settings.checkpoints_total_limit is None


def test_unknown_preset_key_names_it_and_suggests(tmp_path):
    preset = _write(tmp_path, "learning_rat: 1.0e-4\ntrain_data: [/a]\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) in preset .*'learning_rat' \(did you mean learning_r"):
        load_preset(preset)
    with pytest.raises(ValueError, match="learning_rat"):
        parse_settings(["--config", str(preset)])


def test_unknown_flag_and_missing_preset(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) in the command line: 'max_steps' \(did you mean"):
        parse_settings(["--train_data", "/a", "--max_steps", "3"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_settings(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="must be a mapping"):
        load_preset(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_data": []}, "train_data is empty"),
        ({"crop_size": 100}, "crop_size must be a multiple of 8"),
        ({"crop_size": 0}, "crop_size must be an int >= 1"),
        ({"mixed_precision": "fp8"}, r"mixed_precision must be one of \['no', 'fp16', 'bf16'\], got 'fp8'"),
        ({"report_to": "wandb"}, "report_to must be one of"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"adam_beta1": 1.0}, r"adam_beta1 must be in \[0, 1\)"),
        ({"timestep": 1000}, r"timestep must be in \[0, 999\]"),
        ({"unet_adapter": {"r": 4}}, "unet_adapter must be null or a mapping with type"),
        ({"unet_adapter": None, "vae_adapter": None, "train_conv_in": False}, "nothing to train"),
        ({"estimator": {"model_name": "x"}}, "estimator must be null or a mapping with a 'kind' key"),
        ({"lpips_weight": 2.0}, "lpips_weight > 0 needs lpips_vgg16"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be an int >= 1"),
    ],
)
def test_invalid_values_are_named(changes, message):
    values = {"train_data": ["/a"], "lpips_weight": 0.0, **changes}
    with pytest.raises(ValueError, match=message):
        TrainSettings(**values).validate()


@pytest.mark.parametrize("name", ["tiny", "sd21-mor", "sd21-lora"])
def test_shipped_presets_are_valid(name):
    from rankmoe.conditioning.prompts import DEFAULT_PROMPTS

    settings = parse_settings(["--config", str(CONFIGS / f"{name}.yaml"), "--train_data", "/data",
                               "--lpips_vgg16", "/w/vgg16.pth", "--lpips_heads", "/w/vgg.pth"])
    configs = [adapter_config(getattr(settings, option), option) for option in ("unet_adapter", "vae_adapter")]
    routed = [c for c in configs if isinstance(c, rankmoe.RankMoEConfig) and c.router == "condition"]
    for config in routed:  # the condition width is the estimator's number of scores
        kind = settings.estimator["kind"]
        expected = 4 if kind in (None, "weight_free") else len(DEFAULT_PROMPTS)
        assert config.router_kwargs["condition_dim"] == expected
    assert bool(routed) == (name != "sd21-lora")


def test_mor_preset_is_the_paper_configuration():
    settings = TrainSettings(**load_preset(CONFIGS / "sd21-mor.yaml"))
    config = adapter_config(settings.unet_adapter, "unet_adapter")
    assert (config.r, config.num_shared_ranks, config.expert_rank, config.top_k, config.num_zero_experts) == (
        40, 8, 1, 8, 4)
    assert config.router == "condition" and config.balance_loss == "degradation_aware"
    assert settings.learning_rate == 5e-5 and settings.max_train_steps == 25_000
    assert settings.train_batch_size * 4 == 16  # 4 processes
    assert settings.l2_weight == 1 and settings.lpips_weight == 2 and settings.vsd_weight == 1
    assert settings.gan_weight > 0
    lora = adapter_config(load_preset(CONFIGS / "sd21-lora.yaml")["unet_adapter"], "unet_adapter")
    assert type(lora).__name__ == "LoraConfig" and lora.r == 4


def test_adapter_config_errors_name_the_option():
    with pytest.raises(ValueError, match=r"unet_adapter: invalid RankMoEConfig arguments .*top_k"):
        adapter_config({"type": "rankmoe", "r": 4, "num_shared_ranks": 2, "top_k": 9}, "unet_adapter")
    with pytest.raises(ValueError, match="vae_adapter: invalid LoraConfig arguments"):
        adapter_config({"type": "lora", "rank": 4}, "vae_adapter")


def test_condition_dim_must_match_the_estimator():
    estimator = rankmoe.conditioning.degradation_estimator()  # 4 scores
    config = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, router="condition",
                                   router_kwargs={"condition_dim": 7})
    with pytest.raises(ValueError, match=r"condition_dim=7 but the estimator gives 4 scores .*set condition_dim to 4"):
        _check_condition_dim(config, estimator, "unet_adapter")
    with pytest.raises(ValueError, match="estimator is null"):
        _check_condition_dim(config, None, "unet_adapter")
    config.router_kwargs = {"condition_dim": 4}
    _check_condition_dim(config, estimator, "unet_adapter")


def test_epoch_sampler_is_a_seeded_permutation():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))
    assert list(EpochShuffleSampler(10, seed=4)) != first
