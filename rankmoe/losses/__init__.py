"""Load-balancing losses for routers (pure functions and their registry)."""

from rankmoe.losses.functional import degradation_aware_loss, selection_fraction, switch_loss, z_loss
from rankmoe.losses.registry import BALANCE_LOSSES, register_balance_loss

__all__ = [
    "BALANCE_LOSSES",
    "degradation_aware_loss",
    "register_balance_loss",
    "selection_fraction",
    "switch_loss",
    "z_loss",
]
