"""Thin, configurable loss modules over :mod:`rankmoe.losses.functional`, chosen by name in the config.

Axis legend: ``t`` routing decisions, ``s`` slots (real experts first, then zero slots).
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rankmoe.losses import functional
from rankmoe.routers.base import SlotLayout
from rankmoe.utils.validation import check_positive_float


@dataclass
class BalanceInputs:
    """Everything a balance loss may look at for one adapter in one layer (decision axes flattened).

    Attributes:
        layout: The adapter's slot layout.
        logits: Router logits ``(t, s)``.
        probs: Router probabilities ``(t, s)``, float32.
        selected: Boolean selection mask ``(t, s)`` (``layout.top_k`` per row).
        severity: Per-decision severity ``(t,)`` in ``[0, 1]`` (the sample's severity repeated over its tokens), or
            ``None`` when no severity was set with :func:`rankmoe.condition`.
        weights: Per-decision weights ``(t,)`` from a padding / attention mask (0 = excluded), or ``None``.
    """

    layout: SlotLayout
    logits: torch.Tensor
    probs: torch.Tensor
    selected: torch.Tensor
    severity: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class BalanceLoss(nn.Module, metaclass=abc.ABCMeta):
    """Base class of balance losses: map :class:`BalanceInputs` to a scalar tensor.

    Subclass it, implement :meth:`forward` and register it with :func:`rankmoe.register_balance_loss` to choose
    it by name in :class:`~rankmoe.RankMoEConfig`. Constructor keyword arguments come from
    ``balance_loss_kwargs`` (plain JSON) and are checked against the signature by :meth:`check_kwargs`.
    """

    requires_severity: ClassVar[bool] = False
    """Whether the loss needs per-sample severities (``rankmoe.condition(..., severity=...)``)."""

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any]) -> None:
        """Validate ``balance_loss_kwargs`` before any layer is built.

        Raises:
            ValueError: Naming ``balance_loss_kwargs``, the offending key and the accepted keys.
        """
        params = inspect.signature(cls.__init__).parameters
        accepted = [name for name in params if name != "self"]
        has_var_kw = any(param.kind is inspect.Parameter.VAR_KEYWORD for param in params.values())
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown and not has_var_kw:
            raise ValueError(
                f"balance_loss_kwargs has unknown key(s) {unknown} for {cls.__name__}; accepted keys: {accepted}"
            )

    @abc.abstractmethod
    def forward(self, inputs: BalanceInputs) -> torch.Tensor:
        """Return the scalar loss for ``inputs``."""


class SwitchLoss(BalanceLoss):
    """Switch-Transformer balance loss over real and zero slots (:func:`~rankmoe.losses.switch_loss`)."""

    def forward(self, inputs: BalanceInputs) -> torch.Tensor:
        """Scalar loss; 1 under uniform routing."""
        return functional.switch_loss(inputs.probs, inputs.selected, inputs.layout.top_k, inputs.weights)


class DegradationAwareLoss(BalanceLoss):
    """MoR's degradation-aware balance loss (:func:`~rankmoe.losses.degradation_aware_loss`).

    Args:
        alpha: Overall weight ``alpha`` (real experts get ``alpha``, zero slots ``s * alpha``).
    """

    requires_severity = True

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_positive_float("balance_loss_kwargs['alpha']", alpha)

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any]) -> None:
        super().check_kwargs(kwargs)
        if "alpha" in kwargs:
            check_positive_float("balance_loss_kwargs['alpha']", kwargs["alpha"])

    def forward(self, inputs: BalanceInputs) -> torch.Tensor:
        """Scalar loss; ``alpha * switch`` when every severity is 1."""
        if inputs.severity is None:
            raise ValueError(
                "balance_loss='degradation_aware' needs a per-sample severity in [0, 1]; run the forward inside "
                "`with rankmoe.condition(model, cond, severity=severity): ...`"
            )
        return functional.degradation_aware_loss(
            inputs.probs,
            inputs.selected,
            inputs.layout.top_k,
            inputs.layout.num_experts,
            inputs.severity,
            alpha=self.alpha,
            weights=inputs.weights,
        )


class ZLoss(BalanceLoss):
    """Router z-loss (:func:`~rankmoe.losses.z_loss`); also applied on its own through ``z_loss_weight``."""

    def forward(self, inputs: BalanceInputs) -> torch.Tensor:
        """Scalar loss ``mean_t logsumexp(logits_t) ** 2``."""
        return functional.z_loss(inputs.logits, inputs.weights)


@dataclass
class BalanceSettings:
    """How one adapter is balanced: its loss module, the loss weights and the bias-balancing options.

    Built from a :class:`~rankmoe.RankMoEConfig` for every adapted layer; read by :func:`rankmoe.aux_loss` and
    :func:`rankmoe.update_selection_bias`.

    Attributes:
        loss: The balance loss module, or ``None``.
        balance_loss_weight: Weight of ``loss`` in the total.
        z_loss_weight: Weight of the router z-loss in the total.
        selection_bias_update_rate: Step of bias balancing (0 = off).
        target_active_ranks: Mean active ranks to steer toward, or ``None``.
    """

    loss: BalanceLoss | None
    balance_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    selection_bias_update_rate: float = 0.0
    target_active_ranks: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> BalanceSettings:
        """Build the settings of a :class:`~rankmoe.RankMoEConfig` (the loss is looked up in the registry)."""
        from rankmoe.losses.registry import get_balance_loss_class

        loss = None
        if config.balance_loss is not None:
            loss = get_balance_loss_class(config.balance_loss)(**config.balance_loss_kwargs)
        return cls(
            loss=loss,
            balance_loss_weight=float(config.balance_loss_weight),
            z_loss_weight=float(config.z_loss_weight),
            selection_bias_update_rate=float(getattr(config, "selection_bias_update_rate", 0.0)),
            target_active_ranks=getattr(config, "target_active_ranks", None),
        )
