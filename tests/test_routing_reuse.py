"""Inference reuses a per-sample routing under the same condition tensor, and only then."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import MLP


def conditioned_mlp(router: str = "condition") -> tuple[nn.Module, list[int]]:
    """A RankMoE MLP and a list that grows by one per router call of ``lin0``."""
    kwargs = {"condition_dim": 3} if router == "condition" else {}
    model = get_peft_model(MLP(), RankMoEConfig(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=1,
                                                target_modules=["lin0", "lin1"], router=router,
                                                router_kwargs=kwargs, init_weights=False)).eval()
    calls: list[int] = []
    model.base_model.model.lin0.rankmoe_router["default"].register_forward_hook(lambda *_: calls.append(1))
    return model, calls


def test_same_condition_routes_once_and_gives_the_same_output() -> None:
    model, calls = conditioned_mlp()
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 3)
    with torch.no_grad(), rankmoe.condition(model, cond):
        first = model(x)
        second = model(x)
        other_input = model(x * 2)
    assert len(calls) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad(), rankmoe.condition(model, cond.clone()):  # a new tensor: routed again
        fresh = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(fresh, first, rtol=0, atol=0)
    assert not torch.allclose(other_input, first)


def test_changes_invalidate_the_reused_routing() -> None:
    model, calls = conditioned_mlp()
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 3)
    layer = model.base_model.model.lin0
    with torch.no_grad(), rankmoe.condition(model, cond):
        before = model(x)
        cond.mul_(-3.0)                                   # in-place edit of the condition
        edited = model(x)
        router = layer.rankmoe_router["default"].proj
        router.weight.add_(torch.randn_like(router.weight) * 5)  # in-place edit of the router (an optimizer step)
        stepped = model(x)
        layer.scaling["default"] *= 0.5                   # diffusers' adapter weight
        halved = model(x)
    assert len(calls) == 4
    with torch.no_grad(), rankmoe.condition(model, cond):
        reference = model(x)
    torch.testing.assert_close(halved, reference, rtol=0, atol=0)
    assert not torch.allclose(before, edited) and not torch.allclose(edited, stepped)


def test_no_reuse_in_training_with_gradients_or_for_input_routers() -> None:
    model, calls = conditioned_mlp()
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 3)
    with rankmoe.condition(model, cond):
        model(x)
        model(x)
    assert len(calls) == 2                                 # gradients recorded: routed every call
    model.train()
    with torch.no_grad(), rankmoe.condition(model, cond):
        model(x)
        model(x)
    assert len(calls) == 4                                 # train() mode
    pooled, pooled_calls = conditioned_mlp(router="pooled")
    with torch.no_grad():
        pooled(x)
        pooled(x)
    assert len(pooled_calls) == 2                          # the router reads the input


def test_tile_and_interleave_are_not_confused() -> None:
    model, _ = conditioned_mlp()
    x, cond = torch.randn(4, 5, 16), torch.randn(2, 3)
    with torch.no_grad():
        with rankmoe.condition(model, cond, repeat="tile"):
            tiled = model(x)
        state = rankmoe.condition(model, cond, repeat="interleave")
        with state:
            interleaved = model(x)
        with rankmoe.condition(model, cond.repeat_interleave(2, 0)):
            expected = model(x)
    torch.testing.assert_close(interleaved, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(tiled, interleaved)
