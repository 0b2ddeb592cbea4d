"""pointer: what a pointer cache (`newllm.pointer`) costs a model, measured beside the same model
without one in the same run.

The bundled model (``--checkpoint`` for another; quick: tiny-infini) with its pointer and
without it; or, for a model without one, the model and the same model with a new pointer of
``--dim`` features whose gate reads the read's focus and momentum (its weights at their initial
values: the cost does not depend on them). fp32, one torch thread unless ``--threads``, timed
in turns (`round_robin`):

- **state**: bytes of a session's state (`ModelState.nbytes`) and of its memory file;
- **decode**: generated tokens/s of `newllm.slots.Slots.step` (what the server runs) at 1, 8
  and 32 sessions (quick: 1 and 4), each session about ``--context`` tokens in; before timing,
  the pointer model's slot logits are checked against one ``model(token, state)`` call per
  session (at most 1e-4 apart or the run fails);
- **prefill**: tokens/s reading 2,048 tokens (quick: 256) in pieces of ``PREFILL_CHUNK``;
- **training**: seconds of a step (forward and backward of a batch, only the pointer's weights
  trainable, as `scripts/copy_cache.py` and ``newllm train --train-only 'pointer.*'``) with the
  loss taken from the whole mixture (logits, then cross-entropy) and from the targets alone
  (``forward(targets=...)``, `PointerCache.score_targets`), and the ratio.

    python -m benchmarks.pointer [--quick] [--checkpoint PATH] [--dim 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    new_figure,
    plot_path,
    results_folder,
    round_robin,
    save_figure,
    write_result,
)
from benchmarks.decode import BATCH_SPACING, batch_states
from benchmarks.engine import check_slots
from newllm.memory_file import save_memory
from newllm.pointer import POINTER_GATE_INPUTS, add_pointer, remove_pointer
from newllm.scheduler import PREFILL_CHUNK
from newllm.slots import Slots


def decode_rates(models: dict[str, Any], ids: torch.Tensor, context: int, n: int,
                 repeat: int) -> dict[str, float]:
    """Generated tokens/s of each model's slots at ``n`` sessions, timed in turns."""
    fns = {}
    for name, model in models.items():
        slots = Slots(model, n)
        handles = [slots.add(s) for s in batch_states(model, ids, context, n)]
        tokens = torch.randint(1, model.config.vocab_size, (n,),
                               generator=torch.Generator().manual_seed(n))
        fns[name] = lambda slots=slots, handles=handles, tokens=tokens: slots.step(handles,
                                                                                   tokens)
    return {k: n / s for k, s in round_robin(fns, repeat).items()}


def prefill_rates(models: dict[str, Any], ids: torch.Tensor, total: int,
                  repeat: int) -> dict[str, float]:
    """Tokens/s reading ``total`` tokens in pieces of PREFILL_CHUNK from an empty state."""
    def reader(model: Any) -> Any:
        def run() -> None:
            with torch.no_grad():
                state = None
                for start in range(0, total, PREFILL_CHUNK):
                    _, state = model(ids[:, start:start + PREFILL_CHUNK], state,
                                     last_only=True)
        return run
    seconds = round_robin({k: reader(m) for k, m in models.items()}, repeat)
    return {k: total / s for k, s in seconds.items()}


def training_seconds(model: Any, batch: torch.Tensor, repeat: int) -> dict[str, float]:
    """Seconds of a forward and backward with only the pointer trainable: the loss from
    the whole mixture against the targets alone."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("pointer."))
    ids, targets = batch[:, :-1], batch[:, 1:]

    def mixture() -> None:
        logits, _ = model(ids)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    def targets_alone() -> None:
        lp, _ = model(ids, targets=targets)
        (-lp.mean()).backward()

    model.train()
    try:
        return round_robin({"whole_mixture": mixture, "targets_alone": targets_alone}, repeat)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="newllm bench pointer", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few sessions (a smoke test)")
    ap.add_argument("--checkpoint", default=None, help="model (default: the bundled one)")
    ap.add_argument("--dim", type=int, default=64,
                    help="features of the pointer added to a model without one (pointer_dim)")
    ap.add_argument("--sessions", type=int, nargs="+", default=None,
                    help="sessions per decode level (default 1 8 32)")
    ap.add_argument("--context", type=int, default=None, help="tokens before the sessions")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (server default 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    torch.set_num_threads(args.threads)
    from newllm import load_checkpoint

    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    loaded, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    if loaded.pointer is not None:  # the model's own pointer, against the model without it
        base, with_pointer = remove_pointer(loaded), loaded
    else:
        torch.manual_seed(0)
        base, with_pointer = loaded, add_pointer(loaded, args.dim,
                                                   gate_inputs=POINTER_GATE_INPUTS)
    models = {"without": base.eval(), "with_pointer": with_pointer.eval()}
    levels = args.sessions or ([1, 4] if args.quick else [1, 8, 32])
    context = args.context or (40 if args.quick else 1000)
    repeat = args.repeat or (3 if args.quick else 20)
    prefill_total = 256 if args.quick else 2048
    batch_shape = (2, 129) if args.quick else (8, 1025)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(1, vocab, (1, max(context + BATCH_SPACING * max(levels), prefill_total)),
                        generator=g)
    worst = check_slots(with_pointer, batch_states(with_pointer, ids, context,
                                                   min(max(levels), 8)))
    state_bytes, file_bytes = {}, {}
    for name, model in models.items():
        with torch.no_grad():
            _, state = model(ids[:, :context])
        state_bytes[name] = state.nbytes()
        file_bytes[name] = len(save_memory(state, model))
    decode = {}
    for n in levels:
        decode[str(n)] = decode_rates(models, ids, context, n, repeat)
        print(f"{n:3d} sessions: " + ", ".join(f"{k} {v:,.0f} tok/s"
                                              for k, v in decode[str(n)].items()), flush=True)
    prefill = prefill_rates(models, ids, prefill_total, max(3, repeat // 4))
    print("prefill: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in prefill.items()), flush=True)
    batch = torch.randint(1, vocab, batch_shape, generator=g)
    train = training_seconds(with_pointer, batch, max(2, repeat // 5))
    print(f"training step: whole mixture {train['whole_mixture']:.2f} s, targets alone "
          f"{train['targets_alone']:.2f} s", flush=True)
    results: dict[str, Any] = {
        "state_bytes": state_bytes, "memory_file_bytes": file_bytes,
        "state_ratio": state_bytes["with_pointer"] / state_bytes["without"],
        "decode_tokens_per_s": decode,
        "decode_share": {n: r["with_pointer"] / r["without"] for n, r in decode.items()},
        "prefill_tokens_per_s": prefill,
        "prefill_share": prefill["with_pointer"] / prefill["without"],
        "training_step_s": train,
        "training_speedup": train["whole_mixture"] / train["targets_alone"],
        "slots_max_abs_logit_diff": worst}
    pcfg = with_pointer.config
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": base.config.name, "pointer_dim": pcfg.pointer_dim,
                "pointer_gate_inputs": list(pcfg.pointer_gate_inputs),
                "pointer_span": pcfg.pointer_span, "pointer_delay": pcfg.pointer_delay,
                "pointer_trained": loaded.pointer is not None, "sessions": levels,
                "context": context, "spacing": BATCH_SPACING, "repeat": repeat,
                "dtype": "float32", "threads": args.threads, "prefill_tokens": prefill_total,
                "prefill_chunk": PREFILL_CHUNK, "training_batch": list(batch_shape)}
    path = write_result("pointer", settings, results, args.out)
    fig, ax = new_figure(f"Decode with and without a pointer ({base.config.name}, "
                         f"pointer_dim {pcfg.pointer_dim})", "sessions", "generated tokens / s",
                         logy=True)
    for name in models:
        ax.plot(levels, [decode[str(n)][name] for n in levels], marker="o", label=name)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.legend()
    save_figure(fig, plot_path("pointer", args.out))
    print(f"wrote {path}; state x{results['state_ratio']:.1f}; decode with the pointer " +
          ", ".join(f"{n}: {v:.0%}" for n, v in results["decode_share"].items()) +
          f" of without; training step x{results['training_speedup']:.1f} faster on the "
          f"targets alone; slot logits within {worst:.1e}")
    if worst > 1e-4:
        print(f"FAILED: slots' logits differ from separate calls by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
