"""Pure tensor math of a RankMoE layer: gated low-rank deltas and their dense weights.

Axis legend: ``b`` batch, ``n`` tokens, ``d_in``/``d_out`` features (channels for convolutions), ``r`` ranks,
``k`` kernel positions.

The update of one adapter is ``delta(x) = B (g * (A x))``: ``A x`` is the r-wide intermediate, the gate ``g``
(shared ranks 1, routed ranks their router weight, unselected 0, all multiplied by ``lora_alpha / r``)
multiplies that intermediate, never the d_out-wide output. Gates broadcast against the intermediate, so
per-token and per-sample routing use the same code and shapes never depend on which ranks are active.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gated_linear_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, gates: torch.Tensor | float
) -> torch.Tensor:
    """``B (g * (A x))`` for a linear layer.

    Args:
        x: Input ``(..., d_in)``.
        lora_a: ``A``, ``(r, d_in)``.
        lora_b: ``B``, ``(d_out, r)``.
        gates: Gate broadcastable to ``(..., r)`` (scaling folded in), or a plain float scaling.

    Returns:
        ``(..., d_out)``.

    Example:
        >>> a, b = torch.eye(2), torch.eye(2)
        >>> gated_linear_delta(torch.tensor([[1.0, 2.0]]), a, b, torch.tensor([1.0, 0.0]))
        tensor([[1., 0.]])
    """
    hidden = F.linear(x, lora_a) * gates
    return F.linear(hidden, lora_b)


def gated_conv_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor | float,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> torch.Tensor:
    """``B (g * (A * x))`` for a 1-D or 2-D convolution: ``A`` has the base kernel, ``B`` is 1x1.

    Args:
        x: Input ``(b, d_in, *spatial)`` (already padded when the base layer uses a non-zero padding mode).
        lora_a: ``A``, ``(r, d_in, *kernel)``.
        lora_b: ``B``, ``(d_out, r, 1[, 1])``.
        gates: Gate broadcastable to ``(b, r, *spatial_out)`` (scaling folded in), or a float scaling.
        stride: Base stride.
        padding: Base padding.
        dilation: Base dilation.

    Returns:
        ``(b, d_out, *spatial_out)``.
    """
    conv = F.conv1d if lora_a.dim() == 3 else F.conv2d
    hidden = conv(x, lora_a, None, stride, padding, dilation) * gates
    return conv(hidden, lora_b)


def gated_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Dense weight of a gated low-rank update, ``B diag(g) A``, in the layout of ``nn.Linear`` / ``nn.ConvNd``.

    Exact for convolutions too, because ``B`` is a 1x1 kernel with stride 1.

    Args:
        lora_a: ``(r, d_in)`` or ``(r, d_in, *kernel)``.
        lora_b: ``(d_out, r)`` or ``(d_out, r, 1[, 1])``.
        gates: ``(r,)`` with the scaling folded in.

    Returns:
        ``(d_out, d_in)`` or ``(d_out, d_in, *kernel)``.
    """
    rank = lora_a.shape[0]
    b_matrix = lora_b.reshape(lora_b.shape[0], rank) * gates
    weight = b_matrix @ lora_a.reshape(rank, -1)
    return weight.reshape(lora_b.shape[0], *lora_a.shape[1:])
