"""Conditions reach every routed layer; clear errors; identical gradients with activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from torch.utils.checkpoint import checkpoint

import rankmoe
from rankmoe import RankMoEConfig
from tests.conftest import MLP, tiny_llama


def cond_config(**overrides) -> RankMoEConfig:
    kwargs = dict(r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, target_modules=["lin0", "lin1"],
                  router="condition", router_kwargs={"condition_dim": 3}, init_weights=False)
    kwargs.update(overrides)
    return RankMoEConfig(**kwargs)


def test_condition_steers_the_output(mlp) -> None:
    model = get_peft_model(mlp, cond_config())
    x = torch.randn(2, 4, 16)
    c1, c2 = torch.rand(2, 3) * 4, -torch.rand(2, 3) * 4
    with rankmoe.condition(model, c1):
        out1 = model(x)
        again = model(x)
    with rankmoe.condition(model, c2):
        out2 = model(x)
    torch.testing.assert_close(out1, again, rtol=0, atol=0)
    assert not torch.allclose(out1, out2)
    # per-sample: each sample only sees its own condition row
    with rankmoe.condition(model, torch.stack([c1[0], c2[1]])):
        mixed = model(x)
    torch.testing.assert_close(mixed[0], out1[0])
    torch.testing.assert_close(mixed[1], out2[1])


def test_contexts_nest_and_restore(mlp) -> None:
    model = get_peft_model(mlp, cond_config())
    outer, inner = torch.rand(2, 3), torch.rand(2, 3)
    layers = [layer for _, layer in rankmoe.rankmoe_layers(model)]
    with rankmoe.condition(model, outer):
        with rankmoe.condition(model, inner):
            assert all(layer._rankmoe_condition.condition is inner for layer in layers)
        assert all(layer._rankmoe_condition.condition is outer for layer in layers)
    assert all(layer._rankmoe_condition is None for layer in layers)
    rankmoe.set_condition(model, outer)
    assert all(layer._rankmoe_condition.condition is outer for layer in layers)
    rankmoe.clear_condition(model)
    assert all(layer._rankmoe_condition is None for layer in layers)


def test_condition_works_after_inject_adapter_in_model() -> None:
    model = inject_adapter_in_model(cond_config(), MLP())
    with rankmoe.condition(model, torch.rand(3, 3)):
        assert model(torch.randn(3, 16)).shape == (3, 8)


@pytest.mark.parametrize(
    "cond, severity, match",
    [
        (torch.rand(3, 3), None, "batch size 3.*batch size 2"),
        (torch.rand(2, 5), None, "width 5.*condition_dim=3"),
        (torch.rand(2, 3), torch.tensor([0.5, 1.5]), r"severity must lie in \[0, 1\]"),
        (torch.rand(2, 3), torch.rand(3), "severity has 3 rows but condition has 2"),
        (torch.rand(6), None, r"shape \(batch, condition_dim\)"),
        (None, None, "both are None"),
    ],
)
def test_bad_conditions_are_clear_errors(mlp, cond, severity, match) -> None:
    model = get_peft_model(mlp, cond_config())
    with pytest.raises(ValueError, match=match):
        with rankmoe.condition(model, cond, severity=severity):
            model(torch.randn(2, 4, 16))


def test_missing_condition_is_a_clear_error(mlp) -> None:
    model = get_peft_model(mlp, cond_config())
    with pytest.raises(ValueError, match="needs a per-sample condition.*rankmoe.condition"):
        model(torch.randn(2, 4, 16))


def test_model_without_rankmoe_layers() -> None:
    with pytest.raises(ValueError, match="no RankMoE layer"):
        with rankmoe.condition(torch.nn.Linear(2, 2), torch.rand(1, 3)):
            pass


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpointed_pair(use_reentrant: bool):
    """A plain and an activation-checkpointed copy of the same conditioned RankMoE model."""

    class Checkpointed(MLP):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=use_reentrant)

    torch.manual_seed(0)
    plain = get_peft_model(MLP(), cond_config())
    ckpt = get_peft_model(Checkpointed(), cond_config())
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_gives_identical_gradients(backward_inside, use_reentrant) -> None:
    plain, ckpt = checkpointed_pair(use_reentrant)
    x = torch.randn(2, 4, 16, requires_grad=True)
    cond, severity = torch.rand(2, 3) * 3, torch.tensor([0.1, 0.8])
    for model in (plain, ckpt):
        with rankmoe.condition(model, cond, severity=severity):
            loss = model(x).pow(2).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=0, atol=0, msg=key)
    assert any(g.abs().sum() > 0 for k, g in g_plain.items() if "router" in k)


def test_checkpointing_with_ambiguous_forwards_raises() -> None:
    class Checkpointed(MLP):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=False)

    model = get_peft_model(Checkpointed(), cond_config())
    x = torch.randn(2, 4, 16, requires_grad=True)
    with rankmoe.condition(model, torch.rand(2, 3)):
        first = model(x).sum()
    with rankmoe.condition(model, torch.rand(2, 3)):
        second = model(x).sum()
    with pytest.raises(RuntimeError, match="several forwards with gradients and different conditions"):
        (first + second).backward()


def test_transformers_gradient_checkpointing_matches() -> None:
    base = tiny_llama().train()
    config = RankMoEConfig(r=4, num_shared_ranks=1, top_k=2, num_zero_experts=1, init_weights=False,
                           target_modules=["q_proj", "v_proj"], router="condition", router_kwargs={"condition_dim": 2})
    plain = get_peft_model(copy.deepcopy(base), config)
    ckpt = get_peft_model(copy.deepcopy(base), config)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, cond = torch.randint(0, 128, (2, 6)), torch.rand(2, 2)
    for model in (plain, ckpt):
        with rankmoe.condition(model, cond):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # after the context exited: recomputation must reuse the condition
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_replays_the_forwards_condition(use_reentrant) -> None:
    """Evaluation forwards in between and backward inside another context still replay the right condition."""

    plain, ckpt = checkpointed_pair(use_reentrant)
    x = torch.randn(2, 4, 16, requires_grad=True)
    cond, other = torch.rand(2, 3) * 3, -torch.rand(2, 3) * 3
    with rankmoe.condition(plain, cond):
        plain(x).pow(2).sum().backward()
    # an evaluation pass with another condition first, then the training forward, then backward in another context
    ckpt.eval()
    with torch.no_grad(), rankmoe.condition(ckpt, other):
        ckpt(x)
    ckpt.train()
    with rankmoe.condition(ckpt, cond):
        loss = ckpt(x).pow(2).sum()
    with rankmoe.condition(ckpt, other):
        loss.backward()
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=0, atol=0, msg=key)


def test_adapter_loaded_under_another_name_keeps_its_router(tmp_path) -> None:
    base = MLP()
    model = get_peft_model(copy.deepcopy(base), cond_config())
    x, cond = torch.randn(2, 4, 16), torch.rand(2, 3)
    with rankmoe.condition(model, cond):
        expected = model(x)
    model.save_pretrained(tmp_path)
    other = get_peft_model(copy.deepcopy(base), cond_config())
    other.load_adapter(tmp_path, adapter_name="second")
    other.set_adapter("second")
    with rankmoe.condition(other, cond):
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_adapter_names_that_clash_with_container_methods_are_refused(mlp) -> None:
    with pytest.raises(ValueError, match="adapter_name='keys'"):
        get_peft_model(mlp, cond_config(), adapter_name="keys")


@pytest.mark.parametrize("repeat", ["tile", "interleave"])
def test_repeat_routes_a_multiple_of_the_condition_batch(mlp, repeat) -> None:
    """With repeat, a layer batch of k * b uses the b rows in CFG (tile) or per-prompt (interleave) order."""
    model = get_peft_model(mlp, cond_config(init_weights=False))
    cond, x = torch.rand(2, 3), torch.randn(2, 16)
    expanded = cond.repeat(3, 1) if repeat == "tile" else cond.repeat_interleave(3, dim=0)
    x_big = x.repeat(3, 1) if repeat == "tile" else x.repeat_interleave(3, dim=0)
    with rankmoe.condition(model, expanded):
        expected = model(x_big)
    with rankmoe.condition(model, cond, severity=torch.tensor([0.2, 0.9]), repeat=repeat):
        torch.testing.assert_close(model(x_big), expected)
        severity = dict(rankmoe.rankmoe_layers(model))["base_model.model.lin0"]._rankmoe_records["default"].severity
        order = [0.2, 0.9] * 3 if repeat == "tile" else [0.2] * 3 + [0.9] * 3
        torch.testing.assert_close(severity, torch.tensor(order))
        with pytest.raises(ValueError, match="repeat='tile'"):
            model(torch.randn(5, 16))  # not a multiple of 2
    with rankmoe.condition(model, cond), pytest.raises(ValueError, match="batch size 2"):
        model(x_big)
    with pytest.raises(ValueError, match="repeat must be"):
        with rankmoe.condition(model, cond, repeat="cycle"):
            pass
