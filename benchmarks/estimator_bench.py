"""Throughput of the weight-free degradation estimator: images per second on 512 x 512 batches.

Times ``WeightFreeDegradationEstimator()(images)`` (validation, the four measures, calibration, severity) for each
batch size and thread count, and each raw measure of :mod:`rankmoe.conditioning.measures` on its own (each call
includes its own validation and luminance), on the same images. After ``--warmup`` untimed calls per setting,
``--repeats`` rounds take one sample of every setting, the order rotated every round, so slow drifts of a shared
machine hit all settings alike; the statistic is the median. The images are synthetic but photo-like
(piecewise-constant regions with smooth shading, step edges and mild noise, values in ``[0, 1]``, float32), so
no data set is needed; the measures do the same work whatever the content.

Run from the repository root::

    python benchmarks/estimator_bench.py                            # CPU: b = 1, 8; 1 and 2 threads
    python benchmarks/estimator_bench.py --device cuda --threads 0  # GPU (torch's thread default)

Results go to ``<out>/results/<name>.json`` and ``<out>/results/<name>.md`` (``--out`` defaults to this
folder; ``<name>`` to ``<cpu model or card>-estimator``); the Markdown table is also printed. These are
measurements to read, never timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import device_name, synchronizer
from tqdm.auto import tqdm

import rankmoe
from rankmoe.conditioning import measures
from rankmoe.conditioning.handcrafted import WeightFreeDegradationEstimator

MEASURE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "edge_blur": measures.edge_blur,
    "noise_level": measures.noise_level,
    "blockiness": measures.blockiness,
    "high_frequency_loss": measures.high_frequency_loss,
}
"""The raw measures timed on their own (``resolution_loss`` = edge blur + high-frequency loss)."""


def make_images(batch: int, size: int, device: torch.device, seed: int) -> torch.Tensor:
    """``(b, 3, size, size)`` float32 photo-like images in ``[0, 1]``: regions, shading, step edges, mild noise."""
    generator = torch.Generator().manual_seed(seed)
    regions = F.interpolate(torch.rand(batch, 3, size // 32, size // 32, generator=generator), size=(size, size))
    shading = F.interpolate(torch.rand(batch, 3, 4, 4, generator=generator), size=(size, size), mode="bicubic")
    noise = 0.01 * torch.randn(batch, 3, size, size, generator=generator)
    return (0.6 * regions + 0.4 * shading + noise).clamp(0, 1).to(device)



@dataclass
class Measurement:
    """Timings of one callable at one batch size and thread count.

    Args:
        what: ``"estimator"`` or a measure name.
        batch: ``b``, images per call.
        threads: ``torch.get_num_threads()`` during the run.
        samples_ms: Time per call of every timed sample, in order.
    """

    what: str
    batch: int
    threads: int
    samples_ms: list[float]
    median_ms: float = field(init=False)
    min_ms: float = field(init=False)
    iqr_ms: float = field(init=False)
    images_per_s: float = field(init=False)
    ms_per_image: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_ms = statistics.median(self.samples_ms)
        self.min_ms = min(self.samples_ms)
        if len(self.samples_ms) >= 2:
            quartiles = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
            self.iqr_ms = quartiles[2] - quartiles[0]
        else:
            self.iqr_ms = 0.0
        self.images_per_s = 1e3 * self.batch / self.median_ms
        self.ms_per_image = self.median_ms / self.batch


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    """``repeats`` samples (ms per call) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(1e3 * (time.perf_counter() - start))
    return samples



def default_name(device: torch.device) -> str:
    """Results file stem ``<cpu model or card>-estimator``, e.g. ``amd-epyc-estimator``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") + "-estimator"


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Versions, machine and settings recorded with the results."""
    return {
        "device": args.device,
        "card": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rankmoe": rankmoe.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "size": args.size,
        "batches": args.batches,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown_report(env: dict[str, Any], rows: list[Measurement]) -> str:
    """Environment, the estimator's throughput, and the per-measure cost."""
    load = env["load_average_1_5_15"]
    lines = [
        f"# estimator_bench: {env['card']}",
        "",
        f"device `{env['device']}` ({env['card']}, {env['cpu_count']} logical CPUs), torch {env['torch']}, "
        f"rankmoe {env['rankmoe']}, images {env['size']}x{env['size']} float32, repeats={env['repeats']}, "
        f"warmup={env['warmup']}, load average {' / '.join(f'{v:.1f}' for v in load) if load else 'n/a'}, "
        f"{env['date']}",
        "",
        f"Command: `{env['command']}`",
        "",
        "## WeightFreeDegradationEstimator (4 dimensions, validation and severity included)",
        "",
        "| batch | threads | images/s | ms/image | median ms/call | min ms | IQR ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.what == "estimator":
            lines.append(
                f"| {r.batch} | {r.threads} | {r.images_per_s:.1f} | {r.ms_per_image:.1f} | {r.median_ms:.1f} |"
                f" {r.min_ms:.1f} | {r.iqr_ms:.1f} |"
            )
    lines += [
        "",
        "## Each measure alone (ms per image; each call includes validation and luminance)",
        "",
        "| batch | threads | " + " | ".join(MEASURE_FUNCTIONS) + " |",
        "|---|---|" + "---|" * len(MEASURE_FUNCTIONS),
    ]
    keys = sorted({(r.batch, r.threads) for r in rows})
    index = {(r.what, r.batch, r.threads): r for r in rows}
    for batch, threads in keys:
        cells = [index.get((name, batch, threads)) for name in MEASURE_FUNCTIONS]
        if all(c is None for c in cells):
            continue
        values = " | ".join("–" if c is None else f"{c.ms_per_image:.1f}" for c in cells)
        lines.append(f"| {batch} | {threads} | {values} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--threads", default="1,2", help="comma-separated torch.set_num_threads values (0: keep torch's default)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per setting before timing")
    parser.add_argument("--no-measures", dest="measures", action="store_false", help="time the estimator only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="writes <out>/results/")
    parser.add_argument("--name", default=None, help="results file stem (default <cpu model or card>-estimator)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    try:
        args.batches = [int(v) for v in args.batches.split(",") if v.strip()]
        args.threads = [int(v) for v in args.threads.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--batches and --threads take comma-separated integers, got {args.batches!r}, {args.threads!r}")
    if not args.batches or min(args.batches) < 1 or not args.threads or min(args.threads) < 0:
        parser.error(f"need batch sizes >= 1 and thread counts >= 0, got {args.batches} and {args.threads}")
    if args.size < measures.MIN_SIZE or args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --size >= {measures.MIN_SIZE}, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the results and print the Markdown report."""
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = synchronizer(device)
    estimator = WeightFreeDegradationEstimator()
    default_threads = torch.get_num_threads()
    settings: list[tuple[int, int, str, Callable[[], Any]]] = []  # (threads, batch, what, call)
    for threads in args.threads:
        for batch in args.batches:
            images = make_images(batch, args.size, device, args.seed)
            settings.append((threads or default_threads, batch, "estimator", lambda x=images: estimator(x)))
            if args.measures:
                settings += [
                    (threads or default_threads, batch, name, lambda fn=fn, x=images: fn(x))
                    for name, fn in MEASURE_FUNCTIONS.items()
                ]
    samples: list[list[float]] = [[] for _ in settings]
    with tqdm(total=len(settings) * (args.repeats + 1), desc="estimator_bench", unit="call") as bar:
        for threads, batch, what, call in settings:
            torch.set_num_threads(threads)
            bar.set_postfix_str(f"warm-up threads={threads} b={batch} {what}")
            time_calls(call, 0, args.warmup, sync)
            bar.update(1)
        for round_index in range(args.repeats):
            shift = round_index % len(settings)  # rotate the order so that slow drifts hit all settings alike
            for index in list(range(shift, len(settings))) + list(range(shift)):
                threads, batch, what, call = settings[index]
                torch.set_num_threads(threads)
                bar.set_postfix_str(f"round {round_index + 1} threads={threads} b={batch} {what}")
                samples[index] += time_calls(call, 1, 0, sync)
                bar.update(1)
    rows = [Measurement(what, batch, threads, samples[i]) for i, (threads, batch, what, _) in enumerate(settings)]
    torch.set_num_threads(default_threads)
    env = environment(args, device)
    payload = {"environment": env, "measurements": [asdict(r) for r in rows]}
    markdown = markdown_report(env, rows)
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = args.name or default_name(device)
    json_path, md_path = results / f"{name}.json", results / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()
