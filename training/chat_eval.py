"""Chat recall at the library level: does a fact told in a conversation's first user message come
back when a later turn asks for it, with the session's memory moved through a memory file on the
way?

One conversation (`conversation_script`): the first user message tells a fact
(`training.chat_data.random_fact`) followed by prose, then user messages of about
``user_tokens`` tokens of prose from the filler text, and the last (``turns``-th) user message
asks for the fact. Each turn is what a server session does (`server.engine`), done with the
library: the turn's text is `newllm.chat.render_chat` of the user message, the model replies
with greedy decoding up to ``reply_tokens`` tokens, stopping at `newllm.chat.CHAT_STOP`; when
the stop string cut the reply, the state is rebuilt from the state before the turn by reading
the turn's text and the reply as returned (the generated tokens wholly inside it, then the rest
tokenized), so that the memory holds exactly the rendered conversation. After turn ``move_at``
the state is saved to memory-file bytes and loaded back (`newllm.memory_file`), as a move
between servers does. The answer is right when the fact's value is a word of the last reply's
first line (`training.chat_data.answer_matches`).

The floor: the question asked in a fresh conversation (nothing told).

`value_choice` (``--value-choice``) asks where a word fact is lost, without generation: a name,
city or favourite is told, ``fillers`` exchanges of prose follow, the question is asked and the
answer's opening words (" Your name is") are given; the model then scores every value of that
topic as the continuation (the sum of its tokens' log-probabilities, also against the same
conversation with the fact left out), and the told value should win. With no filler the whole
conversation sits in one segment (the local attention can see the fact); with a few exchanges it
is segments back (only the memory can carry it). Chance is one in the number of values (12 to
28).

The conversations also report how much the replies to the prose turns repeat themselves
(``prose_replies``: rep-2, the share of a reply's word bigrams that repeat one before it, and the
share of replies stuck in a loop). `same_message` (``--same-message``) puts a fact and its
question in one message, a new chat's first: the fact is then a few tokens before the answer.

    python -m training.chat_eval --checkpoint newllm/checkpoints/default \\
        --filler DATA/gutenberg/val.txt --conversations 50
    python -m training.chat_eval --filler DATA/gutenberg/val.txt --value-choice 40 \\
        --value-fillers 0 2 8
    python -m training.chat_eval --filler DATA/gutenberg/val.txt --same-message 10
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from newllm.chat import CHAT_STOP, render_chat
from training.chat_data import TOPICS, ChatFact, answer_matches, random_fact

MAX_FILLER_CHARS = 400_000


@dataclass(frozen=True)
class Script:
    """The user's side of one conversation: the fact and the user messages, turn by turn."""

    fact: ChatFact
    messages: tuple[str, ...]


def prose_line(words: list[str], at: int, k: int) -> str:
    """``k`` words of ``words`` from index ``at`` on (wrapping around), joined by spaces."""
    return " ".join(words[(at + i) % len(words)] for i in range(k))


def conversation_script(rng: random.Random, words: list[str], turns: int = 10,
                        user_tokens: int = 30) -> Script:
    """A fact told in message 1 (followed by prose up to about ``user_tokens`` tokens), prose
    messages of about ``user_tokens`` tokens, the question in message ``turns``."""
    if turns < 2:
        raise ValueError(f"a conversation needs at least 2 turns (tell, ask), got {turns}")
    fact = random_fact(rng)
    per_message = max(1, user_tokens * 3 // 4)  # a word is about 4/3 tokens
    at = rng.randrange(len(words))

    def prose(k: int) -> str:
        nonlocal at
        at += k
        return prose_line(words, at - k, k)

    first = f"{fact.tell} {prose(max(1, per_message - len(fact.tell.split())))}"
    middle = [prose(per_message) for _ in range(turns - 2)]
    return Script(fact, (first, *middle, fact.ask))


def filler_words(path: str) -> list[str]:
    """The words of a prose file (its first ``MAX_FILLER_CHARS`` characters)."""
    with open(path, encoding="utf-8") as fh:
        return fh.read(MAX_FILLER_CHARS).split()


def _read(model: Any, ids: list[int], state: Any) -> Any:
    device = next(model.parameters()).device
    with torch.no_grad():
        _, state = model(torch.tensor([ids], device=device), state)
    return state


def chat_turn(model: Any, tokenizer: Any, message: str, state: Any, first: bool,
              reply_tokens: int) -> tuple[str, Any]:
    """One user message and the model's greedy reply: (reply as returned, the new state)."""
    from newllm.generation import SamplingParams, generate, tokens_as_returned

    ids = tokenizer.encode(render_chat([("user", message)], open_reply=not first))
    params = SamplingParams(max_new_tokens=reply_tokens, temperature=0, stop=(CHAT_STOP,),
                            stop_token_ids=(tokenizer.eos_token_id,))
    stream = generate(model, ids, state, params, decode=tokenizer.decode,
                      vocab_size=tokenizer.vocab_size).collect()
    reply, got = stream.text, stream.token_ids
    if got and got[-1] == tokenizer.eos_token_id or tokenizer.decode(got) == reply:
        return reply, stream.state  # EOS or the length limit ended it: the state read it all
    # a stop string cut the reply: re-read the turn as returned, as the server does
    return reply, _read(model, ids + tokens_as_returned(got, reply, tokenizer), state)


def run_conversation(model: Any, tokenizer: Any, script: Script, reply_tokens: int = 30,
                     move_at: int = 0) -> list[str]:
    """The replies to ``script``'s messages; after turn ``move_at`` (1-based; 0 = never) the
    state goes through a memory file."""
    from newllm.memory_file import load_memory_report, save_memory

    state = None
    replies = []
    for i, message in enumerate(script.messages):
        reply, state = chat_turn(model, tokenizer, message, state, i == 0, reply_tokens)
        replies.append(reply)
        if i + 1 == move_at:
            state = load_memory_report(save_memory(state, model), model).state
    return replies


def recall_by_kind(kinds: Sequence[str], right: dict[str, Sequence[bool]]
                   ) -> dict[str, dict[str, Any]]:
    """Conversations split by the kind of their fact (``kinds[i]``, "digits" or "words"): for
    each kind, the share right of every measure of ``right`` (one flag per conversation) and
    the number of conversations."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = {**{m: sum(flags[i] for i in rows) / len(rows) for m, flags in right.items()},
                     "conversations": len(rows)}
    return out


def repeated_bigrams(text: str) -> float | None:
    """The share of a reply's word bigrams that repeat an earlier bigram of the same reply
    (rep-2: 0 for text that never repeats itself, near 1 for a loop such as "not not not ..."),
    None for a reply of fewer than three words."""
    words = text.split()
    pairs = list(zip(words, words[1:], strict=False))
    if len(pairs) < 2:
        return None
    return 1.0 - len(set(pairs)) / len(pairs)


def prose_repetition(replies: Sequence[str], loop_at: float = 0.5) -> dict[str, Any]:
    """How much the replies to prose turns repeat themselves: the mean of `repeated_bigrams`
    and the share of replies at ``loop_at`` or more (stuck in a loop), over the replies of
    three words or more."""
    reps = [r for r in map(repeated_bigrams, replies) if r is not None]
    if not reps:
        return {"repeated_bigrams": None, "looping": None, "replies": 0}
    return {"repeated_bigrams": sum(reps) / len(reps),
            "looping": sum(r >= loop_at for r in reps) / len(reps), "replies": len(reps)}


def chat_recall(model: Any, tokenizer: Any, words: list[str], conversations: int = 50,
                turns: int = 10, user_tokens: int = 30, reply_tokens: int = 30,
                move_at: int = 5, seed: int = 0, floor: bool = True) -> dict[str, Any]:
    """Share of ``conversations`` whose last reply gives the fact (and the floor: the question
    alone), split by the kind of value (``by_kind``: digits, as pass keys and locker codes, or
    words, as names and cities), with a few replies to show what the model says."""
    rng = random.Random(seed)
    floor_hits = 0
    examples = []
    kinds: list[str] = []
    right: list[bool] = []
    prose_replies: list[str] = []
    for c in range(conversations):
        script = conversation_script(rng, words, turns, user_tokens)
        replies = run_conversation(model, tokenizer, script, reply_tokens, move_at)
        prose_replies += replies[1:-1]  # the replies to prose messages
        hit = answer_matches(replies[-1], script.fact.value)
        kinds.append(script.fact.kind)
        right.append(hit)
        if floor:
            alone, _ = chat_turn(model, tokenizer, script.fact.ask, None, True, reply_tokens)
            floor_hits += answer_matches(alone, script.fact.value)
        if c < 5:
            examples.append({"fact": script.fact.tell, "ask": script.fact.ask,
                             "answer": replies[-1], "right": hit, "reply_1": replies[0],
                             "reply_2": replies[1]})
    out: dict[str, Any] = {"recall": sum(right) / conversations, "conversations": conversations,
                           "turns": turns, "user_tokens": user_tokens,
                           "reply_tokens": reply_tokens, "move_after_turn": move_at,
                           "by_kind": recall_by_kind(kinds, {"recall": right}),
                           "prose_replies": prose_repetition(prose_replies),
                           "examples": examples}
    if floor:
        out["floor"] = floor_hits / conversations
    return out


def same_message(model: Any, tokenizer: Any, per_topic: int = 10, reply_tokens: int = 12
                 ) -> dict[str, Any]:
    """A fact and its question in one message, a new chat's first ("My name is Ada. What is my
    name?"): the share answered, over the first ``per_topic`` values of every word topic
    (the topics' first phrasings), by topic. What a pointer that reads only older pairs
    (``pointer_delay``) could lose: the fact is a few tokens before the answer."""
    by_topic: dict[str, float] = {}
    hits = total = 0
    for topic in TOPICS:
        if topic.kind != "words":
            continue
        right = 0
        values = [str(v) for v in topic.values[:per_topic]]
        for v in values:
            message = f"{topic.tells[0].format(v=v)} {topic.asks[0]}"
            reply, _ = chat_turn(model, tokenizer, message, None, True, reply_tokens)
            right += answer_matches(reply, v)
        by_topic[topic.answer.format(v="X").strip()] = right / len(values)
        hits, total = hits + right, total + len(values)
    return {"recall": hits / total, "trials": total, "by_topic": by_topic}


def _continuation_logprob(model: Any, last: Any, state: Any, ids: list[int]) -> float:
    """log p(ids | what ``state`` read), ``last`` the logits (vocab,) after it."""
    lp = torch.log_softmax(last.float(), -1)[ids[0]].item()
    if len(ids) > 1:
        device = next(model.parameters()).device
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]], device=device), state)
        steps = torch.log_softmax(logits[0].float(), -1)
        lp += steps.gather(1, torch.tensor(ids[1:], device=device)[:, None]).sum().item()
    return lp


def value_trial(rng: random.Random, tokenizer: Any, words: list[str], topic: Any, fillers: int,
                filler_words_per_message: int = 20) -> tuple[int, list[int], list[int]]:
    """One `value_choice` trial: (the index of the told value among ``topic``'s values, the
    conversation's token ids up to the answer's opening words, the same with the fact replaced
    by "Hello."). ``fillers`` exchanges of prose from ``words`` lie between fact and question."""
    told = rng.randrange(len(topic.values))
    at = rng.randrange(len(words))
    tell = topic.tells[rng.randrange(len(topic.tells))].format(v=topic.values[told])
    ask = topic.asks[rng.randrange(len(topic.asks))]
    rest: list[int] = tokenizer.encode(" I see.")
    for line in range(2 * fillers):  # a user line of prose, the assistant's, and so on
        prose = prose_line(words, at, filler_words_per_message)
        at += filler_words_per_message
        rest += tokenizer.encode(" " + prose if line % 2 else
                                 render_chat([("user", prose)], open_reply=True))
    rest += tokenizer.encode(render_chat([("user", ask)], open_reply=True))
    rest += tokenizer.encode(topic.answer.split("{v}")[0].rstrip())
    ids = tokenizer.encode(render_chat([("user", tell)], open_reply=False)) + rest
    untold = tokenizer.encode(render_chat([("user", "Hello.")], open_reply=False)) + rest
    return told, ids, untold


def value_choice(model: Any, tokenizer: Any, words: list[str], trials: int = 40,
                 fillers: Sequence[int] = (0, 2, 8), filler_words_per_message: int = 20,
                 seed: int = 0) -> dict[str, Any]:
    """For each number of filler exchanges, whether the told value comes back among its
    topic's values after the answer's opening words (see the module docstring).

    Each value's score is the log-probability of its tokens; the same conversation with the
    fact replaced by a greeting gives each value's score untold, and the difference is what
    telling did (the ``lift``). Reported: ``top1``, how often the told value scores highest,
    against ``chance`` (the mean of one over the number of values); ``top1_lift``, how often
    its lift is the highest (a model that prefers short or common values is not credited for
    them); ``lift``, the told value's lift minus the mean lift of the others, in nats (0 when
    nothing of the fact is carried); ``tokens``, the conversation's mean length (a segment is
    ``model.config.segment_len``). Trials cycle through the word topics; the same seed draws
    the same conversations for every model."""
    topics = [t for t in TOPICS if t.kind == "words"]
    candidates = {t: [tokenizer.encode(f" {v}") for v in t.values] for t in topics}
    device = next(model.parameters()).device

    def scores(ids: list[int], topic: Any) -> Tensor:
        with torch.no_grad():
            logits, state = model(torch.tensor([ids], device=device), None)
        return torch.tensor([_continuation_logprob(model, logits[0, -1], state, c)
                             for c in candidates[topic]])

    out: dict[str, Any] = {"trials": trials, "segment_len": model.config.segment_len,
                           "by_fillers": {}}
    for n in fillers:
        rng = random.Random(seed)
        top1 = top1_lift = 0
        lift, chance, tokens = 0.0, 0.0, 0
        for trial in range(trials):
            topic = topics[trial % len(topics)]
            values = [str(v) for v in topic.values]
            told, ids, untold = value_trial(rng, tokenizer, words, topic, n,
                                            filler_words_per_message)
            got = scores(ids, topic)
            gain = got - scores(untold, topic)
            top1 += int(got.argmax()) == told
            top1_lift += int(gain.argmax()) == told
            lift += (gain[told] - (gain.sum() - gain[told]) / (len(values) - 1)).item()
            chance += 1 / len(values)
            tokens += len(ids)
        out["by_fillers"][str(n)] = {"top1": top1 / trials, "top1_lift": top1_lift / trials,
                                     "chance": chance / trials, "lift": lift / trials,
                                     "tokens": tokens / trials}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="newllm/checkpoints/default")
    ap.add_argument("--filler", required=True, help="a prose text file (the user's messages)")
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=30)
    ap.add_argument("--reply-tokens", type=int, default=30)
    ap.add_argument("--move-at", type=int, default=5, help="move after this turn (0 = never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--value-choice", type=int, default=0, metavar="TRIALS",
                    help="instead of conversations: score the told word among its topic's "
                         "values after --value-fillers exchanges (TRIALS per count)")
    ap.add_argument("--value-fillers", type=int, nargs="+", default=[0, 2, 8])
    ap.add_argument("--same-message", type=int, default=0, metavar="VALUES",
                    help="instead of conversations: a fact and its question in one message, "
                         "VALUES values of each word topic")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    if args.value_choice < 0:
        ap.error(f"--value-choice takes a number of trials (0 = off), got {args.value_choice}")
    if args.value_choice and min(args.value_fillers) < 0:
        ap.error(f"--value-fillers must be 0 or more, got {args.value_fillers}")
    torch.set_num_threads(args.threads)
    from newllm import load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    t0 = time.perf_counter()
    if args.same_message < 0:
        ap.error(f"--same-message takes a number of values (0 = off), got {args.same_message}")
    if args.same_message:
        result = same_message(model, tokenizer, args.same_message)
    elif args.value_choice:
        result = value_choice(model, tokenizer, filler_words(args.filler), args.value_choice,
                              args.value_fillers, seed=args.seed)
    else:
        result = chat_recall(model, tokenizer, filler_words(args.filler), args.conversations,
                             args.turns, args.user_tokens, args.reply_tokens, args.move_at,
                             args.seed)
    result["checkpoint"], result["seconds"] = args.checkpoint, round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
