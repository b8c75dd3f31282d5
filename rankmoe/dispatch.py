"""Choosing the execution path of a RankMoE layer: the break-even rule, as pure functions.

The three paths (see :mod:`rankmoe.paths`) compute the same function. Which one is fastest depends on how many
tokens share one set of gates. Merging costs ``2 d_in d_out k`` FLOPs and one read and write of the weight per
gate set; the unmerged branch costs ``2 n k (d_in + d_out)`` FLOPs and several activation-sized passes for ``n``
tokens. Both models give the same break-even::

    n* = d_in d_out / (d_in + d_out)                      linear layer
    n* = (d_in kh kw) d_out / (d_in kh kw + d_out)         convolution (B is 1x1), n = output positions

Above ``n*`` tokens per gate set merging saves time; below, the fixed-k gather (per-sample gates) or
dense-masked (static gates) branch does. The automatic rule adds three measured refinements:

* **memory**: a merged weight ``(d_out, d_in kh kw)`` per gate set must not be larger than the output it
  produces, ``(n, d_out)``: merge only when also ``n >= d_in kh kw``. The merged weight then never raises the
  call's peak memory above what the branch allocates (on CPU it was also the faster side: a 3x3 convolution
  with 640 channels at 32x32 ran 0.95x base gathered and 1.12x merged);
* **batched convolutions** gather instead of merging: per-sample kernels run as one grouped convolution, which
  was slower than the gathered branch on CPU and on an H100;
* **GPUs** take the dense path: there every path is bound by kernel launches and memory latency at these sizes,
  and dense (the fewest kernels) was the fastest of the three on every measured shape of an H100, eager and in
  CUDA graphs (``benchmarks/results/``). Gather and merge are CPU fast paths, and can be forced on any device.

Per-token routing always takes the dense-masked path: per-token gates cannot be merged or gathered per sample.
Training never merges (a merged weight would need the frozen weight's gradient GEMM). On a CPU it gathers per
sample when that also keeps less for backward than the dense path (:func:`gather_saves_memory`): the gathered
``k`` ranks' intermediate ``(n, k)`` plus the gathered rows of ``A`` and columns of ``B`` against the dense
``(n, r)``. Where it does (many tokens per sample) the gathered branch was also the faster one, 0.77-0.91x PEFT
LoRA against 0.95-1.01x dense in training on a 2-core CPU (four runs); elsewhere training stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rankmoe.routers.base import SlotLayout
from rankmoe.routers.selection import Routing, gathered_ranks

ExecutionPath = Literal["dense", "gather", "merge"]
EXECUTION_PATHS: tuple[str, ...] = ("auto", "dense", "gather", "merge")
"""Values of :attr:`RankMoEConfig.execution_path <rankmoe.RankMoEConfig.execution_path>`."""

GateLevel = Literal["token", "sample", "static"]


def break_even_tokens(in_features: int, out_features: int, kernel_numel: int = 1) -> float:
    """Tokens per gate set above which merging the update into the weight is cheaper than the branch.

    Args:
        in_features: ``d_in`` (input channels for a convolution).
        out_features: ``d_out``.
        kernel_numel: Positions of the base kernel (``kh * kw``; 1 for a linear layer or a 1x1 convolution).

    Returns:
        ``n* = (d_in kernel_numel) d_out / (d_in kernel_numel + d_out)``.

    Example:
        >>> break_even_tokens(320, 320)
        160.0
        >>> round(break_even_tokens(320, 320, kernel_numel=9), 1)
        288.0
    """
    fan_in = in_features * kernel_numel
    return fan_in * out_features / (fan_in + out_features)


def choose_execution_path(
    requested: str,
    *,
    level: GateLevel,
    tokens_per_gate_set: int,
    in_features: int,
    out_features: int,
    kernel_numel: int = 1,
    batch_size: int = 1,
    is_conv: bool = False,
    device_type: str = "cpu",
    training: bool = False,
    rank: int | None = None,
    gathered_rank: int | None = None,
) -> ExecutionPath:
    """The path one adapter of one layer takes for one call.

    Args:
        requested: The configured path: ``"auto"`` or a fixed ``"dense"`` / ``"gather"`` / ``"merge"`` (returned
            as is; :class:`~rankmoe.RankMoEConfig` refuses fixed paths that do not fit the router).
        level: How gates vary: ``"token"`` (per token), ``"sample"`` (one gate set per sample) or ``"static"``
            (one gate set for every input: no router, or a static router).
        tokens_per_gate_set: Tokens that share one gate set: tokens (output positions) per sample for
            ``"sample"``, all tokens of the call for ``"static"``.
        in_features: ``d_in``.
        out_features: ``d_out``.
        kernel_numel: Positions of the base kernel (``kh * kw``).
        batch_size: Samples in the call.
        is_conv: Whether the layer is a convolution: per-sample gates then merge only for one sample.
        device_type: ``torch.device.type`` of the layer (``"cpu"``, ``"cuda"``, ...).
        training: Whether the layer is in ``train()`` mode or gradients are being recorded: then ``"auto"`` never
            merges, and gathers only on a CPU with per-sample gates where :func:`gather_saves_memory` (the rule
            does not look at the grad mode itself, so a reentrant activation checkpoint, which recomputes under
            gradients what ran without, takes the same path in both passes).
        rank: ``r``, all ranks of the adapter (needed for gathering in training; ``None``: dense).
        gathered_rank: ``k``, the ranks a fixed-k gather reads per sample (shared plus ``expert_rank * top_k``).

    Returns:
        ``"dense"``, ``"gather"`` or ``"merge"``.

    Example:
        >>> choose_execution_path("auto", level="sample", tokens_per_gate_set=4096, in_features=320,
        ...                       out_features=320)
        'merge'
        >>> choose_execution_path("auto", level="sample", tokens_per_gate_set=64, in_features=1280,
        ...                       out_features=1280)
        'gather'
        >>> choose_execution_path("auto", level="sample", tokens_per_gate_set=4096, in_features=320,
        ...                       out_features=320, device_type="cuda")
        'dense'
    """
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if level == "token" or device_type != "cpu":
        return "dense"
    if training:
        saves = level == "sample" and rank is not None and gathered_rank is not None and gather_saves_memory(
            tokens_per_gate_set, rank, gathered_rank, in_features, out_features, kernel_numel
        )
        return "gather" if saves else "dense"
    if merge_pays_off(tokens_per_gate_set, in_features, out_features, kernel_numel) and (
        not is_conv or batch_size == 1 or level == "static"
    ):
        return "merge"
    return "gather" if level == "sample" else "dense"


def merge_pays_off(tokens: int, in_features: int, out_features: int, kernel_numel: int = 1) -> bool:
    """Whether ``tokens`` per gate set are above the break-even and at least the merged weight's fan-in.

    Args:
        tokens: Tokens (output positions) sharing one gate set.
        in_features: ``d_in``.
        out_features: ``d_out``.
        kernel_numel: Positions of the base kernel.

    Returns:
        ``tokens > n*`` (:func:`break_even_tokens`) and ``tokens >= d_in * kernel_numel`` (the merged weight is no
        larger than the output it produces).

    Example:
        >>> merge_pays_off(200, 320, 320)  # above n* = 160, but a 320 x 320 weight is larger than 200 x 320
        False
        >>> merge_pays_off(4096, 320, 320, kernel_numel=9)
        True
    """
    fan_in = in_features * kernel_numel
    return tokens > break_even_tokens(in_features, out_features, kernel_numel) and tokens >= fan_in


def gather_saves_memory(
    tokens: int, rank: int, gathered_rank: int, in_features: int, out_features: int, kernel_numel: int = 1
) -> bool:
    """Whether the gather path keeps less for backward than the dense path, per sample.

    Dense keeps the intermediate ``(n, r)``; gather keeps ``(n, k)`` plus the gathered rows of ``A``
    ``(k, d_in kernel_numel)`` and two gathered copies of ``B``'s columns ``(k, d_out)`` (before and after the
    gates), so it keeps less when ``n (r - k) >= k (d_in kernel_numel + 2 d_out)``.

    Args:
        tokens: Tokens (output positions) per sample.
        rank: ``r``.
        gathered_rank: ``k``.
        in_features: ``d_in``.
        out_features: ``d_out``.
        kernel_numel: Positions of the base kernel.

    Returns:
        Whether gathering keeps no more than the dense path.

    Example:
        >>> gather_saves_memory(4096, 40, 16, 320, 320)  # 4096 * 24 >= 16 * 960
        True
        >>> gather_saves_memory(256, 40, 16, 1280, 1280)
        False
    """
    return tokens * (rank - gathered_rank) >= gathered_rank * (in_features * kernel_numel + 2 * out_features)


def kernel_positions(kernel_size: tuple[int, ...]) -> int:
    """``kh * kw`` of a kernel size tuple (1 for ``()``, a linear layer)."""
    return math.prod(kernel_size) if kernel_size else 1


@dataclass
class AdapterGates:
    """The gates of one adapter for one forward call (internal to the layers).

    Attributes:
        adapter: Adapter name.
        level: ``"token"``, ``"sample"`` or ``"static"``.
        rank_gates: Gate per rank without the scaling: ``"token"``: ``(..., r)`` (conv: ``(b, r, *spatial_out)``);
            ``"sample"``: ``(b, r)``; ``"static"``: ``None``.
        batch_size: Samples in the call.
        scaling: The adapter's scaling at this call.
        routing: The per-sample :class:`~rankmoe.routers.selection.Routing` (``"sample"`` only).
    """

    adapter: str
    level: GateLevel
    rank_gates: torch.Tensor | None
    batch_size: int
    scaling: float
    routing: Routing | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def dense(self, dtype: torch.dtype) -> torch.Tensor | float:
        """Gates of the dense path with the scaling folded in, in ``dtype`` (the float scaling when static)."""
        if self.rank_gates is None:
            return self.scaling
        if ("dense", dtype) not in self._memo:  # computed once per call, or once per cached routing
            self._memo["dense", dtype] = (self.rank_gates * self.scaling).to(dtype)
        return self._memo["dense", dtype]

    def gathered(self, layout: SlotLayout, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank_index, rank_gates)`` ``(b, k)`` of the fixed-k gather, scaling folded in (``"sample"`` only)."""
        if self.routing is None:
            raise ValueError(f"adapter {self.adapter!r} has {self.level} gates; only per-sample gates are gathered")
        if ("gathered", dtype) not in self._memo:
            index, gates = gathered_ranks(self.routing.top_indices, self.routing.top_weights, layout)
            self._memo["gathered", dtype] = (index, (gates * self.scaling).to(dtype))
        return self._memo["gathered", dtype]
