"""The gated up-projection ``result + B (g * h)`` with a backward that keeps only what LoRA keeps.

Axis legend: ``b`` samples, ``n`` tokens (output positions for convolutions), ``r`` ranks, ``o`` output features.

A plain autograd graph of ``result + (h * g) @ B^T`` keeps both ``h`` (for the gate gradient) and ``h * g`` (for
``B``'s gradient), two ``(b, n, r)`` tensors where a LoRA keeps one; folding per-sample gates into a per-sample
copy of ``B`` instead keeps that ``(b, o, r)`` copy. :func:`gated_update` keeps ``h``, ``g`` and ``B`` only, so a
routed adapter keeps as much activation memory as a LoRA of the same rank plus its gates:

* per-sample gates ``(b, r)`` with at least ``o`` tokens per sample are folded into ``B`` (``(b, o, r)``, no
  larger than ``h``); the backward forms ``M_b = h_b^T dY_b`` once (the product a LoRA forms for ``B``'s
  gradient) and reads both ``B``'s and the gates' gradients off it, with no ``(b, n, r)`` elementwise work;
* per-token gates (shaped like ``h``), and per-sample gates with fewer tokens, multiply ``h``; the backward
  recomputes ``g * h``.

The backward is built from differentiable ops, so it can itself be differentiated.
"""

from __future__ import annotations

from typing import Any

import torch


def _sample_weight(matrix_b: torch.Tensor, gates: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Per-sample gated ``B``: ``(b, o, r)`` channels-first, else its transpose ``(b, r, o)``."""
    if channels_first:
        return matrix_b.unsqueeze(0) * gates.unsqueeze(1)
    return matrix_b.t().unsqueeze(0) * gates.unsqueeze(-1)


def _folds(hidden: torch.Tensor, matrix_b: torch.Tensor, channels_first: bool) -> bool:
    """Whether per-sample gates go into a per-sample ``B`` (``(b, o, r)``, no larger than ``(b, n, r)``)."""
    return hidden.shape[2 if channels_first else 1] >= matrix_b.shape[0]


def _broadcast(gates: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Per-sample gates ``(b, r)`` as ``(b, r, 1)`` (channels-first) or ``(b, 1, r)``, to multiply ``h``."""
    return gates.unsqueeze(-1) if channels_first else gates.unsqueeze(1)


def _forward(
    result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor, channels_first: bool
) -> torch.Tensor:
    """``result + B (g * h)``; per-token gates are shaped like ``h`` (or broadcast to it)."""
    if gates.dim() == 2 and gates.shape != hidden.shape:  # per-sample gates (b, r)
        if not _folds(hidden, matrix_b, channels_first):
            return _forward(result, hidden, matrix_b, _broadcast(gates, channels_first), channels_first)
        weight = _sample_weight(matrix_b, gates, channels_first)
        left, right = (weight, hidden) if channels_first else (hidden, weight)
        return torch.baddbmm(result, left, right)
    if channels_first:
        return torch.baddbmm(result, matrix_b.unsqueeze(0).expand(hidden.shape[0], -1, -1), hidden * gates)
    gated = (hidden * gates).reshape(-1, hidden.shape[-1])
    return torch.addmm(result.reshape(-1, result.shape[-1]), gated, matrix_b.t()).view(result.shape)


def _backward_sample(
    grad_out: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
    channels_first: bool, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_hidden, need_b, need_gates = needs
    grad_hidden = grad_b = grad_gates = None
    if need_hidden:
        weight = _sample_weight(matrix_b, gates, channels_first)
        grad_hidden = torch.bmm(weight.transpose(1, 2), grad_out) if channels_first else torch.bmm(
            grad_out, weight.transpose(1, 2)
        )
    if need_b or need_gates:
        if channels_first:  # M (b, o, r)
            product = torch.bmm(grad_out, hidden.transpose(1, 2))
            grad_b = (product * gates.unsqueeze(1)).sum(0) if need_b else None
            grad_gates = (product * matrix_b.unsqueeze(0)).sum(1) if need_gates else None
        else:  # M (b, r, o)
            product = torch.bmm(hidden.transpose(1, 2), grad_out)
            grad_b = (product * gates.unsqueeze(-1)).sum(0).t() if need_b else None
            grad_gates = (product * matrix_b.t().unsqueeze(0)).sum(-1) if need_gates else None
    return grad_hidden, grad_b, grad_gates


def _backward_token(
    grad_out: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
    channels_first: bool, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_hidden, need_b, need_gates = needs
    grad_gated = grad_b = None
    if need_hidden or need_gates:
        grad_gated = torch.matmul(matrix_b.t(), grad_out) if channels_first else torch.matmul(grad_out, matrix_b)
    if need_b and channels_first:
        grad_b = torch.bmm(grad_out, (hidden * gates).transpose(1, 2)).sum(0)
    elif need_b:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).t().mm((hidden * gates).reshape(-1, hidden.shape[-1]))
    grad_hidden = grad_gated * gates if need_hidden else None
    grad_gates = (grad_gated * hidden).sum_to_size(gates.shape) if need_gates else None
    return grad_hidden, grad_b, grad_gates


class _GatedUpdate(torch.autograd.Function):
    """``result + B (g * h)``; saves ``h``, ``g`` and ``B`` (no ``g * h``, no gated copy of ``B``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
        channels_first: bool,
    ) -> torch.Tensor:
        # forward(ctx, ...) rather than setup_context: apply() then skips an inspect.signature per call
        ctx.save_for_backward(hidden, matrix_b, gates)
        ctx.channels_first = channels_first
        device = hidden.device.type  # the backward runs under the forward's autocast, as autograd's own nodes do
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return _forward(result, hidden, matrix_b, gates, channels_first)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.autocast is None:
            return _GatedUpdate._backward(ctx, grad_out)
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            return _GatedUpdate._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, matrix_b, gates = ctx.saved_tensors
        need_result, need_hidden, need_b, need_gates, _ = ctx.needs_input_grad
        needs, channels_first = (need_hidden, need_b, need_gates), ctx.channels_first
        if gates.shape == hidden.shape:
            grads = _backward_token(grad_out, hidden, matrix_b, gates, channels_first, needs)
        elif _folds(hidden, matrix_b, channels_first):
            grads = _backward_sample(grad_out, hidden, matrix_b, gates, channels_first, needs)
        else:  # few tokens: the gates multiply h (as in the forward), their gradient summed over the tokens
            grad_hidden, grad_b, grad_gates = _backward_token(
                grad_out, hidden, matrix_b, _broadcast(gates, channels_first), channels_first, needs
            )
            grads = grad_hidden, grad_b, None if grad_gates is None else grad_gates.reshape(gates.shape)
        return (grad_out if need_result else None, *grads, None)


def gated_update(
    result: torch.Tensor, hidden: torch.Tensor, matrix_b: torch.Tensor, gates: torch.Tensor,
    channels_first: bool = False,
) -> torch.Tensor:
    """``result + B (g * h)`` keeping ``h``, ``g`` and ``B`` for backward (nothing of size ``(b, n, r)`` more).

    Args:
        result: The base output: ``(b, n, o)`` (per-token gates: ``(..., o)``), or ``(b, o, n)`` with
            ``channels_first``.
        hidden: The down-projection ``h = A x``: ``(b, n, r)`` (per-token gates: ``(..., r)`` with the leading axes
            of ``result``), or ``(b, r, n)`` with ``channels_first``.
        matrix_b: ``B`` as a matrix ``(o, r)``.
        gates: Rank gates, per sample ``(b, r)`` or per token shaped like ``hidden``.
        channels_first: Whether ranks and outputs are on axis 1 (convolutions) rather than the last axis.

    Returns:
        ``result`` plus the gated update, shaped like ``result``.

    Example:
        >>> h, b, g = torch.ones(1, 2, 3), torch.ones(4, 3), torch.tensor([[1.0, 0.0, 2.0]])
        >>> gated_update(torch.zeros(1, 2, 4), h, b, g)[0, 0]
        tensor([3., 3., 3., 3.])

    Raises:
        ValueError: If ``gates`` is neither ``(b, r)`` with a 3-D ``hidden`` nor shaped like ``hidden``.
    """
    if gates.shape != hidden.shape:
        rank_axis = 1 if channels_first else 2
        if hidden.dim() != 3 or gates.shape != (hidden.shape[0], hidden.shape[rank_axis]):
            raise ValueError(
                f"gates of shape {tuple(gates.shape)} fit neither hidden {tuple(hidden.shape)} (per-token gates) nor "
                f"(b, r) per-sample gates of a 3-D hidden ({'(b, r, n)' if channels_first else '(b, n, r)'})"
            )
    if torch.is_grad_enabled() and (hidden.requires_grad or gates.requires_grad or matrix_b.requires_grad):
        return _GatedUpdate.apply(result, hidden, matrix_b, gates, channels_first)
    return _forward(result, hidden, matrix_b, gates, channels_first)
