"""``newllm runs compare RUN [RUN ...]``: training runs side by side, as a table and a PNG.

A run is a ``newllm train --out`` folder. From its ``metrics.jsonl`` (one record per logged step
and per evaluation) come the steps, tokens, training time, final and best training loss, and the
last and best validation perplexity, memory gain (perplexity with the memory carried against
reset every segment) and pass-key recall (exact, mean over the distances); from an
``eval.json`` in the folder (``newllm eval --checkpoint RUN ... --out RUN/eval.json``) the
evaluated perplexity, memory gain and pass-key recall (columns shown when some run has one). A
value a run does not hold is ``-``.
The PNG has four panels against the step: training loss, validation perplexity, memory gain and
pass-key recall, one line per run.

    newllm runs compare runs/infini runs/pythia --out compare.png
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"
Curve = list[tuple[int, float]]


@dataclass
class Run:
    """What one run folder's files hold."""

    name: str
    folder: Path
    records: list[dict[str, Any]]
    eval: dict[str, Any] = field(default_factory=dict)
    skipped_lines: int = 0

    def curve(self, key: str) -> Curve:
        """(step, value) of every record that holds a number (or per-distance numbers, then
        their mean) under ``key``; a later record of a step replaces an earlier one."""
        points: dict[int, float] = {}
        for r in self.records:
            v = _number(r.get(key))
            if v is not None and isinstance(r.get("step"), int):
                points[r["step"]] = v
        return sorted(points.items())


def _number(value: Any) -> float | None:
    if isinstance(value, dict):  # by distance: their mean
        values = [_number(v) for v in value.values()]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)  # NaN too: a diverged run's last loss is NaN, not its last number
    return None


def read_run(path: str | Path) -> Run:
    """A run folder's metrics (and eval report); ValueError saying why ``path`` is not a run."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder (give the --out folder of a "
                         "newllm train run)")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{str(path)!r} is not a training run: it has no metrics.jsonl (give "
                         "the --out folder of a newllm train run)")
    records, skipped = [], 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # e.g. a line cut short by a killed run
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
    report: dict[str, Any] = {}
    if (folder / EVAL_FILE).is_file():
        try:
            report = json.loads((folder / EVAL_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{folder / EVAL_FILE} is not valid JSON: {e}") from None
    name = folder.resolve().name or str(folder)
    return Run(name, folder, records, report if isinstance(report, dict) else {}, skipped)


def _elapsed(run: Run) -> float | None:
    """Training seconds: the last record's ``elapsed_s``, else the newest checkpoint's."""
    curve = run.curve("elapsed_s")
    if curve:
        return curve[-1][1]
    states = sorted(run.folder.glob("checkpoints/step-*/trainer_state.json"))
    try:
        return _number(json.loads(states[-1].read_text()).get("elapsed_s")) if states else None
    except (OSError, ValueError):
        return None


def _last(curve: Curve) -> float | None:
    return curve[-1][1] if curve else None


def _best(curve: Curve, high: bool = False) -> float | None:
    values = [v for _, v in curve if math.isfinite(v)]
    return (max(values) if high else min(values)) if values else None


def _val_ppl(run: Run) -> Curve:
    ppl = run.curve("val_ppl")
    return ppl or [(s, math.exp(min(v, 50.0))) for s, v in run.curve("val_loss")]


def memory_gain(run: Run) -> Curve:
    """100 (1 − ppl with memory / ppl reset every segment) at each evaluation (computed from
    the two losses for runs that predate ``memory_gain_pct``)."""
    gain = run.curve("memory_gain_pct")
    if gain:
        return gain
    reset = dict(run.curve("val_loss_memory_reset"))
    return [(s, 100 * (1 - math.exp(min(max(v - reset[s], -50), 50))))
            for s, v in run.curve("val_loss") if s in reset]


def summary(run: Run) -> dict[str, Any]:
    """The table row of a run (None where the run holds no such value)."""
    loss, ppl, gain = run.curve("loss"), _val_ppl(run), memory_gain(run)
    passkey = run.curve("passkey")
    ev = run.eval
    row: dict[str, Any] = {
        "run": run.name,
        "steps": max((r["step"] for r in run.records if isinstance(r.get("step"), int)),
                     default=None),
        "tokens": _last(run.curve("tokens")),
        "time_s": _elapsed(run),
        "loss": _last(loss), "best_loss": _best(loss),
        "val_ppl": _last(ppl), "best_val_ppl": _best(ppl),
        "memory_gain_pct": _last(gain),
        "passkey": _last(passkey), "best_passkey": _best(passkey, high=True),
        "eval_ppl": _number((ev.get("perplexity") or {}).get("ppl")),
        "eval_memory_gain_pct": _number((ev.get("memory") or {}).get("gain_pct")),
        "eval_passkey": _number((ev.get("passkey") or {}).get("by_distance")),
    }
    return row


COLUMNS = {  # key -> (header, format)
    "run": ("run", "{}"), "steps": ("steps", "{:,.0f}"), "tokens": ("tokens", "{:,.0f}"),
    "time_s": ("train time", "time"), "loss": ("loss", "{:.4f}"),
    "best_loss": ("best loss", "{:.4f}"), "val_ppl": ("val ppl", "{:.2f}"),
    "best_val_ppl": ("best val ppl", "{:.2f}"), "memory_gain_pct": ("memory gain", "{:+.2f}%"),
    "passkey": ("pass-key", "{:.0%}"), "best_passkey": ("best pass-key", "{:.0%}"),
    "eval_ppl": ("eval ppl", "{:.2f}"), "eval_memory_gain_pct": ("eval gain", "{:+.2f}%"),
    "eval_passkey": ("eval pass-key", "{:.0%}"),
}


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "time":
        if value < 60:
            return f"{value:.1f}s"
        s = int(round(value))
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (names left, numbers right); the ``eval_*`` columns
    only when some run has an eval report."""
    columns = {k: v for k, v in COLUMNS.items()
               if not k.startswith("eval_") or any(row[k] is not None for row in rows)}
    cells = [[h for h, _ in columns.values()]]
    cells += [[_cell(row[k], fmt) for k, (_, fmt) in columns.items()] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


PANELS = (  # title, y label, curve
    ("training loss", "loss (nats/token)", lambda run: run.curve("loss")),
    ("validation perplexity", "perplexity", _val_ppl),
    ("memory gain (ppl, memory vs reset)", "gain %", memory_gain),
    ("pass-key recall (mean over distances)", "exact recall", lambda run: run.curve("passkey")),
)


def plot(runs: list[Run], path: Path) -> Path:
    """A 2 x 2 PNG of the `PANELS` against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    for ax, (title, ylabel, get) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        drawn = False
        for run in runs:
            points = get(run)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None,
                        markersize=3, label=run.name)
                drawn = True
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylabel == "exact recall":
            ax.set_ylim(-0.03, 1.03)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if drawn:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no run logged this", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def compare(folders: list[str], out: str = "compare.png",
            as_json: bool = False) -> dict[str, Any] | None:
    """Read every run (all of them, before writing anything), print the table (or, with
    ``as_json``, return the rows), write the PNG unless ``out`` is ''."""
    runs = [read_run(f) for f in folders]
    names = [r.name for r in runs]
    for run in runs:  # two runs of one name (a/run, b/run): tell them apart by the path given
        if names.count(run.name) > 1:
            run.name = str(run.folder)
    for run in runs:
        if run.skipped_lines:
            print(f"note: {run.folder / 'metrics.jsonl'}: skipped {run.skipped_lines} line(s) "
                  "that are not JSON", file=sys.stderr)
    rows = [summary(r) for r in runs]
    png = str(plot(runs, Path(out))) if out else None
    if as_json:
        return {"runs": rows, "png": png}
    print(table(rows))
    if png:
        print(f"curves: {png}")
    return None
