"""Properties of top-k selection and gate expansion, checked against a numpy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankmoe.routers.base import SlotLayout
from rankmoe.routers.selection import active_ranks, expand_rank_gates, select_top_k, selection_mask
from tests.strategies import slot_layouts


def reference_gates(logits: np.ndarray, layout: SlotLayout) -> tuple[np.ndarray, np.ndarray]:
    """Loop-based reference: returns (slot gates (t, s), rank gates (t, r)) for logits (t, s)."""
    t, s = logits.shape
    slot = np.zeros((t, s))
    rank = np.zeros((t, layout.r))
    for row in range(t):
        z = logits[row] - logits[row].max()
        p = np.exp(z) / np.exp(z).sum()
        chosen = np.argsort(-p, kind="stable")[: layout.top_k]
        total = p[chosen].sum()
        for i in chosen:
            slot[row, i] = layout.top_k * p[i] / total
        rank[row, : layout.num_shared_ranks] = 1.0
        for expert in range(layout.num_experts):
            start = layout.num_shared_ranks + expert * layout.expert_rank
            rank[row, start : start + layout.expert_rank] = slot[row, expert]
    return slot, rank


@given(layout=slot_layouts(), leading=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_selection_matches_reference_and_invariants(layout: SlotLayout, leading: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*leading, layout.num_slots, generator=generator, dtype=torch.float64) * 3
    routing = select_top_k(logits, layout)

    assert routing.probs.shape == (*leading, layout.num_slots)
    assert routing.rank_gates.shape == (*leading, layout.r)
    # exactly top_k distinct slots per decision
    mask = selection_mask(routing.top_indices, layout.num_slots)
    assert bool((mask.sum(-1) == layout.top_k).all())
    # gates are non-negative and live only on selected slots
    assert bool((routing.slot_gates >= 0).all())
    assert bool((routing.slot_gates[~mask] == 0).all())
    # renormalised weights of the selected slots sum to top_k
    torch.testing.assert_close(
        routing.slot_gates.sum(-1), torch.full(leading, float(layout.top_k)), rtol=1e-5, atol=1e-5
    )
    # shared ranks always 1
    assert bool((routing.rank_gates[..., : layout.num_shared_ranks] == 1).all())

    slot_ref, rank_ref = reference_gates(logits.reshape(-1, layout.num_slots).numpy(), layout)
    np.testing.assert_allclose(routing.slot_gates.reshape(-1, layout.num_slots).numpy(), slot_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(routing.rank_gates.reshape(-1, layout.r).numpy(), rank_ref, rtol=1e-5, atol=1e-6)


@given(layout=slot_layouts(), seed=st.integers(0, 999))
def test_zero_slots_never_reach_a_rank(layout: SlotLayout, seed: int) -> None:
    """Putting all the mass on zero slots leaves only the shared ranks active."""
    layout = dataclasses.replace(layout, num_zero_experts=max(layout.num_zero_experts, layout.top_k))
    logits = torch.full((3, layout.num_slots), -30.0)
    logits[:, layout.num_experts :] = torch.rand(3, layout.num_zero_experts, generator=torch.Generator().manual_seed(seed))
    routing = select_top_k(logits, layout)
    assert bool((routing.top_indices >= layout.num_experts).all())
    assert bool((routing.rank_gates[:, layout.num_shared_ranks :] == 0).all())
    torch.testing.assert_close(active_ranks(routing.top_indices, layout), torch.full((3,), float(layout.num_shared_ranks)))


def test_uniform_router_gives_unit_gates() -> None:
    """With equal probabilities over the selected experts, every active rank has gate 1, like a shared rank."""
    layout = SlotLayout(r=6, num_shared_ranks=2, expert_rank=2, top_k=2, num_zero_experts=0)
    logits = torch.tensor([[0.0, 0.0]])
    assert torch.equal(select_top_k(logits, layout).rank_gates, torch.ones(1, 6))


def test_selected_zero_slot_takes_its_share() -> None:
    layout = SlotLayout(r=3, num_shared_ranks=1, top_k=2, num_zero_experts=1)
    # slots: expert0, expert1, zero; probabilities proportional to exp(logit)
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.4]]))
    routing = select_top_k(logits, layout)
    # selected: expert0 (0.5) and the zero slot (0.4); expert0 gate = 2 * 0.5 / 0.9
    torch.testing.assert_close(routing.rank_gates, torch.tensor([[1.0, 2 * 0.5 / 0.9, 0.0]]))


def test_expand_rank_gates_layout() -> None:
    layout = SlotLayout(r=7, num_shared_ranks=1, expert_rank=2, top_k=1, num_zero_experts=2)
    slot_gates = torch.tensor([0.5, 0.0, 2.0, 9.0, 9.0])
    assert expand_rank_gates(slot_gates, layout).tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 2.0, 2.0]


def test_wrong_slot_count_is_a_clear_error() -> None:
    layout = SlotLayout(r=4, num_shared_ranks=0, top_k=1)
    with pytest.raises(ValueError, match="num_slots=4"):
        select_top_k(torch.zeros(2, 5), layout)
