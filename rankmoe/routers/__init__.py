"""Routers: map a layer's input (or an external condition) to slot logits; selection turns them into gates.

Built-in routers, chosen with ``RankMoEConfig(router=...)``:

* ``linear`` — :class:`LinearRouter`, per token from the layer input;
* ``pooled`` — :class:`PooledRouter`, per sample from the mean-pooled layer input;
* ``condition`` — :class:`ConditionRouter`, per sample from an external condition vector;
* ``static`` — :class:`StaticRouter`, fixed routing.

Register your own with :func:`register_router`.
"""

from rankmoe.routers.base import LayerSpec, Router, RoutingInputs, SlotLayout
from rankmoe.routers.condition import ConditionRouter
from rankmoe.routers.linear import LinearRouter
from rankmoe.routers.pooled import PooledRouter
from rankmoe.routers.registry import ROUTERS, get_router_class, register_router, unregister_router
from rankmoe.routers.selection import Routing, active_ranks, expand_rank_gates, select_top_k, selection_mask
from rankmoe.routers.static import StaticRouter

__all__ = [
    "ROUTERS",
    "ConditionRouter",
    "LayerSpec",
    "LinearRouter",
    "PooledRouter",
    "Router",
    "Routing",
    "RoutingInputs",
    "SlotLayout",
    "StaticRouter",
    "active_ranks",
    "expand_rank_gates",
    "get_router_class",
    "register_router",
    "select_top_k",
    "selection_mask",
    "unregister_router",
]
