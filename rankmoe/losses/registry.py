"""The balance-loss registry: losses are chosen by name with ``RankMoEConfig(balance_loss=...)``."""

from __future__ import annotations

from collections.abc import Callable

from rankmoe.losses.modules import BalanceLoss, DegradationAwareLoss, SwitchLoss, ZLoss
from rankmoe.utils.registry import Registry

BALANCE_LOSSES: Registry[type[BalanceLoss]] = Registry("balance loss")
"""Registered balance-loss classes by name (``switch``, ``degradation_aware``, ``z_loss``)."""

BALANCE_LOSSES.register("switch")(SwitchLoss)
BALANCE_LOSSES.register("degradation_aware")(DegradationAwareLoss)
BALANCE_LOSSES.register("z_loss")(ZLoss)


def register_balance_loss(name: str) -> Callable[[type[BalanceLoss]], type[BalanceLoss]]:
    """Class decorator registering a :class:`~rankmoe.losses.BalanceLoss` subclass under ``name``.

    Example:
        >>> import torch
        >>> from rankmoe.losses import BalanceLoss, BALANCE_LOSSES
        >>> @register_balance_loss("entropy_doc_example")
        ... class EntropyLoss(BalanceLoss):
        ...     def forward(self, inputs):
        ...         return -(inputs.probs * inputs.probs.clamp_min(1e-9).log()).sum(-1).mean()
        >>> BALANCE_LOSSES.unregister("entropy_doc_example")

    Raises:
        ValueError: If the name is taken or malformed.
        TypeError: If the decorated object is not a ``BalanceLoss`` subclass.
    """
    register = BALANCE_LOSSES.register(name)

    def decorator(cls: type[BalanceLoss]) -> type[BalanceLoss]:
        if not (isinstance(cls, type) and issubclass(cls, BalanceLoss)):
            raise TypeError(
                f"register_balance_loss({name!r}) decorates subclasses of rankmoe.losses.BalanceLoss, got {cls!r}"
            )
        return register(cls)

    return decorator


def get_balance_loss_class(name: str) -> type[BalanceLoss]:
    """The class registered under ``name``.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the registered names).
    """
    return BALANCE_LOSSES.get(name)
