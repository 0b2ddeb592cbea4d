"""Train a pointer cache (`newllm.pointer`) onto a frozen model: can the bundled model answer
word facts from many segments back when a memory's values are token identities instead of
hidden vectors? Written for issue 19 (training/README.md, sessions 18 to 20).

The model's own weights do not change; the pointer's (two projections, the write and mixing
gates, and with ``--gate-inputs`` the gate's weights for the read's focus and momentum) are
trained on windows of prose, chat-form recall examples (`training.chat_data.ChatExamples`, the
fact at the window's start) and optionally pass-key examples (``--passkey-fraction``), each
read from an empty state or, with ``--prefix-tokens``, after a prefix of other prose; the loss
is taken at the targets alone (`newllm.pointer.PointerCache.score_targets`, as ``newllm train
--train-only 'pointer.*'`` does; it has no prefixes). The result
is a checkpoint (``--save-checkpoint``: the model with its pointer, float16) or the pointer's
weights alone (``--save``, which ``--load`` reads back). Evaluations are `training.chat_eval`'s
(value choice, chat recall with the session moved through a memory file after turn 5).

    python scripts/copy_cache.py --checkpoint MODEL_WITHOUT_POINTER \\
        --data DATA/gutenberg/train.txt --filler DATA/gutenberg/val.txt --steps 600 \\
        --gate-inputs focus momentum --save-checkpoint runs/ptr --value-choice 40 --chat 50

A checkpoint that already has a pointer is trained further (its pointer's options are its own,
except ``--span``: a pointer of span 1 gets the reads of the tokens after the next,
`newllm.pointer.widen_span`, their gates starting as copies of the first read's; and
``--delay``, `newllm.pointer.with_delay`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.chat_data import ChatExamples  # noqa: E402
from training.chat_eval import chat_recall, filler_words, value_choice  # noqa: E402


@torch.no_grad()
def read_prose(model: Any, tokens: Any, n: int, rng: random.Random) -> tuple[Tensor, Tensor]:
    """The pointer's key inputs u (1, n, W) and the token ids (1, n) of ``n`` tokens of the
    stream from a random place, read by the frozen model as one long session."""
    start = rng.randrange(max(1, len(tokens) - n))
    ids = torch.as_tensor(tokens[start:start + n].astype("int64"))[None]
    us, state = [], None
    for c in range(0, ids.shape[1], 1024):
        hidden, embedded, state = model.hidden_states(ids[:, c:c + 1024], state)
        us.append(model.pointer.inputs(hidden, embedded))
    return torch.cat(us, 1), ids


def prefix_state(pointer: Any, u: Tensor, ids: Tensor, batch: int) -> Any:
    """The pointer's state after reading ``ids`` (1, p) whose key inputs are ``u`` (1, p, W),
    with the pointer's current weights (so the gradient reaches how prose is written), for
    ``batch`` rows."""
    import dataclasses

    from newllm.state import state_tensors

    state = pointer.state_of(u, ids)
    return dataclasses.replace(state, **{
        n: t.expand(batch, *t.shape[1:]) for n, t in state_tensors(state).items()})


def train(model: Any, tok: Any, args: argparse.Namespace) -> list[dict]:
    """Train ``model.pointer`` (every other weight frozen); the curve's rows."""
    import math

    from training.data import RecallExamples, Windows, default_cache_dir, load_token_stream

    stream = load_token_stream([args.data], tok, default_cache_dir())
    windows = Windows(stream.tokens, args.length)
    chats = ChatExamples(tok, at_start=1.0, max_fillers=args.max_fillers, acks=0.7)
    keys = RecallExamples(tok, model.config.segment_len, at_start=0.5)
    pointer = model.pointer
    long_read = None
    if args.prefix_tokens:  # twice the longest prefix, to draw prefixes from
        long_read = read_prose(model, stream.tokens, 2 * args.prefix_tokens,
                           random.Random(f"prefix-{args.seed}"))
    opt = torch.optim.AdamW(pointer.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    curve = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        rows, masks = [], []
        for _ in range(args.batch_size):
            w = windows[rng.randrange(len(windows))]
            mask = torch.zeros(args.length, dtype=torch.bool)
            r = rng.random()
            if r < args.chat_fraction:
                w, mask, _ = chats.make(w, rng)
            elif r < args.chat_fraction + args.passkey_fraction:
                w, mask, _ = keys.make(w, rng)
            rows.append(w)
            masks.append(mask)
        batch, answer = torch.stack(rows), torch.stack(masks)
        ids, targets = batch[:, :-1], batch[:, 1:]
        B = ids.shape[0]
        with torch.no_grad():  # the frozen model: its hidden states and logits
            hidden, embedded, _ = model.hidden_states(ids)
            logits = model.embed_out(hidden)
        start = pointer.init_state(B, ids.device, hidden.dtype)
        started = torch.zeros(B, dtype=torch.bool)
        prefix = 0
        if long_read is not None and rng.random() < args.prefix_fraction:
            # the window read after p tokens of other prose (p log-uniform from 256): the
            # pointer learns to find what the window told among many older pairs
            prefix = int(math.exp(rng.uniform(math.log(256), math.log(args.prefix_tokens))))
            at = rng.randrange(long_read[0].shape[1] - prefix)
            start = prefix_state(pointer, long_read[0][:, at:at + prefix],
                                 long_read[1][:, at:at + prefix], B)
            started = torch.ones(B, dtype=torch.bool)
        mixed, plain, _ = pointer.score_targets(hidden, embedded, ids, targets, logits, start,
                                                started)
        weight = 1.0 + (args.recall_weight - 1.0) * answer.float()
        loss = -(weight * mixed).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            prose = ~answer
            row = {"step": step, "loss": loss.item(),
                   "prose_nll": -mixed[prose].mean().item(),
                   "prose_nll_model": -plain[prose].mean().item(),
                   "answer_nll": -mixed[answer].mean().item() if answer.any() else None,
                   "answer_nll_model": -plain[answer].mean().item() if answer.any() else None,
                   "prefix": prefix, "seconds": round(time.time() - t0, 1)}
            if pointer.gate_read is not None:
                row["gate_read"] = dict(zip(pointer.gate_inputs,
                                            pointer.gate_read.tolist(), strict=True))
            if pointer.span_read is not None:  # depth 2.. each
                row["span_read"] = [dict(zip(pointer.gate_inputs, w, strict=True))
                                    for w in pointer.span_read.tolist()]
            curve.append(row)
            print(json.dumps(row), flush=True)
    return curve


def main(argv: list[str] | None = None) -> int:
    from newllm.checkpoint import load_checkpoint, save_pretrained
    from newllm.pointer import add_pointer, widen_span, with_delay

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="newllm/checkpoints/default")
    p.add_argument("--data", help="prose to train on (text file)")
    p.add_argument("--filler", help="held-out prose for the evaluations")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chat-fraction", type=float, default=0.5)
    p.add_argument("--max-fillers", type=int, default=10)
    p.add_argument("--passkey-fraction", type=float, default=0.0,
                   help="share of examples that are pass-key examples (training.data's)")
    p.add_argument("--prefix-tokens", type=int, default=0,
                   help="read a share of windows (--prefix-fraction) after up to this many "
                        "tokens of other prose in the pointer (0: every window from empty)")
    p.add_argument("--prefix-fraction", type=float, default=0.5)
    p.add_argument("--recall-weight", type=float, default=5.0)
    p.add_argument("--dk", type=int, help="the new pointer's key width (default 64)")
    p.add_argument("--token-keys", action="store_true",
                   help="keys and queries also read the token's input embedding")
    p.add_argument("--gate-inputs", nargs="*", default=None, metavar="NAME",
                   help="what the mixing gate reads besides the hidden state: focus, momentum")
    p.add_argument("--span", type=int, default=None,
                   help="tokens read after each pair found (newllm.pointer; default 1, the next "
                        "only, or the checkpoint's pointer's)")
    p.add_argument("--delay", type=int, default=None,
                   help="the pointer reads pairs at least this many tokens old (newllm.pointer; "
                        "default 0, or the checkpoint's pointer's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="of the training batches")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="of the evaluations' conversations (the same for every run)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--load", help="pointer weights to start from (safetensors, from --save)")
    p.add_argument("--save", help="write the pointer's weights here (safetensors)")
    p.add_argument("--save-checkpoint",
                   help="write the model with its pointer to this folder, in float16")
    p.add_argument("--no-cache", action="store_true", help="evaluate the model alone")
    p.add_argument("--value-choice", type=int, default=0)
    p.add_argument("--value-fillers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--chat", type=int, default=0, help="conversations of chat recall")
    p.add_argument("--out", help="JSON of the curve and the evaluations")
    args = p.parse_args(argv)
    if args.steps and not args.data:
        p.error("--steps needs --data")
    if args.prefix_tokens and args.prefix_tokens < 512:
        p.error(f"--prefix-tokens must be 0 or at least 512, got {args.prefix_tokens}")
    if args.chat_fraction + args.passkey_fraction > 1:
        p.error("--chat-fraction and --passkey-fraction add up to more than 1")
    if (args.value_choice or args.chat) and not args.filler:
        p.error("--value-choice and --chat need --filler")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tok = load_checkpoint(args.checkpoint, dtype=torch.float32)
    if base.pointer is not None:
        if args.dk is not None or args.token_keys or args.gate_inputs is not None:
            p.error(f"{args.checkpoint} already has a pointer (pointer_dim "
                    f"{base.config.pointer_dim}); it is trained as it is: leave out --dk, "
                    "--token-keys and --gate-inputs")
        model = base
        if args.span is not None and args.span != base.config.pointer_span:
            try:
                model = widen_span(base, args.span, warm=True)
            except ValueError as e:
                p.error(f"--span {args.span}: {e}")
    else:
        try:
            model = add_pointer(base, 64 if args.dk is None else args.dk, args.token_keys,
                                tuple(args.gate_inputs or ()), args.span or 1)
        except ValueError as e:
            p.error(str(e))
    if args.delay is not None and args.delay != model.config.pointer_delay:
        try:
            model = with_delay(model, args.delay)
        except ValueError as e:
            p.error(f"--delay {args.delay}: {e}")
    model.eval()
    for name, prm in model.named_parameters():
        prm.requires_grad_(name.startswith("pointer."))
    if args.load:
        from safetensors.torch import load_file

        model.pointer.load_state_dict(load_file(args.load))
    result: dict[str, Any] = {"args": vars(args)}
    if args.steps:
        result["curve"] = train(model, tok, args)
        if args.save:
            from safetensors.torch import save_file

            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in model.pointer.state_dict().items()},
                      args.save)
    if args.save_checkpoint:
        save_pretrained(model, args.save_checkpoint, tok, dtype=torch.float16)
    if args.no_cache and base.pointer is not None:
        p.error("--no-cache evaluates the model without a pointer: give the checkpoint "
                "without one")
    judged = (base if args.no_cache else model).eval()
    words = filler_words(args.filler) if args.filler else []
    with torch.no_grad():
        if args.value_choice:
            result["value_choice"] = value_choice(judged, tok, words, args.value_choice,
                                                  args.value_fillers, seed=args.eval_seed)
            print(json.dumps(result["value_choice"]), flush=True)
        if args.chat:
            result["chat"] = chat_recall(judged, tok, words, args.chat, seed=args.eval_seed)
            print(json.dumps({k: v for k, v in result["chat"].items() if k != "examples"}),
                  flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
