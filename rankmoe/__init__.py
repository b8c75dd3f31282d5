"""rankmoe: Mixture-of-Ranks LoRA as a PEFT method — every LoRA rank is an expert.

Importing this package registers the PEFT method ``RANKMOE`` so that ``get_peft_model``,
``PeftModel.from_pretrained`` and diffusers' ``add_adapter`` accept :class:`RankMoEConfig`.
"""

from rankmoe import peft_compat
from rankmoe.collapse import CollapsedLoRA, collapse
from rankmoe.condition import clear_condition, condition, rankmoe_layers, set_condition
from rankmoe.conditioning import (
    ClipDegradationEstimator,
    ConditionCache,
    DegradationEstimator,
    DegradationScores,
    TextAnchorConditioner,
    WeightFreeDegradationEstimator,
)
from rankmoe.config import RankMoEConfig
from rankmoe.export import export_lora
from rankmoe.layer import Conv, Linear, RankMoELayer
from rankmoe.losses import AuxLoss, BalanceInputs, BalanceLoss, aux_loss, register_balance_loss, update_selection_bias
from rankmoe.model import RankMoEModel
from rankmoe.plots import plot_routing
from rankmoe.records import RoutingRecord
from rankmoe.routers import Router, register_router
from rankmoe.stats import LayerRoutingStats, overall_active_ranks, routing_stats, routing_summary
from rankmoe.tracker import RoutingTracker

peft_compat.register_with_peft(RankMoEConfig, RankMoEModel)

__version__ = "0.1.0"

__all__ = [
    "AuxLoss",
    "BalanceInputs",
    "BalanceLoss",
    "ClipDegradationEstimator",
    "CollapsedLoRA",
    "ConditionCache",
    "Conv",
    "DegradationEstimator",
    "DegradationScores",
    "LayerRoutingStats",
    "Linear",
    "RankMoEConfig",
    "RankMoELayer",
    "RankMoEModel",
    "Router",
    "RoutingRecord",
    "RoutingTracker",
    "TextAnchorConditioner",
    "WeightFreeDegradationEstimator",
    "__version__",
    "aux_loss",
    "clear_condition",
    "collapse",
    "condition",
    "export_lora",
    "overall_active_ranks",
    "plot_routing",
    "rankmoe_layers",
    "register_balance_loss",
    "register_router",
    "routing_stats",
    "routing_summary",
    "set_condition",
    "update_selection_bias",
]
