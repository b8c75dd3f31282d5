"""With every rank shared, RankMoE is exactly PEFT LoRA: same outputs and same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from rankmoe import RankMoEConfig
from tests.conftest import MLP, ConvNet


class Conv1dNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 6, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GPT2StyleNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Conv1D(12, 10)  # nx=10 -> nf=12, weight stored (10, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


CASES = [
    ("linear", MLP, ["lin0", "lin1"], (3, 5, 16)),
    ("conv2d", ConvNet, ["conv0", "conv1"], (2, 3, 8, 8)),
    ("conv1d", Conv1dNet, ["conv"], (2, 4, 9)),
    ("transformers_conv1d", GPT2StyleNet, ["proj"], (2, 5, 10)),
]


def _pair(model_cls, targets, r=6, alpha=12):
    torch.manual_seed(0)
    base = model_cls()
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, fan_in_fan_out=model_cls is GPT2StyleNet),
    )
    moe = get_peft_model(
        copy.deepcopy(base),
        RankMoEConfig(r=r, num_shared_ranks=r, top_k=0, lora_alpha=alpha, target_modules=targets, init_weights=False),
    )
    # copy LoRA's factors into RankMoE so both start from the same weights
    for name, module in moe.base_model.model.named_modules():
        if hasattr(module, "rankmoe_A"):
            peft_module = lora.base_model.model.get_submodule(name)
            with torch.no_grad():
                module.rankmoe_A["default"].copy_(peft_module.lora_A["default"].weight)
                module.rankmoe_B["default"].copy_(peft_module.lora_B["default"].weight)
    return lora, moe


@pytest.mark.parametrize("name, model_cls, targets, shape", CASES, ids=[c[0] for c in CASES])
def test_all_shared_equals_peft_lora(name, model_cls, targets, shape) -> None:
    lora, moe = _pair(model_cls, targets)
    x = torch.randn(shape)
    x_lora, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_lora, out_moe = lora(x_lora), moe(x_moe)
    torch.testing.assert_close(out_moe, out_lora, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), moe.disable_adapter():
        base_out = moe(x)
    assert not torch.allclose(out_moe, base_out, atol=1e-4), "the adapter must change the output for the test to mean anything"

    grad = torch.randn_like(out_lora)
    out_lora.backward(grad)
    out_moe.backward(grad)
    torch.testing.assert_close(x_moe.grad, x_lora.grad, rtol=1e-5, atol=1e-6)
    lora_grads = {n.replace("lora_A.default.weight", "A").replace("lora_B.default.weight", "B"): p.grad
                  for n, p in lora.named_parameters() if p.requires_grad}
    moe_grads = {n.replace("rankmoe_A.default", "A").replace("rankmoe_B.default", "B"): p.grad
                 for n, p in moe.named_parameters() if p.requires_grad}
    assert lora_grads.keys() == moe_grads.keys()
    for key in lora_grads:
        torch.testing.assert_close(moe_grads[key], lora_grads[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name, model_cls, targets, shape", CASES, ids=[c[0] for c in CASES])
def test_all_shared_merge_matches_peft_lora_merge(name, model_cls, targets, shape) -> None:
    lora, moe = _pair(model_cls, targets)
    x = torch.randn(shape)
    merged_lora = lora.merge_and_unload()
    merged_moe = moe.merge_and_unload()
    for key, value in merged_lora.state_dict().items():
        torch.testing.assert_close(merged_moe.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(merged_moe(x), merged_lora(x), rtol=1e-5, atol=1e-6)


def test_bf16_base_with_fp32_adapters_rounds_like_peft_lora() -> None:
    """fp32 adapters on a bf16 base: the update is added in fp32 and rounded once, bit for bit as PEFT's LoRA."""
    torch.manual_seed(0)
    lora, moe = _pair(MLP, ["lin0", "lin1"])
    for model in (lora, moe):
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "base_layer"):
                module.base_layer.to(torch.bfloat16)
    x = torch.randn(4, 16)
    out_lora = lora.base_model.model.lin0(x.to(torch.bfloat16))
    out_moe = moe.base_model.model.lin0(x.to(torch.bfloat16))
    assert out_moe.dtype == out_lora.dtype == torch.bfloat16
    assert next(moe.base_model.model.lin0.rankmoe_A.parameters()).dtype == torch.float32
    torch.testing.assert_close(out_moe, out_lora, rtol=0, atol=0)
