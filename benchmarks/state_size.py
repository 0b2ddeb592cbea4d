"""state_size: session-state bytes vs context length for every model kind against Pythia.

For each 70M preset the state is *measured* from a real state (run the model over the text, or,
for long contexts, a state built at that position with the declared shapes — flagged in the
JSON) and checked against the closed-form formula in `newllm.sizes`; fp32 and fp16 bytes.
Headline: reduction against `pythia-70m` at 2,048, 16,384 and 65,536 tokens. The lengths are
multiples of every segment length, where an open segment is empty (the best case); each row
also gives the worst case within the same segment (open segment full), from the formula.

    python -m benchmarks.state_size [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import new_figure, plot_path, results_folder, save_figure, write_result
from newllm import ModelConfig, TransformerLM
from newllm.sizes import state_bytes, worst_state_bytes

KINDS = {
    "pythia": "pythia-70m",
    "infini": "infini-70m",
    "multi_memory": "multi-memory-70m",
    "hierarchical": "hierarchical-70m",
    "context_pythia": "context-pythia-70m",
    "context_kv": "context-kv-70m",
}


def measured_bytes(model: TransformerLM, position: int, run_limit: int) -> tuple[int, str]:
    """Bytes of a real state at ``position``: run the model when cheap, else build the state."""
    if position <= run_limit:
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, position))
        with torch.no_grad():
            state = None
            for start in range(0, position, 1024):
                _, state = model(ids[:, start:start + 1024], state, last_only=True)
        assert state is not None
        return state.nbytes(), "run"
    shapes = model.state_shapes(1, position)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    return total, "shapes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short contexts only (< 1 minute)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    lengths = [512, 2048, 16384, 65536]
    run_limit = 0 if args.quick else 4096
    rows: dict[str, list[dict[str, object]]] = {}
    for kind, preset in KINDS.items():
        cfg = ModelConfig.from_name(preset)
        model = TransformerLM(cfg).eval()
        rows[kind] = []
        for n in lengths:
            got, how = measured_bytes(model, n, run_limit)
            formula = state_bytes(cfg, n)
            if got != formula:
                raise SystemExit(f"{kind} at {n}: measured {got} bytes, formula {formula}")
            rows[kind].append({"tokens": n, "fp32_bytes": got, "fp16_bytes": got // 2,
                               "formula_bytes": formula, "measured_by": how,
                               # the lengths are segment boundaries (best case): the largest
                               # state in the same segment, its open segment full
                               "worst_in_segment_fp32_bytes": worst_state_bytes(cfg, n)})
        print(f"{kind:15s}", " ".join(f"{r['fp32_bytes']:>12,}" for r in rows[kind]))
    headline = {}
    for kind in KINDS:
        headline[kind] = {
            str(r["tokens"]): 1 - int(r["fp32_bytes"]) / int(p["fp32_bytes"])  # type: ignore
            for r, p in zip(rows[kind], rows["pythia"], strict=True)
        }
    path = write_result("state_size", {"presets": KINDS, "lengths": lengths,
                                       "run_limit_tokens": run_limit, "quick": args.quick},
                        {"rows": rows, "reduction_vs_pythia": headline}, args.out)
    fig, ax = new_figure("Session state vs context (70M presets, fp32)", "tokens of context",
                         "state bytes", logy=True)
    for kind in KINDS:
        ax.plot(lengths, [r["fp32_bytes"] for r in rows[kind]], marker="o", label=kind)
    ax.legend()
    save_figure(fig, plot_path("state_size", args.out))
    print(f"wrote {path}")
    for kind, red in headline.items():
        print(f"  {kind:15s} reduction vs pythia: " +
              ", ".join(f"{k}: {v:.1%}" for k, v in red.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
