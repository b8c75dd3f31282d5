"""``rankmoe.aux_loss``: values from the last records, masks, checkpointing, accumulation, adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch.utils.checkpoint import checkpoint

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.losses import degradation_aware_loss, switch_loss, z_loss
from rankmoe.routers.selection import selection_mask
from tests.conftest import MLP


def routed_config(**overrides) -> RankMoEConfig:
    values = dict(
        r=8, num_shared_ranks=2, top_k=2, num_zero_experts=2, target_modules=["lin0", "lin1"],
        router="linear", router_kwargs={"init_scale": 1.0}, balance_loss="switch",
        balance_loss_weight=0.1, z_loss_weight=0.01,
    )
    values.update(overrides)
    return RankMoEConfig(**values)


def manual_terms(layer, adapter="default", keep=None):
    """Balance and z-loss of one layer's last record, computed straight from the functional forms."""
    record = layer._rankmoe_records[adapter]
    probs, logits = record.flat("probs"), record.flat("logits")
    selected = selection_mask(record.flat("top_indices"), record.layout.num_slots)
    if keep is not None:
        probs, logits, selected = probs[keep], logits[keep], selected[keep]
    return switch_loss(probs, selected, record.layout.top_k), z_loss(logits)


def test_total_is_the_mean_of_weighted_per_layer_terms(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    model(torch.randn(3, 5, 16))
    losses = rankmoe.aux_loss(model)
    layers = dict(rankmoe.rankmoe_layers(model))
    expected = []
    for name in ("base_model.model.lin0", "base_model.model.lin1"):
        balance, z = manual_terms(layers[name])
        torch.testing.assert_close(losses.per_layer[name]["balance"], balance)
        torch.testing.assert_close(losses.per_layer[name]["z"], z)
        expected.append(0.1 * balance + 0.01 * z)
    assert losses.num_layers == 2
    torch.testing.assert_close(losses.total, torch.stack(expected).mean())
    torch.testing.assert_close(losses.terms["balance"], (losses.per_layer["base_model.model.lin0"]["balance"]
                                                         + losses.per_layer["base_model.model.lin1"]["balance"]) / 2)
    assert set(losses.log_dict()) == {"rankmoe/aux_loss", "rankmoe/balance_loss", "rankmoe/z_loss"}


def test_total_reaches_the_router_weights(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    model(torch.randn(4, 16))
    rankmoe.aux_loss(model).total.backward()
    router = dict(rankmoe.rankmoe_layers(model))["base_model.model.lin0"].rankmoe_router["default"]
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def test_nothing_routed_means_zero(mlp) -> None:
    model = get_peft_model(copy.deepcopy(mlp), routed_config())
    losses = rankmoe.aux_loss(model)  # no forward yet
    assert losses.num_layers == 0 and float(losses.total) == 0.0 and losses.terms == {}
    shared = get_peft_model(mlp, routed_config(r=4, num_shared_ranks=4, top_k=0, num_zero_experts=0))
    shared(torch.randn(2, 16))
    losses = rankmoe.aux_loss(shared)
    assert losses.num_layers == 0 and float(losses.total) == 0.0


def test_token_mask_equals_dropping_the_padded_tokens(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    model(x)
    masked = rankmoe.aux_loss(model, token_mask=mask)
    model(x[mask.bool()].unsqueeze(0))  # only the real tokens, as one sequence
    dropped = rankmoe.aux_loss(model)
    torch.testing.assert_close(masked.total, dropped.total)
    torch.testing.assert_close(masked.terms["balance"], dropped.terms["balance"])


def test_token_mask_of_the_wrong_shape_is_a_clear_error(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    model(torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match=r"token_mask has shape \(2, 5\).*\(2, 6\)"):
        rankmoe.aux_loss(model, token_mask=torch.ones(2, 5))


def test_sample_level_records_drop_fully_padded_samples(mlp) -> None:
    model = get_peft_model(mlp, routed_config(router="pooled"))
    x = torch.randn(3, 4, 16)
    model(x)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    layer = dict(rankmoe.rankmoe_layers(model))["base_model.model.lin0"]
    balance, _ = manual_terms(layer, keep=torch.tensor([True, False, True]))
    torch.testing.assert_close(rankmoe.aux_loss(model, token_mask=mask).per_layer["base_model.model.lin0"]["balance"],
                               balance)


def test_degradation_aware_reads_the_severity_of_each_sample(mlp) -> None:
    model = get_peft_model(mlp, routed_config(balance_loss="degradation_aware", balance_loss_kwargs={"alpha": 0.5}))
    x, severity = torch.randn(3, 4, 16), torch.tensor([0.0, 0.5, 1.0])
    with rankmoe.condition(model, None, severity=severity):
        model(x)
    losses = rankmoe.aux_loss(model)
    record = dict(rankmoe.rankmoe_layers(model))["base_model.model.lin1"]._rankmoe_records["default"]
    layout = record.layout
    selected = selection_mask(record.flat("top_indices"), layout.num_slots)
    expected = degradation_aware_loss(record.flat("probs"), selected, layout.top_k, layout.num_experts,
                                      severity.repeat_interleave(4), alpha=0.5)
    torch.testing.assert_close(losses.per_layer["base_model.model.lin1"]["balance"], expected)
    model(x)  # no severity this time
    with pytest.raises(ValueError, match="severity"):
        rankmoe.aux_loss(model)


class Checkpointed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.use_reentrant)


def _router_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "rankmoe_router" in n and p.grad is not None}


def test_activation_checkpointing_counts_each_forward_once() -> None:
    torch.manual_seed(0)
    plain = get_peft_model(MLP(), routed_config())
    wrapped = copy.deepcopy(plain)
    wrapped.base_model.model = Checkpointed(wrapped.base_model.model, use_reentrant=False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    results = []
    for model in (plain, wrapped):
        out = model(x)
        losses = rankmoe.aux_loss(model)
        (out.square().mean() + losses.total).backward()  # recomputation overwrites the records during backward
        after = rankmoe.aux_loss(model)  # must not have grown: overwritten, not appended
        results.append((losses.total.detach(), after.total.detach(), _router_grads(model)))
    (plain_total, plain_after, plain_grads), (ckpt_total, ckpt_after, ckpt_grads) = results
    torch.testing.assert_close(ckpt_total, plain_total)
    torch.testing.assert_close(ckpt_after, plain_total)
    torch.testing.assert_close(plain_after, plain_total)
    assert plain_grads.keys() == {k.replace("inner.", "") for k in ckpt_grads}
    for name, grad in ckpt_grads.items():
        torch.testing.assert_close(grad, plain_grads[name.replace("inner.", "")])


def test_reentrant_checkpointing_warns_that_routers_get_no_gradient(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    model.base_model.model = Checkpointed(model.base_model.model, use_reentrant=True)
    model.train()
    model(torch.randn(2, 16, requires_grad=True))
    with pytest.warns(UserWarning, match="use_reentrant"):
        rankmoe.aux_loss(model)


def test_gradient_accumulation_sees_only_the_latest_micro_batch(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    first, second = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    model(second)
    alone = rankmoe.aux_loss(model).total.detach()
    model(first)
    model(second)
    torch.testing.assert_close(rankmoe.aux_loss(model).total.detach(), alone)


def test_several_active_adapters_are_reported_separately(mlp) -> None:
    model = get_peft_model(mlp, routed_config())
    model.add_adapter("other", routed_config(balance_loss=None, z_loss_weight=1.0))
    model.base_model.set_adapter(["default", "other"])
    model(torch.randn(2, 16))
    losses = rankmoe.aux_loss(model)
    assert set(losses.per_layer) == {f"base_model.model.{layer}/{adapter}"
                                     for layer in ("lin0", "lin1") for adapter in ("default", "other")}
    assert "balance" not in losses.per_layer["base_model.model.lin0/other"]
    torch.testing.assert_close(losses.per_layer["base_model.model.lin0/other"]["total"],
                               losses.per_layer["base_model.model.lin0/other"]["z"])
    only = rankmoe.aux_loss(model, adapter_name="other")
    assert set(only.per_layer) == {"base_model.model.lin0", "base_model.model.lin1"}
