"""The balance-loss registry: losses are chosen by name with ``RankMoEConfig(balance_loss=...)``."""

from __future__ import annotations

from collections.abc import Callable

from rankmoe.losses import functional
from rankmoe.utils.registry import Registry

BALANCE_LOSSES: Registry[Callable[..., object]] = Registry("balance loss")
"""Registered balance-loss functions by name (``switch``, ``degradation_aware``)."""

BALANCE_LOSSES.register("switch")(functional.switch_loss)
BALANCE_LOSSES.register("degradation_aware")(functional.degradation_aware_loss)


def register_balance_loss(name: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator registering a balance-loss function under ``name``.

    Raises:
        ValueError: If the name is taken or malformed.
    """
    return BALANCE_LOSSES.register(name)
