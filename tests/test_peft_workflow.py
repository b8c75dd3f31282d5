"""Every PEFT verb on RankMoE adapters: training, save/load, several adapters, disable, merge, real model types."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import tiny_llama, tiny_unet


def routed_config(**overrides) -> RankMoEConfig:
    kwargs = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, lora_alpha=8, target_modules=["lin0", "lin1"])
    kwargs.update(overrides)
    return RankMoEConfig(**kwargs)


def test_only_rankmoe_parameters_train(mlp) -> None:
    model = get_peft_model(mlp, routed_config(init_weights=False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".rankmoe_" in name for name in trainable)
    assert any("rankmoe_router" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 16)).pow(2).mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == (name in trainable), name


def test_save_load_is_bit_identical(mlp, tmp_path) -> None:
    base = copy.deepcopy(mlp)
    model = get_peft_model(mlp, routed_config(init_weights=False))
    x = torch.randn(2, 5, 16)
    expected = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RANKMOE" and saved["num_zero_experts"] == 2 and saved["router"] == "linear"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("rankmoe_" in key for key in keys)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.peft_config["default"], RankMoEConfig)
    assert torch.equal(loaded(x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "rankmoe_router" in n)


def test_several_adapters(mlp) -> None:
    reference = copy.deepcopy(mlp)
    model = get_peft_model(mlp, routed_config(init_weights=False))
    model.add_adapter("pooled", routed_config(router="pooled", init_weights=False, r=4, top_k=1, num_zero_experts=0))
    x = torch.randn(3, 4, 16)
    out_default = model(x)
    model.set_adapter("pooled")
    out_pooled = model(x)
    assert not torch.allclose(out_default, out_pooled)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".pooled" in n
    }
    with model.disable_adapter():
        base = model(x)
    torch.testing.assert_close(base, reference(x), rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.active_adapters == ["pooled"]
    torch.testing.assert_close(model(x), out_pooled)


def test_disable_adapter_gives_base_output(mlp) -> None:
    reference = copy.deepcopy(mlp)
    model = get_peft_model(mlp, routed_config(init_weights=False))
    x = torch.randn(2, 3, 16)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), reference(x))


def test_mixed_adapter_batch_matches_per_adapter_runs(mlp) -> None:
    model = get_peft_model(mlp, routed_config(init_weights=False)).eval()
    model.add_adapter("other", routed_config(router="pooled", init_weights=False))
    x = torch.randn(3, 4, 16)
    mixed = model(x, adapter_names=["default", "__base__", "other"])
    model.set_adapter("default")
    first = model(x[:1])
    model.set_adapter("other")
    third = model(x[2:])
    with model.disable_adapter():
        second = model(x[1:2])
    torch.testing.assert_close(mixed, torch.cat([first, second, third]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["default", "nope", "other"])


@pytest.mark.parametrize("router_kwargs", [{}, {"selected": [1, 4]}])
def test_static_routing_merges(mlp, router_kwargs) -> None:
    model = get_peft_model(mlp, routed_config(router="static", router_kwargs=router_kwargs, init_weights=False))
    x = torch.randn(2, 3, 16)
    expected = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any("rankmoe" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_dynamic_routing_refuses_to_merge_and_changes_nothing(mlp) -> None:
    model = get_peft_model(mlp, routed_config(init_weights=False))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="static routing"):
        model.merge_and_unload()
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p), name
    assert not any(layer.merged for _, layer in rankmoe.rankmoe_layers(model))


def test_unsupported_target_type_is_named(mlp) -> None:
    net = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.sparse\.Embedding.*supported layer types"):
        get_peft_model(net, RankMoEConfig(r=2, num_shared_ranks=2, top_k=0, target_modules=["0"]))


def test_conv_token_routing_shapes(convnet) -> None:
    model = get_peft_model(
        convnet, RankMoEConfig(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1, target_modules=["conv0", "conv1"])
    )
    out = model(torch.randn(2, 3, 9, 7))
    assert out.shape == (2, 6, 5, 4)
    stats = rankmoe.routing_stats(model)
    assert stats["base_model.model.conv1"].num_decisions == 2 * 5 * 4
    assert stats["base_model.model.conv0"].num_decisions == 2 * 9 * 7


def test_tiny_llama_end_to_end(tmp_path) -> None:
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), RankMoEConfig(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2,
                                                               task_type="CAUSAL_LM", init_weights=False))
    targets = {name.rsplit(".", 1)[-1] for name, _ in rankmoe.rankmoe_layers(model)}
    assert targets == {"q_proj", "v_proj"}
    ids = torch.randint(0, 128, (2, 7))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    generated = model.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 7)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model.eval()
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_tiny_unet_add_adapter_with_condition(tmp_path) -> None:
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    config = RankMoEConfig(
        r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, init_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        router="condition", router_kwargs={"condition_dim": 3},
    )
    unet.add_adapter(config, adapter_name="mor")
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 5, 8)
    with rankmoe.condition(unet, torch.rand(2, 3), severity=torch.tensor([0.2, 0.9])):
        out = unet(sample, t, encoder_hidden_states=text).sample
    expected = reference(sample, t, encoder_hidden_states=text).sample
    assert not torch.allclose(out, expected)
    unet.disable_adapters()
    torch.testing.assert_close(unet(sample, t, encoder_hidden_states=text).sample, expected, rtol=0, atol=0)
    unet.enable_adapters()
    stats = rankmoe.routing_stats(unet)
    assert stats and all(item.level == "sample" and item.num_decisions == 2 for item in stats.values())

    # the state dict round-trips through inject_adapter_in_model (diffusers' own LoRA loader accepts LoRA only)
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name="mor")
    fresh = inject_adapter_in_model(config, copy.deepcopy(reference), adapter_name="mor")
    result = set_peft_model_state_dict(fresh, state, adapter_name="mor")
    assert not result.unexpected_keys
    cond = torch.rand(2, 3)
    with rankmoe.condition(unet, cond), rankmoe.condition(fresh, cond):
        torch.testing.assert_close(
            fresh(sample, t, encoder_hidden_states=text).sample, unet(sample, t, encoder_hidden_states=text).sample,
            rtol=0, atol=0,
        )


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_modes_match_dense_weight(padding_mode) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, kernel_size=3, padding=1, padding_mode=padding_mode))
    model = get_peft_model(net, RankMoEConfig(r=6, num_shared_ranks=2, top_k=2, num_zero_experts=1, router="static",
                                              target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        delta = model(x) - layer.base_layer(x)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode=padding_mode)
        expected = torch.nn.functional.conv2d(padded, layer.get_delta_weight("default"))
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    token_model = get_peft_model(
        torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode=padding_mode)),
        RankMoEConfig(r=4, num_shared_ranks=1, top_k=1, target_modules=["0"]),
    )
    assert token_model(x).shape == (2, 5, 7, 6)
    assert token_model.base_model.model[0].rankmoe_router["default"].proj.padding_mode == padding_mode
