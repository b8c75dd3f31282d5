"""Per-layer routing state: the last routing record and the active condition."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankmoe.routers.base import RoutingLevel, SlotLayout


@dataclass
class RoutingRecord:
    """The last routing decision of one adapter in one layer (overwritten by every forward).

    Leading axes ``...`` are ``(b,)`` for per-sample routing and the token axes for per-token routing.
    Tensors keep their autograd history so losses can be computed from them after the forward.

    Attributes:
        layout: The adapter's slot layout.
        level: ``"token"`` or ``"sample"``.
        logits: Router logits ``(..., s)``.
        probs: Softmax over slots ``(..., s)``, float32.
        top_indices: Selected slots ``(..., top_k)``.
        slot_gates: Weight per slot ``(..., s)`` (0 for unselected).
        batch_size: Samples in the forward call.
        severity: Per-sample severity ``(b,)`` if one was set with the condition, else ``None``.
    """

    layout: SlotLayout
    level: RoutingLevel
    logits: torch.Tensor
    probs: torch.Tensor
    top_indices: torch.Tensor
    slot_gates: torch.Tensor
    batch_size: int
    severity: torch.Tensor | None = None

    def flat(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` with the decision axes flattened: ``(t, s)`` or ``(t, top_k)``."""
        tensor = getattr(self, name)
        return tensor.reshape(-1, tensor.shape[-1])


@dataclass
class ConditionState:
    """A condition handed to the routed layers by :func:`rankmoe.condition`.

    Attributes:
        condition: ``(b, c)`` or ``None`` (only a severity was given).
        severity: ``(b,)`` in ``[0, 1]`` or ``None``.
        repeat: ``None`` (the layer batch must be ``b``), ``"tile"`` (a layer batch of ``k * b`` reuses the rows as
            ``[rows; rows; ...]``, the order of classifier-free guidance ``torch.cat([uncond, cond])``) or
            ``"interleave"`` (each row repeated ``k`` times in place: beam search, or ``num_images_per_prompt``
            without classifier-free guidance).
    """

    condition: torch.Tensor | None
    severity: torch.Tensor | None
    repeat: str | None = None

    @property
    def batch_size(self) -> int:
        """``b`` of the condition (or of the severity when no condition vector is set)."""
        tensor = self.condition if self.condition is not None else self.severity
        return int(tensor.shape[0]) if tensor is not None else 0

    def rows(self, index: list[int]) -> ConditionState:
        """The condition of a subset of samples (mixed-adapter batches)."""
        return ConditionState(
            None if self.condition is None else self.condition[index],
            None if self.severity is None else self.severity[index],
        )

    def expanded(self, batch_size: int) -> ConditionState | None:
        """This condition repeated to ``batch_size`` rows by :attr:`repeat`, or ``None`` if that is impossible."""
        if self.batch_size == batch_size:
            return self
        if self.repeat is None or self.batch_size == 0 or batch_size % self.batch_size:
            return None
        times = batch_size // self.batch_size

        def grow(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if self.repeat == "tile":
                return tensor.repeat(times, *([1] * (tensor.dim() - 1)))
            return tensor.repeat_interleave(times, dim=0)

        return ConditionState(grow(self.condition), grow(self.severity))
