"""LoRA-style scaling hooks: set_scale / scale_layer / unscale_layer, as diffusers drives them."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import MLP, tiny_unet


def routed(**overrides) -> RankMoEConfig:
    values = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, lora_alpha=16, init_weights=False,
                  router="linear", target_modules=["lin0", "lin1"])
    values.update(overrides)
    return RankMoEConfig(**values)


def test_scale_multiplies_the_update_of_a_layer() -> None:
    model = get_peft_model(MLP(), routed())
    layer = model.base_model.model.lin0
    x = torch.randn(4, 16)
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        full = layer(x) - base
        layer.set_scale("default", 0.25)
        assert layer.scaling["default"] == pytest.approx(0.25 * 16 / 8)
        torch.testing.assert_close(layer(x) - base, 0.25 * full)  # routing does not depend on the scale
        layer.set_scale("default", 1.0)
        layer.scale_layer(3.0)
        torch.testing.assert_close(layer(x) - base, 3.0 * full)
        layer.unscale_layer(3.0)
        torch.testing.assert_close(layer(x) - base, full)
        layer.scale_layer(0.5)
        layer.unscale_layer()
        torch.testing.assert_close(layer(x) - base, full)
        layer.set_scale("missing", 2.0)  # unknown adapters are ignored, as in PEFT's LoRA
        torch.testing.assert_close(layer(x) - base, full)


def test_diffusers_adapter_weights_and_cross_attention_scale() -> None:
    unet = tiny_unet()
    config = RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, num_zero_experts=1, init_weights=False,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0"], router="pooled")
    unet.add_adapter(config)
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 5, 8)
    with torch.no_grad():
        full = unet(sample, t, encoder_hidden_states=text).sample
        unet.disable_adapters()
        base = unet(sample, t, encoder_hidden_states=text).sample
        unet.enable_adapters()
        assert not torch.allclose(full, base, atol=1e-5)
        zero = unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"scale": 0.0}).sample
        torch.testing.assert_close(zero, base)
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=text).sample, full)  # unscaled again
        unet.set_adapters(["default"], weights=[0.0])
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=text).sample, base)
        unet.set_adapters(["default"], weights=[1.0])
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=text).sample, full)
    for _, layer in rankmoe.rankmoe_layers(unet):
        assert layer.scaling["default"] == pytest.approx(8 / 4)  # lora_alpha / r, restored
