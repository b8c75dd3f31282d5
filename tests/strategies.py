"""Hypothesis strategies for slot layouts and configs."""

from __future__ import annotations

from hypothesis import strategies as st

from rankmoe.routers.base import SlotLayout


@st.composite
def slot_layouts(draw: st.DrawFn, max_rank: int = 24, routed: bool = True) -> SlotLayout:
    """Valid layouts; with ``routed`` at least one slot exists."""
    expert_rank = draw(st.integers(1, 3))
    num_experts = draw(st.integers(0 if not routed else 0, max_rank // expert_rank))
    num_shared = draw(st.integers(0, 6))
    num_zero = draw(st.integers(0, 4))
    if routed and num_experts + num_zero == 0:
        num_experts = 1
    if num_shared + num_experts * expert_rank == 0:
        num_shared = 1
    num_slots = num_experts + num_zero
    top_k = draw(st.integers(1, num_slots)) if num_slots else 0
    return SlotLayout(
        r=num_shared + num_experts * expert_rank,
        num_shared_ranks=num_shared,
        expert_rank=expert_rank,
        top_k=top_k,
        num_zero_experts=num_zero,
    )
