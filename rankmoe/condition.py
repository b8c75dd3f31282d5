"""Hand a per-sample condition (and severity) to every routed layer of a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rankmoe.conditioning.base import DegradationScores
from rankmoe.layer import RankMoELayer
from rankmoe.records import ConditionState


def rankmoe_layers(model: nn.Module) -> list[tuple[str, RankMoELayer]]:
    """All RankMoE layers of ``model`` (a ``PeftModel``, a diffusers/transformers model or any module) by name.

    Raises:
        ValueError: If ``model`` has no RankMoE layer.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, RankMoELayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no RankMoE layer; add an adapter first (get_peft_model, add_adapter or "
            "inject_adapter_in_model with a RankMoEConfig)"
        )
    return layers


def _validated_state(
    condition: torch.Tensor | DegradationScores | None, severity: torch.Tensor | None, repeat: str | None = None
) -> ConditionState:
    if isinstance(condition, DegradationScores):
        severity = condition.severity if severity is None else severity
        condition = condition.scores
    if condition is None and severity is None:
        raise ValueError("pass a condition (b, c) and/or a severity (b,); both are None")
    if condition is not None:
        if not isinstance(condition, torch.Tensor) or not condition.is_floating_point() or condition.dim() != 2:
            raise ValueError(
                f"condition must be a floating tensor of shape (batch, condition_dim), got "
                f"{type(condition).__name__} {tuple(getattr(condition, 'shape', ()))}"
            )
    if severity is not None:
        if not isinstance(severity, torch.Tensor) or not severity.is_floating_point() or severity.dim() != 1:
            raise ValueError(
                f"severity must be a floating tensor of shape (batch,), got {type(severity).__name__} "
                f"{tuple(getattr(severity, 'shape', ()))}"
            )
        if condition is not None and severity.shape[0] != condition.shape[0]:
            raise ValueError(
                f"severity has {severity.shape[0]} rows but condition has {condition.shape[0]}; one per sample"
            )
        if not torch.compiler.is_compiling() and bool(((severity < 0) | (severity > 1) | severity.isnan()).any()):
            raise ValueError(f"severity must lie in [0, 1], got values from {severity.min()} to {severity.max()}")
    if repeat not in (None, "tile", "interleave"):
        raise ValueError(f"repeat must be None, 'tile' or 'interleave', got {repeat!r}")
    return ConditionState(condition=condition, severity=severity, repeat=repeat)


def set_condition(
    model: nn.Module,
    condition: torch.Tensor | DegradationScores | None,
    severity: torch.Tensor | None = None,
    *,
    repeat: str | None = None,
) -> None:
    """Set the per-sample condition of every RankMoE layer until :func:`clear_condition`.

    Args:
        model: A model carrying RankMoE adapters.
        condition: ``(b, c)`` condition vectors (read by ``condition`` routers), a
            :class:`~rankmoe.conditioning.DegradationScores` (its ``scores`` are the condition and its ``severity``
            the severity), or ``None``.
        severity: ``(b,)`` severities in ``[0, 1]`` (recorded for the degradation-aware loss), or ``None``; overrides
            the severity of a ``DegradationScores``.
        repeat: How a layer that sees ``k * b`` samples uses the ``b`` rows (see :func:`condition`).

    Raises:
        ValueError: On wrong shapes, severities outside ``[0, 1]`` or a model without RankMoE layers.
    """
    state = _validated_state(condition, severity, repeat)
    for _, layer in rankmoe_layers(model):
        layer._rankmoe_condition = state


def clear_condition(model: nn.Module) -> None:
    """Remove the condition from every RankMoE layer of ``model``."""
    for _, layer in rankmoe_layers(model):
        layer._rankmoe_condition = None


@contextmanager
def condition(
    model: nn.Module,
    cond: torch.Tensor | DegradationScores | None,
    severity: torch.Tensor | None = None,
    *,
    repeat: str | None = None,
) -> Iterator[nn.Module]:
    """Context manager: route with ``cond`` (and record ``severity``) inside the block, restore afterwards.

    Works on a ``PeftModel``, on a diffusers model after ``add_adapter`` and after ``inject_adapter_in_model``.
    Contexts nest: on exit each layer gets back exactly the condition it had before. With activation
    checkpointing, ``backward()`` may run after the block: recomputed layers reuse the condition of the
    forward they recompute.

    Args:
        model: A model carrying RankMoE adapters.
        cond: ``(b, c)`` condition vectors, one row per sample of the batch the model will see; or the
            :class:`~rankmoe.conditioning.DegradationScores` of a degradation estimator (scores and severity in one
            argument: ``with rankmoe.condition(model, estimator(images)): ...``); or ``None``.
        severity: ``(b,)`` severities in ``[0, 1]``, or ``None``; overrides the severity of a ``DegradationScores``.
        repeat: ``None``: every routed layer must see exactly ``b`` samples. ``"tile"``: a layer that sees
            ``k * b`` samples uses the rows as ``[rows; rows; ...]`` — the batch order of classifier-free guidance in
            diffusers pipelines (``torch.cat([uncond, cond])``), so ``with rankmoe.condition(pipe.unet, scores,
            repeat="tile"): pipe(...)`` routes both halves with the image's condition. ``"interleave"``: each row
            repeated ``k`` times in place (beam search; ``num_images_per_prompt`` *without* guidance). With
            guidance *and* several images per prompt the UNet batch is ``[uncond x n; cond x n]`` per prompt
            block: pass ``cond.repeat_interleave(n, 0)`` with ``"tile"``.

    Yields:
        ``model``.

    Example:
        >>> import torch, rankmoe
        >>> from peft import get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> cfg = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, target_modules=["0"],
        ...                             router="condition", router_kwargs={"condition_dim": 3})
        >>> model = get_peft_model(net, cfg)
        >>> with rankmoe.condition(model, torch.rand(2, 3)):
        ...     out = model(torch.randn(2, 4))
        >>> out.shape
        torch.Size([2, 4])
    """
    state = _validated_state(cond, severity, repeat)
    layers = rankmoe_layers(model)
    previous = [layer._rankmoe_condition for _, layer in layers]
    for _, layer in layers:
        layer._rankmoe_condition = state
    try:
        yield model
    finally:
        for (_, layer), old in zip(layers, previous, strict=True):
            layer._rankmoe_condition = old
