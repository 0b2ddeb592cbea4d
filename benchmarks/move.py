"""move: does the model remember a fact after its session moved to another server?

End to end through two live servers (same checkpoint, separate session folders, loopback). One
trial, for a random five-digit pass key N and a distance of K segments:

1. on server A, two sessions read the same text: ``EOS`` + the fact
   ``" The pass key is N. Remember it. N is the pass key."`` (the sentence of
   `training.data.RecallExamples`) + K segments (K x ``segment_len`` tokens) of prose from a
   random place in the filler text;
2. one of them is moved to server B with `clients.move_session` (export, verify, import, verify,
   delete the source);
3. the question ``" What is the pass key? The pass key is"`` is asked with greedy decoding in the
   moved session on B and in the session that stayed on A, and in a fresh session with an empty
   memory (the floor: the question alone).

Recall is exact when the first number of the answer is N. Reported per distance: accuracy after
the move, without the move (the answers must be identical, token for token: exit 1 otherwise)
and with the memory reset.

Chat recall after a move (``--chat-conversations``, 50; `training.chat_eval` makes the
conversations): a user tells a fact in the first message of a chat session on server A (a name,
a number, a city, a favourite; `training.chat_data`), more user messages of about
``--chat-user-tokens`` (30) tokens of filler prose follow, each answered by the model (greedy,
at most ``--chat-reply-tokens`` (30) tokens, the server's implicit ``"\\nUser:"`` stop), the
session is moved to server B after turn ``--chat-move-at`` (5), and turn ``--chat-turns`` (10)
asks for the fact on B. Right when the fact's value is a word of the reply's first line.
Reported: recall through the servers, the floor (the question alone in a fresh session), and
recall and reply agreement of the same conversations run with the library alone, each also split
by the kind of value (``by_kind``: digits or words)
(`training.chat_eval.run_conversation`, the move through a memory file: what training
evaluates). ``--chat-only`` runs just this part and writes ``move_chat.json``.

Moves across precision (library level, the same `load_memory_report` a server's upload runs):
the checkpoint is loaded in float32, bfloat16 and float16; for each of ``--precision-prompts``
(50) places in the filler, a session reads ``--prompt-tokens`` (512) tokens at the writer's
precision, its memory file is loaded at the reader's (converted), and (a) 32 greedy tokens
continue it there, compared with continuing where it was written and with the reader reading
the same prompt itself (no move); (b) the next 1,024 tokens of the text are scored each way
(perplexity). Pairs: bf16 -> fp32, fp32 -> bf16, fp16 -> fp32.

    python -m benchmarks.move [--quick] [--checkpoint PATH] [--filler FILE] [--distances 2 4 8]
        [--chat-conversations 50] [--chat-only]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROSE,
    new_figure,
    plot_path,
    results_folder,
    save_figure,
    write_result,
)
from benchmarks.live import running_servers
from clients import move_session

FACT = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
MAX_FILLER_CHARS = 400_000


def first_number(text: str) -> int | None:
    found = re.match(r"\s*(\d+)", text)
    return int(found.group(1)) if found else None


def trial_prompt(tok: Any, key: int, filler: list[int], n_filler: int,
                 rng: random.Random) -> list[int]:
    """EOS + fact + ``n_filler`` tokens of prose from a random offset of the filler."""
    at = rng.randrange(len(filler))
    prose = [filler[(at + i) % len(filler)] for i in range(n_filler)]
    return [tok.eos_token_id] + tok.encode(FACT.format(key=key)) + prose


PAIRS = (("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float32"))


def precision_moves(checkpoint: str | None, filler_text: str, prompts: int, prompt_tokens: int,
                    next_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy agreement and perplexity after moves between precisions (see the docstring)."""
    import math

    import torch

    from newllm import load_checkpoint
    from newllm.generation import SamplingParams, generate
    from newllm.memory_file import load_memory_report, save_memory

    models, tok = {}, None
    for name in {d for pair in PAIRS for d in pair}:
        models[name], tok = load_checkpoint(checkpoint, dtype=getattr(torch, name))
    assert tok is not None
    ids = tok.encode(filler_text)
    need = prompt_tokens + next_tokens + 1
    if len(ids) < need:
        ids = ids * (need // len(ids) + 1)
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=32, temperature=0, stop_token_ids=())

    def greedy(model: Any, state: Any, first: int) -> list[int]:
        return generate(model, [first], state, params).collect().token_ids

    def nll(model: Any, state: Any, text: list[int]) -> float:
        with torch.no_grad():
            logits, _ = model(torch.tensor([text[:-1]]), state)
        target = torch.tensor(text[1:])
        return float(torch.nn.functional.cross_entropy(logits[0].float(), target,
                                                       reduction="sum"))

    out: dict[str, Any] = {}
    for src, dst in PAIRS:
        same_written = same_reader = 0
        sums = {"written": 0.0, "moved": 0.0, "reader": 0.0}
        for _ in range(prompts):
            at = rng.randrange(len(ids) - need)
            prompt, after = ids[at:at + prompt_tokens], ids[at + prompt_tokens - 1:at + need]
            with torch.no_grad():
                _, written = models[src](torch.tensor([prompt[:-1]]))
                _, read_here = models[dst](torch.tensor([prompt[:-1]]))
            moved = load_memory_report(save_memory(written, models[src]), models[dst])
            assert moved.conversion is not None, "a move between precisions must convert"
            base = greedy(models[src], written, prompt[-1])
            got = greedy(models[dst], moved.state, prompt[-1])
            same_written += got == base
            same_reader += got == greedy(models[dst], read_here, prompt[-1])
            sums["written"] += nll(models[src], written, after)
            sums["moved"] += nll(models[dst], moved.state, after)
            sums["reader"] += nll(models[dst], read_here, after)
        n = prompts * next_tokens
        out[f"{src}->{dst}"] = {
            "greedy_identical_to_written": same_written / prompts,
            "greedy_identical_to_reader_alone": same_reader / prompts,
            "ppl_written": math.exp(sums["written"] / n), "ppl_moved": math.exp(sums["moved"] / n),
            "ppl_reader_alone": math.exp(sums["reader"] / n)}
        row = out[f"{src}->{dst}"]
        print(f"{src} -> {dst}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
              flush=True)
    return out


def chat_moves(servers: dict[str, Any], model: Any, tok: Any, words: list[str],
               conversations: int, turns: int, user_tokens: int, reply_tokens: int,
               move_at: int, seed: int) -> dict[str, Any]:
    """Chat recall through two servers with the session moved (see the module docstring)."""
    from training.chat_data import answer_matches
    from training.chat_eval import conversation_script, recall_by_kind, run_conversation

    rng = random.Random(seed)
    right: dict[str, list[bool]] = {"moved": [], "floor": [], "library": []}
    kinds: list[str] = []
    same_as_library = 0
    examples: list[dict[str, Any]] = []
    ask = {"session_input": "new", "max_tokens": reply_tokens, "temperature": 0}
    with servers["a"].client() as a, servers["b"].client() as b:
        for c in range(conversations):
            script = conversation_script(rng, words, turns, user_tokens)
            sid, replies = f"chat-{seed}-{c}", []
            for i, message in enumerate(script.messages):
                if i == move_at:
                    moved = move_session(sid, a, b)
                    if not moved.source_deleted:
                        raise RuntimeError(f"the move of {sid} went wrong: {moved}")
                server = a if i < move_at else b
                replies.append(server.chat(message, sid, **ask).text)
            library = run_conversation(model, tok, script, reply_tokens, move_at)
            floor = a.chat(script.fact.ask, f"floor-{seed}-{c}", **ask).text
            value = script.fact.value
            right["moved"].append(answer_matches(replies[-1], value))
            right["library"].append(answer_matches(library[-1], value))
            right["floor"].append(answer_matches(floor, value))
            kinds.append(script.fact.kind)
            same_as_library += replies == library
            if len(examples) < 5:
                examples.append({"fact": script.fact.tell, "ask": script.fact.ask,
                                 "answer": replies[-1], "reply_1": replies[0],
                                 "reply_2": replies[1]})
    out = {k: sum(flags) / conversations for k, flags in right.items()}
    out["replies_same_as_library"] = same_as_library / conversations
    by_kind = recall_by_kind(kinds, right)
    print("chat recall after a move: " + ", ".join(f"{k} {v:.0%}" for k, v in out.items())
          + "; moved by kind: " + ", ".join(f"{kind} {row['moved']:.0%} of "
                                           f"{row['conversations']}"
                                           for kind, row in by_kind.items()), flush=True)
    return {**out, "conversations": conversations, "by_kind": by_kind, "examples": examples}


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-infini, 2 trials, 1 distance")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder or preset (default: the bundled default model)")
    ap.add_argument("--filler", type=Path, default=None,
                    help="a text file of prose to put between fact and question (default: a "
                         "built-in paragraph)")
    ap.add_argument("--distances", type=int, nargs="*", default=None,
                    help="segments of prose between fact and question (default 2 4 8)")
    ap.add_argument("--trials", type=int, default=None, help="random facts per distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision-prompts", type=int, default=None,
                    help="places in the filler for the precision moves (default 50)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="tokens a session reads before a precision move (default 512)")
    ap.add_argument("--chat-conversations", type=int, default=None,
                    help="chat conversations moved between the servers (default 50, quick 2; "
                         "0 = none)")
    ap.add_argument("--chat-turns", type=int, default=None,
                    help="user messages per conversation, the last one asks (default 10)")
    ap.add_argument("--chat-user-tokens", type=int, default=None,
                    help="about this many tokens per user message (default 30)")
    ap.add_argument("--chat-reply-tokens", type=int, default=None,
                    help="the model's replies: at most this many tokens (default 30)")
    ap.add_argument("--chat-move-at", type=int, default=None,
                    help="the session moves from A to B after this turn (default 5)")
    ap.add_argument("--chat-only", action="store_true",
                    help="only the chat conversations (writes move_chat.json)")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    q = args.quick
    chat_opts = {
        "conversations": _default(args.chat_conversations, 2 if q else 50),
        "turns": _default(args.chat_turns, 3 if q else 10),
        "user_tokens": _default(args.chat_user_tokens, 12 if q else 30),
        "reply_tokens": _default(args.chat_reply_tokens, 4 if q else 30),
        "move_at": _default(args.chat_move_at, 2 if q else 5)}
    if args.chat_only and not chat_opts["conversations"]:
        ap.error("--chat-only needs --chat-conversations > 0")
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    distances = args.distances or ([2] if args.quick else [2, 4, 8])
    trials = args.trials or (2 if args.quick else 30)
    if args.filler is not None:
        text = args.filler.read_text(encoding="utf-8")[:MAX_FILLER_CHARS]
    else:
        text = PROSE

    from newllm import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    S = model.config.segment_len
    filler = tok.encode(text)
    question = tok.encode(QUESTION)
    rng = random.Random(args.seed)
    by_distance: dict[str, dict[str, Any]] = {}
    mismatches: list[dict[str, Any]] = []
    moved_bytes: list[int] = []
    words = text.split()
    chat: dict[str, Any] = {}
    with running_servers(checkpoint, {"a": 1, "b": 1}) as servers:
        if chat_opts["conversations"]:
            chat = chat_moves(servers, model, tok, words, seed=args.seed, **chat_opts)
        if args.chat_only:
            distances = []
        with servers["a"].client() as a, servers["b"].client() as b:
            for d in distances:
                hits = {"moved": 0, "not_moved": 0, "reset": 0}
                for t in range(trials):
                    key = rng.randint(10_000, 99_999)
                    prompt = trial_prompt(tok, key, filler, d * S, rng)
                    moving, staying = f"move-d{d}-t{t}", f"stay-d{d}-t{t}"
                    for sid in (moving, staying):
                        a.complete(prompt, sid, session_input="new", max_tokens=0)
                    moved = move_session(moving, a, b)
                    if moved.tokens_seen != len(prompt) or not moved.source_deleted:
                        raise RuntimeError(f"the move of {moving} went wrong: {moved}")
                    moved_bytes.append(moved.bytes)
                    ask = {"session_input": "new", "max_tokens": 8, "temperature": 0}
                    answers = {
                        "moved": b.complete(question, moving, **ask).text,
                        "not_moved": a.complete(question, staying, **ask).text,
                        "reset": a.complete([tok.eos_token_id] + question, f"reset-d{d}-t{t}",
                                            **ask).text,
                    }
                    for name, answer in answers.items():
                        hits[name] += int(first_number(answer) == key)
                    if answers["moved"] != answers["not_moved"]:
                        mismatches.append({"distance": d, "trial": t, "key": key, **answers})
                by_distance[str(d)] = {k: v / trials for k, v in hits.items()}
                print(f"distance {d} segments ({d * S} tokens): " + ", ".join(
                    f"{k} {v:.0%}" for k, v in by_distance[str(d)].items()), flush=True)
    chat_settings = {f"chat_{k}": v for k, v in chat_opts.items()}
    if args.chat_only:
        settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                    "model": model.config.name, "fingerprint": model.fingerprint(),
                    "seed": args.seed, "filler": str(args.filler) if args.filler else "built-in",
                    "decoding": "greedy", "servers": 2, "loopback": True, **chat_settings}
        path = write_result("move_chat", settings, chat, args.out)
        print(f"wrote {path}")
        return 0
    overall = {k: sum(r[k] for r in by_distance.values()) / len(by_distance)
               for k in ("moved", "not_moved", "reset")}
    n_prompts = args.precision_prompts or (2 if args.quick else 50)
    prompt_tokens = args.prompt_tokens or (48 if args.quick else 512)
    next_tokens = 64 if args.quick else 1024
    precision = precision_moves(checkpoint, text, n_prompts, prompt_tokens, next_tokens,
                                args.seed)
    identical = not mismatches
    results = {"by_distance": by_distance, "overall": overall,
               "answers_identical_after_move": identical, "mismatches": mismatches[:10],
               "trials_per_distance": trials,
               "moved_file_bytes_mean": sum(moved_bytes) / len(moved_bytes),
               "precision_moves": precision, "chat": chat}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": model.config.name, "fingerprint": model.fingerprint(),
                "segment_len": S, "distances_segments": distances, "trials": trials,
                "seed": args.seed, "filler": str(args.filler) if args.filler else "built-in",
                "fact": FACT, "question": QUESTION, "decoding": "greedy, 8 tokens",
                "servers": 2, "loopback": True, "precision_prompts": n_prompts,
                "precision_prompt_tokens": prompt_tokens, "precision_next_tokens": next_tokens,
                **chat_settings}
    path = write_result("move", settings, results, args.out)
    fig, ax = new_figure(f"Pass-key recall after a move ({model.config.name})",
                         "segments of prose between fact and question", "exact recall",
                         logx=False)
    xs = distances
    for name, style in (("moved", "o-"), ("not_moved", "x--"), ("reset", "s:")):
        ax.plot(xs, [by_distance[str(d)][name] for d in xs], style, label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(xs)
    ax.legend()
    save_figure(fig, plot_path("move", args.out))
    print(f"wrote {path}; overall recall: " + ", ".join(f"{k} {v:.0%}"
                                                         for k, v in overall.items()))
    if not identical:
        print(f"FAILED: {len(mismatches)} answers differ after the move: {mismatches[:3]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
