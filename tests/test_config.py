"""RankMoEConfig validation: every impossible combination is a ValueError naming the field."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import MLP
from tests.strategies import slot_layouts

FIELDS = [
    "r", "num_shared_ranks", "expert_rank", "top_k", "num_zero_experts", "lora_alpha", "lora_dropout",
    "target_modules", "exclude_modules", "modules_to_save", "init_weights", "router", "router_kwargs",
    "balance_loss", "balance_loss_kwargs", "balance_loss_weight", "z_loss_weight",
]


def test_public_fields_exist_and_json_round_trip(tmp_path) -> None:
    config = RankMoEConfig(r=40, num_shared_ranks=8, top_k=8, num_zero_experts=4, lora_alpha=40,
                           target_modules=["q_proj", "v_proj"], router="condition",
                           router_kwargs={"condition_dim": 7}, balance_loss="degradation_aware",
                           balance_loss_weight=0.01, z_loss_weight=0.001)
    data = config.to_dict()
    assert set(FIELDS) <= set(data)
    assert config.peft_type is PeftType.RANKMOE and PeftType("RANKMOE") is PeftType.RANKMOE
    assert (config.num_experts, config.num_slots) == (32, 36)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())  # plain JSON on disk
    assert saved["router_kwargs"] == {"condition_dim": 7} and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    restored = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(restored, RankMoEConfig)
    assert restored.to_dict() == data


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": 4, "num_shared_ranks": 5}, "num_shared_ranks"),
        ({"r": 8, "num_shared_ranks": 1, "expert_rank": 2}, "expert_rank"),
        ({"expert_rank": 0}, "expert_rank"),
        ({"r": 8, "num_shared_ranks": 2, "top_k": 7, "num_zero_experts": 0}, "top_k"),
        ({"r": 8, "num_shared_ranks": 8, "top_k": 1}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_zero_experts": -1}, "num_zero_experts"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"init_weights": "yes"}, "init_weights"),
        ({"bias": "rankmoe_only"}, "bias"),
        ({"router": "nope"}, "router"),
        ({"router": "condition"}, "condition_dim"),
        ({"router": "condition", "router_kwargs": {"condition_dim": 0}}, "condition_dim"),
        ({"router_kwargs": {"bias": "x"}}, "router_kwargs"),
        ({"router_kwargs": {"unknown": 1}}, "router_kwargs"),
        ({"router_kwargs": {"a": torch.zeros(1)}}, "router_kwargs"),
        ({"router_kwargs": {"a": (1, 2)}}, "router_kwargs"),
        ({"router_kwargs": [1]}, "router_kwargs"),
        ({"router": "static", "router_kwargs": {"selected": [0, 9]}}, "selected"),
        ({"router": "static", "router_kwargs": {"selected": [0]}}, "selected"),
        ({"balance_loss": "nope"}, "balance_loss"),
        ({"balance_loss_kwargs": {"s": {1, 2}}}, "balance_loss_kwargs"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"balance_loss": "switch", "balance_loss_kwargs": {"alpha": 1.0}}, "balance_loss_kwargs"),
        ({"balance_loss": "degradation_aware", "balance_loss_kwargs": {"alpah": 1.0}}, "balance_loss_kwargs"),
        ({"z_loss_weight": float("inf")}, "z_loss_weight"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"modules_to_save": "head"}, "modules_to_save"),
    ],
)
def test_impossible_configs_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        RankMoEConfig(target_modules=["lin0"], **kwargs) if "target_modules" not in kwargs else RankMoEConfig(**kwargs)


def test_all_shared_needs_no_router() -> None:
    config = RankMoEConfig(r=4, num_shared_ranks=4, top_k=0, router="condition")  # router kwargs unused
    assert config.num_slots == 0


def test_unknown_json_keys_of_newer_versions_are_dropped(tmp_path) -> None:
    config = RankMoEConfig(r=4, target_modules=["lin0"])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["some_future_field"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_field"):
        assert isinstance(PeftConfig.from_pretrained(tmp_path), RankMoEConfig)


config_values = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(-2, 12),
        "num_shared_ranks": st.integers(-1, 12),
        "expert_rank": st.integers(-1, 4),
        "top_k": st.integers(-1, 8),
        "num_zero_experts": st.integers(-1, 4),
        "lora_alpha": st.sampled_from([0.0, -1.0, 1.0, 16.0]),
        "lora_dropout": st.sampled_from([0.0, 0.1, 1.0, -0.5]),
        "router": st.sampled_from(["linear", "pooled", "condition", "static", "missing"]),
        "router_kwargs": st.sampled_from([{}, {"condition_dim": 3}, {"condition_dim": -1}, {"bias": False},
                                          {"selected": [0]}, {"hidden_features": 4, "condition_dim": 3}]),
        "balance_loss": st.sampled_from([None, "switch", "degradation_aware", "bogus"]),
        "balance_loss_weight": st.sampled_from([0.0, 0.01, -1.0]),
        "z_loss_weight": st.sampled_from([0.0, 1e-3, -1e-3]),
        "init_weights": st.sampled_from([True, False, 0]),
    },
)


def assert_reload_identical(model, base, x, cond, folder) -> None:
    """Save ``model``'s adapter, load it onto a copy of ``base`` and compare outputs bit for bit."""
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.eval()
    with rankmoe.condition(model, cond), rankmoe.condition(loaded, cond):
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@given(values=config_values, seed=st.integers(0, 100))
def test_drawn_configs_work_or_name_a_field(values, seed, tmp_path_factory) -> None:
    try:
        config = RankMoEConfig(target_modules=["lin0", "lin1"], **values)
    except ValueError as error:
        message = str(error)
        assert any(name in message for name in FIELDS + ["condition_dim", "selected", "bias"]), message
        return
    torch.manual_seed(seed)
    base = MLP()
    model = get_peft_model(copy.deepcopy(base), config)
    x = torch.randn(2, 3, 16)
    cond = torch.rand(2, 3)
    with rankmoe.condition(model, cond):
        out = model(x)
        out.sum().backward()
    assert torch.isfinite(out).all()
    assert_reload_identical(model, base, x, cond, tmp_path_factory.mktemp("adapter"))


@given(
    layout=slot_layouts(max_rank=10, routed=False),
    router=st.sampled_from(["linear", "pooled", "condition", "static"]),
    alpha=st.sampled_from([1.0, 8.0]),
)
def test_valid_layouts_always_build_train_and_reload(layout, router, alpha, tmp_path_factory) -> None:
    kwargs = {"condition_dim": 3} if router == "condition" else {}
    config = RankMoEConfig(r=layout.r, num_shared_ranks=layout.num_shared_ranks, expert_rank=layout.expert_rank,
                           top_k=layout.top_k, num_zero_experts=layout.num_zero_experts, lora_alpha=alpha,
                           router=router, router_kwargs=kwargs, target_modules=["lin0", "lin1"], init_weights=False)
    base = MLP()
    model = get_peft_model(copy.deepcopy(base), config)
    x, cond = torch.randn(2, 3, 16), torch.rand(2, 3)
    with rankmoe.condition(model, cond):
        model(x).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "rankmoe_B" in n)
    assert_reload_identical(model, base, x, cond, tmp_path_factory.mktemp("adapter"))
