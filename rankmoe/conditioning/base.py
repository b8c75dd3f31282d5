"""The degradation-estimator protocol: images in, per-image degradation scores and severity out.

Axis legend: ``b`` images, ``h`` / ``w`` height and width, ``D`` degradation dimensions.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SeverityRule = str | Sequence[float] | Callable[[torch.Tensor], torch.Tensor]
"""How severity is formed from the scores: ``"mean"``, ``"max"``, per-dimension weights, or a callable."""


@dataclass
class DegradationScores:
    """Per-image degradation scores, as produced by a :class:`DegradationEstimator`.

    Hand it to the routed model in one call: ``with rankmoe.condition(model, scores): ...`` routes on
    ``scores.scores`` and gives ``scores.severity`` to the degradation-aware balance loss.

    Attributes:
        scores: ``(b, D)`` in ``[0, 1]``; higher means more degraded along that dimension.
        severity: ``(b,)`` in ``[0, 1]``, one number per image (see :func:`aggregate_severity`).
        names: The ``D`` dimension names, in column order.
    """

    scores: torch.Tensor
    severity: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.scores.dim() != 2 or self.scores.shape[1] != len(self.names):
            raise ValueError(
                f"scores must have shape (b, {len(self.names)}) for names {list(self.names)}, got "
                f"{tuple(self.scores.shape)}"
            )
        if self.severity.shape != self.scores.shape[:1]:
            raise ValueError(f"severity must have shape ({self.scores.shape[0]},), got {tuple(self.severity.shape)}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> DegradationScores:
        """The scores of a subset of images (keeps the batch axis): ``scores[[0, 0, 1]]`` repeats image 0 for two
        tiles, for example."""
        if isinstance(index, int):
            index = [index]
        return DegradationScores(self.scores[index], self.severity[index], self.names)

    def to(self, *args: object, **kwargs: object) -> DegradationScores:
        """Move / cast both tensors (``Tensor.to`` arguments)."""
        return DegradationScores(self.scores.to(*args, **kwargs), self.severity.to(*args, **kwargs), self.names)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{name: (b,) scores}`` plus ``"severity"``."""
        columns = {name: self.scores[:, index] for index, name in enumerate(self.names)}
        columns["severity"] = self.severity
        return columns


def aggregate_severity(scores: torch.Tensor, rule: SeverityRule = "mean") -> torch.Tensor:
    """Combine per-dimension scores ``(b, D)`` into one severity per image ``(b,)`` in ``[0, 1]``.

    Args:
        scores: ``(b, D)`` in ``[0, 1]``.
        rule: ``"mean"`` (default), ``"max"`` (the worst dimension decides), a sequence of ``D`` non-negative
            weights (a weighted mean), or a callable mapping ``(b, D)`` to ``(b,)``; the result is clamped to
            ``[0, 1]``.

    Returns:
        ``(b,)``, same dtype and device as ``scores``.

    Raises:
        ValueError: For an unknown rule name or weights of the wrong length / sign.

    Example:
        >>> aggregate_severity(torch.tensor([[0.2, 0.6], [1.0, 0.0]]), "max")
        tensor([0.6000, 1.0000])
        >>> aggregate_severity(torch.tensor([[0.2, 0.6]]), [3.0, 1.0])
        tensor([0.3000])
    """
    if isinstance(rule, str):
        if rule == "mean":
            return scores.mean(dim=-1)
        if rule == "max":
            return scores.amax(dim=-1)
        raise ValueError(f"severity rule {rule!r} is unknown; use 'mean', 'max', a list of weights or a callable")
    if callable(rule):
        severity = rule(scores)
        if not isinstance(severity, torch.Tensor) or severity.shape != scores.shape[:1]:
            raise ValueError(
                f"the severity callable must return a tensor of shape ({scores.shape[0]},), got "
                f"{tuple(getattr(severity, 'shape', ()))}"
            )
        return severity.clamp(0.0, 1.0)
    weights = torch.as_tensor(list(rule), dtype=scores.dtype, device=scores.device)
    if weights.shape != scores.shape[-1:] or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(
            f"severity weights must be {scores.shape[-1]} non-negative numbers with a positive sum, got {list(rule)}"
        )
    return (scores * weights).sum(dim=-1) / weights.sum()


def check_severity_rule(rule: SeverityRule, num_dims: int) -> SeverityRule:
    """Validate a severity rule for ``num_dims`` dimensions before any image is seen.

    Raises:
        ValueError: Naming ``severity`` and the value.
    """
    if isinstance(rule, str):
        if rule not in ("mean", "max"):
            raise ValueError(f"severity={rule!r} is unknown; use 'mean', 'max', a list of weights or a callable")
        return rule
    if callable(rule):
        return rule
    values = list(rule)
    if len(values) != num_dims or any(not isinstance(v, (int, float)) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"severity weights must be {num_dims} non-negative numbers (one per dimension) with a positive sum, "
            f"got {values}"
        )
    return values


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Require a floating RGB batch ``(b, 3, h, w)`` with values in ``[0, 1]``.

    Raises:
        TypeError: If ``images`` is not a floating tensor.
        ValueError: On a wrong shape, channel count, non-finite values or values outside ``[0, 1]``.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = type(images).__name__ if not isinstance(images, torch.Tensor) else f"{images.dtype} tensor"
        raise TypeError(
            f"{name} must be a floating tensor (b, 3, h, w) with values in [0, 1], got a {kind}; convert uint8 "
            "images with images.float() / 255"
        )
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (b, 3, h, w), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(
            f"{name} must have 3 (RGB) channels on axis 1, got shape {tuple(images.shape)}; repeat grey images "
            "with images.expand(-1, 3, -1, -1) and drop alpha channels"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    low, high = float(images.min()), float(images.max())
    if not (low >= 0.0 and high <= 1.0):  # also catches NaN
        raise ValueError(
            f"{name} must hold values in [0, 1], got values from {low} to {high}; images in [-1, 1] map with "
            "(images + 1) / 2, uint8 images with images / 255"
        )
    return images


class DegradationEstimator(nn.Module, metaclass=abc.ABCMeta):
    """Base class of degradation estimators: frozen modules mapping images to :class:`DegradationScores`.

    Subclasses set :attr:`names` (in ``__init__``) and implement :meth:`score`. Calling the estimator validates the
    images, runs :meth:`score` without gradients, clamps to ``[0, 1]``, forms the severity and returns everything
    on the images' device and in their dtype. Estimators never train: parameters are frozen and the module stays
    in ``eval()`` mode.

    Args:
        severity: How severity is formed from the scores (see :func:`aggregate_severity`).
    """

    names: tuple[str, ...] = ()

    def __init__(self, severity: SeverityRule = "mean") -> None:
        super().__init__()
        self.severity_rule = severity
        self.train(False)

    def train(self, mode: bool = True) -> DegradationEstimator:
        """Estimators stay in evaluation mode (``train(True)`` is ignored)."""
        return super().train(False)

    @property
    def num_dims(self) -> int:
        """``D``, the number of degradation dimensions."""
        return len(self.names)

    @abc.abstractmethod
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Raw scores ``(b, D)`` of validated images ``(b, 3, h, w)`` in ``[0, 1]`` (higher = more degraded)."""

    def forward(self, images: torch.Tensor) -> DegradationScores:
        """Score a batch of images.

        Args:
            images: ``(b, 3, h, w)`` floating RGB in ``[0, 1]``.

        Returns:
            :class:`DegradationScores` with ``scores`` ``(b, D)`` and ``severity`` ``(b,)``, on ``images.device`` in
            ``images.dtype``.

        Raises:
            TypeError / ValueError: For images that are not floating RGB batches in ``[0, 1]``.
        """
        images = check_images(images)
        if self.training or any(module.training for module in self.modules()):
            self.train(False)  # submodules added after __init__ start in training mode
        if any(param.requires_grad for param in self.parameters()):
            self.requires_grad_(False)  # frozen: estimators are never trained
        with torch.no_grad():
            scores = self.score(images)
        scores = scores.to(device=images.device, dtype=torch.float32).clamp(0.0, 1.0)
        severity = aggregate_severity(scores, check_severity_rule(self.severity_rule, self.num_dims))
        return DegradationScores(
            scores=scores.to(images.dtype), severity=severity.clamp(0.0, 1.0).to(images.dtype), names=self.names
        )
