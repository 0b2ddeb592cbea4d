"""prefill: tokens/s of reading a prompt (512 ... 8,192 tokens), every kind against transformers.

Batch 1, fp32, random weights (ours stored input-major as the server runs them;
``--default-layout``: nn.Linear's layout), one forward call over the whole prompt from an empty
state that returns the last token's logits and the new state (ours:
``model(ids, None, last_only=True)``; transformers' `GPTNeoXForCausalLM` with the *same weights*
as our `pythia` model: ``use_cache=True, logits_to_keep=1``, so both build a KV cache and skip
the full-vocabulary logits). The two last-token logits are checked equal (exit 1 otherwise).
Memory kinds read the prompt segment by segment inside the same call.

Full: the 70M presets of every kind at 512, 1,024, 2,048, 4,096, 8,192 tokens. Quick: the small
presets (``small-pythia`` with its own transformers twin, ``small-infini``) at 128 and 256.

    python -m benchmarks.prefill [--quick] [--lengths ...] [--kinds ...]
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_layout_flag,
    apply_layout,
    new_figure,
    plot_path,
    results_folder,
    round_robin,
    save_figure,
    write_result,
)
from benchmarks.decode import hf_twin
from benchmarks.state_size import KINDS
from newllm import ModelConfig, TransformerLM

QUICK_PRESETS = {"pythia": "small-pythia", "infini": "small-infini"}
LOGITS_TOLERANCE = 1e-3


def ours_prefill(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    logits, _ = model(ids, None, last_only=True)  # (1, 1, V)
    return logits[0, -1]


def hf_prefill(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    out = hf(ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]  # (V,)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small presets, short prompts (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--lengths", type=int, nargs="*", default=None,
                    help="prompt lengths (default 512 1024 2048 4096 8192)")
    ap.add_argument("--kinds", nargs="*", default=None, choices=list(KINDS))
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per point (median)")
    add_layout_flag(ap)
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    presets = dict(QUICK_PRESETS) if args.quick else dict(KINDS)
    if args.kinds:
        presets = {k: v for k, v in presets.items() if k in args.kinds}
    lengths = args.lengths or ([128, 256] if args.quick else [512, 1024, 2048, 4096, 8192])
    repeat = args.repeat or (2 if args.quick else 3)
    torch.manual_seed(0)
    models = {k: TransformerLM(ModelConfig.from_name(p)).eval() for k, p in presets.items()}
    hf = hf_twin(models["pythia"]) if "pythia" in models else None
    layout = apply_layout(models.values(), args.default_layout)
    vocab = min(m.config.vocab_size for m in models.values())
    rows: dict[str, list[dict[str, float]]] = {}
    max_diff = 0.0
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n))  # (1, T)
            timed: dict[str, Any] = {kind: partial(ours_prefill, m, ids)
                                     for kind, m in models.items()}
            if hf is not None:
                timed["transformers_gpt_neox"] = partial(hf_prefill, hf, ids)
                diff = (ours_prefill(models["pythia"], ids) - hf_prefill(hf, ids)).abs().max()
                max_diff = max(max_diff, float(diff))
            for kind, sec in round_robin(timed, repeat).items():
                rows.setdefault(kind, []).append(
                    {"tokens": n, "ms": 1000 * sec, "tokens_per_s": n / sec})
            print(f"{n:6d} tokens: " + ", ".join(
                f"{k} {v[-1]['tokens_per_s']:,.0f} tok/s" for k, v in rows.items()), flush=True)
    ratios = {}
    if hf is not None:
        for ours, theirs in zip(rows["pythia"], rows["transformers_gpt_neox"], strict=True):
            ratios[str(ours["tokens"])] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    same = hf is None or max_diff <= LOGITS_TOLERANCE
    results = {"rows": rows, "pythia_speedup_vs_transformers": ratios,
               "last_logits_max_abs_diff": max_diff,
               "last_logits_equal_transformers": same}
    settings = {"quick": args.quick, "lengths": lengths, "repeat": repeat, "dtype": "float32",
                "batch": 1, "presets": presets, "one_call": True,
                "timing": "median of the repeats; each repeat times every kind once, in turn",
                "our_weight_layout": layout,
                "transformers_attention": getattr(hf.config, "_attn_implementation", None)
                if hf is not None else None, "logits_tolerance": LOGITS_TOLERANCE}
    path = write_result("prefill", settings, results, args.out)
    fig, ax = new_figure("Prefill throughput (batch 1, fp32)", "prompt tokens", "tokens / s")
    for kind, r in rows.items():
        ax.plot([x["tokens"] for x in r], [x["tokens_per_s"] for x in r], marker="o",
                label=kind if kind == "transformers_gpt_neox" else f"{kind} ({presets[kind]})")
    ax.legend()
    save_figure(fig, plot_path("prefill", args.out))
    print(f"wrote {path}; ours/transformers prefill speed-up: " +
          ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    if not same:
        print(f"FAILED: last-token logits differ from transformers' by {max_diff:.2e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
