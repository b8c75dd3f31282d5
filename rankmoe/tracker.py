"""`RoutingTracker`: routing statistics added up over a window of many forwards.

Axis legend: ``b`` batch, ``n`` tokens, ``r`` ranks, ``s`` slots (real routed experts first, then zero slots),
``p`` recorded samples.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from rankmoe.condition import rankmoe_layers
from rankmoe.losses.collect import decision_weights
from rankmoe.records import RoutingRecord
from rankmoe.routers.base import SlotLayout
from rankmoe.routers.selection import active_ranks, selection_mask
from rankmoe.stats import LayerRoutingStats, overall_active_ranks


@dataclass
class _Counts:
    """Counts of one layer over one or more updates (CPU tensors)."""

    layout: SlotLayout
    level: str
    slot_counts: torch.Tensor  # (s,) int64: decisions that selected each slot
    rank_counts: torch.Tensor  # (r + 1,) int64: decisions with 0 .. r active ranks
    num_decisions: int
    num_updates: int

    def add(self, other: _Counts, sign: int = 1) -> None:
        self.slot_counts += sign * other.slot_counts
        self.rank_counts += sign * other.rank_counts
        self.num_decisions += sign * other.num_decisions
        self.num_updates += sign * other.num_updates

    def copy(self) -> _Counts:
        return _Counts(self.layout, self.level, self.slot_counts.clone(), self.rank_counts.clone(),
                       self.num_decisions, self.num_updates)


class _PairBuffer:
    """(mean active ranks, severity) per sample, in chunks tagged with the update that produced them."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()
        self.size = 0

    def append(self, update: int, ranks: torch.Tensor, severity: torch.Tensor) -> None:
        self.chunks.append((update, ranks, severity))
        self.size += int(ranks.numel())

    def trim(self, oldest_update: int, max_samples: int | None) -> None:
        """Drop chunks older than ``oldest_update`` and chunks not needed to keep ``max_samples`` samples."""
        while self.chunks and (
            self.chunks[0][0] < oldest_update
            or (max_samples is not None and self.size - self.chunks[0][1].numel() >= max_samples)
        ):
            self.size -= int(self.chunks.popleft()[1].numel())

    def tensors(self, max_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.chunks:
            return torch.zeros(0), torch.zeros(0)
        ranks = torch.cat([chunk[1] for chunk in self.chunks])
        severity = torch.cat([chunk[2] for chunk in self.chunks])
        if max_samples is not None:
            ranks, severity = ranks[-max_samples:], severity[-max_samples:]
        return ranks, severity


class RoutingTracker:
    """Routing statistics over a window of forwards: slot loads, active ranks, dead slots, severity.

    Call :meth:`update` once after every forward whose routing should count (typically once per training
    step). It reads the routing record each layer keeps of its last forward — detached, under
    ``torch.no_grad()``, reduced to small count tensors and moved to the CPU — so the tracker holds no autograd
    graph and no activations. A record already counted (no forward ran since the last update, or the layer was
    skipped in this forward) is not counted again.

    Per layer the tracker keeps: how many decisions (tokens or samples) selected each slot ``(s,)``, the
    number of decisions, a histogram of active ranks per decision ``(r + 1,)``, and per sample the pair
    (mean active ranks of the sample, its severity) — for per-token routing the mean over the sample's tokens;
    pairs are kept only for forwards run with a severity (``rankmoe.condition(model, cond, severity=...)``).
    Layers whose adapter routes nothing (every rank shared) are left out.

    Args:
        model: A model carrying RankMoE adapters (``PeftModel``, diffusers/transformers model or any module).
        adapter_name: Adapter to track; defaults to each layer's first active adapter at every update.
        window: ``None`` counts every update since construction or :meth:`reset`; an int keeps only the last
            ``window`` updates (older updates are subtracted again, so dead slots are "never selected in the
            last ``window`` updates").
        max_samples: Most recent (ranks, severity) pairs kept per layer and for :meth:`severity_pairs`, ``None`` for
            no limit. Counts are never limited.

    Raises:
        ValueError: On a model without RankMoE layers or an invalid argument (naming it and its value).

    Example:
        >>> import torch, rankmoe
        >>> from peft import get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> cfg = rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1, num_zero_experts=1, target_modules=["0"],
        ...                             router="static", router_kwargs={"selected": [0]})
        >>> model = get_peft_model(net, cfg)
        >>> tracker = RoutingTracker(model, window=100)
        >>> for _ in range(3):
        ...     out = model(torch.randn(5, 4))
        ...     counted = tracker.update()
        >>> tracker.mean_active_ranks()
        {'base_model.model.0': 3.0}
        >>> tracker.dead_slots()
        {'base_model.model.0': [1, 2]}
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str | None = None,
        window: int | None = None,
        max_samples: int | None = 100_000,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module carrying RankMoE adapters, got {type(model).__name__}")
        if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
            raise ValueError(f"adapter_name must be a non-empty str or None, got {adapter_name!r}")
        for name, value in (("window", window), ("max_samples", max_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        rankmoe_layers(model)  # raises ValueError without RankMoE layers
        self._model = model
        self._adapter_name = adapter_name
        self._window = window
        self._max_samples = max_samples
        self.reset()

    @property
    def model(self) -> nn.Module:
        """The tracked model."""
        return self._model

    @property
    def adapter_name(self) -> str | None:
        """The tracked adapter (``None``: each layer's first active adapter)."""
        return self._adapter_name

    @property
    def window(self) -> int | None:
        """Number of most recent updates counted (``None``: all since :meth:`reset`)."""
        return self._window

    @property
    def max_samples(self) -> int | None:
        """Most recent (ranks, severity) pairs kept per layer (``None``: no limit)."""
        return self._max_samples

    @property
    def num_updates(self) -> int:
        """Updates that count now: calls of :meth:`update` since :meth:`reset`, at most ``window``."""
        return self._num_updates if self._window is None else min(self._num_updates, self._window)

    def reset(self) -> None:
        """Forget every update (the counts start again from zero)."""
        self._num_updates = 0
        self._totals: dict[str, _Counts] = {}
        self._updates: deque[dict[str, _Counts]] = deque()
        self._layer_pairs: dict[str, _PairBuffer] = {}
        self._sample_pairs = _PairBuffer()
        self._seen: dict[str, weakref.ref[RoutingRecord]] = {}

    # ------------------------------------------------------------------ accumulation
    def update(self, token_mask: torch.Tensor | None = None) -> int:
        """Count the last routing record of every layer.

        Call it once after each forward (before the next forward overwrites the records).

        Args:
            token_mask: Optional padding / attention mask ``(b, n)`` of that forward (nonzero = real token);
                masked positions are not counted (see :func:`rankmoe.losses.collect.decision_weights`).

        Returns:
            The number of layers whose record was counted (layers that have not run since the last update are
            skipped).
        """
        self._num_updates += 1
        index = self._num_updates
        entry: dict[str, _Counts] = {}
        sample_means: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, layer in rankmoe_layers(self._model):
                adapter = self._adapter_name or next(iter(layer.active_adapters), None)
                if adapter is None or adapter not in layer.slot_layout or not layer.slot_layout[adapter].is_routed:
                    continue
                record = layer._rankmoe_records.get(adapter)
                seen = self._seen.get(name)
                if record is None or (seen is not None and seen() is record):
                    continue
                self._seen[name] = weakref.ref(record)
                counts, pair = _count_record(record, decision_weights(record, token_mask, name))
                entry[name] = counts
                total = self._totals.get(name)
                if total is None or total.layout != counts.layout:
                    self._totals[name] = counts.copy()
                    self._layer_pairs[name] = _PairBuffer()
                else:
                    total.add(counts)
                    total.level = counts.level
                if pair is not None:
                    self._layer_pairs[name].append(index, *pair)
                    sample_means.append(pair)
        if self._window is not None:
            self._updates.append(entry)
            if len(self._updates) > self._window:
                self._evict(self._updates.popleft())
        if sample_means and all(
            ranks.shape == sample_means[0][0].shape and torch.equal(severity, sample_means[0][1])
            for ranks, severity in sample_means
        ):
            mean = torch.stack([ranks for ranks, _ in sample_means]).mean(dim=0)
            self._sample_pairs.append(index, mean, sample_means[0][1])
        oldest = 0 if self._window is None else index - self._window + 1
        for buffer in (*self._layer_pairs.values(), self._sample_pairs):
            buffer.trim(oldest, self._max_samples)
        return len(entry)

    def _evict(self, entry: dict[str, _Counts]) -> None:
        for name, counts in entry.items():
            total = self._totals.get(name)
            if total is None or total.layout != counts.layout:
                continue
            total.add(counts, sign=-1)
            if total.num_updates <= 0:
                del self._totals[name]
                self._layer_pairs.pop(name, None)

    # ------------------------------------------------------------------ queries
    def slot_layouts(self) -> dict[str, SlotLayout]:
        """Slot layout of every tracked layer (layers with at least one counted update in the window)."""
        return {name: total.layout for name, total in self._totals.items()}

    def stats(self) -> dict[str, LayerRoutingStats]:
        """Per-layer statistics over the window, in the form of :func:`routing_stats`.

        Returns:
            ``{module name: LayerRoutingStats}`` for layers with at least one counted update; ``slot_load`` is
            ``(s,)``, ``num_decisions`` counts every decision in the window.
        """
        stats: dict[str, LayerRoutingStats] = {}
        for name, total in self._totals.items():
            layout, decisions = total.layout, total.num_decisions
            if decisions == 0:
                nan = float("nan")
                stats[name] = LayerRoutingStats(nan, torch.full((layout.num_slots,), nan), nan, 0, total.level)
                continue
            ranks = torch.arange(layout.r + 1, dtype=torch.float64)
            mean_ranks = float((total.rank_counts.double() * ranks).sum() / decisions)
            zero = float(total.slot_counts[layout.num_experts :].sum()) / (decisions * layout.top_k)
            stats[name] = LayerRoutingStats(
                mean_active_ranks=mean_ranks,
                slot_load=total.slot_counts.float() / decisions,
                zero_fraction=zero,
                num_decisions=decisions,
                level=total.level,
            )
        return stats

    def slot_load(self) -> dict[str, torch.Tensor]:
        """Fraction of decisions that selected each slot.

        Returns:
            ``{module name: (s,) float tensor}``; each sums to ``top_k``. Slots ``num_experts ..`` are zero slots.
        """
        return {name: item.slot_load for name, item in self.stats().items()}

    def mean_active_ranks(self) -> dict[str, float]:
        """Mean active ranks per decision (token or sample) of every layer over the window.

        Returns:
            ``{module name: mean}``; see :meth:`~rankmoe.stats.RoutingTracker.overall_active_ranks` for one number for
            the model.
        """
        return {name: item.mean_active_ranks for name, item in self.stats().items()}

    def overall_active_ranks(self) -> float:
        """The per-layer means of :meth:`mean_active_ranks` averaged over layers (``nan`` before any update)."""
        return overall_active_ranks(self.stats())

    def dead_slots(self) -> dict[str, list[int]]:
        """Slots never selected in the window.

        Returns:
            ``{module name: sorted slot indices}`` for every layer with at least one counted update (an empty list
            when every slot was used). Indices ``>= num_experts`` are zero slots.
        """
        return {
            name: torch.nonzero(total.slot_counts == 0).flatten().tolist() for name, total in self._totals.items()
        }

    def active_rank_histogram(self) -> dict[str, torch.Tensor]:
        """How many decisions used each number of active ranks.

        Returns:
            ``{module name: (r + 1,) int64 tensor}``: entry ``i`` counts the decisions with ``i`` active ranks.
        """
        return {name: total.rank_counts.clone() for name, total in self._totals.items()}

    def layer_severity_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per sample of every layer: its mean active ranks and its severity.

        Returns:
            ``{module name: (ranks (p,), severity (p,))}``, oldest sample first, for layers that recorded at least
            one severity; for per-token routing a sample's ranks are the mean over its tokens.
        """
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, buffer in self._layer_pairs.items():
            if buffer.size:
                pairs[name] = buffer.tensors(self._max_samples)
        return pairs

    def severity_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: its active ranks averaged over tokens and layers, and its severity.

        Samples are taken from the updates in which every layer that recorded a severity saw the same batch.

        Returns:
            ``(ranks (p,), severity (p,))``, oldest sample first; both empty when no severity was recorded.
        """
        return self._sample_pairs.tensors(self._max_samples)

    def summary(self) -> str:
        """A plain-text table: per layer the level, mean active ranks, zero-slot share, max/mean slot load and dead
        slots, then the overall mean active ranks.

        Returns:
            The table; a short note when nothing has been counted yet.
        """
        stats = self.stats()
        if not stats:
            return "no routing tracked yet (call tracker.update() after a forward pass)"
        dead = self.dead_slots()
        layouts = self.slot_layouts()
        window = "all since reset" if self._window is None else f"window {self._window}"
        width = max(len("layer"), *(len(name) for name in stats))
        lines = [
            f"routing over {self.num_updates} update(s) ({window})",
            f"{'layer'.ljust(width)}  level   active ranks  zero-slot share  max/mean slot load  dead slots",
        ]
        for name, item in stats.items():
            experts = layouts[name].num_experts
            dead_text = ", ".join(f"{i}" if i < experts else f"{i}(zero)" for i in dead[name]) or "none"
            lines.append(
                f"{name.ljust(width)}  {item.level:<6}  {item.mean_active_ranks:12.2f}  {item.zero_fraction:15.3f}"
                f"  {_load_balance(item.slot_load):18.2f}  {dead_text}"
            )
        lines.append(f"{'mean'.ljust(width)}          {overall_active_ranks(stats):12.2f}")
        return "\n".join(lines)

    def log_dict(self, prefix: str = "rankmoe/") -> dict[str, float]:
        """Flat ``{key: float}`` for experiment loggers (TensorBoard, W&B, ``accelerator.log``).

        Keys (``{layer}`` is the module name):

        * ``{prefix}active_ranks``: :meth:`~rankmoe.stats.RoutingTracker.overall_active_ranks`;
        * ``{prefix}dead_slots``: dead slots summed over layers;
        * ``{prefix}active_ranks/{layer}``: mean active ranks of the layer;
        * ``{prefix}load_max_over_mean/{layer}``: largest slot load over the mean slot load (1 is perfectly
          balanced);
        * ``{prefix}zero_share/{layer}``: share of selections that went to zero slots;
        * ``{prefix}dead_slots/{layer}``: number of slots never selected in the window.

        Args:
            prefix: Prepended to every key.

        Returns:
            The metrics; empty before any update.

        Raises:
            ValueError: If ``prefix`` is not a str.
        """
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {prefix!r}")
        stats = self.stats()
        if not stats:
            return {}
        dead = self.dead_slots()
        logs = {
            f"{prefix}active_ranks": float(overall_active_ranks(stats)),
            f"{prefix}dead_slots": float(sum(len(slots) for slots in dead.values())),
        }
        for name, item in stats.items():
            logs[f"{prefix}active_ranks/{name}"] = float(item.mean_active_ranks)
            logs[f"{prefix}load_max_over_mean/{name}"] = _load_balance(item.slot_load)
            logs[f"{prefix}zero_share/{name}"] = float(item.zero_fraction)
            logs[f"{prefix}dead_slots/{name}"] = float(len(dead[name]))
        return logs

    def __repr__(self) -> str:
        return (
            f"RoutingTracker(adapter_name={self._adapter_name!r}, window={self._window}, "
            f"updates={self.num_updates}, layers={len(self._totals)})"
        )


def _load_balance(slot_load: torch.Tensor) -> float:
    """Largest over mean slot load (``nan`` for no slots or no decisions)."""
    if not slot_load.numel():
        return float("nan")
    mean = float(slot_load.mean())
    return float(slot_load.max()) / mean if mean > 0 and math.isfinite(mean) else float("nan")


def _count_record(
    record: RoutingRecord, weights: torch.Tensor | None = None
) -> tuple[_Counts, tuple[torch.Tensor, torch.Tensor] | None]:
    """Reduce one routing record to CPU counts and, with a severity, per-sample (ranks, severity) pairs.

    ``weights`` ``(t,)`` (0/1 from a padding mask) leave decisions out of every count.
    """
    layout = record.layout
    top = record.top_indices.detach()
    flat = top.reshape(-1, top.shape[-1])
    ranks = active_ranks(top, layout)
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device) if weights is None else weights.ne(0)
    counts = _Counts(
        layout=layout,
        level=record.level,
        slot_counts=selection_mask(flat[keep], layout.num_slots).sum(dim=0).to(torch.int64).cpu(),
        rank_counts=torch.bincount(ranks.reshape(-1)[keep].long(), minlength=layout.r + 1).to(torch.int64).cpu(),
        num_decisions=int(keep.sum()),
        num_updates=1,
    )
    severity = record.severity
    batch = int(record.batch_size)
    if severity is None or batch < 1 or severity.numel() != batch or ranks.numel() % batch:
        return counts, None
    keep_per_sample = keep.reshape(batch, -1).float()
    token_count = keep_per_sample.sum(dim=1)
    per_sample = (ranks.reshape(batch, -1).float() * keep_per_sample).sum(dim=1) / token_count.clamp_min(1)
    valid = (token_count > 0).cpu()
    return counts, (per_sample.cpu()[valid], severity.detach().reshape(-1).float().cpu()[valid])
