"""Layer-level properties on hypothesis-drawn layouts and input shapes, against a loop-based reference."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import get_peft_model

import rankmoe
from rankmoe import RankMoEConfig
from rankmoe.routers.base import SlotLayout
from tests.strategies import slot_layouts
from tests.test_selection import reference_gates


def _config(layout: SlotLayout, router: str, targets: list[str], alpha: float) -> RankMoEConfig:
    return RankMoEConfig(
        r=layout.r, num_shared_ranks=layout.num_shared_ranks, expert_rank=layout.expert_rank, top_k=layout.top_k,
        num_zero_experts=layout.num_zero_experts, lora_alpha=alpha, router=router, target_modules=targets,
        init_weights=False,
    )


@given(
    layout=slot_layouts(max_rank=12),
    leading=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    router=st.sampled_from(["linear", "pooled"]),
    alpha=st.sampled_from([1.0, 6.0]),
)
def test_linear_delta_matches_loop_reference(layout, leading, router, alpha) -> None:
    base = torch.nn.Sequential(torch.nn.Linear(5, 4))
    model = get_peft_model(base, _config(layout, router, ["0"], alpha))
    layer = model.base_model.model[0]
    x = torch.randn(*leading, 5, dtype=torch.float32)
    with torch.no_grad():
        delta = (model(x) - layer.base_layer(x)).reshape(-1, 4).double().numpy()
        record = layer._rankmoe_records["default"]
        logits = record.logits.reshape(-1, layout.num_slots).double().numpy()
    _, rank_gates = reference_gates(logits, layout)
    a = layer.rankmoe_A["default"].detach().double().numpy()
    b = layer.rankmoe_B["default"].detach().double().numpy()
    tokens = x.reshape(-1, 5).double().numpy()
    # per-sample routing: one gate row per sample, shared by its tokens
    if router == "pooled":
        per_sample = tokens.shape[0] // rank_gates.shape[0]
        rank_gates = np.repeat(rank_gates, per_sample, axis=0)
    expected = np.zeros((tokens.shape[0], 4))
    for t in range(tokens.shape[0]):
        for i in range(layout.r):
            if rank_gates[t, i] != 0:  # zero slots and unselected experts never reach a rank
                expected[t] += rank_gates[t, i] * (alpha / layout.r) * b[:, i] * (a[i] @ tokens[t])
    np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-5)
    assert (rank_gates >= 0).all() and (rank_gates[:, : layout.num_shared_ranks] == 1).all()
    assert (rankmoe.routing_stats(model)["base_model.model.0"].slot_load.sum() - layout.top_k).abs() < 1e-5


@given(layout=slot_layouts(max_rank=8), size=st.tuples(st.integers(3, 6), st.integers(3, 6)),
       stride=st.sampled_from([1, 2]), router=st.sampled_from(["linear", "pooled"]))
def test_conv2d_delta_matches_dense_weight_per_position(layout, size, stride, router) -> None:
    """Each output position's delta equals the gated dense weight applied to that position's patch."""
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=3, stride=stride, padding=1))
    model = get_peft_model(base, _config(layout, router, ["0"], 2.0))
    layer = model.base_model.model[0]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        delta = model(x) - layer.base_layer(x)
        record = layer._rankmoe_records["default"]
        logits = record.logits.reshape(-1, layout.num_slots).double().numpy()
    _, rank_gates = reference_gates(logits, layout)
    a = layer.rankmoe_A["default"].detach().double().reshape(layout.r, -1).numpy()
    b = layer.rankmoe_B["default"].detach().double().reshape(4, layout.r).numpy()
    patches = torch.nn.functional.unfold(x.double(), 3, padding=1, stride=stride)  # (b, 27, L)
    out_h, out_w = delta.shape[-2:]
    gates = rank_gates.reshape(2, out_h * out_w, layout.r) if router == "linear" else rank_gates[:, None, :]
    expected = np.einsum("or,bLr,rk,bkL->boL", b, np.broadcast_to(gates, (2, out_h * out_w, layout.r)), a,
                         patches.numpy()) * (2.0 / layout.r)
    np.testing.assert_allclose(delta.reshape(2, 4, -1).double().numpy(), expected, rtol=1e-4, atol=1e-5)
