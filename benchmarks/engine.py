"""engine: batched decoding over slots against its ceiling, and the prefill chunk size.

Decode, aggregate tokens/s at 1, 8, 32 and 128 sessions (quick: 1 and 4) of the bundled model
(``--checkpoint`` for another; quick: tiny-infini), fp32, input-major weights, one torch thread
unless ``--threads``, three ways in the same run, timed in turns (`round_robin`):

- ``batched_state``: one forward over one batched `ModelState`, every row at the same position
  (about ``--context`` tokens): the ceiling, what one batched forward gives;
- ``slots``: `newllm.slots.Slots.step` over sessions at *different* positions (context + 7 i
  tokens), what the server runs;
- ``decode_step``: `TransformerLM.decode_step` over the same sessions (batched embedding, MLPs
  and head, one mixer call per session): what the server ran before the slots (up to 32
  sessions; it is too slow beyond).

Goal: slots at least 80% of the ceiling at 32 sessions. Before timing, the slots' logits for
one step are checked against one ``model(token, state)`` call per session (max |difference|
reported; at most 1e-4 or the run fails).

Prefill: tokens/s and ms per call when a prompt is read in pieces of 16 .. 1,024 tokens after
the same context (one session), the measurement behind `newllm.scheduler.PREFILL_CHUNK`.

    python -m benchmarks.engine [--quick] [--checkpoint PATH] [--sessions 1 8 32 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    new_figure,
    plot_path,
    results_folder,
    round_robin,
    save_figure,
    write_result,
)
from benchmarks.decode import BATCH_SPACING, batch_states
from newllm.scheduler import PREFILL_CHUNK
from newllm.slots import Slots
from newllm.state import ModelState

GOAL_SESSIONS, GOAL_SHARE = 32, 0.8  # slots / batched_state at 32 sessions
DECODE_STEP_MAX = 32  # decode_step is measured up to this many sessions
CHUNKS = (16, 32, 64, 128, 256, 512, 1024)


def check_slots(model: Any, states: list[ModelState]) -> float:
    """Max |logit difference| of one slots step against one forward call per session."""
    slots = Slots(model, len(states))
    handles = [slots.add(s) for s in states]
    tokens = torch.arange(1, len(states) + 1)
    logits = slots.step(handles, tokens)
    worst = 0.0
    with torch.no_grad():
        for i, s in enumerate(states):
            alone, _ = model(tokens[i].view(1, 1), s, last_only=True)
            worst = max(worst, float((logits[i] - alone[0, -1]).abs().max()))
    return worst


def decode_level(model: Any, ids: torch.Tensor, context: int, n: int,
                 repeat: int) -> dict[str, float]:
    """tokens/s of the three ways at n sessions."""
    states = batch_states(model, ids, context, n)
    with torch.no_grad():
        _, batched = model(ids[:, :context].expand(n, -1))
    slots = Slots(model, n)
    handles = [slots.add(s) for s in states]
    tokens = torch.randint(1, model.config.vocab_size, (n,))
    box = {"state": batched, "states": states}

    def one_forward() -> None:
        with torch.no_grad():
            _, box["state"] = model(tokens.view(n, 1), box["state"], last_only=True)

    def slot_step() -> None:
        slots.step(handles, tokens)

    def decode_step() -> None:
        with torch.no_grad():
            _, box["states"] = model.decode_step(tokens, box["states"])

    fns = {"batched_state": one_forward, "slots": slot_step}
    if n <= DECODE_STEP_MAX:
        fns["decode_step"] = decode_step
    seconds = round_robin(fns, repeat)
    return {k: n / s for k, s in seconds.items()}


def prefill_sweep(model: Any, ids: torch.Tensor, context: int,
                  total: int) -> dict[str, dict[str, float]]:
    """Reading ``total`` tokens after ``context`` in pieces of each size: tokens/s, ms/piece."""
    out = {}
    with torch.no_grad():
        _, base = model(ids[:, :context])
        for chunk in CHUNKS:
            if chunk > total:
                break
            text = ids[:, context:context + total]
            model(text[:, :chunk], base, last_only=True)  # untimed
            t0 = time.perf_counter()
            state = base
            for start in range(0, total, chunk):
                _, state = model(text[:, start:start + chunk], state, last_only=True)
            dt = time.perf_counter() - t0
            out[str(chunk)] = {"tokens_per_s": total / dt,
                               "ms_per_chunk": 1000 * dt / -(-total // chunk)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="newllm bench engine", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few sessions (a smoke test)")
    ap.add_argument("--checkpoint", default=None, help="model (default: the bundled one)")
    ap.add_argument("--sessions", type=int, nargs="+", default=None,
                    help="sessions per level (default 1 8 32 128)")
    ap.add_argument("--context", type=int, default=None, help="tokens before the sessions")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per level")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (server default 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    torch.set_num_threads(args.threads)
    from newllm import load_checkpoint

    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    model, _ = load_checkpoint(checkpoint)
    model.eval().use_input_major_weights()
    levels = args.sessions or ([1, 4] if args.quick else [1, 8, 32, 128])
    context = args.context or (40 if args.quick else 1000)
    repeat = args.repeat or (3 if args.quick else 20)
    prefill_total = 256 if args.quick else 2048
    g = torch.Generator().manual_seed(0)
    need = context + BATCH_SPACING * max(levels) + prefill_total
    ids = torch.randint(1, model.config.vocab_size, (1, need), generator=g)
    worst = check_slots(model, batch_states(model, ids, context, min(max(levels), 8)))
    rows = {}
    for n in levels:
        rows[str(n)] = decode_level(model, ids, context, n, repeat)
        print(f"{n:4d} sessions: " + ", ".join(f"{k} {v:,.0f} tok/s"
                                               for k, v in rows[str(n)].items()), flush=True)
    share = {n: r["slots"] / r["batched_state"] for n, r in rows.items()}
    chunks = prefill_sweep(model, ids, context, prefill_total)
    results: dict[str, Any] = {
        "tokens_per_s": rows, "slots_share_of_batched_state": share,
        "slots_max_abs_logit_diff": worst, "prefill_chunks": chunks,
        "prefill_chunk_chosen": PREFILL_CHUNK}
    if str(GOAL_SESSIONS) in share:
        v = share[str(GOAL_SESSIONS)]
        results["goal"] = {"sessions": GOAL_SESSIONS, "target": GOAL_SHARE, "value": v,
                           "met": v >= GOAL_SHARE}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": model.config.name, "sessions": levels, "context": context,
                "spacing": BATCH_SPACING, "repeat": repeat, "dtype": "float32",
                "weights": "input-major", "threads": args.threads,
                "prefill_tokens": prefill_total}
    path = write_result("engine", settings, results, args.out)
    fig, ax = new_figure(f"Batched decode ({model.config.name}, ~{context:,} tokens of context)",
                         "sessions", "generated tokens / s", logy=True)
    for way in ("batched_state", "slots", "decode_step"):
        xs = [n for n in levels if way in rows[str(n)]]
        ax.plot(xs, [rows[str(n)][way] for n in xs], marker="o", label=way)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.legend()
    save_figure(fig, plot_path("engine", args.out))
    print(f"wrote {path}; slots / one batched state: " +
          ", ".join(f"{n}: {v:.0%}" for n, v in share.items()) +
          f"; logits vs separate calls within {worst:.1e}")
    if worst > 1e-4:
        print(f"FAILED: slots' logits differ from separate calls by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
