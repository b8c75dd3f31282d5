"""Collapse and export: a RankMoE adapter for one condition is an exact plain LoRA (merged, peft, diffusers)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors import safe_open

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.collapse import CollapsedLoRA, collapse
from rankmoe.export import export_lora
from tests.conftest import MLP, tiny_llama, tiny_unet

TOL = 1e-5  # relative error ||out - routed|| / ||routed||

# The base model of the fresh-process check: the subprocess imports this file, never rankmoe.
MODELS_SOURCE = '''
import torch
from torch import nn


class MixedNet(nn.Module):
    """Conv2d, Conv1d and two Linear layers named ``lin`` and ``inner.lin``: (b, 3, 6, 6) -> (b, 36, 6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.seq = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.lin = nn.Linear(8, 16)
        self.inner = nn.Module()
        self.inner.lin = nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)
        h = torch.relu(self.seq(h)).transpose(1, 2)
        return self.inner.lin(torch.relu(self.lin(h)))
'''

FRESH_SCRIPT = '''
import json, sys

class BlockRankMoE:
    """Any attempt to import rankmoe in this process fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "rankmoe" or name.startswith("rankmoe."):
            raise ImportError("rankmoe must not be imported in the fresh process")
        return None

sys.meta_path.insert(0, BlockRankMoE())
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

torch.set_num_threads(2)
manifest = json.loads(open(sys.argv[1]).read())
results = {}


def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def lora_ranks(model):
    return {name: module.r[adapter] for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) for adapter in module.r}

case = manifest["mixed"]
sys.path.insert(0, case["module_dir"])
from collapse_models import MixedNet

net = MixedNet()
net.load_state_dict(torch.load(case["base"]))
data = torch.load(case["data"])
model = PeftModel.from_pretrained(net, case["adapter"]).eval()
with torch.no_grad():
    results["mixed"] = {"rel_err": rel(model(data["x"]), data["expected"]),
                        "ranks": lora_ranks(model.get_base_model())}

case = manifest["llama"]
from transformers import LlamaForCausalLM

data = torch.load(case["data"])
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(case["base"]), case["adapter"]).eval()
with torch.no_grad():
    results["llama"] = {"rel_err": rel(model(input_ids=data["ids"]).logits, data["expected"]),
                        "class": type(model).__name__, "ranks": lora_ranks(model.get_base_model())}

case = manifest["unet"]
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

data = torch.load(case["data"])
unet = UNet2DConditionModel.from_pretrained(case["base"]).eval()
unet.load_lora_adapter(case["adapter"], prefix="unet", weight_name="pytorch_lora_weights.safetensors")
with torch.no_grad():
    model_level = rel(unet(data["sample"], data["t"], encoder_hidden_states=data["text"]).sample, data["expected"])
# what StableDiffusionPipeline.load_lora_weights(dir) does, without building a pipeline
unet = UNet2DConditionModel.from_pretrained(case["base"]).eval()
state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(case["adapter"], return_lora_metadata=True)
StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata, adapter_name="collapsed")
with torch.no_grad():
    pipeline_level = rel(unet(data["sample"], data["t"], encoder_hidden_states=data["text"]).sample, data["expected"])
results["unet"] = {"model_rel_err": model_level, "pipeline_rel_err": pipeline_level, "ranks": lora_ranks(unet)}

results["rankmoe_imported"] = sorted(name for name in sys.modules if name.split(".")[0] == "rankmoe")
open(sys.argv[2], "w").write(json.dumps(results))
'''


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def condition_config(target_modules, **overrides) -> RankMoEConfig:
    kwargs = dict(r=8, num_shared_ranks=2, top_k=3, num_zero_experts=2, init_weights=False,
                  target_modules=target_modules, router="condition", router_kwargs={"condition_dim": 3})
    kwargs.update(overrides)
    return RankMoEConfig(**kwargs)


def models_module(directory: Path):
    """Write ``collapse_models.py`` to ``directory`` and import it (the fresh process imports the same file)."""
    path = directory / "collapse_models.py"
    path.write_text(MODELS_SOURCE)
    spec = importlib.util.spec_from_file_location("collapse_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_slot_bias(model, name: str, value: float) -> None:
    """Add ``value`` to the selection bias of layer ``name``'s zero slots (positive: more zero slots picked)."""
    layer = dict(rankmoe.rankmoe_layers(model))[name]
    router = layer.rankmoe_router["default"]
    router.selection_bias[router.layout.num_experts:] += value


def routed_mixed_net(directory: Path):
    """MixedNet with condition routing; ``lin`` forced to 3 active ranks, ``inner.lin`` to 5."""
    net = models_module(directory).MixedNet()
    base_state = copy.deepcopy(net.state_dict())
    model = get_peft_model(net, condition_config(["conv", "seq", "lin"])).eval()
    zero_slot_bias(model, "base_model.model.lin", 100.0)        # both zero slots + 1 expert
    zero_slot_bias(model, "base_model.model.inner.lin", -100.0)  # 3 real experts
    return model, base_state


def test_merge_and_unload_reproduces_routed_output(tmp_path) -> None:
    model, _ = routed_mixed_net(tmp_path)
    x, cond = torch.randn(1, 3, 6, 6), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(x)
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
    collapsed = collapse(model, cond)
    assert set(collapsed.ranks) == {"conv", "seq", "lin", "inner.lin"}
    assert collapsed.ranks["lin"] == 3 and collapsed.ranks["inner.lin"] == 5
    assert all(2 <= k <= 5 for k in collapsed.ranks.values())
    conv = collapsed.layers["conv"]
    assert conv.lora_A.shape[1:] == (3, 3, 3) and conv.lora_B.shape[2:] == (1, 1)
    assert collapsed.delta_weight("conv").shape == (8, 3, 3, 3) and collapsed.delta_weight("seq").shape == (8, 8, 3)
    merged = collapsed.merge_and_unload(model)
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(m, rankmoe.RankMoELayer) for m in merged.modules())
    with torch.no_grad():
        out = merged(x)
    assert rel_err(out, routed) <= TOL
    assert rel_err(base, routed) > 0.05  # the adapter matters


def test_merge_run_unmerge_per_condition() -> None:
    """Per-image inference on the routed model itself: merge one condition, run with adapters off, unmerge."""
    model = get_peft_model(MLP(), condition_config(["lin0", "lin1"])).eval()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        x, cond = torch.randn(1, 4, 16), torch.rand(3)
        with torch.no_grad(), rankmoe.condition(model, cond[None]):
            routed = model(x)
        collapsed = collapse(model, cond)
        with torch.no_grad(), model.disable_adapter():
            collapsed.merge_into(model)
            out = model(x)
            collapsed.unmerge_from(model)
        assert rel_err(out, routed) <= TOL
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)


def test_exports_load_without_rankmoe_in_a_fresh_process(tmp_path) -> None:
    """One subprocess (torch, peft, transformers, diffusers; rankmoe blocked) loads three exported LoRAs."""
    manifest = {}

    # 1. MixedNet (Conv2d, Conv1d, Linear; `lin` and `inner.lin` with different ranks), format "peft"
    model, base_state = routed_mixed_net(tmp_path)
    x, cond = torch.randn(1, 3, 6, 6), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        expected = model(x)
    mixed = export_lora(model, tmp_path / "mixed_lora", cond)
    torch.save(base_state, tmp_path / "mixed_base.pt")
    torch.save({"x": x, "expected": expected}, tmp_path / "mixed_data.pt")
    manifest["mixed"] = {"module_dir": str(tmp_path), "base": str(tmp_path / "mixed_base.pt"),
                         "data": str(tmp_path / "mixed_data.pt"), "adapter": str(tmp_path / "mixed_lora")}

    # 2. tiny Llama causal LM, condition router, format "peft"
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama_base")
    model = get_peft_model(llama, condition_config(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                                   task_type="CAUSAL_LM")).eval()
    ids, cond = torch.randint(0, 128, (1, 7)), torch.rand(1, 3)
    with torch.no_grad(), rankmoe.condition(model, cond):
        expected = model(input_ids=ids).logits
    llama_lora = export_lora(model, tmp_path / "llama_lora", cond)
    torch.save({"ids": ids, "expected": expected}, tmp_path / "llama_data.pt")
    manifest["llama"] = {"base": str(tmp_path / "llama_base"), "data": str(tmp_path / "llama_data.pt"),
                         "adapter": str(tmp_path / "llama_lora")}

    # 3. tiny diffusers UNet (attention Linear + resnet Conv2d), format "diffusers"
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet_base")
    unet.add_adapter(condition_config(["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]), adapter_name="mor")
    sample, t, text, cond = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 5, 8), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(unet, cond[None]):
        expected = unet(sample, t, encoder_hidden_states=text).sample
    unet_lora = export_lora(unet, tmp_path / "unet_lora", cond, format="diffusers")
    torch.save({"sample": sample, "t": t, "text": text, "expected": expected}, tmp_path / "unet_data.pt")
    manifest["unet"] = {"base": str(tmp_path / "unet_base"), "data": str(tmp_path / "unet_data.pt"),
                        "adapter": str(tmp_path / "unet_lora")}

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "fresh.py").write_text(FRESH_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "manifest.json"), str(tmp_path / "results.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "missing" not in proc.stderr.lower() and "unexpected" not in proc.stderr.lower(), proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["rankmoe_imported"] == []
    assert results["mixed"]["rel_err"] <= TOL, results["mixed"]
    assert results["mixed"]["ranks"] == mixed.ranks
    assert results["llama"]["rel_err"] <= TOL, results["llama"]
    assert results["llama"]["class"] == "PeftModelForCausalLM"
    assert results["llama"]["ranks"] == llama_lora.ranks
    assert results["unet"]["model_rel_err"] <= TOL, results["unet"]
    assert results["unet"]["pipeline_rel_err"] <= TOL, results["unet"]
    assert results["unet"]["ranks"] == unet_lora.ranks


def test_diffusers_file_layout(tmp_path) -> None:
    unet = tiny_unet()
    unet.add_adapter(condition_config(["to_q", "conv1"]), adapter_name="mor")
    collapsed = collapse(unet, torch.rand(3))
    path = collapsed.save_pretrained(tmp_path, format="diffusers")
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys, header = set(handle.keys()), handle.metadata()
    assert keys == {f"unet.{name}.lora_{ab}.weight" for name in collapsed.layers for ab in "AB"}
    metadata = json.loads(header["lora_adapter_metadata"])
    assert metadata["unet.peft_type"] == "LORA" and metadata["unet.r"] == metadata["unet.lora_alpha"]
    plain = collapsed.save_pretrained(tmp_path / "plain", format="diffusers", prefix=None, weight_name="x.safetensors")
    with safe_open(str(plain), "pt") as handle:
        assert all(not key.startswith("unet.") for key in handle.keys())


def test_in_memory_lora_routes() -> None:
    """``to_peft_lora`` feeds ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` and ``load_lora_adapter``."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    base = MLP()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, condition_config(["lin0", "lin1"]))
    x, cond = torch.randn(1, 3, 16), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(x)
    config, state = collapse(model, cond).to_peft_lora()
    plain = inject_adapter_in_model(config, reference)
    assert not set_peft_model_state_dict(plain, state).unexpected_keys
    with torch.no_grad():
        assert rel_err(plain(x), routed) <= TOL

    unet = tiny_unet()
    plain_unet = copy.deepcopy(unet)
    unet.add_adapter(condition_config(["to_q", "conv1"]), adapter_name="mor")
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 5, 8)
    with torch.no_grad(), rankmoe.condition(unet, cond[None]):
        routed = unet(sample, t, encoder_hidden_states=text).sample
    config, state = collapse(unet, cond).to_peft_lora(key_prefix="")
    plain_unet.load_lora_adapter(state, prefix=None, metadata=config.to_dict())
    with torch.no_grad():
        assert rel_err(plain_unet(sample, t, encoder_hidden_states=text).sample, routed) <= TOL


def test_unet_merge_and_unload_clears_peft_state() -> None:
    unet = tiny_unet()
    unet.add_adapter(condition_config(["to_q", "to_v", "conv1"]), adapter_name="mor")
    sample, t, text, cond = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 8), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(unet, cond[None]):
        routed = unet(sample, t, encoder_hidden_states=text).sample
    merged = collapse(unet, cond).merge_and_unload(unet)
    assert merged is unet and not hasattr(unet, "peft_config") and not unet._hf_peft_config_loaded
    with torch.no_grad():
        assert rel_err(merged(sample, t, encoder_hidden_states=text).sample, routed) <= TOL


def test_tiny_llama_condition_router_merges() -> None:
    model = get_peft_model(tiny_llama(), condition_config(["q_proj", "v_proj"], task_type="CAUSAL_LM")).eval()
    ids, cond = torch.randint(0, 128, (1, 6)), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(input_ids=ids).logits
    collapsed = collapse(model, cond)
    assert all(name.startswith("model.layers.") for name in collapsed.layers)  # no "base_model.model." prefix
    assert collapsed.task_type == "CAUSAL_LM"
    merged = collapsed.merge_and_unload(model)
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, routed) <= TOL


def test_transformers_conv1d_exports_with_fan_in_fan_out(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, condition_config(["c_attn", "c_proj"])).eval()
    ids, cond = torch.randint(0, 64, (1, 5)), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(input_ids=ids).logits
    collapsed = collapse(model, cond)
    assert all(layer.fan_in_fan_out for layer in collapsed.layers.values())
    assert collapsed.delta_weight("transformer.h.0.attn.c_attn").shape == (16, 48)  # Conv1D layout (d_in, d_out)
    collapsed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, routed) <= TOL
        assert rel_err(collapsed.merge_and_unload(model)(input_ids=ids).logits, routed) <= TOL
        # merge_into also works on a plain model with the same module names
        assert rel_err(collapsed.merge_into(reference)(input_ids=ids).logits, routed) <= TOL


@pytest.mark.parametrize(
    ("overrides", "rank"),
    [(dict(router="static", router_kwargs={}), 5),  # shared 2 + slots 0, 1, 2
     (dict(router="static", router_kwargs={"selected": [1, 6, 7]}), 3),  # slots 6 and 7 are zero slots
     (dict(r=4, num_shared_ranks=4, top_k=0, num_zero_experts=0, router="linear", router_kwargs={}), 4)],
    ids=["static", "static-with-zero-slots", "all-shared"],
)
def test_static_adapter_exports_without_cond_and_equals_peft_merge(tmp_path, overrides, rank) -> None:
    base = MLP()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, condition_config(["lin0", "lin1"], **overrides))
    x = torch.randn(2, 5, 16)  # a static LoRA serves any batch
    with torch.no_grad():
        routed = model(x)
    collapsed = export_lora(model, tmp_path)
    assert collapsed.ranks == {"lin0": rank, "lin1": rank}
    for name, layer in rankmoe.rankmoe_layers(model):
        short = name.removeprefix("base_model.model.")
        torch.testing.assert_close(collapsed.delta_weight(short), layer.get_delta_weight("default"))
    peft_merged = copy.deepcopy(model).merge_and_unload()  # PEFT's own merge
    ours = collapsed.merge_and_unload(model)
    for name in ("lin0", "lin1"):
        torch.testing.assert_close(getattr(ours, name).weight, getattr(peft_merged, name).weight)
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    with torch.no_grad():
        assert rel_err(loaded(x), routed) <= TOL
        assert rel_err(ours(x), routed) <= TOL


def test_trained_biases_travel_with_the_export(tmp_path) -> None:
    base = MLP()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, condition_config(["lin0"], bias="all"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and "rankmoe_" not in name:
                param.add_(torch.randn_like(param))  # as if trained
    x, cond = torch.randn(1, 4, 16), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(x)
    collapsed = collapse(model, cond)
    assert set(collapsed.biases) == {"lin0.bias", "lin1.bias"}
    collapsed.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    with torch.no_grad():
        assert rel_err(loaded(x), routed) <= TOL
        assert rel_err(collapsed.merge_into(copy.deepcopy(reference))(x), routed) <= TOL
    with pytest.raises(ValueError, match="biases"):
        collapsed.save_pretrained(tmp_path / "d", format="diffusers")


def test_pooled_router_collapses_from_the_last_forward(tmp_path) -> None:
    config = condition_config(["lin0", "lin1"], router="pooled", router_kwargs={"init_scale": 5.0})
    model = get_peft_model(MLP(), config)
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        routed = model(x)
    with pytest.raises(ValueError, match=r"routes on the layer input .*from_last_forward=True"):
        collapse(model)
    collapsed = collapse(model, from_last_forward=True)
    model.eval()
    with torch.no_grad():
        assert rel_err(collapsed.merge_and_unload(model)(x), routed) <= TOL


def test_from_last_forward_needs_batch_size_one() -> None:
    model = get_peft_model(MLP(), condition_config(["lin0"], router="pooled", router_kwargs={}))
    with pytest.raises(ValueError, match="no routing record"):
        collapse(model, from_last_forward=True)
    model(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="batch size 2"):
        collapse(model, from_last_forward=True)
    with pytest.raises(ValueError, match="either cond or from_last_forward"):
        collapse(model, torch.rand(3), from_last_forward=True)


def test_clear_errors() -> None:
    token = get_peft_model(MLP(), condition_config(["lin0"], router="linear", router_kwargs={}))
    with pytest.raises(ValueError, match=r"layer 'lin0' \(adapter 'default', router 'linear'\) routes per token"):
        collapse(token)
    routed = get_peft_model(MLP(), condition_config(["lin0", "lin1"]))
    with pytest.raises(ValueError, match=r"cond has shape \(2, 3\)"):
        collapse(routed, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"layer 'lin0' .* routes on a condition; pass cond"):
        collapse(routed)
    with pytest.raises(ValueError, match="floating tensor"):
        collapse(routed, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="condition_dim=3"):
        collapse(routed, torch.rand(4))
    with pytest.raises(ValueError, match="adapter_name='nope'"):
        collapse(routed, torch.rand(3), adapter_name="nope")
    with pytest.raises(ValueError, match="no module named 'lin0'"):
        collapse(routed, torch.rand(3)).merge_into(torch.nn.Sequential(torch.nn.Linear(16, 32)))


def test_several_adapters_need_a_name() -> None:
    model = get_peft_model(MLP(), condition_config(["lin0"], router="static", router_kwargs={}))
    model.add_adapter("other", condition_config(["lin1"]))
    collapsed = collapse(model)  # only "default" is active
    assert collapsed.adapter_name == "default" and set(collapsed.layers) == {"lin0"}
    other = collapse(model, torch.rand(3), adapter_name="other")
    assert set(other.layers) == {"lin1"}
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 active RankMoE adapters"):
        collapse(model, torch.rand(3))


def test_layer_without_active_rank_is_skipped(tmp_path) -> None:
    model = get_peft_model(MLP(), condition_config(["lin0", "lin1"], r=4, num_shared_ranks=0, top_k=2))
    zero_slot_bias(model, "base_model.model.lin0", -100.0)  # lin0 picks two real experts
    zero_slot_bias(model, "base_model.model.lin1", 100.0)  # lin1 picks both zero slots: no active rank
    x, cond = torch.randn(1, 3, 16), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(x)
    collapsed = collapse(model, cond)
    assert collapsed.skipped == ("lin1",) and set(collapsed.layers) == {"lin0"}
    with pytest.raises(ValueError, match="skipped"):
        collapsed.delta_weight("lin1")
    config, state = collapsed.to_peft_lora()
    assert config.target_modules == "(?:lin0)"
    assert set(state) == {"base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"}
    with torch.no_grad():
        assert rel_err(collapsed.merge_and_unload(model)(x), routed) <= TOL


def test_all_layers_skipped_refuses_to_export(tmp_path) -> None:
    model = get_peft_model(MLP(), condition_config(["lin0"], r=4, num_shared_ranks=0, top_k=2))
    zero_slot_bias(model, "base_model.model.lin0", 100.0)
    collapsed = collapse(model, torch.rand(3))
    assert collapsed.layers == {} and collapsed.skipped == ("lin0",)
    with pytest.raises(ValueError, match="no layer of adapter 'default' has an active rank"):
        collapsed.save_pretrained(tmp_path)


def test_rank_patterns_match_only_their_own_layer(tmp_path) -> None:
    """``lin`` and ``inner.lin`` have different ranks; PEFT's pattern lookup must give each its own."""
    model, _ = routed_mixed_net(tmp_path)
    collapsed = collapse(model, torch.rand(3))
    config, _ = collapsed.to_peft_lora()
    assert config.r == config.lora_alpha and config.rank_pattern == config.alpha_pattern
    assert config.rank_pattern  # lin (3) and inner.lin (5) cannot share one rank
    names = ["conv", "seq", "lin", "inner.lin", "inner", "xlin", "inner.lin.x"]
    for name in names:
        key = get_pattern_key(config.rank_pattern.keys(), name)
        assert config.rank_pattern.get(key, config.r) == collapsed.ranks.get(name, config.r), name
    for key in config.rank_pattern:
        assert sum(get_pattern_key([key], name) == key for name in names) == 1, key


def test_dilated_conv_merges_but_refuses_peft_export(tmp_path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=3, padding=2, dilation=2))
    model = get_peft_model(net, condition_config(["0"]))
    x, cond = torch.randn(1, 3, 5, 5), torch.rand(3)
    with torch.no_grad(), rankmoe.condition(model, cond[None]):
        routed = model(x)
    collapsed = collapse(model, cond)
    with pytest.raises(ValueError, match=r"layer '0' is a convolution with dilation=\(2, 2\)"):
        collapsed.save_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_err(collapsed.merge_and_unload(model)(x), routed) <= TOL


def test_collapsed_lora_is_a_plain_dataclass() -> None:
    model = get_peft_model(MLP(), condition_config(["lin0"]))
    collapsed = collapse(model, torch.tensor([[0.1, 0.5, 0.9]]))
    assert isinstance(collapsed, CollapsedLoRA)
    torch.testing.assert_close(collapsed.condition, torch.tensor([0.1, 0.5, 0.9]))
    layer = collapsed.layers["lin0"]
    assert layer.lora_A.shape == (layer.rank, 16) and layer.lora_B.shape == (32, layer.rank)
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
