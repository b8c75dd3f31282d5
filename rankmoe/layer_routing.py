"""Routing of a RankMoE layer: which condition applies, and the gates of each adapter for one call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankmoe.dispatch import AdapterGates
from rankmoe.records import ConditionState, RoutingRecord
from rankmoe.routers.base import RoutingInputs
from rankmoe.routers.selection import select_top_k


class RoutingMixin:
    """Methods of :class:`~rankmoe.RankMoELayer` that turn the condition and the input into gates.

    At inference a per-sample routing that does not read the input is computed once per condition tensor and
    reused (see :meth:`_routing_cache_key`).
    """

    def _batch_size(self, x: torch.Tensor) -> int:
        unbatched_dim = 1 if self.spec.kind == "linear" else self.spec.conv_dim + 1
        return 1 if x.dim() <= unbatched_dim else int(x.shape[0])

    def _resolve_condition(self) -> ConditionState | None:
        """The condition to route with.

        A forward with gradients remembers its condition, so an activation-checkpoint recomputation during
        ``backward()`` replays exactly that condition, even after the ``with rankmoe.condition(...)`` block exited or
        inside another one. The replay is refused when it would be ambiguous (several gradient-enabled forwards with
        different conditions before one backward); an evaluation forward (no gradients, ``eval()`` mode) in between
        forgets the remembered condition, and the active condition, if any, is used.
        """
        state = self._rankmoe_condition
        if torch.compiler.is_compiling():
            return state
        stash = self._rankmoe_stash
        if torch._C._current_graph_task_id() != -1:  # inside backward: activation-checkpoint recomputation
            if stash is not None and not self._rankmoe_stash_ambiguous:
                self._rankmoe_stash_consumed = True
                return stash
            if self._rankmoe_stash_ambiguous:
                raise RuntimeError(
                    "activation checkpointing recomputes a RankMoE layer, but several forwards with gradients and "
                    "different conditions ran before this backward, so the condition to replay is ambiguous; run "
                    "one backward per conditioned training forward, and run evaluation forwards in eval() mode "
                    "under torch.no_grad()"
                )
            return state
        if state is None or state is stash:
            return state
        if torch.is_grad_enabled() or self.training:  # may be replayed (reentrant checkpointing runs under no_grad)
            self._rankmoe_stash_ambiguous = stash is not None and not self._rankmoe_stash_consumed
            self._rankmoe_stash = state
            self._rankmoe_stash_consumed = False
        else:
            # an evaluation forward is never replayed; the remembered condition may no longer be the last
            self._rankmoe_stash = None
            self._rankmoe_stash_ambiguous = False
        return state

    def _route(self, adapter: str, x: torch.Tensor, state: ConditionState | None) -> AdapterGates:
        """Route ``x`` for ``adapter``: its rank gates and, per sample, the selection (reused when allowed)."""
        layout = self.slot_layout[adapter]
        scaling = self.scaling[adapter]
        batch_size = self._batch_size(x)
        if not layout.is_routed:
            return AdapterGates(adapter, "static", None, batch_size, scaling)
        router = self.rankmoe_router[adapter]
        if router.requires_condition and (state is None or state.condition is None):
            raise ValueError(
                f"router {self.router_name[adapter]!r} of adapter {adapter!r} needs a per-sample condition but none "
                "is set; wrap the call in `with rankmoe.condition(model, cond): ...` or call "
                "rankmoe.set_condition(model, cond)"
            )
        key = self._routing_cache_key(adapter, router, state, batch_size)
        cached = self._rankmoe_routing_cache.get(adapter)
        if key is not None and cached is not None and cached[0] == key and cached[1] is state.condition:
            self._rankmoe_records[adapter] = cached[2]
            return cached[3]
        original = state
        if state is not None and state.batch_size != batch_size:
            grown = state.expanded(batch_size)
            if grown is None:
                raise ValueError(
                    f"the condition set with rankmoe.condition has batch size {state.batch_size}, but layer input "
                    f"{tuple(x.shape)} has batch size {batch_size}; pass one condition row per sample, or "
                    "repeat='tile' (classifier-free guidance) / repeat='interleave' (several images per prompt) "
                    "when the model sees a multiple of the condition's batch"
                )
            state = grown
        inputs = RoutingInputs(
            x=x,
            batch_size=batch_size,
            condition=None if state is None else state.condition,
            severity=None if state is None else state.severity,
        )
        logits = router(inputs)
        routing = select_top_k(logits, layout, router.selection_bias)
        record = RoutingRecord(
            layout=layout,
            level=router.level,
            logits=logits,
            probs=routing.probs,
            top_indices=routing.top_indices,
            slot_gates=routing.slot_gates,
            batch_size=batch_size,
            severity=inputs.severity,
        )
        self._rankmoe_records[adapter] = record
        gates = routing.rank_gates
        if router.level == "token":
            if self.spec.kind == "conv":
                gates = gates.movedim(-1, 1)
            return AdapterGates(adapter, "token", gates, batch_size, scaling)
        result = AdapterGates(adapter, "sample", gates.reshape(batch_size, layout.r), batch_size, scaling, routing)
        if key is not None:  # hold the condition itself, so its id cannot be reused by another tensor
            self._rankmoe_routing_cache[adapter] = (key, original.condition, record, result)
        else:
            self._rankmoe_routing_cache.pop(adapter, None)
        return result

    def _routing_cache_key(
        self, adapter: str, router: nn.Module, state: ConditionState | None, batch_size: int
    ) -> tuple[Any, ...] | None:
        """Key under which a routing may be reused, or ``None`` when it must be computed.

        Only at inference (``eval()``, no gradients, not compiling, not capturing a CUDA graph: a replayed graph
        must contain the routing), for per-sample routers whose logits do not read
        the layer input, under a condition tensor: then the routing depends only on that tensor's identity and
        version, the router's parameters and buffers (their storage and version, which changes with every in-place
        update such as an optimizer step or ``load_state_dict``), the batch size and the scaling.
        """
        if (
            router.reads_input or router.level != "sample" or state is None or state.condition is None
            or self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        ):
            return None
        versions = tuple((t.data_ptr(), t._version) for t in (*router.parameters(), *router.buffers()))
        severity = state.severity
        return (
            id(state.condition), state.condition._version, None if severity is None else id(severity),
            None if severity is None else severity._version, state.repeat, batch_size, self.scaling[adapter], versions,
        )
