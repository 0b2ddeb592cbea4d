"""decode: ms per generated token vs context length, every kind against transformers' GPT-NeoX.

Batch 1, fp32, greedy, random weights; ours with the weights stored input-major, as the server
and `newllm generate` run them (``--default-layout``: nn.Linear's layout). Full: the 70M presets
of all six kinds at 128, 512, 1,024, 4,096 and 16,384 tokens of context, beside transformers'
`GPTNeoXForCausalLM` with the *same weights* as our ``pythia-70m`` (the greedy tokens must be
equal: exit 1 otherwise). Quick: the tiny presets at 32 and 128 tokens.

The state at each context comes from a real prefill (chunks of 1,024 tokens) of one random text:
each length extends the previous length's state (ours: states are values, so decoding from one
leaves it intact; transformers: its cache is cropped back first), so both read the same chunks.
At each point one untimed step is taken, then up to ``--steps`` tokens are decoded one at a time,
each step timed (our pythia and transformers in turns, one step of each, so both see the machine
at the same moments); a point stops early once its timed steps add up to ``--max-seconds`` (never
before ``--min-steps``), which bounds the slow long-context points. ``ms_per_token`` is the median
step. Derived: our pythia's speed-up over transformers (goal: at least 1.3x at 1,024), each kind's
speed relative to pythia, and each kind's slowdown from the shortest to the longest context (the
constant-state kinds should be flat: at most ``FLAT_TOLERANCE``).

Batched: `TransformerLM.decode_step` over 1, 4 and 16 sessions at different positions (1,024 +
7 i tokens; quick: 32 + 7 i) for pythia and infini: aggregate tokens/s.

    python -m benchmarks.decode [--quick] [--kinds ...] [--contexts ...] [--max-seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    add_layout_flag,
    apply_layout,
    new_figure,
    plot_path,
    results_folder,
    save_figure,
    write_result,
)
from benchmarks.state_size import KINDS
from newllm import ModelConfig, TransformerLM
from newllm.sizes import state_bytes
from newllm.state import ModelState

QUICK_PRESETS = {k: "tiny-" + p.removesuffix("-70m") for k, p in KINDS.items()}
HF = "transformers_gpt_neox"
CHUNK = 1024  # prefill chunk, ours and transformers'
GOAL_CONTEXT, GOAL_SPEEDUP = 1024, 1.3  # our pythia against transformers
FLAT_TOLERANCE = 1.25  # longest / shortest context ms per token of a constant-state kind
BATCH_SPACING = 7  # session i of a batch sits at context + 7 i tokens

Step = Callable[[Tensor], Tensor]  # token (1, 1) -> logits (1, 1, V)


# the twin and the two decoders ---------------------------------------------------------------
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


def prefill(model: TransformerLM, ids: torch.Tensor,
            state: ModelState | None = None) -> tuple[torch.Tensor, ModelState]:
    """Read ids (1, T), T >= 1, in chunks of 1,024 after ``state``: last logits (1, 1, V), state."""
    logits = None
    for start in range(0, ids.shape[1], CHUNK):
        logits, state = model(ids[:, start:start + CHUNK], state, last_only=True)
    assert logits is not None and state is not None, "prefill needs at least one token"
    return logits, state


def hf_prefill(hf: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Extend transformers' cache by ids (1, T) in the same chunks: last logits (1, 1, V)."""
    out = None
    for start in range(0, ids.shape[1], CHUNK):
        out = hf(ids[:, start:start + CHUNK], cache=cache, use_cache=True, logits_to_keep=1)
    assert out is not None, "prefill needs at least one token"
    return out.logits


def ours_step(model: TransformerLM, state: ModelState) -> Step:
    def step(tok: Tensor) -> Tensor:
        nonlocal state
        logits, state = model(tok, state)  # (1, 1, V)
        return logits
    return step


def hf_step(hf: Any, cache: Any) -> Step:
    return lambda tok: hf(tok, cache=cache, use_cache=True).logits  # (1, 1, V)


def greedy_steps(step: Step, logits: Tensor, steps: int, *, warmup: int = 0,
                 max_seconds: float = float("inf"),
                 min_steps: int = 1) -> tuple[list[float], list[int]]:
    """Decode greedily from ``logits`` (1, 1, V): seconds of each timed step, and every token.

    ``warmup`` untimed steps first; then up to ``steps`` timed ones, stopping once they add up
    to ``max_seconds`` (never before ``min_steps``).
    """
    out = interleaved_steps({"": step}, {"": logits}, steps, warmup=warmup,
                            max_seconds=max_seconds, min_steps=min_steps)
    return out[""]


def interleaved_steps(steps_by: dict[str, Step], logits_by: dict[str, Tensor], steps: int, *,
                      warmup: int = 0, max_seconds: float = float("inf"),
                      min_steps: int = 1) -> dict[str, tuple[list[float], list[int]]]:
    """`greedy_steps` for several decoders at once, one step of each in turn.

    Decoders compared this way see the same machine at the same moments (a noisy neighbour
    slows both), so their ratio is steadier than that of two runs one after the other. Stops
    once the slowest decoder's timed steps add up to ``max_seconds`` (never before
    ``min_steps``).
    """
    toks = {k: logits_by[k][:, -1:].argmax(-1) for k in steps_by}  # (1, 1) each
    times: dict[str, list[float]] = {k: [] for k in steps_by}
    tokens: dict[str, list[int]] = {k: [] for k in steps_by}
    with torch.no_grad():
        for i in range(warmup + steps):
            for name, step in steps_by.items():
                t0 = time.perf_counter()
                tok = step(toks[name])[:, -1:].argmax(-1)  # (1, 1)
                tokens[name].append(int(tok))  # reads the token back: waits for an accelerator
                dt = time.perf_counter() - t0
                toks[name] = tok
                if i >= warmup:
                    times[name].append(dt)
            if i - warmup + 1 >= min_steps and max(map(sum, times.values())) >= max_seconds:
                break
    return {k: (times[k], tokens[k]) for k in steps_by}


def ours_decode(model: TransformerLM, ids: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Prefill ids (1, T) and decode ``steps`` greedy tokens: mean seconds per token, tokens."""
    with torch.no_grad():
        logits, state = prefill(model, ids)
    times, tokens = greedy_steps(ours_step(model, state), logits, steps)
    return sum(times) / len(times), tokens


def batched(model: TransformerLM, states: list[ModelState], steps: int) -> float:
    """Aggregate tokens/s of `decode_step` over these sessions (one untimed step first)."""
    tokens = torch.zeros(len(states), dtype=torch.long, device=model.device)  # (B,)
    with torch.no_grad():
        logits, states = model.decode_step(tokens, states)  # (B, V)
        tokens = logits.argmax(-1)  # (B,)
        int(tokens[0])  # an accelerator has finished the untimed step
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, states = model.decode_step(tokens, states)
            tokens = logits.argmax(-1)
        int(tokens[0])  # ... and the timed ones
    return len(states) * steps / (time.perf_counter() - t0)


def batch_states(model: TransformerLM, ids: torch.Tensor, context: int,
                 sessions: int) -> list[ModelState]:
    """``sessions`` states at context + 7 i tokens of ids (one prefill, then short extensions)."""
    with torch.no_grad():
        _, base = prefill(model, ids[:, :context])
        return [base] + [prefill(model, ids[:, context:context + BATCH_SPACING * i], base)[1]
                         for i in range(1, sessions)]


def constant_state(config: ModelConfig) -> bool:
    """Whether a state stops growing with the text (bytes equal at two segment boundaries)."""
    S = config.segment_len
    return state_bytes(config, 64 * S) == state_bytes(config, 128 * S)


# results -------------------------------------------------------------------------------------
def point(times: list[float]) -> dict[str, float]:
    sec = statistics.median(times)
    return {"ms_per_token": 1000 * sec, "tokens_per_s": 1 / sec, "steps": len(times)}


def check_complete(rows: dict[str, list[dict[str, Any]]], contexts: list[int],
                   batched_rows: dict[str, dict[str, float]], sessions: list[int],
                   min_steps: int) -> None:
    """Refuse a result with a point missing or measured from too few steps."""
    for kind, rs in rows.items():
        if [r["context"] for r in rs] != contexts:
            raise ValueError(f"decode {kind}: contexts {[r['context'] for r in rs]} measured, "
                             f"expected {contexts}")
        for r in rs:
            if not (r["steps"] >= min_steps and r["ms_per_token"] > 0):
                raise ValueError(f"decode {kind} at {r['context']}: invalid point {r}")
    for kind, by in batched_rows.items():
        if list(by) != [str(b) for b in sessions] or not all(v > 0 for v in by.values()):
            raise ValueError(f"batched decode {kind}: invalid {by}, expected sessions {sessions}")


def derived(rows: dict[str, list[dict[str, Any]]], flat_kinds: list[str]) -> dict[str, Any]:
    """Ratios read from the rows: speed-ups, relative speeds, slowdowns, goals."""
    ms = {k: {str(r["context"]): r["ms_per_token"] for r in rs} for k, rs in rows.items()}
    out: dict[str, Any] = {
        "pythia_speedup_vs_transformers": {},
        "speed_vs_pythia": {},  # pythia ms / kind ms: above 1 is faster than pythia
        "slowdown_longest_vs_shortest": {k: rs[-1]["ms_per_token"] / rs[0]["ms_per_token"]
                                         for k, rs in rows.items()},
        "goals": {},
    }
    if "pythia" in ms:
        out["speed_vs_pythia"] = {k: {n: ms["pythia"][n] / v for n, v in by.items()}
                                  for k, by in ms.items() if k not in ("pythia", HF)}
    if "pythia" in ms and HF in ms:
        out["pythia_speedup_vs_transformers"] = {n: ms[HF][n] / v
                                                 for n, v in ms["pythia"].items()}
        at = out["pythia_speedup_vs_transformers"].get(str(GOAL_CONTEXT))
        if at is not None:
            out["goals"]["pythia_vs_transformers"] = {
                "context": GOAL_CONTEXT, "target": GOAL_SPEEDUP, "value": at,
                "met": at >= GOAL_SPEEDUP}
    if flat_kinds:
        worst = max(out["slowdown_longest_vs_shortest"][k] for k in flat_kinds)
        out["goals"]["constant_state_kinds_flat"] = {
            "kinds": flat_kinds, "target": FLAT_TOLERANCE, "value": worst,
            "met": worst <= FLAT_TOLERANCE}
    return out


def plot(rows: dict[str, list[dict[str, Any]]], presets: dict[str, str],
         out_dir: Path | None) -> None:
    fig, ax = new_figure("Decode latency vs context (batch 1, fp32)", "tokens of context",
                         "ms / token (median)")
    for kind, rs in rows.items():
        hf = kind == HF
        ax.plot([r["context"] for r in rs], [r["ms_per_token"] for r in rs],
                "k--" if hf else "-", marker="x" if hf else "o",
                label=kind if hf else f"{kind} ({presets[kind]})")
    contexts = [r["context"] for r in next(iter(rows.values()))]
    ax.set_xticks(contexts, [f"{n:,}" for n in contexts])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save_figure(fig, plot_path("decode", out_dir))


# main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny presets, short contexts (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--kinds", nargs="*", default=None, choices=list(KINDS),
                    help="kinds to measure (default: all six)")
    ap.add_argument("--contexts", type=int, nargs="*", default=None,
                    help="context lengths, ascending (default 128 512 1024 4096 16384)")
    ap.add_argument("--steps", type=int, default=None, help="most timed tokens per point (64)")
    ap.add_argument("--min-steps", type=int, default=None, help="fewest timed tokens (8)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a point's timed steps after this many seconds (5)")
    ap.add_argument("--batched-kinds", nargs="*", default=["pythia", "infini"],
                    choices=list(KINDS), help="kinds of the batched-decode part")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' twin")
    add_layout_flag(ap)
    ap.add_argument("--device", default="cpu",
                    help="where to run both implementations, e.g. cuda (default cpu); use --out "
                         "to keep the results apart from the CPU ones")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    device = torch.device(args.device)
    q = args.quick
    presets = dict(QUICK_PRESETS if q else KINDS)
    if args.kinds:
        presets = {k: v for k, v in presets.items() if k in args.kinds}
    contexts = sorted(set(args.contexts or ([32, 128] if q else [128, 512, 1024, 4096, 16384])))
    steps = args.steps or (4 if q else 64)
    min_steps = min(steps, args.min_steps or (2 if q else 8))
    max_seconds = args.max_seconds or (1.0 if q else 5.0)
    sessions = [1, 4] if q else [1, 4, 16]
    batch_context = 32 if q else 1024
    torch.manual_seed(0)
    models = {k: TransformerLM(ModelConfig.from_name(p)).eval().to(device)
              for k, p in presets.items()}
    hf = (hf_twin(models["pythia"]).to(device) if "pythia" in models and not args.no_transformers
          else None)
    layout = apply_layout(models.values(), args.default_layout)
    vocab = min(m.config.vocab_size for m in models.values())
    length = max(contexts[-1], batch_context + BATCH_SPACING * max(sessions))
    ids = torch.randint(0, vocab, (1, length)).to(device)  # (1, T): one text for every point
    rows: dict[str, list[dict[str, Any]]] = {HF: []} if hf is not None else {}
    rows.update({k: [] for k in models})
    logits: dict[str, Tensor] = {}
    states: dict[str, ModelState | None] = dict.fromkeys(models)
    cache = None
    same_tokens, compared = True, 0
    done = 0
    for n in contexts:
        piece = ids[:, done:n]  # (1, n - done): what this context adds to the previous one
        with torch.no_grad():
            if hf is not None:
                from transformers import DynamicCache

                if cache is None:
                    cache = DynamicCache()
                extra = cache.get_seq_length() - done
                if extra:
                    cache.crop(-extra)  # drop the previous point's decoded tokens
                logits[HF] = hf_prefill(hf, piece, cache)
            for kind, model in models.items():
                logits[kind], states[kind] = prefill(model, piece, states[kind])
        done = n
        kw = {"warmup": 1, "max_seconds": max_seconds, "min_steps": min_steps}
        for kind, model in models.items():
            state = states[kind]
            assert state is not None and state.position == n
            decoders = {kind: ours_step(model, state)}
            if kind == "pythia" and hf is not None:  # the pair of the goal: measured in turns
                decoders[HF] = hf_step(hf, cache)
            measured = interleaved_steps(decoders, logits, steps, **kw)
            for name, (times, _) in measured.items():
                rows[name].append({"context": n, **point(times)})
            if len(measured) == 2:
                tokens, hf_tokens = measured[kind][1], measured[HF][1]
                same_tokens &= tokens == hf_tokens
                compared += len(tokens)
        print(f"context {n:6,d}: " + ", ".join(
            f"{k} {v[-1]['ms_per_token']:.1f} ms" for k, v in rows.items()), flush=True)
    states.clear()
    batch: dict[str, dict[str, float]] = {}
    for kind in [k for k in args.batched_kinds if k in models]:
        pool = batch_states(models[kind], ids, batch_context, max(sessions))
        batch[kind] = {str(b): batched(models[kind], pool[:b], steps) for b in sessions}
        print(f"batched decode {kind}: " + ", ".join(
            f"{b} sessions {v:.1f} tokens/s" for b, v in batch[kind].items()), flush=True)
    check_complete(rows, contexts, batch, sessions, min_steps)
    flat_kinds = [k for k, m in models.items() if constant_state(m.config)]
    results = {"rows": rows, **derived(rows, flat_kinds), "constant_state_kinds": flat_kinds,
               "greedy_tokens_equal_transformers": same_tokens if hf is not None else None,
               "greedy_tokens_compared": compared, "batched_tokens_per_s": batch}
    settings = {"quick": q, "contexts": contexts, "steps": steps, "min_steps": min_steps,
                "max_seconds_per_point": max_seconds, "warmup_steps": 1,
                "statistic": "median step", "dtype": "float32", "batch": 1,
                "device": str(device),
                "our_weight_layout": layout,
                "transformers_weight_layout": "out-in (as shipped)",
                "pythia_and_transformers": "one step of each in turn",
                "prefill_chunk": CHUNK, "presets": presets,
                "transformers": hf is not None, "batched_sessions": sessions,
                "batched_context": batch_context, "batched_spacing": BATCH_SPACING,
                "batched_steps": steps, "flat_tolerance": FLAT_TOLERANCE,
                "goal": {"context": GOAL_CONTEXT, "pythia_speedup_vs_transformers": GOAL_SPEEDUP}}
    path = write_result("decode", settings, results, args.out)
    plot(rows, presets, args.out)
    print(f"wrote {path}; ours/transformers speed-up: " + ", ".join(
        f"{k}: {v:.2f}x" for k, v in results["pythia_speedup_vs_transformers"].items()))
    for name, goal in results["goals"].items():
        print(f"goal {name}: {goal['value']:.2f} (target {goal['target']}): "
              f"{'met' if goal['met'] else 'NOT met'}")
    if hf is not None and not same_tokens:
        print("FAILED: greedy tokens differ from transformers'", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
