"""What every benchmark shares: the machine description, timing, and writing JSON + PNG.

Results go to ``benchmarks/results/NAME.json`` with the machine, library versions, date and
settings, beside a PNG plot. Figures that are compared are measured in the same run and reported
as ratios; nothing here asserts a timing.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# original prose used as conversation text and as filler (no file needed)
PROSE = (
    "The river ran low that autumn, and the ferryman spent his afternoons mending nets on the "
    "stones. Travellers were few. A merchant came through with two mules and a crate of copper "
    "pans, and asked the way to the market town beyond the hills. The ferryman pointed at the "
    "old road, which climbed between the orchards and then vanished into a fold of the land. "
    "In the evenings the village gathered at the well to trade news: who had married, whose "
    "roof had fallen in, how the barley stood in the upper fields. Children chased the geese "
    "along the bank until their mothers called them home. When the first frost came, the "
    "miller opened his doors to anyone who needed warmth, and the long winter talk began. "
)


def results_folder(out: Path | None, quick: bool) -> Path:
    """Where a run writes: ``out``, or ``benchmarks/results`` (``results/quick`` for a
    ``--quick`` run, so a smoke run never replaces the measured results the README quotes)."""
    return out or (RESULTS / "quick" if quick else RESULTS)


def machine() -> dict[str, Any]:
    """Where a measurement was taken: CPU model, cores, memory, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "versions": versions,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def add_layout_flag(ap: Any) -> None:
    """``--default-layout`` for the benchmarks that time our models against transformers."""
    ap.add_argument("--default-layout", action="store_true",
                    help="keep our weights in nn.Linear's layout instead of the input-major one "
                         "the server uses (TransformerLM.use_input_major_weights)")


def layout_label(default_layout: bool) -> str:
    """How our weights are stored, for a result's settings."""
    if default_layout:
        return "out-in (nn.Linear)"
    return "input-major (TransformerLM.use_input_major_weights, as the server runs)"


def apply_layout(models: Any, default_layout: bool) -> str:
    """Store our models' weights as the server runs them (unless ``default_layout``); returns
    the layout for the result's settings. transformers' twin is left as it ships."""
    if not default_layout:
        for model in models:
            model.use_input_major_weights()
    return layout_label(default_layout)


def round_robin(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each fn over ``repeat`` rounds, every round calling each fn once in
    turn (after one untimed round), so a noisy moment of the machine falls on all of them."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for kind, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def round_robin_blocks(fns: dict[str, Callable[[], Any]], repeat: int,
                       block: int = 25) -> dict[str, float]:
    """Median seconds of each fn's calls, ``repeat`` calls each, made in blocks of ``block``
    consecutive calls of one fn, the fns taking turns block by block. Unlike `round_robin`,
    a fn mostly runs as it would alone (its data warm in the CPU's caches: the first call of a
    block pays for what the others evicted, and the median passes over it), while a noisy
    moment of the machine still falls on all of them."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, -(-repeat // block))):
        for kind, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                samples[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_it(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median and spread of ``repeat`` calls of fn, in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "repeat": repeat}


def check_numbers(obj: Any, where: str = "result") -> None:
    """Refuse a result with a missing or invalid measured number (None, NaN, inf, negative)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj) or obj < 0):
        raise ValueError(f"invalid measured number at {where}: {obj}")


def write_result(name: str, settings: dict[str, Any], results: Any,
                 out_dir: Path | None = None) -> Path:
    """Write ``NAME.json`` atomically after checking every measured number."""
    check_numbers(results)
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "results": results,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def plot_path(name: str, out_dir: Path | None = None) -> Path:
    return (out_dir or RESULTS) / f"{name}.png"


def new_figure(title: str, xlabel: str, ylabel: str, *, logx: bool = True,
               logy: bool = False) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
