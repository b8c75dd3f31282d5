"""Side-by-side cost of one adapted layer: base layer, PEFT LoRA and RankMoE variants, in one process.

Every variant wraps a copy of the *same* base layer (same weights) in a tiny module, is built with
``peft.get_peft_model`` and is called on the *same* input tensor. Per layer shape and mode (``inference``:
``eval()`` + ``torch.no_grad()``; ``training``: ``train()``, forward + backward into the trainable parameters
and the input) the script records the median time per call over ``--repeats`` interleaved rounds (variant
order rotated every round) after ``--warmup`` calls, and reports ratios against the base layer and against
PEFT LoRA of the same total rank. Ratios are only meaningful within one run on one machine.

Run from the repository root::

    python benchmarks/layer_bench.py --device cpu --shapes small --repeats 3          # smoke test, < 1 min
    python benchmarks/layer_bench.py --device cuda --shapes sd --dtype bfloat16       # SD-UNet-like shapes

Results go to ``<out>/results/<name>.json`` and ``<out>/results/<name>.md`` (``--out`` defaults to this
folder); the Markdown table is also printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import peft
import torch
from bench_common import Wrapper, device_name, peak_memory_mib, synchronizer
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

import rankmoe
from rankmoe import RankMoEConfig

Mode = Literal["inference", "training"]
MODES: tuple[Mode, ...] = ("inference", "training")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TOTAL_RANK = 40
"""Total rank ``r`` of every adapter (PEFT LoRA, all-shared RankMoE and the MoR preset)."""
MOR_PRESET: dict[str, Any] = {
    "r": TOTAL_RANK,
    "num_shared_ranks": 8,
    "top_k": 8,
    "num_zero_experts": 4,
    "expert_rank": 1,
}
"""The MoR configuration (arXiv 2511.16024): 8 shared ranks, top-8 of 32 rank-1 experts + 4 zero slots."""
ACTIVE_RANK = 16
"""Most ranks the MoR preset has active per sample (8 shared + top-8 rank-1 experts): LoRA at equal active rank."""
CONDITION_DIM = 7
"""Width of the external condition vector of the ``condition`` router (e.g. 7 degradation scores)."""
BASE = "base"
LORA = "peft_lora"
LORA_ACTIVE = "peft_lora_active"
PATH_VARIANTS = ("dense", "gather", "merge")
"""Execution paths forced on the ``condition`` variant (``rankmoe_condition`` itself runs ``auto``)."""


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LayerShape:
    """One benchmarked layer and its input.

    Args:
        name: Short identifier (used by ``--layers``).
        kind: ``"linear"`` (``nn.Linear(features, features)`` on ``(b, n, d)``) or ``"conv"``
            (``nn.Conv2d(features, features, 3, padding=1)`` on ``(b, d, size, size)``).
        batch: ``b``, samples per call.
        features: ``d``, input and output features (channels for ``conv``).
        size: Tokens per sample ``n`` for ``linear``; the spatial side for ``conv`` (``size x size``).
    """

    name: str
    kind: Literal["linear", "conv"]
    batch: int
    features: int
    size: int

    def describe(self) -> str:
        """Human-readable shape, e.g. ``Linear 320->320, x (4, 4096, 320)``."""
        d = self.features
        if self.kind == "linear":
            return f"Linear {d}->{d}, x ({self.batch}, {self.size}, {d})"
        return f"Conv2d 3x3 {d}->{d}, x ({self.batch}, {d}, {self.size}, {self.size})"


SHAPE_PRESETS: dict[str, tuple[LayerShape, ...]] = {
    # CPU smoke test: a few ms per call on two cores.
    "small": (
        LayerShape("linear256", "linear", batch=2, features=256, size=256),
        LayerShape("conv64", "conv", batch=2, features=64, size=32),
    ),
    # The seven SD-2.1-like UNet layers at 512 px (latent 64x64) with one image per call, as MoR's per-image
    # routing runs at inference: each width at the resolution it runs at.
    "paper": (
        LayerShape("linear320", "linear", batch=1, features=320, size=4096),
        LayerShape("linear640", "linear", batch=1, features=640, size=1024),
        LayerShape("linear1280", "linear", batch=1, features=1280, size=256),
        LayerShape("linear1280_t64", "linear", batch=1, features=1280, size=64),
        LayerShape("conv320", "conv", batch=1, features=320, size=64),
        LayerShape("conv640", "conv", batch=1, features=640, size=32),
        LayerShape("conv1280", "conv", batch=1, features=1280, size=16),
    ),
    # Batched and LLM-like shapes: a batch-4 UNet layer, LLM decode (one token) and prefill (128 tokens).
    "llm": (
        LayerShape("linear640_b4", "linear", batch=4, features=640, size=1024),
        LayerShape("decode4096", "linear", batch=1, features=4096, size=1),
        LayerShape("prefill4096", "linear", batch=1, features=4096, size=128),
        LayerShape("conv640_b4", "conv", batch=4, features=640, size=32),
    ),
    # Stable-Diffusion-2.1-like UNet layers at 512 px (latent 64x64), batch 4: each width at the resolution
    # it runs at (320 @ 64x64 tokens, 640 @ 32x32, 1280 @ 16x16 and 8x8).
    "sd": (
        LayerShape("linear320", "linear", batch=4, features=320, size=4096),
        LayerShape("linear640", "linear", batch=4, features=640, size=1024),
        LayerShape("linear1280", "linear", batch=4, features=1280, size=256),
        LayerShape("linear1280_t64", "linear", batch=4, features=1280, size=64),
        LayerShape("conv320", "conv", batch=4, features=320, size=64),
        LayerShape("conv640", "conv", batch=4, features=640, size=32),
        LayerShape("conv1280", "conv", batch=4, features=1280, size=16),
    ),
}


def make_base_layer(shape: LayerShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The bare base layer of ``shape`` (random weights from the current seed) on ``device`` in ``dtype``."""
    if shape.kind == "linear":
        layer: nn.Module = nn.Linear(shape.features, shape.features)
    else:
        layer = nn.Conv2d(shape.features, shape.features, kernel_size=3, padding=1)
    return layer.to(device=device, dtype=dtype)


def make_input(shape: LayerShape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random input of ``shape``: ``(b, n, d)`` for linear layers, ``(b, d, size, size)`` for convolutions."""
    if shape.kind == "linear":
        dims = (shape.batch, shape.size, shape.features)
    else:
        dims = (shape.batch, shape.features, shape.size, shape.size)
    return torch.randn(dims, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One way of running the layer.

    Args:
        name: Identifier used in tables and JSON.
        description: What it is, for the report.
        config: The PEFT config (``None`` for the bare base layer).
        needs_condition: Whether calls run inside ``rankmoe.condition(model, cond)``.
        reroute: Whether every inference call recomputes the routing (a new image per call, as in one-step SR);
            otherwise the layers reuse the routing of the condition, as over the steps of a diffusion sampler.
    """

    name: str
    description: str
    config: peft.PeftConfig | None
    needs_condition: bool = False
    reroute: bool = False


def _rankmoe_config(**kwargs: Any) -> RankMoEConfig:
    return RankMoEConfig(lora_alpha=TOTAL_RANK, init_weights=False, target_modules=["layer"], **kwargs)


def make_variants() -> list[Variant]:
    """Base layer, PEFT LoRA(r=40), RankMoE with every rank shared, and the MoR preset under three routers."""
    mor = ", ".join(f"{k}={v}" for k, v in MOR_PRESET.items())
    return [
        Variant(BASE, "the bare base layer (frozen weight)", None),
        Variant(
            LORA,
            f"peft.LoraConfig(r={TOTAL_RANK}, lora_alpha={TOTAL_RANK}, init_lora_weights=False)",
            LoraConfig(r=TOTAL_RANK, lora_alpha=TOTAL_RANK, init_lora_weights=False, target_modules=["layer"]),
        ),
        Variant(
            LORA_ACTIVE,
            f"peft.LoraConfig(r={ACTIVE_RANK}): the rank the MoR preset has active per sample at most",
            LoraConfig(r=ACTIVE_RANK, lora_alpha=ACTIVE_RANK, init_lora_weights=False, target_modules=["layer"]),
        ),
        Variant(
            "rankmoe_shared",
            f"RankMoE r={TOTAL_RANK}, every rank shared (no router)",
            _rankmoe_config(r=TOTAL_RANK, num_shared_ranks=TOTAL_RANK, top_k=0),
        ),
        Variant(
            "rankmoe_token",
            f"MoR preset ({mor}), router='linear' (per token)",
            _rankmoe_config(**MOR_PRESET, router="linear"),
        ),
        Variant(
            "rankmoe_pooled",
            f"MoR preset ({mor}), router='pooled' (per sample)",
            _rankmoe_config(**MOR_PRESET, router="pooled"),
        ),
        Variant(
            "rankmoe_condition",
            f"MoR preset ({mor}), router='condition', condition_dim={CONDITION_DIM} (per sample),"
            " execution_path='auto'",
            _rankmoe_config(**MOR_PRESET, router="condition", router_kwargs={"condition_dim": CONDITION_DIM}),
            needs_condition=True,
        ),
        Variant(
            "rankmoe_condition_rerouted",
            "as rankmoe_condition, the routing recomputed every call (a new image per call, as in one-step SR)",
            _rankmoe_config(**MOR_PRESET, router="condition", router_kwargs={"condition_dim": CONDITION_DIM}),
            needs_condition=True,
            reroute=True,
        ),
        *[
            Variant(
                f"rankmoe_condition_{path}",
                f"as rankmoe_condition with execution_path={path!r}",
                _rankmoe_config(
                    **MOR_PRESET, router="condition", router_kwargs={"condition_dim": CONDITION_DIM},
                    execution_path=path,
                ),
                needs_condition=True,
            )
            for path in PATH_VARIANTS
        ],
    ]


def build_model(variant: Variant, base_layer: nn.Module, autocast_adapter_dtype: bool) -> nn.Module:
    """Wrap a deep copy of ``base_layer`` and, unless ``variant`` is the base, apply its PEFT config.

    The base weight is frozen in every variant (``get_peft_model`` freezes it; the bare base is frozen here), so
    training cost = the input gradient plus, for adapters, the adapter gradients.
    """
    wrapper = Wrapper(copy.deepcopy(base_layer))
    if variant.config is None:
        wrapper.requires_grad_(False)
        return wrapper
    return get_peft_model(wrapper, copy.deepcopy(variant.config), autocast_adapter_dtype=autocast_adapter_dtype)


def adapter_dtypes(model: nn.Module) -> list[str]:
    """Distinct dtypes of the trainable parameters (the adapter), e.g. ``["torch.float32"]``."""
    return sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})


# ---------------------------------------------------------------------------------------------------- calls

def make_call(
    model: nn.Module, x: torch.Tensor, mode: Mode, cuda_graphs: bool = False, reroute: bool = False
) -> Callable[[], None]:
    """A zero-argument function running one forward (``inference``) or forward + backward (``training``).

    With ``reroute`` every inference call first drops the routing the RankMoE layers keep for their condition.

    Training sets every gradient to ``None`` first (no accumulation) and back-propagates a fixed random
    output gradient into the trainable parameters and into ``x``. With ``cuda_graphs`` (``torch.compile`` mode
    ``reduce-overhead``) every call starts a new CUDA-graph step, since the variants' graphs are interleaved.
    """
    step = torch.compiler.cudagraph_mark_step_begin if cuda_graphs else (lambda: None)
    if mode == "inference":
        model.eval()
        caches = [m._rankmoe_routing_cache for m in model.modules() if reroute and hasattr(m, "_rankmoe_routing_cache")]

        def infer() -> None:
            step()
            for cache in caches:
                cache.clear()
            with torch.no_grad():
                model(x)

        return infer

    model.train()
    x_grad = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(model(x))

    def train_step() -> None:
        step()
        x_grad.grad = None
        for p in params:
            p.grad = None
        model(x_grad).backward(grad_out)

    train_step.owned = [*model.parameters(), *model.buffers()]  # type: ignore[attr-defined]
    return train_step


def saved_for_backward_mib(fn: Callable[[], None]) -> float | None:
    """MiB of tensors autograd saves for backward during one call, beyond the weights.

    Counted on every device (the activation memory a training step keeps between forward and backward, the part
    of its peak that grows with the batch): every storage saved by an op during the call, once, the layer input
    included (LoRA keeps it for ``A``'s gradient; a frozen base layer alone does not), except the model's
    parameters and buffers. ``None`` for inference calls.
    """
    owned = getattr(fn, "owned", None)
    if owned is None:
        return None
    known = {t.untyped_storage().data_ptr() for t in owned}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values()) / 2**20


@contextlib.contextmanager
def conditions(models: dict[str, nn.Module], variants: dict[str, Variant], cond: torch.Tensor) -> Iterator[None]:
    """Enter ``rankmoe.condition(model, cond)`` once for every variant that needs a condition.

    The context is entered around the whole measurement (as a user wraps one network forward), not per call.
    """
    with contextlib.ExitStack() as stack:
        for name, model in models.items():
            if variants[name].needs_condition:
                stack.enter_context(rankmoe.condition(model, cond))
        yield


def time_per_call(fn: Callable[[], None], number: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls between two syncs."""
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - start) / number


def calls_per_sample(fn: Callable[[], None], sync: Callable[[], None], min_sample_s: float) -> int:
    """How many back-to-back calls one timed sample needs to last at least ``min_sample_s``."""
    if min_sample_s <= 0:
        return 1
    return max(1, math.ceil(min_sample_s / max(time_per_call(fn, 1, sync), 1e-9)))


@dataclass
class Measurement:
    """Timings of one variant on one shape in one mode (milliseconds per call).

    Args:
        shape: ``LayerShape.name``.
        mode: ``"inference"`` or ``"training"``.
        variant: ``Variant.name``.
        samples_ms: Every timed sample (time per call), in round order.
        number: Calls averaged per sample.
        peak_mib: Extra peak CUDA memory of one call, or ``None``.
        saved_mib: Tensors saved for backward by one training call (MiB, every device), or ``None``.
        compile_stats: With ``--compile``: Dynamo graphs and graph breaks of the warm-up, else ``None``.
    """

    shape: str
    mode: str
    variant: str
    samples_ms: list[float]
    number: int
    peak_mib: float | None = None
    saved_mib: float | None = None
    compile_stats: dict[str, int] | None = None
    median_ms: float = field(init=False)
    min_ms: float = field(init=False)
    iqr_ms: float = field(init=False)
    ratio_base: float | None = None
    ratio_lora: float | None = None
    peak_ratio_base: float | None = None
    peak_ratio_lora: float | None = None
    saved_ratio_lora: float | None = None

    def __post_init__(self) -> None:
        self.median_ms = statistics.median(self.samples_ms)
        self.min_ms = min(self.samples_ms)
        if len(self.samples_ms) >= 2:
            quartiles = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
            self.iqr_ms = quartiles[2] - quartiles[0]
        else:
            self.iqr_ms = 0.0


def warm_up(fn: Callable[[], None], count: int, compiled: bool) -> dict[str, int] | None:
    """Call ``fn`` ``count`` times; with ``compiled``, return the Dynamo graphs and graph breaks this caused."""
    if compiled:
        torch._dynamo.utils.counters.clear()
    for _ in range(count):
        fn()
    if not compiled:
        return None
    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(counters["graph_break"].values())}


def measure(
    calls: dict[str, Callable[[], None]],
    args: argparse.Namespace,
    device: torch.device,
    progress: tqdm,
) -> dict[str, dict[str, Any]]:
    """Warm up every call, then time them in interleaved rounds with the order rotated every round.

    Peak memory is taken from one call after the warm-up.

    Returns:
        Per variant the keyword arguments of :class:`Measurement` other than shape, mode and variant.
    """
    sync = synchronizer(device)
    names = list(calls)
    extra: dict[str, dict[str, Any]] = {name: {} for name in names}
    for name in names:
        extra[name]["compile_stats"] = warm_up(calls[name], max(args.warmup, 1), args.compile)
        extra[name]["peak_mib"] = peak_memory_mib(calls[name], device)
        if not args.compile:
            extra[name]["saved_mib"] = saved_for_backward_mib(calls[name])
    number = {name: calls_per_sample(calls[name], sync, args.min_sample_ms / 1e3) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(1e3 * time_per_call(calls[name], number[name], sync))
        progress.update(1)
    return {name: {"samples_ms": samples[name], "number": number[name], **extra[name]} for name in names}


# ---------------------------------------------------------------------------------------------------- checks
def _layer(model: nn.Module) -> nn.Module:
    return model.get_base_model().layer


def check_shape(
    models: dict[str, nn.Module], variants: dict[str, Variant], x: torch.Tensor, cond: torch.Tensor
) -> dict[str, Any]:
    """Sanity checks before timing: every adapter changes the output, and all-shared RankMoE equals PEFT LoRA.

    For the second check the LoRA weights are copied into the all-shared RankMoE adapter (same scaling
    ``lora_alpha / r``), so both compute ``W x + (alpha / r) B A x``.

    Returns:
        ``relative_delta`` per variant (``|y - y_base| / |y_base|``, finite and > 0 expected) and
        ``shared_vs_lora_max_abs`` / ``shared_vs_lora_rel``.
    """
    result: dict[str, Any] = {"relative_delta": {}}
    with torch.no_grad(), conditions(models, variants, cond):
        for model in models.values():
            model.eval()
        y_base = models[BASE](x).float()
        for path in (*PATH_VARIANTS, "rerouted"):  # the same weights as the auto variant: the same function
            name = f"rankmoe_condition_{path}"
            if name in models and "rankmoe_condition" in models:
                models[name].load_state_dict(models["rankmoe_condition"].state_dict())
        outputs = {}
        result["paths"], result["paths_vs_auto_rel"] = {}, {}
        for name, model in models.items():
            if name != BASE:
                outputs[name] = model(x).float()
                result["relative_delta"][name] = float((outputs[name] - y_base).norm() / y_base.norm())
                taken = getattr(_layer(model), "last_execution_paths", {}).get("default")
                if taken is not None:
                    result["paths"][name] = taken
        for path in PATH_VARIANTS:
            name = f"rankmoe_condition_{path}"
            if name in outputs and "rankmoe_condition" in outputs:
                ref = outputs["rankmoe_condition"]
                result["paths_vs_auto_rel"][path] = float((outputs[name] - ref).norm() / ref.norm())
        if LORA in models and "rankmoe_shared" in models:
            lora, shared = _layer(models[LORA]), _layer(models["rankmoe_shared"])
            shared.rankmoe_A["default"].copy_(lora.lora_A["default"].weight)
            shared.rankmoe_B["default"].copy_(lora.lora_B["default"].weight)
            y_lora, y_shared = models[LORA](x).float(), models["rankmoe_shared"](x).float()
            result["shared_vs_lora_max_abs"] = float((y_shared - y_lora).abs().max())
            result["shared_vs_lora_rel"] = float((y_shared - y_lora).norm() / y_lora.norm())
    return result


# ---------------------------------------------------------------------------------------------------- runs
def run_shape(
    shape: LayerShape, variants: list[Variant], args: argparse.Namespace, progress: tqdm
) -> tuple[list[Measurement], dict[str, Any]]:
    """Build every variant on one shape, check them, and time both modes."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    base_layer = make_base_layer(shape, device, dtype)
    x = make_input(shape, device, dtype)
    cond = torch.rand(shape.batch, CONDITION_DIM, device=device, dtype=dtype)
    by_name = {v.name: v for v in variants}
    models = {v.name: build_model(v, base_layer, args.autocast_adapter_dtype) for v in variants}
    check = check_shape(models, by_name, x, cond)
    check["adapter_dtypes"] = {name: adapter_dtypes(m) for name, m in models.items() if name != BASE}
    if args.compile:
        models = {name: torch.compile(m, mode=args.compile_mode, dynamic=False) for name, m in models.items()}
    measurements: list[Measurement] = []
    for mode in MODES:
        progress.set_postfix_str(f"{shape.name} {mode}")
        with conditions(models, by_name, cond):
            cuda_graphs = args.compile and args.compile_mode == "reduce-overhead"
            calls = {name: make_call(m, x, mode, cuda_graphs, by_name[name].reroute) for name, m in models.items()}
            timed = measure(calls, args, device, progress)
        measurements += [Measurement(shape.name, mode, name, **timed[name]) for name in calls]
    add_ratios(measurements)
    return measurements, check


def add_ratios(measurements: list[Measurement]) -> None:
    """Fill the ratios of median time (and peak memory) against the base layer and PEFT LoRA, per mode."""
    for mode in MODES:
        rows = {m.variant: m for m in measurements if m.mode == mode}
        for row in rows.values():
            for ref_name, attr in ((BASE, "base"), (LORA, "lora")):
                ref = rows.get(ref_name)
                if ref is None:
                    continue
                setattr(row, f"ratio_{attr}", row.median_ms / ref.median_ms)
                if row.peak_mib is not None and ref.peak_mib:
                    setattr(row, f"peak_ratio_{attr}", row.peak_mib / ref.peak_mib)
            lora = rows.get(LORA)
            if row.saved_mib is not None and lora is not None and lora.saved_mib:
                row.saved_ratio_lora = row.saved_mib / lora.saved_mib


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive numbers."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(measurements: list[Measurement], variants: list[Variant]) -> dict[str, dict[str, dict[str, float]]]:
    """Geometric mean over shapes of each ratio, per mode and variant."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode in MODES:
        summary[mode] = {}
        for variant in variants:
            rows = [m for m in measurements if m.mode == mode and m.variant == variant.name]
            entry = {}
            for key in ("ratio_base", "ratio_lora"):
                values = [getattr(m, key) for m in rows if getattr(m, key) is not None]
                if values:
                    entry[f"geomean_{key}"] = geomean(values)
            summary[mode][variant.name] = entry
    return summary


# ---------------------------------------------------------------------------------------------------- report

def default_name(args: argparse.Namespace, device: torch.device) -> str:
    """Results file stem ``<cpu|card>-<shapes>-<dtype>[-compile[-<mode>]]``.

    For example ``cpu-small-float32`` or ``nvidia-h100-80gb-hbm3-sd-bfloat16``.
    """
    card = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    suffix = ""
    if args.compile:
        suffix = "-compile" + ("" if args.compile_mode == "default" else f"-{args.compile_mode}")
    return f"{card}-{args.shapes}-{args.dtype}{suffix}"


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Versions, machine and settings recorded with the results."""
    return {
        "card": device_name(device),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "rankmoe": rankmoe.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "autocast_adapter_dtype": args.autocast_adapter_dtype,
        "shapes": args.shapes,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "min_sample_ms": args.min_sample_ms,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _load(env: dict[str, Any]) -> str:
    load = env.get("load_average_1_5_15")
    return "n/a" if not load else " / ".join(f"{v:.1f}" for v in load)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown_report(
    env: dict[str, Any],
    shapes: list[LayerShape],
    variants: list[Variant],
    measurements: list[Measurement],
    checks: dict[str, dict[str, Any]],
    summary: dict[str, dict[str, dict[str, float]]],
) -> str:
    """The Markdown report: environment, summary ratios, one table per mode, checks."""
    lines = [
        f"# layer_bench: {env['card']}",
        "",
        f"device `{env['device']}` ({env['card']}), dtype `{env['dtype']}`, torch {env['torch']}, peft {env['peft']},"
        f" rankmoe {env['rankmoe']}, {env['threads']} threads, compile={env['compile']}"
        f"{' (' + env['compile_mode'] + ')' if env['compile'] else ''},"
        f" autocast_adapter_dtype={env['autocast_adapter_dtype']}, repeats={env['repeats']},"
        f" warmup={env['warmup']}, load average {_load(env)}, {env['date']}",
        "",
        f"Command: `{env['command']}`",
        "",
        "Ratios of median time per call within this run (×base: / bare base layer; ×LoRA: / PEFT LoRA"
        f" r={TOTAL_RANK}). Not comparable across machines or runs.",
        "",
        "## Variants",
        "",
        *[f"- `{v.name}`: {v.description}" for v in variants],
        "",
        "## Shapes",
        "",
        *[f"- `{s.name}`: {s.describe()}" for s in shapes],
        "",
        "## Summary (geometric mean over shapes)",
        "",
        "| variant | inference ×base | inference ×LoRA | training ×base | training ×LoRA |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        inf, tr = summary["inference"][v.name], summary["training"][v.name]
        lines.append(
            f"| {v.name} | {_fmt(inf.get('geomean_ratio_base'))} | {_fmt(inf.get('geomean_ratio_lora'))} |"
            f" {_fmt(tr.get('geomean_ratio_base'))} | {_fmt(tr.get('geomean_ratio_lora'))} |"
        )
    lines += target_lines(measurements, summary)
    for mode in MODES:
        lines += _mode_table(mode, shapes, variants, measurements)
    lines += _checks_table(checks)
    return "\n".join(lines) + "\n"


def _mode_table(mode: str, shapes: list[LayerShape], variants: list[Variant], rows: list[Measurement]) -> list[str]:
    title = "forward, no_grad" if mode == "inference" else "forward + backward"
    index = {(m.shape, m.variant): m for m in rows if m.mode == mode}
    compiled = any(m.compile_stats is not None for m in index.values())
    lines = [
        "",
        f"## {mode} ({title})",
        "",
        "| shape | variant | median ms | min ms | IQR ms | ×base | ×LoRA | peak MiB | peak ×LoRA | saved MiB |"
        " saved ×LoRA |" + (" graphs / breaks |" if compiled else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if compiled else ""),
    ]
    for shape in shapes:
        for v in variants:
            m = index[(shape.name, v.name)]
            line = (
                f"| {shape.name} | {v.name} | {m.median_ms:.3f} | {m.min_ms:.3f} | {m.iqr_ms:.3f} |"
                f" {_fmt(m.ratio_base)} | {_fmt(m.ratio_lora)} | {_fmt(m.peak_mib, '.1f')} |"
                f" {_fmt(m.peak_ratio_lora)} | {_fmt(m.saved_mib, '.1f')} | {_fmt(m.saved_ratio_lora)} |"
            )
            if compiled and m.compile_stats is not None:
                line += f" {m.compile_stats['graphs']} / {m.compile_stats['graph_breaks']} |"
            lines.append(line)
    return lines


def target_lines(measurements: list[Measurement], summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's targets read off this run: training vs LoRA(R), per-image inference vs base and LoRA(R), memory."""
    lines = ["", "## Targets", ""]
    routed = [m for m in measurements if m.variant.startswith("rankmoe")]
    for mode in MODES:
        rows = [m for m in routed if m.mode == mode and m.ratio_lora is not None]
        if rows:
            worst = max(rows, key=lambda m: m.ratio_lora)
            auto = [m.ratio_lora for m in rows if m.variant == "rankmoe_condition"]
            lines.append(
                f"- {mode}: `rankmoe_condition` (auto) ×LoRA(R) per shape {min(auto):.2f}–{max(auto):.2f};"
                f" worst RankMoE variant {worst.variant} on {worst.shape}: {worst.ratio_lora:.2f}× LoRA(R)"
            )
    auto = summary["inference"].get("rankmoe_condition", {})
    if auto:
        lines.append(
            f"- inference, per-sample routing, automatic path: geometric mean {auto['geomean_ratio_base']:.2f}× base,"
            f" {auto['geomean_ratio_lora']:.2f}× PEFT LoRA(R) (targets on the `paper` preset, CPU: ≤ 1.05 and ≤ 0.8)"
        )
    groups = {
        "per-sample routing and all-shared, automatic path": ("rankmoe_shared", "rankmoe_pooled", "rankmoe_condition"),
        "per-token routing (router logits, probabilities and per-token gates kept)": ("rankmoe_token",),
        "merge forced in training (a merged weight per sample kept; auto never merges in training)": (
            "rankmoe_condition_merge",
        ),
    }
    for attr, label in (("saved_ratio_lora", "saved for backward"), ("peak_ratio_lora", "peak memory")):
        for group, names in groups.items():
            values = [(getattr(m, attr), m) for m in routed if m.variant in names and getattr(m, attr) is not None]
            if values:
                ratio, row = max(values, key=lambda item: item[0])
                lines.append(
                    f"- {label}, {group}: at most {ratio:.2f}× PEFT LoRA(R) ({row.variant}, {row.shape}, {row.mode})"
                )
    return lines


def _checks_table(checks: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Checks (before timing)",
        "",
        "Relative output change |y − y_base| / |y_base| per variant (must be > 0: adapters are initialised"
        " non-trivially), and all-shared RankMoE vs PEFT LoRA with copied weights (relative difference).",
        "",
        "`auto path`: the path `rankmoe_condition` (execution_path='auto') took at inference; `paths vs auto`: relative"
        " difference of each forced path's output from it.",
        "",
        "| shape | relative delta per variant | shared vs LoRA (rel) | auto path | paths vs auto (rel) |"
        " adapter dtypes |",
        "|---|---|---|---|---|---|",
    ]
    for name, check in checks.items():
        deltas = ", ".join(f"{k} {v:.3g}" for k, v in check["relative_delta"].items())
        dtypes = ", ".join(sorted({d for ds in check["adapter_dtypes"].values() for d in ds}))
        auto = check.get("paths", {}).get("rankmoe_condition", "–")
        agree = ", ".join(f"{k} {v:.1e}" for k, v in check.get("paths_vs_auto_rel", {}).items()) or "–"
        lines.append(
            f"| {name} | {deltas} | {_fmt(check.get('shared_vs_lora_rel'), '.2e')} | {auto} | {agree} | {dtypes} |"
        )
    return lines


def write_results(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/results/<name>.json`` and ``.md``; return both paths."""
    results = out_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    json_path, md_path = results / f"{name}.json", results / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--shapes", choices=tuple(SHAPE_PRESETS), default="small", help="layer shape preset")
    parser.add_argument("--layers", default=None, help="comma-separated shape names of the preset to keep")
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated variants to keep ({BASE} and {LORA} are always kept)"
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (samples) per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant before timing")
    parser.add_argument(
        "--min-sample-ms",
        type=float,
        default=None,
        help="average enough back-to-back calls per sample to last this long (default: 2 on cuda, 0 on cpu)",
    )
    parser.add_argument("--compile", action="store_true", help="wrap every model in torch.compile")
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        default="default",
        help="torch.compile mode (reduce-overhead = CUDA graphs on cuda)",
    )
    parser.add_argument(
        "--no-autocast-adapter-dtype",
        dest="autocast_adapter_dtype",
        action="store_false",
        help="keep adapters in the base dtype (PEFT's default upcasts bf16/fp16 adapters to float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 1 on cpu, where two threads on a shared box are very noisy; "
        "torch's choice on cuda)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="writes <out>/results/")
    parser.add_argument("--name", default=None, help="results file stem (default <cpu|card>-<shapes>-<dtype>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.min_sample_ms is None:
        args.min_sample_ms = 2.0 if args.device == "cuda" else 0.0
    return args


def select(items: Sequence[Any], names: str | None, keep: Sequence[str] = ()) -> list[Any]:
    """Items whose ``.name`` is in the comma-separated ``names`` (all when ``None``) or in ``keep``.

    Raises:
        SystemExit: Naming unknown names.
    """
    if names is None:
        return list(items)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {item.name for item in items}
    if unknown:
        raise SystemExit(f"unknown name(s) {sorted(unknown)}; choose from {[item.name for item in items]}")
    return [item for item in items if item.name in wanted or item.name in keep]


def raise_recompile_limits(limit: int = 256) -> None:
    """Let Dynamo compile every variant and mode.

    All ``PeftModel`` instances share the code object of ``PeftModel.forward``, so the variants together count
    against one recompile limit (8 by default); past it Dynamo silently runs the remaining ones eagerly.
    """
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the results and print the Markdown report."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile:
        raise_recompile_limits()
    shapes = select(SHAPE_PRESETS[args.shapes], args.layers)
    variants = select(make_variants(), args.variants, keep=(BASE, LORA))
    measurements: list[Measurement] = []
    checks: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(shapes) * len(MODES) * args.repeats, desc="layer_bench", unit="round") as progress:
        for shape in shapes:
            rows, checks[shape.name] = run_shape(shape, variants, args, progress)
            measurements += rows
    summary = summarize(measurements, variants)
    env = environment(args, device)
    payload = {
        "environment": env,
        "variants": {v.name: v.description for v in variants},
        "shapes": {s.name: {**asdict(s), "description": s.describe()} for s in shapes},
        "summary": summary,
        "measurements": [asdict(m) for m in measurements],
        "checks": checks,
    }
    markdown = markdown_report(env, shapes, variants, measurements, checks, summary)
    json_path, md_path = write_results(args.out, args.name or default_name(args, device), payload, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()
