"""quality: size, speed and quality of trained models side by side, in one table.

Rows come from training results, merged by checkpoint folder:

- ``--eval FILE ...``: reports written by ``newllm eval --out FILE`` (perplexity, memory carried
  vs reset, passkey recall by distance, reversal curse);
- ``--metrics FILE ...``: ``runs/NAME/metrics.jsonl`` of ``newllm train`` (last validation
  perplexity with memory carried and reset every segment, last passkey recall, training tokens/s);
- ``--evaluate SPEC ...``: checkpoints evaluated here with the same code as ``newllm eval``
  (`training.cli.evaluate`) on ``--data`` (default: a built-in paragraph).

For every row whose config is known (the checkpoint folder's ``config.json`` or a preset name)
the size columns come from `newllm.sizes` (parameters, state bytes at 2,048 and 16,384 tokens and
the share of a same-shape Pythia KV cache) and the speed column is measured here (decode ms/token
at ``--speed-context`` tokens of context, random weights of that config, batch 1, fp32, the
weights stored as the server runs them unless ``--default-layout``).

``--keep FILE`` carries over the rows of an earlier ``quality.json`` that this run does not
produce, as they were (their figures, date and machine recorded in ``kept_from``): a new
bundled model's row can replace the old one without retraining the others.

Without any input, the bundled default checkpoint is evaluated; ``--quick`` evaluates untrained
``tiny-infini`` and ``tiny-pythia`` on the built-in paragraph instead (to exercise the path).
Exits 1, writing nothing, when a row has no size or no perplexity.

    python -m benchmarks.quality --eval runs/a/eval.json --metrics runs/*/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PROSE,
    add_layout_flag,
    apply_layout,
    layout_label,
    new_figure,
    plot_path,
    results_folder,
    save_figure,
    write_result,
)
from benchmarks.decode import ours_decode
from newllm import PRESETS, ModelConfig, TransformerLM
from newllm.sizes import state_bytes

SIZE_AT = (2048, 16384)


def _key(checkpoint: str, base: Path) -> str:
    """One name per model: a resolved folder path, or a preset name / ``default``."""
    if checkpoint in ("", "default"):
        return "default"
    path = Path(checkpoint) if Path(checkpoint).is_absolute() else base / checkpoint
    return str(path.resolve()) if path.is_dir() else checkpoint


def config_of(key: str) -> ModelConfig | None:
    """The model's config: a folder's config.json (or its newest training checkpoint's)."""
    if key == "default":
        from newllm import load_checkpoint

        return load_checkpoint(None)[0].config
    if key in PRESETS:
        return ModelConfig.from_name(key)
    folder = Path(key)
    candidates = [folder / "config.json"] + sorted(folder.glob("checkpoints/*/config.json"),
                                                   reverse=True)
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            if "model_type" not in data:  # a GPT-NeoX folder: no size formula here
                return ModelConfig.from_dict(data)
    return None


def from_eval(report: dict[str, Any]) -> dict[str, Any]:
    """Quality columns of a ``newllm eval`` report."""
    row: dict[str, Any] = {"config_name": report.get("model"),
                           "parameters": report.get("parameters")}
    if "perplexity" in report:
        row["ppl"] = report["perplexity"]["ppl"]
        row["ppl_window"] = report["perplexity"]["window"]
        row["eval_tokens"] = report["perplexity"]["tokens"]
    memory = report.get("memory") or {}
    if "ppl_memory" in memory:
        row["ppl_memory"] = memory["ppl_memory"]
        row["ppl_reset"] = memory["ppl_reset"]
    if "passkey" in report:
        row["passkey"] = dict(report["passkey"]["by_distance"])
    if "reversal_curse" in report:
        rc = report["reversal_curse"]
        row["reversal"] = {k: rc[k] for k in ("forward_ppl", "backward_ppl", "ratio")}
    return row


def from_metrics(path: Path) -> dict[str, Any]:
    """Quality and training-speed columns of a ``metrics.jsonl``: the last of each kind."""
    row: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "val_loss" in rec:
            row["val_ppl"] = math.exp(min(rec["val_loss"], 50.0))
            row["val_step"] = rec["step"]
            if "val_loss_memory_reset" in rec:
                row["val_ppl_reset"] = math.exp(min(rec["val_loss_memory_reset"], 50.0))
        if "passkey" in rec:
            row["train_passkey"] = dict(rec["passkey"])
        if "tokens_per_s" in rec:
            row["train_tokens_per_s"] = rec["tokens_per_s"]
            row["tokens_seen"] = rec["tokens"]
            row["steps"] = rec["step"]
    return row


def size_and_speed(config: ModelConfig, context: int, steps: int,
                   default_layout: bool = False) -> dict[str, Any]:
    pythia = ModelConfig.from_dict({**config.to_dict(), "layers": ["pythia"] * config.num_layers,
                                    "segment_local": False, "context_mode": "none"})
    torch.manual_seed(0)
    model = TransformerLM(config).eval()
    apply_layout([model], default_layout)
    ids = torch.randint(0, config.vocab_size, (1, context))
    sec, _ = ours_decode(model, ids, steps)
    out: dict[str, Any] = {"config_name": config.name, "layers": list(config.layers),
                           "parameters": model.num_parameters(), "decode_ms_per_token": 1000 * sec,
                           "decode_context": context}
    for n in SIZE_AT:
        out[f"state_bytes_{n}"] = state_bytes(config, n)
        out[f"state_vs_pythia_{n}"] = state_bytes(config, n) / state_bytes(pythia, n)
    return out


def evaluate_here(spec: str, data: Path, quick: bool) -> dict[str, Any]:
    """A ``newllm eval`` report for ``spec``, computed in this process."""
    from training.cli import EvalConfig, evaluate

    cfg = EvalConfig(checkpoint="" if spec == "default" else spec, data=(str(data),),
                     memory=True, passkey=True, max_tokens=2048 if quick else 20000,
                     passkey_distances=(0, 1) if quick else (0, 1, 2, 4),
                     passkey_trials=2 if quick else 20)
    return evaluate(cfg)


def read_kept(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier quality result, each marked with where and when it was measured;
    rows it had kept itself keep their first mark."""
    try:
        doc = json.loads(path.read_text())
        rows = doc["results"]["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--keep {path}: not a quality result ({e})") from e
    mark = {"file": str(path), "date": doc.get("date"), "machine": doc.get("machine")}
    return [{**row, "kept_from": row.get("kept_from") or mark} for row in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny untrained models (< 1 minute)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="newllm eval reports")
    ap.add_argument("--metrics", type=Path, nargs="*", default=[], help="metrics.jsonl files")
    ap.add_argument("--evaluate", nargs="*", default=None,
                    help="checkpoints (folders or presets; 'default') to evaluate here")
    ap.add_argument("--data", type=Path, default=None,
                    help="text for --evaluate (default: a built-in paragraph)")
    ap.add_argument("--speed-context", type=int, default=None,
                    help="context of the decode timing (default 1024; quick 64)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="an earlier quality.json: its rows this run does not produce are kept "
                         "as they were, marked with their date")
    add_layout_flag(ap)
    args = ap.parse_args(argv)
    kept = read_kept(args.keep) if args.keep else []
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    evaluate_specs = args.evaluate
    if evaluate_specs is None and not (args.eval or args.metrics):
        evaluate_specs = ["tiny-infini", "tiny-pythia"] if args.quick else ["default"]
    context = args.speed_context or (64 if args.quick else 1024)
    steps = 4 if args.quick else 16
    rows: dict[str, dict[str, Any]] = {}

    def add(key: str, source: str, part: dict[str, Any]) -> None:
        row = rows.setdefault(key, {"name": Path(key).name if "/" in key else key,
                                    "checkpoint": key, "sources": []})
        row["sources"].append(source)
        row.update({k: v for k, v in part.items() if v is not None})

    for path in args.eval:
        report = json.loads(path.read_text())
        add(_key(str(report.get("checkpoint", "")), Path.cwd()), f"eval:{path}",
            from_eval(report))
    for path in args.metrics:
        add(str(path.parent.resolve()), f"metrics:{path}", from_metrics(path))
    if evaluate_specs:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data or Path(tmp) / "text.txt"
            if args.data is None:
                data.write_text(PROSE * 3, encoding="utf-8")
            for spec in evaluate_specs:
                add(_key(spec, Path.cwd()), "evaluated here",
                    from_eval(evaluate_here(spec, data, args.quick)))
    problems = []
    for key, row in rows.items():
        config = config_of(key)
        if config is None:
            problems.append(f"{key}: no config.json found, so no size or speed")
        else:
            row.update(size_and_speed(config, context, steps, args.default_layout))
        if "ppl" not in row and "val_ppl" not in row:
            problems.append(f"{key}: no perplexity (run newllm eval --data ... or train with "
                            "validation data)")
        if "ppl_memory" in row:
            row["memory_ppl_ratio"] = row["ppl_memory"] / row["ppl_reset"]
        print(f"{row['name']:24s} params {row.get('parameters', 0):>11,}  state@16k "
              f"{row.get('state_bytes_16384', 0):>12,} B  decode "
              f"{row.get('decode_ms_per_token', float('nan')):6.1f} ms  ppl "
              f"{row.get('ppl', row.get('val_ppl', float('nan'))):9.2f}  memory/reset "
              f"{row.get('memory_ppl_ratio', float('nan')):.3f}  passkey "
              f"{row.get('passkey', row.get('train_passkey'))}", flush=True)
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    table = list(rows.values())
    table += [row for row in kept if row["checkpoint"] not in rows]
    settings = {"quick": args.quick, "eval": [str(p) for p in args.eval],
                "metrics": [str(p) for p in args.metrics], "evaluated": evaluate_specs or [],
                "kept_from": str(args.keep) if args.keep else None,
                "data": str(args.data) if args.data else "built-in paragraph",
                "size_at_tokens": list(SIZE_AT), "decode_context": context,
                "decode_steps": steps,
                "layout": layout_label(args.default_layout)}
    path = write_result("quality", settings, {"rows": table}, args.out)
    fig, ax = new_figure("Size vs quality", "session state bytes at 16,384 tokens (fp32)",
                         "perplexity", logy=True)
    ax.set_xscale("log")
    for row in table:
        ppl = row.get("ppl", row.get("val_ppl"))
        if ppl is not None and "state_bytes_16384" in row:
            ax.scatter([row["state_bytes_16384"]], [ppl], label=row["name"])
    ax.legend(fontsize="small")
    save_figure(fig, plot_path("quality", args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
