"""Routing telemetry as PNG files: slot load heatmap, active-rank histogram, active ranks against severity.

Needs matplotlib (``pip install rankmoe[plots]``), imported only when :func:`plot_routing` runs. Figures are
drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot, no global backend switch, nothing
left open.

Axis legend: ``s`` slots (real routed experts first, then zero slots), ``r`` ranks, ``p`` recorded samples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from rankmoe.tracker import RoutingTracker

PLOT_KINDS = ("slot_load", "active_ranks", "severity")
"""Keys of the dict returned by :func:`plot_routing`, in the order the files are written."""

_PEFT_PREFIX = "base_model.model."


def plot_routing(
    source: nn.Module | RoutingTracker,
    out_dir: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    prefix: str = "routing",
) -> dict[str, Path]:
    """Write routing plots as PNG files.

    Three figures:

    * ``slot_load``: heatmap, one row per layer and one column per slot, of the fraction of decisions that
      selected the slot. A white bar in each row separates the real experts from the zero slots, red crosses
      mark dead slots (never selected), grey cells are slots a layer does not have (layers with fewer slots).
    * ``active_ranks``: distribution of active ranks per decision — all layers pooled (bars), and per layer as
      a heatmap row with the layer's mean marked.
    * ``severity``: per sample, active ranks (mean over tokens and layers) against the severity given to
      :func:`rankmoe.condition`, with the mean per severity bin. Without any recorded severity the figure
      says so instead of failing.

    Args:
        source: A model carrying RankMoE adapters (its layers' last routing records are plotted: one forward)
            or a :class:`~rankmoe.tracker.RoutingTracker` (its window is plotted).
        out_dir: Folder for the files; created if missing.
        adapter_name: Adapter to plot when ``source`` is a model; defaults to each layer's first active adapter.
            A tracker plots the adapter it tracks.
        prefix: File name prefix: files are ``{prefix}_slot_load.png``, ``{prefix}_active_ranks.png`` and
            ``{prefix}_severity.png``.

    Returns:
        ``{"slot_load": path, "active_ranks": path, "severity": path}``.

    Raises:
        ImportError: If matplotlib is not installed.
        TypeError: If ``source`` is neither a module nor a tracker.
        ValueError: On an invalid ``prefix`` or ``adapter_name``, or when no routing has been recorded yet.

    Example:
        >>> import tempfile, torch, rankmoe
        >>> from peft import get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> model = get_peft_model(net, rankmoe.RankMoEConfig(r=4, num_shared_ranks=2, top_k=1,
        ...                                                   num_zero_experts=1, target_modules=["0"]))
        >>> out = model(torch.randn(3, 4))
        >>> sorted(plot_routing(model, tempfile.mkdtemp()))
        ['active_ranks', 'severity', 'slot_load']
    """
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "rankmoe.plot_routing needs matplotlib; install it with `pip install rankmoe[plots]`"
        ) from err

    if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name prefix without path separators, got {prefix!r}")
    tracker = _as_tracker(source, adapter_name)
    layouts = tracker.slot_layouts()
    if not layouts:
        raise ValueError(
            "no routing recorded yet: run a forward pass through the model (and call tracker.update() for a "
            "RoutingTracker) before plotting"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{prefix}_{kind}.png" for kind in PLOT_KINDS}
    draw = {"slot_load": _draw_slot_load, "active_ranks": _draw_active_ranks, "severity": _draw_severity}
    for kind, path in paths.items():
        figure = Figure()
        FigureCanvasAgg(figure)
        draw[kind](figure, tracker, np)
        figure.savefig(path, dpi=100)
    return paths


def _as_tracker(source: Any, adapter_name: str | None) -> RoutingTracker:
    if isinstance(source, RoutingTracker):
        if adapter_name is not None and adapter_name != source.adapter_name:
            raise ValueError(
                f"adapter_name={adapter_name!r} differs from the tracker's adapter_name={source.adapter_name!r}; a "
                "tracker plots the adapter it tracks (leave adapter_name out)"
            )
        return source
    if isinstance(source, nn.Module):
        tracker = RoutingTracker(source, adapter_name=adapter_name)
        tracker.update()
        return tracker
    raise TypeError(f"source must be a model (torch.nn.Module) or a RoutingTracker, got {type(source).__name__}")


def _short_names(names: list[str], limit: int = 48) -> list[str]:
    """Layer labels: PEFT's ``base_model.model.`` prefix removed, long names cut from the left."""
    if names and all(name.startswith(_PEFT_PREFIX) for name in names):
        names = [name[len(_PEFT_PREFIX) :] for name in names]
    return [name if len(name) <= limit else "…" + name[-(limit - 1) :] for name in names]


class _Grid:
    """Place axes by inches on a figure whose size follows its content (much faster than a layout engine)."""

    def __init__(self, figure: Any, labels: list[str], plot_width: float, heights: list[float]) -> None:
        self.figure = figure
        self.left = max(0.8, 0.45 + 0.072 * max((len(label) for label in labels), default=0))  # tick labels
        self.right = 1.15  # colour bar and its label
        self.top, self.bottom, self.gap = 0.7, 0.65, 0.5
        self.plot_width = plot_width
        self.heights = heights
        self.size = (
            self.left + plot_width + self.right,
            self.top + sum(heights) + self.gap * (len(heights) - 1) + self.bottom,
        )
        figure.set_size_inches(*self.size)

    def axes(self, row: int, **kwargs: Any) -> Any:
        width, height = self.size
        y = self.bottom + sum(self.heights[row + 1 :]) + self.gap * (len(self.heights) - 1 - row)
        box = (self.left / width, y / height, self.plot_width / width, self.heights[row] / height)
        return self.figure.add_axes(box, **kwargs)

    def colorbar(self, image: Any, ax: Any, label: str) -> None:
        width, height = self.size
        box = ax.get_position()
        cax = self.figure.add_axes((box.x1 + 0.12 / width, box.y0, 0.15 / width, box.height))
        self.figure.colorbar(image, cax=cax, label=label)


def _updates_text(tracker: RoutingTracker) -> str:
    count = tracker.num_updates
    return "1 update (one forward)" if count == 1 else f"{count} updates"


def _draw_slot_load(figure: Any, tracker: RoutingTracker, np: Any) -> None:
    layouts = tracker.slot_layouts()
    loads = tracker.slot_load()
    dead = tracker.dead_slots()
    names = list(layouts)
    num_slots = max(layout.num_slots for layout in layouts.values())
    grid = np.full((len(names), num_slots), np.nan)
    for row, name in enumerate(names):
        grid[row, : layouts[name].num_slots] = loads[name].numpy()
    labels = _short_names(names)
    grid_layout = _Grid(figure, labels, max(5.2, 0.45 * num_slots), [max(1.2, 0.3 * len(names))])
    ax = grid_layout.axes(0)
    finite = grid[np.isfinite(grid)]
    vmax = float(finite.max()) if finite.size and float(finite.max()) > 0 else 1.0
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    grid_layout.colorbar(image, ax, "selection load")
    for row, name in enumerate(names):
        layout = layouts[name]
        if layout.num_zero_experts:
            x = layout.num_experts - 0.5
            ax.plot([x, x], [row - 0.5, row + 0.5], color="white", linewidth=3)
    dead_points = [(slot, row) for row, name in enumerate(names) for slot in dead[name]]
    if dead_points:
        xs, ys = zip(*dead_points, strict=True)
        ax.scatter(xs, ys, marker="x", color="red", s=40, linewidths=1.5)
    same = len({(layout.num_experts, layout.num_slots) for layout in layouts.values()}) == 1
    if same:
        layout = next(iter(layouts.values()))
        slot_labels = [f"e{i}" for i in range(layout.num_experts)]
        slot_labels += [f"z{i}" for i in range(layout.num_zero_experts)]
        ax.set_xlabel("slot (e: routed expert, z: zero slot, right of the white bar)")
    else:
        slot_labels = [str(i) for i in range(num_slots)]
        ax.set_xlabel("slot (zero slots right of the white bar; grey: no such slot)")
    ax.set_xticks(range(num_slots), slot_labels, fontsize="small")
    ax.set_yticks(range(len(names)), labels, fontsize="small")
    num_dead = len(dead_points)
    ax.set_title(
        f"Slot load over {_updates_text(tracker)}: share of decisions selecting each slot\n"
        f"{num_dead} dead slot" + ("s" if num_dead != 1 else "") + " (red x: never selected)",
        fontsize="medium",
    )


def _draw_active_ranks(figure: Any, tracker: RoutingTracker, np: Any) -> None:
    histograms = tracker.active_rank_histogram()
    means = tracker.mean_active_ranks()
    names = list(histograms)
    width = max(h.numel() for h in histograms.values())
    counts = np.zeros((len(names), width))
    for row, name in enumerate(names):
        counts[row, : histograms[name].numel()] = histograms[name].numpy()
    used = np.nonzero(counts.sum(axis=0))[0]
    low, high = (int(used.min()), int(used.max())) if used.size else (0, width - 1)
    values = np.arange(low, high + 1)
    labels = _short_names(names)
    grid = _Grid(figure, labels, max(5.2, 0.5 * len(values)), [2.0, max(0.9, 0.3 * len(names))])
    top = grid.axes(0)
    bottom = grid.axes(1, sharex=top)

    pooled = counts.sum(axis=0)[low : high + 1]
    total = pooled.sum()
    top.bar(values, pooled / total if total else pooled, width=0.8, color="tab:blue")
    top.set_ylabel("fraction of decisions")
    top.tick_params(labelbottom=False)
    overall = tracker.overall_active_ranks()
    top.set_title(
        f"Active ranks per decision, all layers pooled ({_updates_text(tracker)})\n"
        f"mean over layers of the layer means: {overall:.2f}",
        fontsize="medium",
    )

    sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, sums, out=np.full_like(counts, np.nan), where=sums > 0)[:, low : high + 1]
    extent = (low - 0.5, high + 0.5, len(names) - 0.5, -0.5)
    image = bottom.imshow(fractions, aspect="auto", cmap="magma", vmin=0.0, interpolation="nearest", extent=extent)
    grid.colorbar(image, bottom, "share of decisions")
    bottom.scatter([means[name] for name in names], range(len(names)), marker="D", color="white",
                   edgecolors="black", s=30, zorder=3)
    bottom.set_title("per layer (diamond: the layer's mean)", fontsize="small")
    bottom.set_yticks(range(len(names)), labels, fontsize="small")
    bottom.set_xlabel("active ranks (shared + expert_rank × selected real experts)")
    bottom.set_xticks(values)


def _draw_severity(figure: Any, tracker: RoutingTracker, np: Any) -> None:
    figure.set_size_inches(6.4, 4.4)
    figure.subplots_adjust(left=0.16, right=0.97, bottom=0.13, top=0.9)
    ax = figure.add_subplot()
    ranks, severity = tracker.severity_pairs()
    if not ranks.numel():
        layer_pairs = tracker.layer_severity_pairs()
        if layer_pairs:  # the layers saw different batches: pool the per-layer pairs instead
            ranks = np.concatenate([pair[0].numpy() for pair in layer_pairs.values()])
            severity = np.concatenate([pair[1].numpy() for pair in layer_pairs.values()])
    ranks, severity = np.asarray(ranks, dtype=float), np.asarray(severity, dtype=float)
    layouts = tracker.slot_layouts().values()
    ax.set_xlim(-0.02, 1.02)
    fewest = min(layout.num_shared_ranks + layout.expert_rank * max(0, layout.top_k - layout.num_zero_experts)
                 for layout in layouts)
    most = max(layout.num_shared_ranks + layout.expert_rank * min(layout.top_k, layout.num_experts)
               for layout in layouts)
    ax.set_ylim(fewest - 0.5, most + 0.5)
    ax.set_xlabel("severity")
    ax.set_ylabel("active ranks per sample\n(mean over tokens and layers)")
    if not ranks.size:
        ax.set_title("Active ranks against severity", fontsize="medium")
        ax.text(0.5, 0.5, "no severity recorded\n(pass severity= to rankmoe.condition)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        return
    ax.scatter(severity, ranks, s=12, alpha=0.5, color="tab:blue", label="sample")
    edges = np.linspace(0.0, 1.0, 11)
    bins = np.clip(np.digitize(severity, edges) - 1, 0, len(edges) - 2)
    centres, bin_means = [], []
    for index in range(len(edges) - 1):
        members = ranks[bins == index]
        if members.size:
            centres.append((edges[index] + edges[index + 1]) / 2)
            bin_means.append(float(members.mean()))
    ax.plot(centres, bin_means, color="tab:orange", marker="o", linewidth=2, label="mean per severity bin")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"Active ranks against severity: {ranks.size} samples, {_updates_text(tracker)}",
                 fontsize="medium")
