"""A toy pass-key task for comparing memory designs in minutes on a CPU.

Random tokens; in segment 0 a cue of ``--cue-len`` tokens followed by ``--answer`` answer tokens
(the fact); then ``--gap`` segments of filler; at the end of the last segment the cue again and
the answer (the question). The cue's last token is also a common filler token (share
``--common``), as "is" is in "the pass key is 71432": a memory that keys a fact on one previous
token sees that key again and again in the filler. A `tiny-infini` model (2 layers, 64 wide,
segments of ``--segment`` tokens, 16 by default) is trained from scratch on fresh batches (loss
on every token, the answer weighted x3; memory gates at their own learning rate), and every
``--eval-every`` steps scored on 256 new trials: exact answers (all tokens) and first-token
accuracy. Training stops at the first step whose loss or gradient is not finite (the curve
records it); `scripts/memory_stability.py` runs the same training with the memory measured.

At the end, ``--eval-gaps 16,64,256`` scores the model at other gaps (``--eval-trials`` new
trials each, in chunks of ``--eval-chunk``, no gradients; the same trials whenever the same
seed is scored), ``--save DIR`` writes its weights (``newllm.checkpoint.save_pretrained``:
config.json + model.safetensors), and ``--load DIR`` starts from such a folder instead of a
fresh model (``--steps 0``: evaluate only). ``--gap-curriculum`` draws each training batch's gap
uniformly from 1..``--gap`` (the curve is still scored at ``--gap``).

    python scripts/recall_toy.py --model-options memory_history=3 --gap 1 --steps 3000
    python scripts/recall_toy.py --model-options memory_key_shift=true --gap 1 --steps 3000
    python scripts/recall_toy.py --load runs/toy --steps 0 --gap 16 --eval-gaps 64,256,1024

Single-threaded; ~15 steps/s on one core of the development machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from newllm import create_model
from newllm.checkpoint import from_pretrained, save_pretrained
from training.optim import is_gate
from training.options import parse_overrides

VOCAB, FIRST_FREE = 128, 7  # tokens below FIRST_FREE are reserved for the cue


def trials(n: int, *, segment: int, gap: int, cue: list[int], answer: int, common: float,
           gen: torch.Generator) -> torch.Tensor:
    """n sequences (n, segment * (gap + 2)): fact in segment 0, question at the very end."""
    length = segment * (gap + 2)
    seq = torch.randint(FIRST_FREE, VOCAB, (n, length), generator=gen)
    seq[torch.rand(n, length, generator=gen) < common] = cue[-1]
    ans = torch.randint(FIRST_FREE, VOCAB, (n, answer), generator=gen)
    c = len(cue)
    starts = torch.randint(0, segment - c - answer + 1, (n,), generator=gen)
    cue_t = torch.tensor(cue)
    for i, p in enumerate(starts.tolist()):
        seq[i, p:p + c] = cue_t
        seq[i, p + c:p + c + answer] = ans[i]
    q = length - answer - c
    seq[:, q:q + c] = cue_t
    seq[:, q + c:] = ans
    return seq


def build(options: dict[str, object], segment: int, load: Path | None = None
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The toy's `tiny-infini` model (or the one saved in folder ``load``) and its AdamW (memory
    gates at their own learning rate)."""
    if load is not None:
        model = from_pretrained(load)
        if model.config.segment_len != segment or model.config.vocab_size != VOCAB:
            raise ValueError(f"{load}: segment {model.config.segment_len}, vocabulary "
                             f"{model.config.vocab_size}; the toy runs {segment}, {VOCAB}")
    else:
        model = create_model("infini", "tiny", vocab_size=VOCAB, segment_len=segment, **options)
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not is_gate(n)], "lr": 3e-3},
                             {"params": [p for n, p in named if is_gate(n)], "lr": 2e-2}],
                            weight_decay=0.0)
    return model, opt


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                             dict[str, object], torch.Generator,
                                             torch.Generator]:
    """A run's model and optimizer (seeded), the trial settings, and the training and
    evaluation generators (`main` and `scripts/memory_stability.py` train alike)."""
    torch.manual_seed(args.seed)
    model, opt = build(parse_overrides(args.model_options), args.segment,
                       getattr(args, "load", None))
    kw = {"segment": args.segment, "gap": args.gap, "cue": list(range(1, args.cue_len + 1)),
          "answer": args.answer, "common": args.common}
    return (model, opt, kw, torch.Generator().manual_seed(args.seed),
            torch.Generator().manual_seed(10_000 + args.seed))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seq: torch.Tensor,
               answer: int) -> tuple[float, float]:
    """One step on trials ``seq``: loss on every token, the answer x3. -> (loss, grad norm);
    no update when either is not finite."""
    logits, _ = model(seq[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="none")
    nll = nll.view(seq.shape[0], -1)
    loss = nll.mean() + 3 * nll[:, -answer:].mean()
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if torch.isfinite(loss) and torch.isfinite(norm):
        opt.step()
    return loss.item(), norm.item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, seq: torch.Tensor, answer: int) -> dict[str, float]:
    """Answer loss, exact answers and first-token accuracy on trials ``seq``."""
    logits, _ = model(seq[:, :-1])
    pred = logits[:, -answer:].argmax(-1)
    return {"answer_nll": float(F.cross_entropy(logits[:, -answer:].flatten(0, 1),
                                                seq[:, -answer:].flatten())),
            "exact": float((pred == seq[:, -answer:]).all(-1).float().mean()),
            "first_token": float((pred[:, 0] == seq[:, -answer]).float().mean())}


def evaluate_gaps(model: torch.nn.Module, args: argparse.Namespace,
                  kw: dict[str, object]) -> dict[str, dict[str, float]]:
    """`evaluate` at each of ``args.eval_gaps`` (the run's trial settings ``kw`` with that
    gap): ``args.eval_trials`` trials per gap, from a generator seeded by the run's seed and
    the gap (the same trials for the same seed), scored ``args.eval_chunk`` at a time.
    -> {gap: {answer_nll, exact, first_token, trials, seconds}}."""
    out: dict[str, dict[str, float]] = {}
    model.eval()
    for gap in args.eval_gaps:
        gen = torch.Generator().manual_seed(20_000 + 1_000 * args.seed + gap)
        gap_kw = kw | {"gap": gap}
        t0, sums, done = time.time(), dict.fromkeys(("answer_nll", "exact", "first_token"), 0.0), 0
        while done < args.eval_trials:
            n = min(args.eval_chunk, args.eval_trials - done)
            for key, value in evaluate(model, trials(n, gen=gen, **gap_kw), args.answer).items():
                sums[key] += value * n
            done += n
        out[str(gap)] = {**{k: v / done for k, v in sums.items()}, "trials": done,
                         "seconds": round(time.time() - t0, 1)}
        print(json.dumps({"eval_gap": gap, **out[str(gap)]}), flush=True)
    model.train()
    return out


def gap_list(text: str) -> list[int]:
    """'16,64,256' -> [16, 64, 256] (argparse type)."""
    try:
        gaps = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected gaps like 16,64,256, got {text!r}") from None
    if not gaps or min(gaps) < 0:
        raise argparse.ArgumentTypeError(f"expected gaps >= 0 like 16,64,256, got {text!r}")
    return gaps


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-options", nargs="*", default=[], help="config overrides, k=v")
    ap.add_argument("--segment", type=int, default=16, help="segment length (default 16)")
    ap.add_argument("--gap", type=int, default=1, help="segments of filler between (default 1)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cue-len", type=int, default=3)
    ap.add_argument("--answer", type=int, default=4, help="answer tokens (default 4)")
    ap.add_argument("--common", type=float, default=0.15,
                    help="share of filler tokens equal to the cue's last token (default 0.15)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the curve here (JSON)")
    ap.add_argument("--eval-gaps", type=gap_list, default=[],
                    help="after training, score at these gaps, e.g. 16,64,256")
    ap.add_argument("--eval-trials", type=int, default=256, help="trials per --eval-gaps gap")
    ap.add_argument("--eval-chunk", type=int, default=32,
                    help="trials scored at once in --eval-gaps (default 32)")
    ap.add_argument("--gap-curriculum", action="store_true",
                    help="each training batch's gap uniform in 1..--gap (scored at --gap)")
    ap.add_argument("--save", type=Path, default=None,
                    help="write the final weights to this folder (safetensors)")
    ap.add_argument("--load", type=Path, default=None,
                    help="start from the weights in this folder (--model-options are ignored)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.cue_len < 1 or args.cue_len + args.answer > args.segment or args.gap < 0:
        ap.error("need 1 <= --cue-len and --cue-len + --answer <= --segment, --gap >= 0")
    if args.steps < 0 or args.eval_trials < 1 or args.eval_chunk < 1:
        ap.error("need --steps >= 0, --eval-trials >= 1 and --eval-chunk >= 1")
    torch.set_num_threads(1)
    model, opt, kw, train_gen, eval_gen = setup(args)
    gap_gen = torch.Generator().manual_seed(30_000 + args.seed)  # --gap-curriculum's draws
    curve: list[dict[str, object]] = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        train_kw = kw
        if args.gap_curriculum:
            train_kw = kw | {"gap": int(torch.randint(1, max(args.gap, 1) + 1, (),
                                                      generator=gap_gen))}
        loss, norm = train_step(model, opt, trials(args.batch_size, gen=train_gen, **train_kw),
                                args.answer)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # training is over: say so
            curve.append({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": True})
            print(json.dumps(curve[-1]), flush=True)
            break
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, **evaluate(model, trials(256, gen=eval_gen, **kw), args.answer),
                   "seconds": round(time.time() - t0, 1)}
            curve.append(row)
            print(json.dumps(row), flush=True)
    finite = not (curve and curve[-1].get("nonfinite"))
    if args.save is not None:
        save_pretrained(model, args.save)
    gaps = evaluate_gaps(model, args, kw) if finite and args.eval_gaps else {}
    if args.out is not None:
        settings = vars(args) | {k: None if vars(args)[k] is None else str(vars(args)[k])
                                 for k in ("out", "save", "load")}
        result: dict[str, object] = {"settings": settings, "curve": curve}
        if gaps:
            result["eval_gaps"] = gaps
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
