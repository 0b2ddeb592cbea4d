"""Evaluation: sliding-window perplexity, what the memory is worth, passkey retrieval and the
reversal curse.

Sliding-window perplexity (`sliding_window_nll`): tokens t_0 .. t_{N-1}; every target t_1 ..
t_{N-1} is scored exactly once. A window feeds ``window`` tokens ``t_b .. t_{b+window-1}`` and
predicts ``t_{b+1} .. t_{b+window}``; it scores only the targets the previous window did not, so
each scored token has between ``window - stride`` and ``window`` tokens of context. The sum of
per-token negative log-likelihoods over N - 1 targets gives the perplexity (the transformers
docs' recipe drops one target per window; this one does not). A window is fed through the
model's state in chunks, so for a memory model it is a proper streaming evaluation: with a
window of several segments the memory is written and read inside it.

- stride == window: disjoint windows, each from an empty state.
- window == segment_len, stride == window: the memory reset every segment (a local-only model).
- window >= the document: the whole document streamed through the state (`streaming_nll`).
- `memory_only_nll`: the memory layers' state carried, every other layer reset each segment.

Documents are scored one at a time, each after an EOS token as in training (memory reset at
document boundaries).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data import (
    PASSKEY_FACT,
    PASSKEY_QUESTION,
    WORD_FACT,
    WORD_QUESTION,
    prose_words,
)

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
WORD_KEYS = ("apple", "river", "candle", "garden", "silver", "forest", "window", "basket",
             "harbor", "thunder", "meadow", "pepper", "castle", "lantern", "violet", "marble",
             "copper", "falcon", "orange", "saddle", "bridge", "winter", "cherry", "anchor")
"""secret words of --passkey-keys words when no filler text is given (none is in the default
filler); with a filler text the words are drawn from its own prose, as in training"""


# perplexity -------------------------------------------------------------------------------------
@torch.no_grad()
def feed(model: nn.Module, ids: Tensor, chunk: int = 0, *, keep_from: int = 0) -> Tensor:
    """Logits (T, V) of ``ids`` (T,) from an empty state, fed ``chunk`` tokens at a time
    (0 = all at once) with the state carried; equal to one call for every model.

    ``keep_from`` > 0 returns only the logits of positions ``keep_from`` .. T-1: chunks that
    end before it run with ``last_only`` (the LM head, the largest product of a small model,
    skipped), with the same chunk boundaries, so the kept logits are those of the full call."""
    state, outs = None, []
    step = chunk or max(1, len(ids))
    for s in range(0, len(ids), step):
        piece = ids[s:s + step].view(1, -1).to(model.device)
        if s + piece.shape[1] <= keep_from:
            _, state = model(piece, state, last_only=True)
            continue
        logits, state = model(piece, state)
        outs.append(logits[0, max(0, keep_from - s):].float())
    return torch.cat(outs) if outs else torch.zeros(0, model.config.vocab_size)


def sliding_window_nll(model: nn.Module, ids: Tensor, window: int, stride: int | None = None,
                       *, chunk: int = 0) -> tuple[float, int]:
    """(sum of negative log-likelihoods, number of scored targets = N - 1) for ``ids`` (N,)."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, "
                         f"stride={stride}")
    ids = ids.long().cpu()
    N = len(ids)
    total, count, scored_to, begin = 0.0, 0, 0, 0
    while N >= 2:
        end = min(begin + window, N - 1)  # inputs t_begin..t_{end-1}, targets t_{begin+1}..t_end
        logits = feed(model, ids[begin:end], chunk)  # (end - begin, V)
        nll = F.cross_entropy(logits, ids[begin + 1:end + 1].to(logits.device),
                              reduction="none")
        first = max(scored_to + 1, begin + 1)  # first target not scored yet
        total += float(nll[first - begin - 1:].double().sum())
        count += end - first + 1
        scored_to = end
        if end == N - 1:
            break
        begin += stride
    return total, count


def streaming_nll(model: nn.Module, ids: Tensor, chunk: int = 0) -> tuple[float, int]:
    """Every target scored with the whole document before it, through the state."""
    return sliding_window_nll(model, ids, max(1, len(ids)), chunk=chunk)


def document_ids(tokenizer: Any, text: str, max_tokens: int = 0) -> Tensor:
    """``[EOS] + tokens`` (as in training, where a document follows an EOS), cut to max_tokens."""
    ids = [tokenizer.eos_token_id] + tokenizer.encode(text)
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def default_chunk(model: nn.Module) -> int:
    return model.config.segment_len if has_memory(model) else 0


def _is_memory_layer(module: nn.Module) -> bool:
    from newllm.layers.memory import SegmentMemoryAttention

    return isinstance(module, SegmentMemoryAttention)


def _only_memory_carries(model: nn.Module) -> bool:
    """Whether every layer that is not a memory layer forgets at segment boundaries."""
    local = getattr(model.config, "segment_local", False)
    return not model.config.has_context_block and all(
        _is_memory_layer(b.attention) or (kind == "pythia" and local)
        for b, kind in zip(model.layers, model.config.layers, strict=True))


def has_memory(model: nn.Module) -> bool:
    """Whether any layer is a segment memory layer (infini, multi_memory, hierarchical)."""
    return any(_is_memory_layer(m) for m in model.modules())


def perplexity(model: nn.Module, docs: Sequence[tuple[str, Tensor]], window: int,
               stride: int | None = None, *, chunk: int | None = None) -> dict[str, Any]:
    """Sliding-window perplexity over documents (each from an empty state), overall and each."""
    chunk = default_chunk(model) if chunk is None else chunk
    per_doc, total, count = [], 0.0, 0
    for name, ids in docs:
        nll, n = sliding_window_nll(model, ids, window, stride, chunk=chunk)
        total, count = total + nll, count + n
        per_doc.append({"name": name, "tokens": n, "ppl": _ppl(nll, n)})
    return {"ppl": _ppl(total, count), "nll": total / max(count, 1), "tokens": count,
            "window": window, "stride": stride or window, "documents": per_doc}


@torch.no_grad()
def memory_only_nll(model: nn.Module, ids: Tensor) -> tuple[float, int]:
    """Every target scored with the memory layers' state of all earlier segments (and the
    pointer cache's, a memory too), while every other layer (its KV cache, the context block)
    starts each segment empty.

    This is what the memory alone is worth in a model that mixes memory layers with `pythia`
    layers that keep their whole KV cache (``segment_local=False``): they would otherwise carry
    every earlier token too. With ``segment_local=True`` (the memory presets), or when every
    layer is a memory layer, it equals `streaming_nll`; without memory layers it equals
    resetting everything every segment.
    """
    from newllm.state import ModelState

    S = model.config.segment_len
    keep = {i for i, b in enumerate(model.layers) if _is_memory_layer(b.attention)}
    ids = ids.long().cpu()
    inputs, targets = ids[:-1], ids[1:]
    state, total = None, 0.0
    for s in range(0, len(inputs), S):
        if state is not None:  # a segment boundary: only the memory layers remember
            fresh = model.init_state(1)
            layers = tuple(ls if i in keep else fresh.layers[i]
                           for i, ls in enumerate(state.layers))
            state = ModelState(state.position, layers, fresh.context, state.pointer)
        logits, state = model(inputs[s:s + S].view(1, -1).to(model.device), state)
        total += float(F.cross_entropy(logits[0].float(), targets[s:s + S].to(logits.device),
                                       reduction="none").double().sum())
    return total, len(targets)


def memory_benefit(model: nn.Module, docs: Sequence[tuple[str, Tensor]],
                   chunk: int | None = None, full_state: bool = True) -> dict[str, Any]:
    """Per document and overall, perplexity with
    - ``ppl_memory``: the memory layers' state carried through the document, every other layer
      reset each segment (`memory_only_nll`): the memory's own worth;
    - ``ppl_reset``: everything reset every segment (a segment-local model);
    - ``ppl_full_state`` (if ``full_state``): every layer's state carried (`streaming_nll`), as
      a session on the server runs (the same as ``ppl_memory`` for segment-local models;
      quadratic in the document for `pythia` layers that keep their whole KV cache).
    ``gain_pct`` = 100 (1 − ppl_memory / ppl_reset): > 0 means the memory helps;
    ``full_state_gain_pct`` likewise for the full state.
    """
    S = model.config.segment_len
    chunk = default_chunk(model) if chunk is None else chunk
    rows, tm, tr, tf, tn = [], 0.0, 0.0, 0.0, 0
    for name, ids in docs:
        m, n = memory_only_nll(model, ids)
        r, _ = sliding_window_nll(model, ids, S, S, chunk=chunk)
        row = {"name": name, "tokens": n, "ppl_memory": _ppl(m, n), "ppl_reset": _ppl(r, n),
               "gain_pct": _gain(m, r, n)}
        if full_state:  # the same as memory-only when no other layer keeps anything
            f = m if _only_memory_carries(model) else streaming_nll(model, ids, chunk)[0]
            row.update(ppl_full_state=_ppl(f, n), full_state_gain_pct=_gain(f, r, n))
            tf += f
        tm, tr, tn = tm + m, tr + r, tn + n
        rows.append(row)
    gains = [row["gain_pct"] for row in rows]
    out = {"ppl_memory": _ppl(tm, tn), "ppl_reset": _ppl(tr, tn), "gain_pct": _gain(tm, tr, tn),
           "mean_gain_pct": sum(gains) / max(len(gains), 1), "segment_len": S, "tokens": tn}
    if full_state:
        out.update(ppl_full_state=_ppl(tf, tn), full_state_gain_pct=_gain(tf, tr, tn))
    return {**out, "documents": rows}


def _ppl(nll: float, n: int) -> float:
    return math.exp(min(nll / n, 50.0)) if n else float("nan")


def _gain(mem: float, reset: float, n: int) -> float:
    return 100.0 * (1.0 - _ppl(mem, n) / _ppl(reset, n)) if n else float("nan")


# passkey retrieval --------------------------------------------------------------------------------
def _filler(ids: list[int], n: int, start: int = 0) -> list[int]:
    return [ids[(start + i) % len(ids)] for i in range(n)] if n > 0 else []


def word_pool(filler_text: str | None) -> tuple[list[str], str]:
    """Words to hide or copy, and where they came from: the distinct words of the filler's prose
    (as training's secret words are drawn), else `WORD_KEYS`."""
    drawn = sorted(set(prose_words(filler_text))) if filler_text else []
    return (drawn, "filler") if drawn else (list(WORD_KEYS), "built-in list")


def passkey_example(tokenizer: Any, distance: int, segment_len: int, rng: random.Random,
                    filler_ids: list[int] | None = None, digits: int = 5,
                    word: str | None = None) -> tuple[Tensor, int, int]:
    """A filler text hiding a pass key; the question starts ``distance`` segments after the
    segment in which the key sentence ends (0 = the same segment). With ``word`` the key is
    that word, told and asked as a secret word (the sentences of --recall-words training).

    Returns (ids (T,), answer start index, answer length); the answer is the key's tokens.
    """
    S = segment_len
    if word is None:
        key, fact_text, question_text = (str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)),
                                         PASSKEY_FACT, PASSKEY_QUESTION)
    else:
        key, fact_text, question_text = word, WORD_FACT, WORD_QUESTION
    fact = tokenizer.encode(fact_text.format(k=key))
    question = tokenizer.encode(question_text)
    answer = tokenizer.encode(f" {key}")
    filler = filler_ids or tokenizer.encode(PASSKEY_FILLER)
    a = rng.randint(1, max(1, S - len(fact)))  # where the fact starts (position 0 is EOS)
    fact_end = a + len(fact)  # first position after the fact
    seg = (fact_end - 1) // S + distance  # the segment the question goes into
    tail = len(question) + len(answer)
    lo = fact_end if distance == 0 else seg * S
    q0 = rng.randint(lo, max(lo, (seg + 1) * S - tail))
    at = rng.randrange(len(filler))  # real prose as filler: start somewhere different each time
    ids = ([tokenizer.eos_token_id] + _filler(filler, a - 1, at) + fact
           + _filler(filler, q0 - fact_end, at + a) + question + answer)
    return torch.tensor(ids, dtype=torch.long), len(ids) - len(answer), len(answer)


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer: Any, distances: Sequence[int] = (0, 1, 2, 4),
                     trials: int = 20, *, seed: int = 0, segment_len: int | None = None,
                     filler_text: str | None = None, words: bool = False) -> dict[str, Any]:
    """Share of examples whose key greedy decoding reproduces exactly, by distance in segments.
    With ``words`` the key is a word (four or more letters) drawn from the filler's prose
    (`WORD_KEYS` without one), told as a secret word: can the memory carry any token, not only
    digits?

    Greedy decoding returns the key iff the model's argmax is the key's next token at every
    answer position given the correct ones before (teacher forcing), so one pass scores it.
    Two graded measures come with it, which move before exact recall does: the share whose first
    *digit* token is right (``first_token_by_distance``) and the mean loss in nats per token of
    the key's digit tokens (``answer_nll_by_distance``; guessing uniformly among the digit
    tokens costs more). Both skip whitespace-only tokens: with a byte-level tokenizer the answer
    " 52817" starts with a space, which any model gets right for free. A model without memory
    gets a ``note``: beyond its local window it can only guess.
    """
    S = segment_len or model.config.segment_len
    filler = tokenizer.encode(filler_text) if filler_text else None
    rng = random.Random(seed)
    pool, words_from = word_pool(filler_text if words else None)
    chunk = default_chunk(model)
    out: dict[str, Any] = {"key": "words" if words else "digits",
                           "segment_len": S, "trials": trials, "by_distance": {},
                           "first_token_by_distance": {}, "answer_nll_by_distance": {}}
    if words:
        out["words_from"] = words_from
    for d in distances:
        hits = firsts = 0
        nll, count = 0.0, 0
        for _ in range(trials):
            word = pool[rng.randrange(len(pool))] if words else None
            ids, start, n = passkey_example(tokenizer, d, S, rng, filler, word=word)
            logits = feed(model, ids[:-1], chunk, keep_from=start - 1)  # positions start-1..
            answer = logits[:n]
            target = ids[start:start + n].to(answer.device)
            pred = answer.argmax(-1)
            hits += int(torch.equal(pred, target))
            digits = [i for i, t in enumerate(target.tolist()) if tokenizer.decode([t]).strip()]
            firsts += int(pred[digits[0]] == target[digits[0]])
            nll += float(F.cross_entropy(answer[digits].float(), target[digits], reduction="sum"))
            count += len(digits)
        out["by_distance"][str(d)] = hits / trials
        out["first_token_by_distance"][str(d)] = firsts / trials
        out["answer_nll_by_distance"][str(d)] = nll / count
    if not has_memory(model):
        out["note"] = ("this model has no memory: a key further back than its attention "
                       "reaches (its segment, or its training length) can only be guessed")
    return out


# in-context copying -----------------------------------------------------------------------------
@torch.no_grad()
def copy_test(model: nn.Module, tokenizer: Any, distances: Sequence[int] = (0, 1, 4),
              trials: int = 20, *, span: int = 0, seed: int = 0, segment_len: int | None = None,
              filler_text: str | None = None) -> dict[str, Any]:
    """Can the model copy a span it has seen? The classic test of induction heads, run at
    distances in segments, so it probes local attention (0: the span is repeated at once, in
    the same segment) and the memory (d >= 1: the repeat starts d segments after the segment in
    which the first copy ends, prose between).

    The span is ``span`` tokens (default: a quarter of a segment) of random words of the filler
    (`WORD_KEYS` without one): unpredictable the first time. Reports, by distance, the mean
    loss in nats of the span's tokens after its first on the first pass (``first_nll``) and on
    the repeat (``repeat_nll``), and the share of repeated tokens that are the model's first
    choice (``repeat_top1``). A model that copies pays far less on the repeat; one that does
    not pays about the same.
    """
    S = segment_len or model.config.segment_len
    n = span or max(4, S // 4)
    if not 2 <= n <= (S - 1) // 2:  # twice and the EOS fit in one segment at distance 0
        raise ValueError(f"the copy test's span must be 2 to {(S - 1) // 2} tokens (segments "
                         f"of {S}), got {n}")
    if trials < 1 or any(d < 0 for d in distances):
        raise ValueError(f"the copy test needs trials >= 1 and distances >= 0, got {trials} "
                         f"and {list(distances)}")
    vocab, _ = word_pool(filler_text)
    filler = tokenizer.encode(filler_text) if filler_text else tokenizer.encode(PASSKEY_FILLER)
    rng = random.Random(seed)
    chunk = default_chunk(model)
    out: dict[str, Any] = {"segment_len": S, "span": n, "trials": trials, "first_nll": {},
                           "repeat_nll": {}, "repeat_top1": {}}
    for d in distances:
        first = repeat = top1 = 0.0
        for _ in range(trials):
            ids: list[int] = []
            while len(ids) < n:
                ids = tokenizer.encode(" " + " ".join(rng.choice(vocab) for _ in range(2 * n)))
            a = ids[:n]
            start = rng.randint(1, S - n) if d else 1  # the first copy's place after EOS
            end = start + n
            gap = 0 if d == 0 else ((end - 1) // S + d) * S - end + rng.randint(0, S - n)
            seq = ([tokenizer.eos_token_id] + _filler(filler, start - 1, rng.randrange(len(filler)))
                   + a + _filler(filler, gap, rng.randrange(len(filler))) + a)
            x = torch.tensor(seq, dtype=torch.long)
            logits = feed(model, x[:-1], chunk, keep_from=start)
            nll = F.cross_entropy(logits, x[start + 1:].to(logits.device), reduction="none")
            r0 = len(seq) - n  # the repeat's first token (its loss is not counted)
            first += float(nll[:n - 1].mean())
            repeat += float(nll[r0 - start:].mean())
            pred = logits[r0 - start:].argmax(-1).cpu()
            top1 += float((pred == x[r0 + 1:]).float().mean())
        out["first_nll"][str(d)] = first / trials
        out["repeat_nll"][str(d)] = repeat / trials
        out["repeat_top1"][str(d)] = top1 / trials
    return out


# the reversal curse ----------------------------------------------------------------------------
def read_pairs(path: str | Path, limit: int = 0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL file."""
    pairs = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not {"prompt", "completion"} <= set(obj):
                    raise ValueError(f'{path}:{n}: expected {{"prompt": ..., "completion": ...}}')
                pairs.append((obj["prompt"], obj["completion"]))
    return pairs[:limit] if limit else pairs


@torch.no_grad()
def completion_nll(model: nn.Module, tokenizer: Any,
                   pairs: Sequence[tuple[str, str]]) -> tuple[float, int]:
    """Sum of -log p(completion tokens | EOS + prompt) over pairs, and the token count."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        p = [tokenizer.eos_token_id] + tokenizer.encode(prompt)
        c = tokenizer.encode(completion)
        ids = torch.tensor(p + c, dtype=torch.long)
        logits = feed(model, ids[:-1])
        nll = F.cross_entropy(logits[len(p) - 1:], ids[len(p):].to(logits.device),
                              reduction="none")
        total, count = total + float(nll.double().sum()), count + len(c)
    return total, count


def reversal_curse(model: nn.Module, tokenizer: Any, folder: str | Path, direction: str = "p2d",
                   limit: int = 0) -> dict[str, Any]:
    """Perplexity of completions asked in the trained direction vs the reversed one.

    ``folder`` is the name-description dataset (``{d}_prompts_train.jsonl``: the facts to train
    on; ``{d}_prompts_test.jsonl``: held-out paraphrases, same direction;
    ``{d}_reverse_prompts_test.jsonl``: the same facts asked the other way). The curse shows as
    ``gap`` = backward - forward perplexity > 0 (``ratio`` = backward / forward).
    """
    folder = Path(folder)
    if direction not in ("p2d", "d2p"):
        raise ValueError(f"direction must be 'p2d' or 'd2p', got {direction!r}")
    files = {"train": f"{direction}_prompts_train.jsonl",
             "forward": f"{direction}_prompts_test.jsonl",
             "backward": f"{direction}_reverse_prompts_test.jsonl"}
    result: dict[str, Any] = {"direction": direction}
    for key, name in files.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: point at the reversal-curse "
                                    "name_description_dataset folder")
        nll, n = completion_nll(model, tokenizer, read_pairs(folder / name, limit))
        result[f"{key}_ppl"] = _ppl(nll, n)
        result[f"{key}_tokens"] = n
    result["gap"] = result["backward_ppl"] - result["forward_ppl"]
    result["ratio"] = result["backward_ppl"] / result["forward_ppl"]
    return result
