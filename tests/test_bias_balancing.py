"""Selection-only bias balancing and the active-rank budget: mechanics, persistence, configuration errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.losses import selection_bias_update, selection_fraction
from rankmoe.routers.selection import active_ranks, select_top_k, selection_mask
from tests.conftest import MLP
from tests.strategies import slot_layouts


def biased_config(**overrides) -> RankMoEConfig:
    values = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, target_modules=["lin0", "lin1"],
                  router="linear", selection_bias_update_rate=0.05)
    values.update(overrides)
    return RankMoEConfig(**values)


@given(slot_layouts(), st.integers(0, 1000))
def test_bias_changes_the_selection_but_not_the_gate_values(layout, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, layout.num_slots, generator=generator)
    bias = torch.randn(layout.num_slots, generator=generator) * 3
    routing = select_top_k(logits, layout, bias)
    expected_indices = (logits + bias).topk(layout.top_k, -1).indices
    assert torch.equal(routing.top_indices, expected_indices)
    probs = logits.softmax(-1)  # unbiased
    chosen = probs.gather(-1, expected_indices)
    expected_weights = layout.top_k * chosen / chosen.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.slot_gates.gather(-1, expected_indices), expected_weights)
    torch.testing.assert_close(routing.probs, probs)


def test_update_adds_the_functional_step_from_the_last_record() -> None:
    model = get_peft_model(MLP(), biased_config(target_active_ranks=3.0))
    x = torch.randn(4, 6, 16)
    model(x)
    layers = dict(rankmoe.rankmoe_layers(model))
    before = {name: layer.rankmoe_router["default"].selection_bias.clone() for name, layer in layers.items()}
    loads = rankmoe.update_selection_bias(model)
    for name, layer in layers.items():
        record = layer._rankmoe_records["default"]
        top = record.flat("top_indices")
        load = selection_fraction(selection_mask(top, record.layout.num_slots), record.layout.top_k)
        step = selection_bias_update(load, 0.05, record.layout.num_experts,
                                     active_ranks(top, record.layout).mean(), 3.0)
        torch.testing.assert_close(loads[name], load)
        torch.testing.assert_close(layer.rankmoe_router["default"].selection_bias, before[name] + step)


def test_update_skips_adapters_without_bias_balancing() -> None:
    model = get_peft_model(MLP(), biased_config(selection_bias_update_rate=0.0))
    model(torch.randn(3, 16))
    assert rankmoe.update_selection_bias(model) == {}
    for _, layer in rankmoe.rankmoe_layers(model):
        assert not layer.rankmoe_router["default"].selection_bias.any()


def test_bias_is_saved_and_loaded_with_the_adapter(tmp_path) -> None:
    torch.manual_seed(0)
    base = MLP()
    reference = MLP()
    reference.load_state_dict(base.state_dict())
    model = get_peft_model(base, biased_config(init_weights=False))
    for _ in range(5):
        model(torch.randn(4, 16))
        rankmoe.update_selection_bias(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    pairs = zip(rankmoe.rankmoe_layers(model), rankmoe.rankmoe_layers(loaded), strict=True)
    for (_, saved_layer), (_, loaded_layer) in pairs:
        saved_bias = saved_layer.rankmoe_router["default"].selection_bias
        assert saved_bias.abs().sum() > 0
        torch.testing.assert_close(loaded_layer.rankmoe_router["default"].selection_bias, saved_bias)
    x = torch.randn(8, 16)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"selection_bias_update_rate": -0.1}, "selection_bias_update_rate"),
        ({"router": "static"}, "selection_bias_update_rate"),
        ({"r": 4, "num_shared_ranks": 4, "top_k": 0, "num_zero_experts": 0}, "selection_bias_update_rate"),
        ({"target_active_ranks": 3.0, "num_zero_experts": 0}, "num_zero_experts"),
        ({"target_active_ranks": 3.0, "selection_bias_update_rate": 0.0}, "selection_bias_update_rate"),
        ({"target_active_ranks": 9.0}, r"target_active_ranks=9.0 is out of reach.*\[2, 4\]"),
        ({"target_active_ranks": 1.5}, r"\[2, 4\]"),
        ({"target_active_ranks": "3"}, "target_active_ranks"),
    ],
)
def test_bad_bias_settings_name_the_field(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        biased_config(**overrides)
