"""End-to-end cost of a tiny SD-2.1-shaped diffusers UNet: bare, PEFT LoRA and RankMoE, side by side in one process.

The UNet is built from a config (no download) with SD 2.1's block layout and 64-wide attention heads, channels
``64 * width_mult * (1, 2, 4, 4)``. Every adapter (total rank 40) covers the same modules (``unet_target_modules``,
OSEDiff's preset). Variants: ``base`` (bare, frozen); ``lora`` (PEFT LoRA via ``unet.add_adapter``); ``rankmoe``
(the MoR configuration with a ``condition`` router via ``add_rankmoe``, ``execution_path="auto"``);
``rankmoe_dense`` (the same adapter weights, ``execution_path="dense"``).

Modes: ``inference`` (``eval()``, ``no_grad``, one forward at timestep 999, as in one-step SR) and ``training``
(``train()``, forward, ``out.sample.float().pow(2).mean()``, backward, ``AdamW.step()``, ``zero_grad``). In training
the latent requires grad (in OSEDiff it comes from the trained VAE encoder), so the frozen ``base`` has a backward
too (and no optimizer step). RankMoE variants run inside ``rankmoe.condition(unet, cond)``, entered once around
each mode's measurement (its own cost is reported separately). Times are medians of interleaved rounds, variant
order rotated every round, after warm-up calls; ratios are only meaningful within one run.

Run from the repository root (writes ``<out>/<name>.json`` and ``.md`` and prints the Markdown)::

    python benchmarks/unet_bench.py --repeats 2 --warmup 1 --latent 16 --out /tmp/unet_bench   # CPU smoke, < 1 min
    python benchmarks/unet_bench.py                                                             # CPU, 1 thread
    python benchmarks/unet_bench.py --device cuda --dtype bfloat16 --width-mult 5 --latent 64  # SD-2.1 widths
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch
from bench_common import device_name, peak_memory_mib, synchronizer
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from rankmoe.integrations.diffusers import add_rankmoe, unet_target_modules
from torch import nn
from tqdm.auto import tqdm

import rankmoe
from rankmoe import RankMoEConfig

MODES = ("inference", "training")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOTAL_RANK = 40
CONDITION_DIM = 7
CROSS_ATTENTION_DIM = 128
TEXT_TOKENS = 77
TIMESTEP = 999
HEAD_DIM = 64
MOR: dict[str, Any] = {"r": TOTAL_RANK, "num_shared_ranks": 8, "top_k": 8, "num_zero_experts": 4, "expert_rank": 1}
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Largest relative difference allowed between the ``auto`` and ``dense`` RankMoE outputs, per dtype (in bfloat16
the merged weight and the branch round differently, and the difference grows through the network)."""
VARIANTS: dict[str, str] = {
    "base": "the bare UNet (frozen)",
    "lora": f"PEFT LoraConfig(r={TOTAL_RANK}, lora_alpha={TOTAL_RANK}, init_lora_weights=False), unet.add_adapter",
    "rankmoe": "RankMoE MoR (" + ", ".join(f"{k}={v}" for k, v in MOR.items())
    + f", router='condition', condition_dim={CONDITION_DIM}), add_rankmoe, execution_path='auto'",
    "rankmoe_dense": "the same RankMoE adapter weights, execution_path='dense'",
}
NEEDS_CONDITION = ("rankmoe", "rankmoe_dense")


# ---------------------------------------------------------------------------------------------------- models
def build_unet(width_mult: int, latent: int) -> UNet2DConditionModel:
    """An SD-2.1-shaped UNet with channels ``64 * width_mult * (1, 2, 4, 4)`` and 64-wide attention heads."""
    channels = tuple(64 * width_mult * m for m in (1, 2, 4, 4))
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=tuple(c // HEAD_DIM for c in channels),  # diffusers reads it as the number of heads
        use_linear_projection=True, norm_num_groups=32,
    )


def rankmoe_config(names: list[str], execution_path: str) -> RankMoEConfig:
    """The MoR configuration on ``names`` with the given execution path."""
    return RankMoEConfig(
        **MOR, lora_alpha=TOTAL_RANK, router="condition", router_kwargs={"condition_dim": CONDITION_DIM},
        init_weights=False, target_modules=list(names), execution_path=execution_path,
    )


def build_variants(base: nn.Module, names: list[str], device: torch.device) -> dict[str, nn.Module]:
    """The four variants, each adapter on a deep copy of the frozen ``base``, on ``device`` in float32."""
    base.requires_grad_(False)
    lora = copy.deepcopy(base)
    lora.add_adapter(LoraConfig(r=TOTAL_RANK, lora_alpha=TOTAL_RANK, init_lora_weights=False, target_modules=names))
    moe = copy.deepcopy(base)
    add_rankmoe(moe, rankmoe_config(names, "auto"))
    dense = copy.deepcopy(base)
    add_rankmoe(dense, rankmoe_config(names, "dense"))
    dense.load_state_dict(moe.state_dict())
    models = {"base": base, "lora": lora, "rankmoe": moe, "rankmoe_dense": dense}
    for model in models.values():
        model.to(device=device, dtype=torch.float32)
    return models


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------- calls
@dataclass
class Inputs:
    """One batch: latent, text context, timestep and degradation condition."""

    sample: torch.Tensor
    text: torch.Tensor
    timestep: torch.Tensor
    cond: torch.Tensor


def make_inputs(batch: int, latent: int, device: torch.device) -> Inputs:
    """Random float32 inputs (``(b, 4, latent, latent)``, ``(b, 77, 128)``) and a ``(b, 7)`` condition."""
    return Inputs(
        sample=torch.randn(batch, 4, latent, latent, device=device),
        text=torch.randn(batch, TEXT_TOKENS, CROSS_ATTENTION_DIM, device=device),
        timestep=torch.full((batch,), TIMESTEP, device=device, dtype=torch.long),
        cond=torch.rand(batch, CONDITION_DIM, device=device),
    )


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The same inputs with the floating tensors in ``dtype``."""
    return Inputs(inputs.sample.to(dtype), inputs.text.to(dtype), inputs.timestep, inputs.cond.to(dtype))


def unet_out(model: nn.Module, sample: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """``model(sample, t, encoder_hidden_states=text).sample``."""
    return model(sample, inputs.timestep, encoder_hidden_states=inputs.text).sample


@contextlib.contextmanager
def conditioned(models: dict[str, nn.Module], cond: torch.Tensor) -> Iterator[None]:
    """Enter ``rankmoe.condition(model, cond)`` for every RankMoE variant."""
    with contextlib.ExitStack() as stack:
        for name in NEEDS_CONDITION:
            stack.enter_context(rankmoe.condition(models[name], cond))
        yield


def make_infer(model: nn.Module, inputs: Inputs) -> Callable[[], None]:
    """One ``eval()`` / ``no_grad`` forward."""
    model.eval()

    def infer() -> None:
        with torch.no_grad():
            unet_out(model, inputs.sample, inputs)

    return infer


def make_train_step(model: nn.Module, inputs: Inputs) -> Callable[[], None]:
    """Forward, squared-output loss, backward (into the adapter and the latent), ``AdamW.step()``, ``zero_grad``."""
    model.train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    sample = inputs.sample.detach().clone().requires_grad_(True)

    def train_step() -> None:
        sample.grad = None
        unet_out(model, sample, inputs).float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return train_step


# ---------------------------------------------------------------------------------------------------- measuring
def saved_for_backward_mib(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """MiB of the unique storages autograd saves during one training forward (no backward is run).

    Returns:
        ``activations``: storages that are not parameters or buffers of ``model``; ``with_params``: all of them.
    """
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    sample = inputs.sample.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet_out(model, sample, inputs)
    activations = sum(n for ptr, n in storages.items() if ptr not in owned)
    return {"activations": activations / 2**20, "with_params": sum(storages.values()) / 2**20}


def execution_paths(model: nn.Module) -> dict[str, int]:
    """How many RankMoE layers took each path in their last forward."""
    layers = rankmoe.rankmoe_layers(model)
    return dict(sorted(Counter(layer.last_execution_paths.get("default", "not called") for _, layer in layers).items()))


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, min and interquartile range of ``samples`` (ms)."""
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) >= 2 else [0.0, 0.0, 0.0]
    iqr = q[2] - q[0]
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "iqr_ms": iqr}


def measure(calls: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
            progress: tqdm) -> dict[str, dict[str, Any]]:
    """Warm up every call, take its peak memory, then time one call per variant per round, order rotated."""
    sync = synchronizer(device)
    names = list(calls)
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        for _ in range(warmup):
            calls[name]()
        rows[name] = {"peak_mib": peak_memory_mib(calls[name], device), "samples_ms": []}
    for index in range(repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            calls[name]()
            sync()
            rows[name]["samples_ms"].append(1e3 * (time.perf_counter() - start))
        progress.update(1)
    for row in rows.values():
        row.update(summarize(row["samples_ms"]))
    for row in rows.values():  # after every median is known
        row["x_base"] = row["median_ms"] / rows["base"]["median_ms"]
        row["x_lora"] = row["median_ms"] / rows["lora"]["median_ms"]
    return rows


def condition_overhead_ms(model: nn.Module, cond: torch.Tensor, number: int = 20) -> float:
    """Median milliseconds of entering and leaving ``rankmoe.condition(model, cond)`` once."""
    def enter_and_leave() -> None:
        with rankmoe.condition(model, cond):
            pass

    return 1e3 * statistics.median(timeit.repeat(enter_and_leave, number=1, repeat=number))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_outputs(models: dict[str, nn.Module], inputs: Inputs) -> dict[str, Any]:
    """Inference outputs: every adapter must change the base output; ``auto`` and ``dense`` RankMoE must agree.

    The tolerance is :data:`CHECK_TOLERANCE` of the inputs' dtype.

    Raises:
        RuntimeError: If a check fails.
    """
    outputs = {}
    with torch.no_grad(), conditioned(models, inputs.cond):
        for name, model in models.items():
            outputs[name] = unet_out(model.eval(), inputs.sample, inputs)
    deltas = {name: relative(out, outputs["base"]) for name, out in outputs.items() if name != "base"}
    auto_vs_dense = relative(outputs["rankmoe"], outputs["rankmoe_dense"])
    tolerance = CHECK_TOLERANCE[inputs.sample.dtype]
    if not all(d > 0 for d in deltas.values()):
        raise RuntimeError(f"an adapter leaves the UNet output unchanged: relative deltas {deltas}")
    if not auto_vs_dense < tolerance:
        raise RuntimeError(f"RankMoE auto vs dense relative error {auto_vs_dense:.3g} >= {tolerance:g}")
    return {"relative_delta": deltas, "auto_vs_dense": auto_vs_dense, "tolerance": tolerance}


# ---------------------------------------------------------------------------------------------------- report
def environment(args: argparse.Namespace, device: torch.device, unet: dict[str, Any]) -> dict[str, Any]:
    """Versions, machine, settings and UNet shape recorded with the results."""
    return {
        "card": device_name(device), "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "peft": peft.__version__, "diffusers": diffusers.__version__,
        "rankmoe": rankmoe.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None, "threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats, "warmup": args.warmup, "batch": args.batch, "latent": args.latent,
        "width_mult": args.width_mult, "seed": args.seed, "unet": unet,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _paths(counts: dict[str, int] | None) -> str:
    return "–" if not counts else ", ".join(f"{k} {v}" for k, v in counts.items())


def markdown_report(payload: dict[str, Any]) -> str:
    """Environment, one timing table per mode, adapters and execution paths, checks."""
    env, res, adapters = payload["environment"], payload["results"], payload["adapters"]
    load = env["load_average_1_5_15"]
    lines = [
        f"# unet_bench: {env['card']}", "",
        f"device `{env['device']}`, dtype `{env['dtype']}`, torch {env['torch']}, peft {env['peft']}, diffusers"
        f" {env['diffusers']}, rankmoe {env['rankmoe']}, {env['threads']} threads, load average"
        f" {'n/a' if not load else ' / '.join(f'{v:.1f}' for v in load)}, {env['date']}", "",
        f"Command: `{env['command']}`", "",
        f"UNet: channels {env['unet']['channels']}, heads {env['unet']['heads']}, {env['unet']['params']:,} params,"
        f" {env['unet']['adapted_modules']} adapted modules; batch {env['batch']}, latent {env['latent']}x"
        f"{env['latent']}, text (b, {TEXT_TOKENS}, {CROSS_ATTENTION_DIM}), timestep {TIMESTEP}; repeats"
        f" {env['repeats']}, warmup {env['warmup']}.", "",
        *[f"- `{name}`: {text}" for name, text in VARIANTS.items()], "",
        "Median / min / IQR of ms per call; ×base and ×lora are ratios of medians within this run. Peak MiB: CUDA"
        " peak above the pre-call allocation. Saved MiB: unique storages autograd saves in one training forward,"
        " parameters and buffers excluded.",
    ]
    for mode in MODES:
        title = "eval, no_grad forward" if mode == "inference" else "forward + backward + AdamW step"
        lines += ["", f"## {mode} ({title})", "",
                  "| variant | median ms | min ms | IQR ms | ×base | ×lora | peak MiB |"
                  + (" saved for backward MiB |" if mode == "training" else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if mode == "training" else "")]
        for name, row in res[mode].items():
            line = (f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['iqr_ms']:.1f} |"
                    f" {row['x_base']:.2f} | {row['x_lora']:.2f} | {_fmt(row['peak_mib'], '.1f')} |")
            if mode == "training":
                line += f" {row['saved_mib']['activations']:.1f} |"
            lines.append(line)
    lines += ["", "## Adapters", "",
              "| variant | trainable params | trainable dtypes | paths (inference) | paths (training) |",
              "|---|---|---|---|---|"]
    for name, info in adapters.items():
        lines.append(f"| {name} | {info['trainable_params']:,} | {', '.join(info['dtypes']) or '–'} |"
                     f" {_paths(info['paths'].get('inference'))} | {_paths(info['paths'].get('training'))} |")
    lines += ["", "## Checks (before timing, inference outputs)", ""]
    for dtype_name, check in payload["checks"].items():
        lines.append(f"- {dtype_name}: relative change vs base "
                     + ", ".join(f"{k} {v:.3g}" for k, v in check["relative_delta"].items())
                     + f"; RankMoE auto vs dense {check['auto_vs_dense']:.2e} (< {check['tolerance']:g}).")
    lines += ["", f"Entering + leaving `rankmoe.condition(unet, cond)` once: {payload['condition_overhead_ms']:.2f}"
              " ms (not in the timings above; paid once per step by a training loop that sets a new condition)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant and mode")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent side (a multiple of 8)")
    parser.add_argument("--width-mult", type=int, default=1, help="channels 64*m*(1,2,4,4); 5 = SD 2.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default=None, help="file stem (default <cpu|card>-unet-<dtype>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.width_mult < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, --batch >= 1 and --width-mult >= 1")
    if args.latent < 8 or args.latent % 8:
        parser.error(f"--latent must be a positive multiple of 8 (three downsamplings), got {args.latent}")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    return args


def default_name(args: argparse.Namespace, device: torch.device) -> str:
    """``<cpu|card>-unet-<dtype>``, e.g. ``cpu-unet-float32`` or ``nvidia-h100-80gb-hbm3-unet-bfloat16``."""
    card = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{card}-unet-{args.dtype}"


def prepare(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, nn.Module], Inputs, dict[str, Any]]:
    """Build the variants and inputs, check them in float32 (and in ``--dtype``), cast to ``--dtype``.

    Returns:
        The models, the inputs and ``{"unet": shape info, "checks": per dtype}``.
    """
    torch.manual_seed(args.seed)
    base = build_unet(args.width_mult, args.latent)
    names = unet_target_modules(base)
    info: dict[str, Any] = {
        "unet": {"channels": list(base.config.block_out_channels), "heads": list(base.config.attention_head_dim),
                 "params": sum(p.numel() for p in base.parameters()), "adapted_modules": len(names)},
    }
    models = build_variants(base, names, device)
    inputs = make_inputs(args.batch, args.latent, device)
    info["checks"] = {"float32": check_outputs(models, inputs)}
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32:
        for model in models.values():
            model.to(dtype=dtype)
        inputs = cast_inputs(inputs, dtype)
        info["checks"][args.dtype] = check_outputs(models, inputs)
    return models, inputs, info


def run_mode(mode: str, models: dict[str, nn.Module], inputs: Inputs, args: argparse.Namespace,
             progress: tqdm) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
    """Time one mode; return the rows per variant and the RankMoE execution-path counts of the mode."""
    make = make_infer if mode == "inference" else make_train_step
    with conditioned(models, inputs.cond):
        calls = {name: make(model, inputs) for name, model in models.items()}
        rows = measure(calls, args.repeats, args.warmup, torch.device(args.device), progress)
        paths = {name: execution_paths(models[name]) for name in NEEDS_CONDITION}
        if mode == "training":
            for name, model in models.items():
                rows[name]["saved_mib"] = saved_for_backward_mib(model, inputs)
    return rows, paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the variants, check them, time both modes, write and print the report."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models, inputs, info = prepare(args, device)
    adapters: dict[str, dict[str, Any]] = {
        name: {"trainable_params": sum(p.numel() for p in trainable(model)),
               "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable(model)}), "paths": {}}
        for name, model in models.items()
    }
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(MODES) * args.repeats, desc="unet_bench", unit="round") as progress:
        for mode in MODES:
            progress.set_postfix_str(mode)
            results[mode], paths = run_mode(mode, models, inputs, args, progress)
            for name, counts in paths.items():
                adapters[name]["paths"][mode] = counts
    payload = {
        "environment": environment(args, device, info["unet"]), "variants": VARIANTS, "results": results,
        "adapters": adapters, "checks": info["checks"],
        "condition_overhead_ms": condition_overhead_ms(models["rankmoe"], inputs.cond),
    }
    markdown = markdown_report(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or default_name(args, device)
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", markdown)):
        (args.out / f"{stem}{suffix}").write_text(text)
    print(markdown)
    print(f"wrote {args.out / stem}.json and .md")
    return payload


if __name__ == "__main__":
    main()
