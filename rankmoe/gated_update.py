"""The gated up-projection ``result + B (g * h)`` with a backward that keeps only what LoRA keeps.

Axis legend: ``b`` samples, ``n`` tokens (output positions for convolutions), ``r`` ranks, ``o`` output features.

A plain autograd graph of ``result + (h * g) @ B^T`` keeps both ``h`` (for the gate gradient) and ``h * g`` (for
``B``'s gradient), two ``(b, n, r)`` tensors where a LoRA keeps one. :func:`gated_update` keeps ``h``, ``g`` and
``B`` only and recomputes ``h * g`` in the backward (one elementwise product), so a routed adapter keeps as much
activation memory as a LoRA of the same rank plus its gates. It is differentiable twice (the backward is built
from differentiable ops).
"""

from __future__ import annotations

from typing import Any

import torch


def _gated_update_rows(
    result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    gated = (hidden * gates).reshape(-1, hidden.shape[-1])
    return torch.addmm(result.reshape(-1, result.shape[-1]), gated, matrix_b.t()).view(result.shape)


def _gated_update_channels(
    result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    batch = hidden.shape[0]
    return torch.baddbmm(result, matrix_b.unsqueeze(0).expand(batch, -1, -1), hidden * gates)


class _GatedUpdate(torch.autograd.Function):
    """``result + B (g * h)``; saves ``h``, ``g`` and ``B`` (not ``g * h``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
        channels_first: bool,
    ) -> torch.Tensor:
        update = _gated_update_channels if channels_first else _gated_update_rows
        return update(result, hidden, matrix_b, gates)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, hidden, matrix_b, gates, channels_first = inputs
        ctx.save_for_backward(hidden, matrix_b, gates)
        ctx.channels_first = channels_first
        device = hidden.device.type  # the backward runs under the forward's autocast, as autograd's own nodes do
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _GatedUpdate._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, matrix_b, gates = ctx.saved_tensors
        need_result, need_hidden, need_b, need_gates, _ = ctx.needs_input_grad
        if ctx.channels_first:  # hidden (b, r, n), grad_out (b, o, n)
            grad_gated = torch.matmul(matrix_b.t(), grad_out) if (need_hidden or need_gates) else None
            grad_b = (
                torch.bmm(grad_out, (hidden * gates).transpose(1, 2)).sum(0) if need_b else None
            )
        else:  # hidden (..., r), grad_out (..., o)
            grad_gated = torch.matmul(grad_out, matrix_b) if (need_hidden or need_gates) else None
            grad_b = (
                grad_out.reshape(-1, grad_out.shape[-1]).t().mm((hidden * gates).reshape(-1, hidden.shape[-1]))
                if need_b else None
            )
        grad_hidden = grad_gated * gates if need_hidden else None
        grad_gates = (grad_gated * hidden).sum_to_size(gates.shape) if need_gates else None
        return grad_out if need_result else None, grad_hidden, grad_b, grad_gates, None


def gated_update(
    result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
    channels_first: bool = False,
) -> torch.Tensor:
    """``result + B (g * h)`` keeping ``h``, ``g`` and ``B`` for backward (no ``(b, n, r)`` copy of ``g * h``).

    Args:
        result: The base output: ``(..., o)``, or ``(b, o, n)`` with ``channels_first``.
        hidden: The down-projection ``h = A x``: ``(..., r)`` with the leading axes of ``result``, or ``(b, r, n)``
            with ``channels_first``.
        matrix_b: ``B`` as a matrix ``(o, r)``.
        gates: Rank gates broadcastable to ``hidden``: per sample ``(b, 1, r)`` (``(b, r, 1)`` with
            ``channels_first``) or per token, shaped like ``hidden``.
        channels_first: Whether ranks and outputs are on axis 1 (convolutions) rather than the last axis.

    Returns:
        ``result`` plus the gated update, shaped like ``result``.

    Example:
        >>> h, b, g = torch.ones(1, 2, 3), torch.ones(4, 3), torch.tensor([[[1.0, 0.0, 2.0]]])
        >>> gated_update(torch.zeros(1, 2, 4), h, b, g)[0, 0]
        tensor([3., 3., 3., 3.])
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or gates.requires_grad or matrix_b.requires_grad):
        return _GatedUpdate.apply(result, hidden, matrix_b, gates, channels_first)
    update = _gated_update_channels if channels_first else _gated_update_rows
    return update(result, hidden, matrix_b, gates)
