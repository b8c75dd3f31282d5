"""Top-k selection over routed + zero slots and expansion of slot gates to rank gates (pure functions).

The rule, for one token or sample with slot logits ``z`` (``s`` entries):

1. ``p = softmax(z)`` over *all* slots — real routed experts and zero slots compete in one softmax;
2. ``K = top_k(p)`` — exactly ``top_k`` slots are selected;
3. the weight of a selected slot is ``w_i = top_k * p_i / sum_{j in K} p_j``; unselected slots get 0;
4. real expert ``i`` passes ``w_i`` to each of its ``expert_rank`` ranks; a zero slot passes nothing;
5. shared ranks always get gate 1.

Why renormalise over the selected set, with zero slots kept in the normaliser, and multiply by ``top_k``:

* renormalising makes the gate magnitude independent of the probability mass left on unselected
  slots, so the update does not shrink as the router gets sharper;
* keeping the zero slots in the normaliser means a selected zero slot takes its share of the weight
  away from the real experts: selecting it really means "one expert fewer", and the zero-slot logits
  still receive a gradient through the normaliser;
* the factor ``top_k`` makes a uniform router give every active rank gate 1 — the same weight as a
  shared rank — so the LoRA scaling ``lora_alpha / r`` means the same for shared and routed ranks and a
  freshly initialised layer behaves like a LoRA over its active ranks.

All shapes are static: zero slots are gates of 0, never a change of shape, so the functions compile
to one graph for any routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankmoe.routers.base import SlotLayout


@dataclass
class Routing:
    """Result of top-k selection for a batch of routing decisions.

    Leading axes ``...`` are ``(b,)`` for per-sample routing or the token axes for per-token routing.

    Attributes:
        probs: Softmax over all slots, ``(..., s)``, float32.
        top_indices: Selected slots, ``(..., top_k)``, int64.
        top_weights: Weight of each selected slot, ``(..., top_k)`` (zero slots included).
        slot_gates: Weight of every slot, ``(..., s)``: ``w_i`` for selected slots (zero slots included), 0
            otherwise.
        rank_gates: Gate per rank, ``(..., r)``: 1 for shared ranks, the expert's weight for routed ranks, 0 for
            unselected experts. The LoRA scaling is *not* folded in.
    """

    probs: torch.Tensor
    top_indices: torch.Tensor
    top_weights: torch.Tensor
    slot_gates: torch.Tensor
    rank_gates: torch.Tensor


def select_top_k(logits: torch.Tensor, layout: SlotLayout, selection_bias: torch.Tensor | None = None) -> Routing:
    """Select ``layout.top_k`` slots per row of ``logits`` and build slot and rank gates.

    Args:
        logits: Slot logits ``(..., s)`` with ``s == layout.num_slots``; any floating dtype (computed in float32).
        layout: The adapter's slot layout.
        selection_bias: Optional per-slot bias ``(s,)`` added to the logits for choosing the top-k slots only
            (DeepSeek-V3 style bias balancing). The gate values still come from the unbiased probabilities.

    Returns:
        The :class:`Routing` (see the module docstring for the rule).

    Raises:
        ValueError: If the last axis of ``logits`` is not ``layout.num_slots``.

    Example:
        >>> layout = SlotLayout(r=4, num_shared_ranks=1, top_k=2, num_zero_experts=1)
        >>> routing = select_top_k(torch.tensor([[0.0, 0.0, -1e9, -1.0]]), layout)
        >>> routing.rank_gates
        tensor([[1., 1., 1., 0.]])
    """
    if logits.shape[-1] != layout.num_slots:
        raise ValueError(
            f"router logits have {logits.shape[-1]} slots on their last axis, expected "
            f"num_slots={layout.num_slots} (experts={layout.num_experts} + zero={layout.num_zero_experts})"
        )
    probs = torch.softmax(logits.float(), dim=-1)
    if selection_bias is None:
        top_probs, top_indices = probs.topk(layout.top_k, dim=-1)
    else:
        top_indices = (logits.float() + selection_bias.float()).topk(layout.top_k, dim=-1).indices
        top_probs = probs.gather(-1, top_indices)
    denominator = top_probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    top_weights = top_probs * (layout.top_k / denominator)
    slot_gates = torch.zeros_like(probs).scatter(-1, top_indices, top_weights)
    return Routing(
        probs=probs,
        top_indices=top_indices,
        top_weights=top_weights,
        slot_gates=slot_gates,
        rank_gates=expand_rank_gates(slot_gates, layout),
    )


def expand_rank_gates(slot_gates: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """Turn slot gates ``(..., s)`` into rank gates ``(..., r)``.

    Shared ranks get 1, each real expert's weight is repeated over its ``expert_rank`` ranks, zero slots are
    dropped.

    Args:
        slot_gates: Gate per slot, ``(..., s)``.
        layout: The adapter's slot layout.

    Returns:
        Gate per rank, ``(..., r)``, same dtype and device as ``slot_gates``.
    """
    expert_gates = slot_gates[..., : layout.num_experts]
    if layout.expert_rank > 1:
        expert_gates = expert_gates.repeat_interleave(layout.expert_rank, dim=-1)
    shared = slot_gates.new_ones((*slot_gates.shape[:-1], layout.num_shared_ranks))
    return torch.cat([shared, expert_gates], dim=-1)


def selection_mask(top_indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    """One-hot union of the selected slots.

    Args:
        top_indices: Selected slots ``(..., k)``.
        num_slots: ``s``.

    Returns:
        Boolean mask ``(..., s)``, True where a slot was selected.
    """
    mask = torch.zeros((*top_indices.shape[:-1], num_slots), dtype=torch.bool, device=top_indices.device)
    return mask.scatter(-1, top_indices, True)


def active_ranks(top_indices: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """Active ranks per routing decision: shared ranks plus ``expert_rank`` per selected real expert.

    Args:
        top_indices: Selected slots ``(..., k)``.
        layout: The adapter's slot layout.

    Returns:
        Float tensor ``(...)``.
    """
    real = (top_indices < layout.num_experts).sum(dim=-1)
    return (layout.num_shared_ranks + layout.expert_rank * real).float()


def gathered_ranks(
    top_indices: torch.Tensor, top_weights: torch.Tensor, layout: SlotLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks a fixed-k gather path reads, with their gates: shared ranks first, then the selected experts.

    The number of gathered ranks is static, ``k = num_shared_ranks + expert_rank * top_k``, whatever was
    selected: a selected zero slot points at rank 0 with gate 0, so it contributes nothing and never changes a
    shape.

    Args:
        top_indices: Selected slots ``(..., top_k)``.
        top_weights: Their weights ``(..., top_k)`` (:attr:`Routing.top_weights`).
        layout: The adapter's slot layout.

    Returns:
        ``(rank_index, rank_gates)``, both ``(..., k)``: int64 rank positions and their gates (scaling not folded
        in; shared ranks 1).

    Example:
        >>> layout = SlotLayout(r=4, num_shared_ranks=1, top_k=2, num_zero_experts=1)
        >>> routing = select_top_k(torch.tensor([[1.0, -1e9, -1e9, 0.0]]), layout)  # expert 0 and the zero slot
        >>> index, gates = gathered_ranks(routing.top_indices, routing.top_weights, layout)
        >>> index.tolist(), [round(g, 3) for g in gates[0].tolist()]
        ([[0, 1, 0]], [1.0, 1.462, 0.0])
    """
    real = top_indices < layout.num_experts
    weights = top_weights * real
    if layout.expert_rank == 1:
        routed = torch.where(real, top_indices + layout.num_shared_ranks, 0)
    else:
        offsets = torch.arange(layout.expert_rank, device=top_indices.device)
        first = top_indices * layout.expert_rank + layout.num_shared_ranks
        routed = torch.where(real, first, 0).unsqueeze(-1) + offsets * real.unsqueeze(-1)
        routed = routed.flatten(-2)
        weights = weights.repeat_interleave(layout.expert_rank, dim=-1)
    if layout.num_shared_ranks == 0:
        return routed, weights
    lead = top_indices.shape[:-1]
    shared = torch.arange(layout.num_shared_ranks, device=top_indices.device).expand(*lead, -1)
    shared_gates = weights.new_ones((*lead, layout.num_shared_ranks))
    return torch.cat([shared, routed], dim=-1), torch.cat([shared_gates, weights], dim=-1)
