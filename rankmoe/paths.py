"""The three execution paths of a RankMoE layer, as pure functions on plain tensors.

Axis legend: ``b`` samples, ``n`` tokens per sample (output positions for convolutions), ``d_in`` / ``d_out``
features (channels for convolutions), ``r`` ranks, ``k`` static number of gathered ranks per sample.

Every path computes ``y = W x + bias + B (g * (A x))`` with the gate ``g`` (scaling folded in) and keeps static
shapes, so one compiled graph serves every routing:

* **dense-masked** (:func:`dense_linear`, :func:`dense_conv`): all ``r`` ranks are computed and the gate multiplies
  the r-wide intermediate; the update is accumulated into the base output by one ``addmm`` / ``baddbmm``
  (:func:`~rankmoe.gated_update.gated_update`, whose backward keeps the intermediate and the gates only, as much
  as a LoRA keeps).
* **fixed-k gather** (:func:`gather_linear`, :func:`gather_conv`): per sample, the ``k`` active ranks' rows of
  ``A`` and columns of ``B`` are gathered (``k`` static; a selected zero slot points at rank 0 with gate 0), then
  one batched matmul (or grouped convolution) and one ``baddbmm`` into the base output.
* **per-sample merge** (:func:`merged_linear`, :func:`merged_conv`): ``W'_b = W + B_b diag(g_b) A_b`` is formed
  per sample (in the adapter's dtype, then cast to the base weight's) and the base layer runs once with it.

``result`` arguments are the base layer's output; the dense and gather functions return ``result`` plus the
update, in ``result``'s dtype (pass it already cast to the adapter dtype to add in the wider type).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rankmoe.gated_update import gated_update

Padding = Sequence[int] | str


def _conv(dim: int):  # noqa: ANN202 - F.conv1d / F.conv2d
    return F.conv1d if dim == 1 else F.conv2d


def _rows(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``matrix[index]`` for an index ``(b, k)``: ``(b, k, *matrix.shape[1:])`` (``index_select``, cheaper to call)."""
    return matrix.index_select(0, index.reshape(-1)).view(*index.shape, *matrix.shape[1:])


def _bmm_accumulate(
    result: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``result + alpha * left @ right`` in one ``baddbmm`` (``result`` reshaped to ``(b, m, p)`` and back)."""
    out = torch.baddbmm(result.reshape(left.shape[0], left.shape[1], right.shape[2]), left, right, alpha=alpha)
    return out.view(result.shape)


# ---------------------------------------------------------------------------------------------------- linear
def dense_linear(
    result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    gates: torch.Tensor | float, level: str,
) -> torch.Tensor:
    """Dense-masked update of a linear layer accumulated into ``result``.

    Args:
        result: Base output ``(..., d_out)``.
        x: Adapter input ``(..., d_in)`` (after dropout).
        lora_a: ``A``, ``(r, d_in)``.
        lora_b: ``B``, ``(d_out, r)``.
        gates: ``level="token"``: ``(..., r)``; ``"sample"``: ``(b, r)`` with ``b = x.shape[0]`` (or ``(1, r)`` for
            an unbatched 1-D ``x``); ``"static"``: a float (the scaling).
        level: ``"token"``, ``"sample"`` or ``"static"``.

    Returns:
        ``result + B (g * (A x))``, shaped like ``result``.
    """
    hidden = F.linear(x, lora_a)
    rank = lora_a.shape[0]
    if level == "static":
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, rank), lora_b.t(), alpha=gates)
        return flat.view(result.shape)
    if level == "sample":
        batch = gates.shape[0]
        rows = result.reshape(batch, -1, result.shape[-1])
        return gated_update(rows, hidden.reshape(batch, -1, rank), lora_b, gates).view(result.shape)
    return gated_update(result, hidden, lora_b, gates)


def gather_linear(
    result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    rank_index: torch.Tensor, rank_gates: torch.Tensor,
) -> torch.Tensor:
    """Fixed-k gather update of a linear layer accumulated into ``result``.

    Args:
        result: Base output ``(b, ..., d_out)`` (or ``(d_out,)`` when ``b = 1`` and unbatched).
        x: Adapter input ``(b, ..., d_in)``.
        lora_a: ``A``, ``(r, d_in)``.
        lora_b: ``B``, ``(d_out, r)``.
        rank_index: Gathered ranks ``(b, k)``, int64.
        rank_gates: Their gates ``(b, k)`` (scaling folded in; 0 for padding).

    Returns:
        ``result`` plus the update, shaped like ``result``.
    """
    batch = rank_index.shape[0]
    a_sel = _rows(lora_a, rank_index)  # (b, k, d_in)
    b_sel = _rows(lora_b.t(), rank_index) * rank_gates.unsqueeze(-1)  # (b, k, d_out)
    hidden = torch.bmm(x.reshape(batch, -1, x.shape[-1]), a_sel.transpose(1, 2))  # (b, n, k)
    return _bmm_accumulate(result, hidden, b_sel)


def merged_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    rank_index: torch.Tensor | None, rank_gates: torch.Tensor | float,
) -> torch.Tensor:
    """Linear layer with the gated update merged into its weight, per sample (or once for static gates).

    Args:
        x: Input ``(b, ..., d_in)`` in the base weight's dtype.
        weight: Base weight ``(d_out, d_in)``.
        bias: Base bias ``(d_out,)`` or ``None``.
        lora_a: ``A``, ``(r, d_in)``; the merge is computed in its dtype.
        lora_b: ``B``, ``(d_out, r)``.
        rank_index: Gathered ranks ``(b, k)``, or ``None`` for static gates (one merged weight for all samples).
        rank_gates: Their gates ``(b, k)``, or the float scaling when ``rank_index`` is ``None``.

    Returns:
        ``(b, ..., d_out)`` in ``x``'s dtype.
    """
    compute = lora_a.dtype
    if rank_index is None:
        merged = torch.addmm(weight.to(compute), lora_b, lora_a, alpha=rank_gates).to(weight.dtype)
        return F.linear(x, merged, bias)
    batch = rank_index.shape[0]
    a_sel = _rows(lora_a, rank_index)  # (b, k, d_in)
    b_sel = (_rows(lora_b.t(), rank_index) * rank_gates.unsqueeze(-1)).transpose(1, 2)  # (b, d_out, k)
    merged = torch.baddbmm(weight.to(compute).unsqueeze(0), b_sel, a_sel).to(weight.dtype)  # (b, d_out, d_in)
    if batch == 1:
        return F.linear(x, merged[0], bias)
    flat = x.reshape(batch, -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(flat, merged.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.expand(batch, flat.shape[1], -1), flat, merged.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------- conv
def dense_conv(
    result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, gates: torch.Tensor | float,
    level: str, stride: Sequence[int], padding: Padding, dilation: Sequence[int],
) -> torch.Tensor:
    """Dense-masked update of a 1-D / 2-D convolution accumulated into ``result``.

    Args:
        result: Base output ``(b, d_out, *spatial_out)``.
        x: Adapter input ``(b, d_in, *spatial)`` (already padded for non-zero padding modes).
        lora_a: ``A``, ``(r, d_in, *kernel)``.
        lora_b: ``B``, ``(d_out, r, 1[, 1])``.
        gates: ``"token"``: ``(b, r, *spatial_out)``; ``"sample"``: ``(b, r)``; ``"static"``: a float.
        level: ``"token"``, ``"sample"`` or ``"static"``.
        stride: Base stride.
        padding: Base padding.
        dilation: Base dilation.

    Returns:
        ``result`` plus the update, shaped like ``result``.
    """
    hidden = _conv(lora_a.dim() - 2)(x, lora_a, None, stride, padding, dilation)  # (b, r, *spatial_out)
    batch, rank = hidden.shape[:2]
    matrix_b = lora_b.reshape(lora_b.shape[0], rank)
    flat_hidden = hidden.reshape(batch, rank, -1)
    if level == "static":  # the scaling as baddbmm's alpha: autograd keeps no scaled copy of B
        return _bmm_accumulate(result, matrix_b.unsqueeze(0).expand(batch, -1, -1), flat_hidden, alpha=gates)
    flat_gates = gates if level == "sample" else gates.reshape(batch, rank, -1)
    flat_result = result.reshape(batch, matrix_b.shape[0], -1)
    return gated_update(flat_result, flat_hidden, matrix_b, flat_gates, channels_first=True).view(result.shape)


def _grouped_input(x: torch.Tensor) -> torch.Tensor:
    """``(b, d_in, *spatial)`` viewed as one sample of ``b * d_in`` channels for a grouped convolution."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def gather_conv(
    result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank_index: torch.Tensor,
    rank_gates: torch.Tensor, stride: Sequence[int], padding: Padding, dilation: Sequence[int],
) -> torch.Tensor:
    """Fixed-k gather update of a convolution: one grouped convolution over the gathered ranks of every sample.

    Args:
        result: Base output ``(b, d_out, *spatial_out)``.
        x: Adapter input ``(b, d_in, *spatial)``.
        lora_a: ``A``, ``(r, d_in, *kernel)``.
        lora_b: ``B``, ``(d_out, r, 1[, 1])``.
        rank_index: Gathered ranks ``(b, k)``.
        rank_gates: Their gates ``(b, k)``.
        stride: Base stride.
        padding: Base padding.
        dilation: Base dilation.

    Returns:
        ``result`` plus the update, shaped like ``result``.
    """
    batch, k = rank_index.shape
    a_sel = lora_a.index_select(0, rank_index.reshape(-1))  # (b k, d_in, *kernel)
    hidden = _conv(lora_a.dim() - 2)(_grouped_input(x), a_sel, None, stride, padding, dilation, batch)
    matrix_b = lora_b.reshape(lora_b.shape[0], -1)
    b_sel = (_rows(matrix_b.t(), rank_index) * rank_gates.unsqueeze(-1)).transpose(1, 2)  # (b, d_out, k)
    return _bmm_accumulate(result, b_sel, hidden.reshape(batch, k, -1))


def merged_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    rank_index: torch.Tensor | None, rank_gates: torch.Tensor | float, stride: Sequence[int], padding: Padding,
    dilation: Sequence[int],
) -> torch.Tensor:
    """Convolution with the gated update merged into its kernel (exact: ``B`` is 1x1 with stride 1).

    With several samples the per-sample kernels run as one grouped convolution (``groups=b``).

    Args:
        x: Input ``(b, d_in, *spatial)`` in the base weight's dtype (already padded for non-zero padding modes).
        weight: Base kernel ``(d_out, d_in, *kernel)``.
        bias: Base bias ``(d_out,)`` or ``None``.
        lora_a: ``A``, ``(r, d_in, *kernel)``; the merge is computed in its dtype.
        lora_b: ``B``, ``(d_out, r, 1[, 1])``.
        rank_index: Gathered ranks ``(b, k)``, or ``None`` for static gates.
        rank_gates: Their gates ``(b, k)``, or the float scaling when ``rank_index`` is ``None``.
        stride: Base stride.
        padding: Base padding.
        dilation: Base dilation.

    Returns:
        ``(b, d_out, *spatial_out)`` in ``x``'s dtype.
    """
    conv = _conv(weight.dim() - 2)
    compute = lora_a.dtype
    d_out, rank = weight.shape[0], lora_a.shape[0]
    matrix_a = lora_a.reshape(rank, -1)
    matrix_b = lora_b.reshape(d_out, rank)
    flat_weight = weight.to(compute).reshape(d_out, -1)
    if rank_index is None:
        merged = torch.addmm(flat_weight, matrix_b, matrix_a, alpha=rank_gates).to(weight.dtype)
        return conv(x, merged.view(weight.shape), bias, stride, padding, dilation)
    batch = rank_index.shape[0]
    b_sel = (_rows(matrix_b.t(), rank_index) * rank_gates.unsqueeze(-1)).transpose(1, 2)  # (b, d_out, k)
    merged = torch.baddbmm(flat_weight.unsqueeze(0), b_sel, _rows(matrix_a, rank_index)).to(weight.dtype)
    if batch == 1:
        return conv(x, merged[0].view(weight.shape), bias, stride, padding, dilation)
    grouped_bias = None if bias is None else bias.repeat(batch)
    out = conv(_grouped_input(x), merged.view(batch * d_out, *weight.shape[1:]), grouped_bias, stride, padding,
               dilation, batch)
    return out.view(batch, d_out, *out.shape[2:])
