"""Load-balancing losses: pure functions, thin modules, their registry and ``aux_loss(model)``."""

from rankmoe.losses.bias import update_selection_bias
from rankmoe.losses.collect import AuxLoss, aux_loss
from rankmoe.losses.functional import (
    degradation_aware_loss,
    mean_probability,
    selection_bias_update,
    selection_fraction,
    switch_loss,
    weighted_mean,
    z_loss,
)
from rankmoe.losses.modules import (
    BalanceInputs,
    BalanceLoss,
    BalanceSettings,
    DegradationAwareLoss,
    SwitchLoss,
    ZLoss,
)
from rankmoe.losses.registry import BALANCE_LOSSES, get_balance_loss_class, register_balance_loss

__all__ = [
    "BALANCE_LOSSES",
    "AuxLoss",
    "BalanceSettings",
    "BalanceInputs",
    "BalanceLoss",
    "DegradationAwareLoss",
    "SwitchLoss",
    "ZLoss",
    "aux_loss",
    "degradation_aware_loss",
    "get_balance_loss_class",
    "mean_probability",
    "register_balance_loss",
    "selection_bias_update",
    "selection_fraction",
    "switch_loss",
    "update_selection_bias",
    "weighted_mean",
    "z_loss",
]
