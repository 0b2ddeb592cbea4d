"""decode: ms per generated token vs context length, every kind against transformers' GPT-NeoX.

Batch 1, fp32, greedy, on the 70M presets with random weights; `pythia-70m` and transformers'
`GPTNeoXForCausalLM` share the same weights (and their greedy tokens are checked equal). The
state at each context length comes from a real prefill. Also batched decoding of 1, 4 and 16
sessions at different positions (`TransformerLM.decode_step`): aggregate tokens/s.

    python -m benchmarks.decode [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import new_figure, plot_path, save_figure, write_result
from benchmarks.state_size import KINDS
from newllm import ModelConfig, TransformerLM
from newllm.state import ModelState


def hf_twin(model: TransformerLM) -> Any:
    """transformers' GPT-NeoX with our pythia model's weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = model.config
    cfg = GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        rotary_pct=c.rotary_pct, rotary_emb_base=c.rotary_base,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
        use_parallel_residual=c.use_parallel_residual, tie_word_embeddings=False,
    )
    hf = GPTNeoXForCausalLM(cfg).eval()
    ours = model.state_dict()
    sd = {k: ours[k.replace("gpt_neox.", "").replace("lm_head", "embed_out")]
          for k in hf.state_dict()}
    hf.load_state_dict(sd)
    return hf


def prefill(model: TransformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, ModelState]:
    state, logits = None, None
    for start in range(0, ids.shape[1], 1024):
        logits, state = model(ids[:, start:start + 1024], state, last_only=True)
    assert logits is not None and state is not None
    return logits, state


def ours_decode(model: TransformerLM, ids: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    with torch.no_grad():
        logits, state = prefill(model, ids)
        tok = logits[:, -1:].argmax(-1)
        out = []
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = model(tok, state)
            tok = logits[:, -1:].argmax(-1)
            out.append(int(tok))
        return (time.perf_counter() - t0) / steps, out


def hf_decode(hf: Any, ids: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        out_ = None
        for start in range(0, ids.shape[1], 1024):
            out_ = hf(ids[:, start:start + 1024], cache=cache, use_cache=True)
        assert out_ is not None
        tok = out_.logits[:, -1:].argmax(-1)
        out = []
        t0 = time.perf_counter()
        for _ in range(steps):
            o = hf(tok, cache=cache, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)
            out.append(int(tok))
        return (time.perf_counter() - t0) / steps, out


def batched(model: TransformerLM, sessions: int, context: int, steps: int) -> float:
    """Aggregate tokens/s of `decode_step` over ``sessions`` sessions at different positions."""
    states = []
    with torch.no_grad():
        for i in range(sessions):
            n = context + 7 * i
            _, s = prefill(model, torch.randint(0, 50000, (1, n)))
            states.append(s)
        tokens = torch.zeros(sessions, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, states = model.decode_step(tokens, states)
            tokens = logits.argmax(-1)
        return sessions * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short contexts, few steps (< 1 min)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args(argv)
    contexts = [128, 512] if args.quick else [128, 512, 1024, 4096, 16384]
    steps = 4 if args.quick else 24
    kinds = ["pythia"] if args.quick else args.kinds
    torch.manual_seed(0)
    rows: dict[str, list[dict[str, float]]] = {}
    models = {k: TransformerLM(ModelConfig.from_name(KINDS[k])).eval() for k in kinds}
    hf = hf_twin(models["pythia"]) if "pythia" in models else None
    same_tokens = True
    for n in contexts:
        ids = torch.randint(0, 50000, (1, n))
        if hf is not None:
            sec, hf_tokens = hf_decode(hf, ids, steps)
            rows.setdefault("transformers_gpt_neox", []).append(
                {"context": n, "ms_per_token": 1000 * sec, "tokens_per_s": 1 / sec})
        for kind, model in models.items():
            sec, tokens = ours_decode(model, ids, steps)
            rows.setdefault(kind, []).append(
                {"context": n, "ms_per_token": 1000 * sec, "tokens_per_s": 1 / sec})
            if kind == "pythia" and hf is not None:
                same_tokens &= tokens == hf_tokens
        print(f"context {n:6d}: " + ", ".join(
            f"{k} {v[-1]['ms_per_token']:.1f} ms" for k, v in rows.items()), flush=True)
    ratios = {}
    if hf is not None:
        for ours_row, hf_row in zip(rows["pythia"], rows["transformers_gpt_neox"], strict=True):
            ratios[str(ours_row["context"])] = hf_row["ms_per_token"] / ours_row["ms_per_token"]
    batch = {}
    for b in ([1, 4] if args.quick else [1, 4, 16]):
        batch[str(b)] = batched(models[kinds[0]], b, 128 if args.quick else 1024, steps)
        print(f"batched decode, {b:2d} sessions: {batch[str(b)]:.1f} tokens/s", flush=True)
    results = {"rows": rows, "pythia_speedup_vs_transformers": ratios,
               "greedy_tokens_equal_transformers": same_tokens,
               "batched_tokens_per_s": batch, "batched_kind": kinds[0]}
    path = write_result("decode", {"contexts": contexts, "steps": steps, "dtype": "float32",
                                   "batch": 1, "presets": {k: KINDS[k] for k in kinds},
                                   "quick": args.quick},
                        results, args.out)
    fig, ax = new_figure("Decode latency vs context (batch 1, fp32)", "tokens of context",
                         "ms / token")
    for kind, r in rows.items():
        ax.plot([x["context"] for x in r], [x["ms_per_token"] for x in r], marker="o",
                label=kind)
    ax.legend()
    save_figure(fig, plot_path("decode", args.out))
    print(f"wrote {path}; ours/transformers speed-up: " +
          ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    if hf is not None and not same_tokens:
        print("WARNING: greedy tokens differ from transformers'")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
