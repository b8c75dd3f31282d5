"""GPU benchmark of one adapted layer: bare layer vs PEFT LoRA vs RankMoE (MoR config) on each execution path.

Per layer shape, on the same base weights and input, it times ``base`` (bare ``nn.Linear`` / 3x3 ``nn.Conv2d``),
``lora_R`` / ``lora_k`` (PEFT LoRA r=40 / r=16) and the MoR config (r=40: 8 shared + top-8 of 32 rank-1 experts +
4 zero slots, condition router) forced onto ``execution_path`` dense / gather / merge, and on auto; in
``inference`` (``eval()``, ``no_grad``) and ``training`` (forward + backward into the adapter and the input);
eager, ``torch.compile`` (Inductor, ``--compile-shapes``) and replayed ``torch.cuda.CUDAGraph``. Every RankMoE
path is first checked against the dense path. Run from the repository root::

    PYTHONPATH=. python benchmarks/gpu_bench.py --device cpu --out /tmp/gpu_bench_dry   # CPU dry run, < 1 min
    PYTHONPATH=. python benchmarks/gpu_bench.py --out benchmarks/results                # one GPU, bf16

Writes ``<out>/<card-slug>-gpu-bench.json`` and ``.md`` after every shape; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from bench_common import Wrapper, device_name, peak_memory_mib
from peft import LoraConfig, get_peft_model
from torch import nn

if importlib.util.find_spec("rankmoe") is None:  # run without PYTHONPATH=. : import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rankmoe  # noqa: E402
from rankmoe import RankMoEConfig  # noqa: E402

START = time.monotonic()
MODES = ("inference", "training")
PATHS = ("dense", "gather", "merge", "auto")
VARIANTS = ("base", "lora_R", "lora_k", *(f"rankmoe_{p}" for p in PATHS), "rankmoe_auto_rerouted")
"""``rankmoe_auto_rerouted``: auto with the routing recomputed every call (a new image per call, as in one-step
SR); the other RankMoE variants reuse the routing of the condition, as over the steps of a diffusion sampler."""
KINDS = ("eager", "compiled", "cudagraph")
RATIO_KEYS = tuple(f"{k}_x_{ref}" for k in KINDS for ref in ("base", "lora_R"))
TOTAL_RANK, ACTIVE_RANK, CONDITION_DIM = 40, 16, 7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Timer = Callable[[Callable[[], None]], float]


@dataclass(frozen=True)
class Shape:
    """``linear`` on ``(batch, size, features)`` or 3x3 ``conv`` on ``(batch, features, size, size)``."""

    name: str
    kind: str
    batch: int
    size: int
    features: int
    paper: bool = False  # in the summary geomeans


GPU_SHAPES = (  # the paper set first, so that a budget stop keeps it complete
    Shape("linear320", "linear", 1, 4096, 320, True), Shape("linear640", "linear", 1, 1024, 640, True),
    Shape("linear1280", "linear", 1, 256, 1280, True), Shape("linear1280_t64", "linear", 1, 64, 1280, True),
    Shape("conv320", "conv", 1, 64, 320, True), Shape("conv640", "conv", 1, 32, 640, True),
    Shape("conv1280", "conv", 1, 16, 1280, True), Shape("linear640_b4", "linear", 4, 1024, 640),
    Shape("linear4096_b16_t1", "linear", 16, 1, 4096), Shape("linear4096_t2048", "linear", 1, 2048, 4096),
    Shape("conv640_b4", "conv", 4, 32, 640),
)
CPU_SHAPES = (Shape("linear32", "linear", 1, 64, 32, True), Shape("conv8", "conv", 1, 8, 8, True))
DEFAULT_COMPILE_GPU = "linear320,conv320"


class CheckError(RuntimeError):
    """A RankMoE path disagrees with the dense path, or a forced path was not taken."""


@dataclass
class Row:
    """One variant on one shape in one mode: ms per call per timing kind (``None``: not measured)."""

    shape: str
    mode: str
    variant: str
    eager_ms: float | None = None
    compiled_ms: float | None = None
    cudagraph_ms: float | None = None
    peak_mib: float | None = None
    compile_graphs: int | None = None
    compile_breaks: int | None = None
    errors: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- models
def make_layer_and_input(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """``nn.Linear(d, d)`` with input ``(batch, size, d)``, or ``nn.Conv2d(d, d, 3, padding=1)`` with input
    ``(batch, d, size, size)``; random, on ``device`` in ``dtype``."""
    d = shape.features
    if shape.kind == "linear":
        layer, dims = nn.Linear(d, d), (shape.batch, shape.size, d)
    else:
        layer, dims = nn.Conv2d(d, d, 3, padding=1), (shape.batch, d, shape.size, shape.size)
    return layer.to(device=device, dtype=dtype), torch.randn(dims, device=device, dtype=dtype)


def rankmoe_config(path: str) -> RankMoEConfig:
    """The MoR configuration on execution path ``path``."""
    return RankMoEConfig(
        r=TOTAL_RANK, num_shared_ranks=8, top_k=8, num_zero_experts=4, expert_rank=1, lora_alpha=TOTAL_RANK,
        router="condition", router_kwargs={"condition_dim": CONDITION_DIM}, init_weights=False,
        target_modules=["layer"], execution_path=path,
    )


def build_models(layer: nn.Module, fp32_adapters: bool) -> dict[str, nn.Module]:
    """Every variant around a deep copy of ``layer``; the RankMoE variants share one set of adapter weights."""
    def adapt(config: peft.PeftConfig) -> nn.Module:
        return get_peft_model(Wrapper(copy.deepcopy(layer)), config, autocast_adapter_dtype=fp32_adapters)

    models: dict[str, nn.Module] = {"base": Wrapper(copy.deepcopy(layer)).requires_grad_(False)}
    for name, r in (("lora_R", TOTAL_RANK), ("lora_k", ACTIVE_RANK)):
        models[name] = adapt(LoraConfig(r=r, lora_alpha=r, init_lora_weights=False, target_modules=["layer"]))
    for path in (*PATHS, "auto_rerouted"):
        models[f"rankmoe_{path}"] = adapt(rankmoe_config(path.removesuffix("_rerouted")))
        models[f"rankmoe_{path}"].load_state_dict(models["rankmoe_dense"].state_dict())
    return models


def forget_routing(model: nn.Module) -> Callable[[], None]:
    """A function that drops the routing every RankMoE layer of ``model`` keeps for its condition."""
    caches = [m._rankmoe_routing_cache for m in model.modules() if hasattr(m, "_rankmoe_routing_cache")]

    def clear() -> None:
        for cache in caches:
            cache.clear()

    return clear


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def check_paths(models: dict[str, nn.Module], x: torch.Tensor, cond: torch.Tensor, tol: float) -> dict[str, Any]:
    """Compare every RankMoE path's output with the dense path's, and check the path taken, in both modes.

    Returns:
        ``{"rel_err": {"<mode>/<variant>": e}, "update_rel": {mode: ||y_dense - y_base|| / ||y_base||},
        "auto": {mode: path taken by "auto"}, "adapter_dtypes": {variant: [dtype, ...]}}``.

    Raises:
        CheckError: A relative error ``>= tol``, or a forced path that was not taken.
    """
    report: dict[str, Any] = {"rel_err": {}, "update_rel": {}, "auto": {}, "adapter_dtypes": {
        n: sorted({str(p.dtype) for p in m.parameters() if p.requires_grad}) for n, m in models.items() if n != "base"
    }}
    with torch.no_grad():
        base_out = models["base"](x)
    for mode in MODES:
        outs = {}
        for path in PATHS:
            model = models[f"rankmoe_{path}"].train(mode == "training")
            with rankmoe.condition(model, cond), torch.set_grad_enabled(mode == "training"):
                outs[path] = model(x).detach()
            taken = model.get_base_model().layer.last_execution_paths["default"]
            if path == "auto":
                report["auto"][mode] = taken
            elif taken != path:
                raise CheckError(f"{mode}: execution_path={path!r} but the layer took {taken!r}")
        report["update_rel"][mode] = relative_error(outs["dense"], base_out)
        for path, out in outs.items():
            err = report["rel_err"][f"{mode}/rankmoe_{path}"] = relative_error(out, outs["dense"])
            if not err < tol:
                raise CheckError(f"{mode}: rankmoe_{path} vs rankmoe_dense relative error {err:.3g} >= {tol}")
    return report


# ---------------------------------------------------------------------------------------------------- timing
def make_call(
    model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mode: str, reroute: bool = False
) -> Callable[[], None]:
    """One forward under ``no_grad`` (``inference``, sets ``eval()``) or forward + backward of ``grad_out`` into
    the trainable parameters and a copy of ``x``, gradients set to ``None`` first (``training``, sets ``train()``)."""
    if mode == "inference":
        model.eval()
        forget = forget_routing(model) if reroute else (lambda: None)

        def infer() -> None:
            forget()
            with torch.no_grad():
                model(x)

        return infer
    model.train()
    x_req = x.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        x_req.grad = None
        for p in params:
            p.grad = None
        model(x_req).backward(grad_out)

    return train_step


def make_timer(device: torch.device) -> tuple[Timer, str]:
    """A timer returning the median ms per call of ``fn``, and its description.

    On CUDA ``triton.testing.do_bench(fn, warmup=25, rep=100)`` (median) when triton imports, else CUDA events
    around each of 50 calls after 10; on CPU wall clock around each of 5 calls after 2.
    """
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            from triton.testing import do_bench

            params = inspect.signature(do_bench).parameters
            extra: dict[str, Any] = {"return_mode": "median"} if "return_mode" in params else {"quantiles": [0.5]}

            def bench(fn: Callable[[], None]) -> float:
                value = do_bench(fn, warmup=25, rep=100, **extra)
                return float(value[0] if isinstance(value, (list, tuple)) else value)

            return bench, "triton do_bench(warmup=25, rep=100), median"
    cuda = device.type == "cuda"
    warmup, number = (10, 50) if cuda else (2, 5)

    def loop(fn: Callable[[], None]) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(number):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(samples)

    return loop, f"{'CUDA events' if cuda else 'wall clock'}, median of {number} calls after {warmup}"


def capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up 3 times on a side stream, then capture one call into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def raise_recompile_limits(limit: int = 512) -> None:
    """All PeftModels share ``PeftModel.forward``'s code object, hence one Dynamo recompile limit: raise it."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def measure(row: Row, model: nn.Module, compiled: nn.Module | None, inputs: tuple[torch.Tensor, torch.Tensor],
            timer: Timer, args: argparse.Namespace) -> None:
    """Fill ``row``: eager time and peak memory, CUDA-graph replay time (CUDA), compiled time and Dynamo counts.

    Failures of the CUDA-graph and compiled timings are recorded in ``row.errors``, not raised.
    """
    reroute = row.variant.endswith("_rerouted")
    call = make_call(model, *inputs, row.mode, reroute)
    row.eager_ms = timer(call)
    row.peak_mib = peak_memory_mib(call, inputs[0].device)
    if inputs[0].device.type == "cuda":
        try:
            graph = capture(call)
            row.cudagraph_ms = timer(graph.replay)
            del graph
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            row.errors["cudagraph"] = error_text(exc)
            torch.cuda.synchronize()
    if compiled is None:
        return
    if time.monotonic() - START > args.budget_s:
        row.errors["compiled"] = "skipped: over --budget-s"
        return
    try:
        compiled_call = make_call(compiled, *inputs, row.mode, reroute)
        counters = torch._dynamo.utils.counters
        counters.clear()
        for _ in range(3):
            compiled_call()
        row.compile_graphs = int(counters["stats"]["unique_graphs"])
        row.compile_breaks = int(sum(counters["graph_break"].values()))
        row.compiled_ms = timer(compiled_call)
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        row.errors["compiled"] = error_text(exc)


def run_shape(shape: Shape, compile_it: bool, timer: Timer, args: argparse.Namespace
              ) -> tuple[list[Row], dict[str, Any]]:
    """Check, then time every variant on ``shape`` in both modes.

    Raises:
        CheckError: The correctness check failed (nothing was timed).
    """
    torch.manual_seed(args.seed)
    layer, x = make_layer_and_input(shape, torch.device(args.device), DTYPES[args.dtype])
    models = build_models(layer, args.fp32_adapters)
    cond = torch.rand(shape.batch, CONDITION_DIM, device=x.device, dtype=x.dtype)
    check = check_paths(models, x, cond, tol=1e-4 if x.dtype == torch.float32 else 2e-2)
    compiled = {n: torch.compile(m, fullgraph=False, dynamic=False) for n, m in models.items()} if compile_it else {}
    rows = []
    for mode in MODES:
        inputs = (x, torch.randn_like(x))  # the output has the input's shape for both layer kinds
        for name, model in models.items():
            row = Row(shape.name, mode, name)
            conditioned = rankmoe.condition(model, cond) if name.startswith("rankmoe_") else contextlib.nullcontext()
            with conditioned:  # entered once around all measurements of the variant
                measure(row, model, compiled.get(name), inputs, timer, args)
            rows.append(row)
        times = ", ".join(f"{r.variant} " + "/".join(fmt(getattr(r, f"{k}_ms"), ".3f") for k in KINDS)
                          for r in rows[-len(models):])
        log(f"  {shape.name} {mode} ms eager/compiled/cudagraph: {times}")
    if compile_it:
        torch._dynamo.reset()
    return rows, check


# ---------------------------------------------------------------------------------------------------- results
def add_ratios(rows: list[Row]) -> None:
    """Set ``<kind>_x_base`` / ``<kind>_x_lora_R`` per timing kind and ``peak_x_*`` ratios, per shape and mode."""
    index = {(r.shape, r.mode, r.variant): r for r in rows}
    for row in rows:
        for ref_name in ("base", "lora_R"):
            ref = index.get((row.shape, row.mode, ref_name))
            for kind, attr in [*((k, f"{k}_ms") for k in KINDS), ("peak", "peak_mib")]:
                value, ref_value = getattr(row, attr), None if ref is None else getattr(ref, attr)
                if value is not None and ref_value:
                    row.ratios[f"{kind}_x_{ref_name}"] = value / ref_value


def summarize(rows: list[Row], paper: set[str]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{mode: {variant: {ratio key: {"geomean": g, "n": shapes}}}}`` over the paper shapes."""
    summary: dict[str, Any] = {mode: {} for mode in MODES}
    for mode in MODES:
        for variant in VARIANTS:
            picked = [r for r in rows if r.mode == mode and r.variant == variant and r.shape in paper]
            entry = summary[mode][variant] = {}
            for key in RATIO_KEYS:
                values = [r.ratios[key] for r in picked if key in r.ratios]
                if values:
                    entry[key] = {"geomean": math.exp(statistics.fmean(map(math.log, values))), "n": len(values)}
    return summary


def fmt(value: float | None, spec: str = ".2f") -> str:
    """``value`` formatted, or an en dash for ``None``."""
    return "–" if value is None else format(value, spec)


def mode_table(mode: str, rows: list[Row]) -> list[str]:
    """Markdown table of one mode: ms and ratios per timing kind, Dynamo graphs / breaks, peak memory, errors."""
    lines = ["", f"## {mode}", "", "| shape | variant |" + "".join(f" {k} ms | ×base | ×lora_R |" for k in KINDS)
             + " graphs / breaks | peak MiB | peak ×lora_R | notes |", "|---" * 15 + "|"]
    for r in (r for r in rows if r.mode == mode):
        cells = [r.shape, r.variant]
        for kind in KINDS:
            cells += [fmt(getattr(r, f"{kind}_ms"), ".3f"), *(fmt(r.ratios.get(f"{kind}_x_{ref}"))
                                                              for ref in ("base", "lora_R"))]
        graphs = "–" if r.compile_graphs is None else f"{r.compile_graphs} / {r.compile_breaks}"
        notes = "; ".join(f"{k}: {v}" for k, v in r.errors.items()).replace("|", "/")
        lines.append("| " + " | ".join([*cells, graphs, fmt(r.peak_mib, ".1f"), fmt(r.ratios.get("peak_x_lora_R")),
                                        notes]) + " |")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report of a (possibly partial) run."""
    env = payload["environment"]
    paper_done = [s for s in payload["shapes_done"] if s in payload["paper_shapes"]]
    lines = [
        f"# gpu_bench: {env['card']}", "", ", ".join(f"{k} `{v}`" for k, v in env.items() if k != "command"), "",
        f"Command: `{env['command']}`", "",
        f"Median ms per call; ratios within this run (×base: / bare layer; ×lora_R: / PEFT LoRA r={TOTAL_RANK}). "
        f"lora_k: PEFT LoRA r={ACTIVE_RANK}. rankmoe_*: the MoR config on a forced execution path (auto: the "
        "library's choice). compiled: torch.compile default mode (Inductor), shapes "
        f"{', '.join(payload['compiled_shapes']) or 'none'}. cudagraph: one captured eager call, replayed. "
        "Training: forward + backward into the adapter parameters and the input.",
        "", f"## Summary: geomean over the paper shapes done ({', '.join(paper_done)})", "",
        "(n): over n shapes only.", "",
        "| mode | variant |" + "".join(f" {key.replace('_x_', ' ×')} |" for key in RATIO_KEYS), "|---" * 8 + "|",
    ]
    for mode, per_variant in payload["summary"].items():
        for variant, entry in per_variant.items():
            cells = ["–" if key not in entry else f"{entry[key]['geomean']:.2f}"
                     + ("" if entry[key]["n"] == len(paper_done) else f" ({entry[key]['n']})") for key in RATIO_KEYS]
            lines.append(f"| {mode} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "## auto choices and checks", "",
              "| shape | auto inference | auto training | max rel err vs dense | update rel | adapter dtypes |",
              "|---" * 6 + "|"]
    for name, check in payload["checks"].items():
        if "error" in check:
            lines.append(f"| {name} | CHECK FAILED: {check['error']} | | | | |")
            continue
        dtypes = ", ".join(sorted({d for ds in check["adapter_dtypes"].values() for d in ds}))
        lines.append(f"| {name} | {check['auto']['inference']} | {check['auto']['training']} |"
                     f" {max(check['rel_err'].values()):.2e} | {check['update_rel']['inference']:.3f} | {dtypes} |")
    if payload["shapes_skipped"]:
        lines += ["", f"Skipped (over --budget-s): {', '.join(payload['shapes_skipped'])}"]
    rows = [Row(**r) for r in payload["rows"]]
    return "\n".join([*lines, *mode_table("inference", rows), *mode_table("training", rows)]) + "\n"


def environment(args: argparse.Namespace, timer_name: str) -> dict[str, Any]:
    """Card, versions, settings and command line of this run."""
    triton_version = None
    with contextlib.suppress(Exception):
        import triton

        triton_version = triton.__version__
    return {
        "card": device_name(torch.device(args.device)), "torch": torch.__version__, "peft": peft.__version__,
        "triton": triton_version, "cuda": torch.version.cuda, "rankmoe": rankmoe.__version__,
        "python": platform.python_version(), "dtype": args.dtype, "adapters": "float32 (autocast_adapter_dtype=True)"
        if args.fp32_adapters else "base dtype (autocast_adapter_dtype=False)", "timer": timer_name,
        "budget_s": args.budget_s, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write(out: Path, stem: str, payload: dict[str, Any]) -> Path:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md``; return the Markdown path."""
    payload["environment"]["elapsed_s"] = round(time.monotonic() - START, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(payload))
    return out / f"{stem}.md"


def log(message: str) -> None:
    """Print a progress line with the seconds since the start, flushed."""
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: tiny dry run")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bfloat16 (cuda), float32 (cpu)")
    parser.add_argument("--fp32-adapters", action="store_true",
                        help="let get_peft_model upcast adapters to float32 (default: adapters in the base dtype)")
    parser.add_argument("--compile-shapes", default=None, help="'all', 'none', 'paper' or comma-separated shape "
                        f"names also timed under torch.compile (default {DEFAULT_COMPILE_GPU} on cuda, none on cpu)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names to run (default all)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new shape after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False (use --device cpu for the dry run)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def select_shapes(args: argparse.Namespace) -> tuple[list[Shape], set[str]]:
    """The shapes to run and the names of those also timed compiled."""
    available = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    spec = args.compile_shapes or (DEFAULT_COMPILE_GPU if args.device == "cuda" else "none")
    wanted = set((args.shapes or ",".join(s.name for s in available)).split(","))
    to_compile = set() if spec in ("all", "none", "paper") else set(spec.split(","))
    unknown = (wanted | to_compile) - {s.name for s in available}
    if unknown:
        raise SystemExit(f"unknown shape name(s) {sorted(unknown)}; choose from {[s.name for s in available]}")
    shapes = [s for s in available if s.name in wanted]
    if spec in ("all", "paper"):
        to_compile = {s.name for s in shapes if spec == "all" or s.paper}
    return shapes, to_compile


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, writing the results after every shape; return 1 when a correctness check failed."""
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # two threads on a shared box are far noisier
    shapes, to_compile = select_shapes(args)
    timer, timer_name = make_timer(torch.device(args.device))
    raise_recompile_limits()
    card = device_name(torch.device(args.device))
    stem = ("cpu" if args.device == "cpu" else re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")) + "-gpu-bench"
    payload: dict[str, Any] = {
        "environment": environment(args, timer_name), "shapes": {s.name: asdict(s) for s in shapes},
        "paper_shapes": [s.name for s in shapes if s.paper], "compiled_shapes": sorted(to_compile),
        "rows": [], "checks": {}, "summary": {}, "shapes_done": [], "shapes_skipped": [],
    }
    rows: list[Row] = []
    log(f"{card}: {len(shapes)} shapes, compiled: {sorted(to_compile) or 'none'}; timer: {timer_name}")
    for shape in shapes:
        if time.monotonic() - START > args.budget_s:
            payload["shapes_skipped"].append(shape.name)
            log(f"{shape.name}: skipped (over --budget-s {args.budget_s:g})")
            continue
        log(f"{shape.name}: {shape.kind}, batch {shape.batch}, size {shape.size}, d {shape.features}"
            + (", + torch.compile" if shape.name in to_compile else ""))
        try:
            shape_rows, payload["checks"][shape.name] = run_shape(shape, shape.name in to_compile, timer, args)
        except CheckError as exc:
            payload["checks"][shape.name] = {"error": str(exc)}
            log(f"  {shape.name}: CORRECTNESS CHECK FAILED, shape aborted: {exc}")
            continue
        rows += shape_rows
        add_ratios(rows)
        payload["shapes_done"].append(shape.name)
        payload.update(rows=[asdict(r) for r in rows], summary=summarize(rows, set(payload["paper_shapes"])))
        md = write(args.out, stem, payload)
        log(f"  {shape.name}: auto chose {payload['checks'][shape.name]['auto']}; wrote {md}")
    md = write(args.out, stem, payload)
    print(md.read_text().split("\n## inference")[0], flush=True)  # the per-shape tables are in the file
    failed = [name for name, check in payload["checks"].items() if "error" in check]
    log(f"done: {'CHECK FAILED for ' + ', '.join(failed) if failed else 'all checks passed'}; {md} and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
