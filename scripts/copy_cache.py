"""A pointer read through a fixed-size memory (a "copy cache") on a frozen model: can the bundled
model answer word facts from many segments back when a memory's values are token identities
instead of hidden vectors? A prototype for issue 19 (training/README.md, session 18).

The cache keeps, for every token x_t read so far, the pair (h_{t-1}, x_t): the final hidden
state (after the final LayerNorm) that predicted the token, and the token. It stores the pairs
compressively, as a matrix M (dk x V) and a normaliser z (dk)::

    write x_t:       M[:, x_t] += β_t φ(k_t),   z += β_t φ(k_t),
                     k_t = W_k h_{t-1},  β_t = sigmoid(w_β · h_{t-1} + b_β)
    read at s:       p_copy = φ(q_s) M / (φ(q_s) · z),   q_s = W_q h_s
                     (a distribution over the vocabulary: the columns of M sum to z)
    next token:      p = (1 − λ_s) softmax(logits_s) + λ_s p_copy,  λ_s = sigmoid(w_λ · h_s + b_λ)

with φ(x) = ELU(x) + 1 as in the memory layers, and λ = 0 while the cache is empty. This is a
continuous cache (Grave et al., 2017) with learned projections and a memory of fixed size
(dk · V floats however long the text) instead of a window of stored states. The model's weights
do not change; only W_q, W_k, w_β, w_λ (and their biases) are trained, on windows of prose and
chat-form recall examples (`training.chat_data.ChatExamples`).

`CopyCache.log_prob` (training) computes the read as attention over the window's pairs, which is
the same sum; `CacheRunner` (evaluation, generation) keeps M and z and feeds tokens one at a time,
the plain reference the test in tests/test_copy_cache.py holds the first to.

    python scripts/copy_cache.py --data DATA/gutenberg/train.txt --filler DATA/gutenberg/val.txt \\
        --steps 300 --save runs/cache --value-choice 40 --chat 50 --out runs/cache.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from newllm.chat import CHAT_STOP, render_chat  # noqa: E402
from newllm.layers.memory import elu1  # noqa: E402
from training.chat_data import TOPICS, ChatExamples, answer_matches  # noqa: E402
from training.chat_eval import conversation_script, filler_words, value_trial  # noqa: E402


def hidden_and_logits(model: Any, ids: Tensor, state: Any = None
                      ) -> tuple[Tensor, Tensor, Any]:
    """(final hidden states after the final LayerNorm (B, T, d), each joined with its token's
    input embedding (B, T, 2d); logits (B, T, V); the new state)."""
    seen: list[Tensor] = []
    hook = model.final_layer_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        logits, state = model(ids, state)
    finally:
        hook.remove()
    return torch.cat((seen[0], model.embed_in(ids)), -1), logits, state


class CopyCache(nn.Module):
    """The cache's weights. ``token_keys``: keys and queries also see the input embedding of
    their position's token (the token a copy continues from), not only the hidden state."""

    def __init__(self, hidden: int, vocab: int, dk: int = 64, mix_bias: float = -3.0,
                 token_keys: bool = False) -> None:
        super().__init__()
        self.vocab, self.dk, self.hidden = vocab, dk, hidden
        width = 2 * hidden if token_keys else hidden
        self.query = nn.Linear(width, dk)
        self.key = nn.Linear(width, dk)
        self.write_gate = nn.Linear(hidden, 1)
        self.mix_gate = nn.Linear(hidden, 1)
        for lin in (self.query, self.key, self.write_gate, self.mix_gate):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.mix_gate.bias, mix_bias)

    def key_input(self, h: Tensor) -> Tensor:
        """What keys and queries read, from `hidden_and_logits`'s (..., 2d) rows."""
        return h if self.query.in_features == h.shape[-1] else h[..., :self.hidden]

    def log_prob(self, h: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """log p(targets) with the cache, and without it: h (B, T, d) hidden states of a window
        read from an empty state, logits (B, T, V), targets (B, T) the tokens that followed.
        Pair t (h_t, targets_t) is in the cache at every s > t."""
        T = h.shape[1]
        lp_model = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        kin, h = self.key_input(h), h[..., :self.hidden]
        fq, fk = elu1(self.query(kin)), elu1(self.key(kin))  # (B, T, dk)
        beta = torch.sigmoid(self.write_gate(h))[..., 0]  # (B, T)
        past = torch.ones(T, T, dtype=torch.bool, device=h.device).tril(-1)  # t < s
        a = (fq @ fk.transpose(1, 2)) * beta[:, None, :] * past  # (B, s, t)
        same = targets[:, :, None] == targets[:, None, :]  # target of s == token of pair t
        num, den = (a * same).sum(-1), a.sum(-1)
        ok = num > 0
        lp_copy = torch.where(ok, torch.log(torch.where(ok, num, torch.ones_like(num)))
                              - torch.log(den.clamp_min(1e-30)), torch.full_like(num, -torch.inf))
        g = self.mix_gate(h)[..., 0]
        mixed = torch.logsumexp(torch.stack((F.logsigmoid(-g) + lp_model,
                                             F.logsigmoid(g) + lp_copy)), 0)
        mixed = torch.cat((lp_model[:, :1], mixed[:, 1:]), 1)  # the cache is empty at s = 0
        return mixed, lp_model


@dataclass(frozen=True)
class CacheState:
    model_state: Any
    M: Tensor  # (dk, V)
    z: Tensor  # (dk,)
    prev: Tensor | None  # (d,) hidden state of the last token read
    logp: Tensor | None  # (V,) next-token log-probabilities after the last token


class CacheRunner:
    """A model and its cache fed token by token: the memory form of the cache."""

    def __init__(self, model: Any, cache: CopyCache | None) -> None:
        self.model, self.cache = model, cache
        vocab = model.config.vocab_size
        dk = cache.dk if cache is not None else 1
        self.empty = CacheState(None, torch.zeros(dk, vocab), torch.zeros(dk), None, None)

    @torch.no_grad()
    def feed(self, ids: list[int], st: CacheState) -> tuple[Tensor, CacheState]:
        """Read ``ids``: (next-token log-probabilities after each (n, V), the new state)."""
        h, logits, ms = hidden_and_logits(self.model, torch.tensor([ids]), st.model_state)
        h, logits = h[0].float(), logits[0].float()
        M, z, prev = st.M, st.z, st.prev
        rows = []
        for i, tok in enumerate(ids):
            lp = torch.log_softmax(logits[i], -1)
            if self.cache is not None:
                c, hid = self.cache, self.cache.hidden
                if prev is not None:
                    k = elu1(c.key(c.key_input(prev))) * torch.sigmoid(c.write_gate(prev[:hid]))
                    M = M.index_add(1, torch.tensor([tok]), k[:, None])
                    z = z + k
                if bool((z > 0).any()):
                    fq = elu1(c.query(c.key_input(h[i])))
                    p_copy = (fq @ M) / (fq @ z)
                    lam = torch.sigmoid(c.mix_gate(h[i, :hid]))
                    lp = torch.log((1 - lam) * lp.exp() + lam * p_copy)
            prev = h[i]
            rows.append(lp)
        out = torch.stack(rows)
        return out, CacheState(ms, M, z, prev, out[-1])


def chat_turn(runner: CacheRunner, tok: Any, message: str, st: CacheState, first: bool,
              reply_tokens: int) -> tuple[str, CacheState]:
    """A user message and the greedy reply with the cache, as `training.chat_eval.chat_turn`."""
    from newllm.generation import tokens_as_returned

    ids = tok.encode(render_chat([("user", message)], open_reply=not first))
    before = st
    _, st = runner.feed(ids, st)
    got: list[int] = []
    reply = ""
    for _ in range(reply_tokens):
        assert st.logp is not None
        nxt = int(st.logp.argmax())
        if nxt == tok.eos_token_id:
            got.append(nxt)
            break
        got.append(nxt)
        _, st = runner.feed([nxt], st)
        reply = tok.decode(got)
        if CHAT_STOP in reply:
            reply = reply[:reply.index(CHAT_STOP)]
            _, st = runner.feed(ids + tokens_as_returned(got, reply, tok), before)
            return reply, st
    return tok.decode([t for t in got if t != tok.eos_token_id]), st


def chat_recall(runner: CacheRunner, tok: Any, words: list[str], conversations: int,
                seed: int = 0) -> dict[str, Any]:
    """`training.chat_eval.chat_recall`'s conversations (10 turns, 30 tokens) with the cache."""
    rng = random.Random(seed)
    hits = {"digits": [0, 0], "words": [0, 0]}
    examples = []
    for c in range(conversations):
        script = conversation_script(rng, words, 10, 30)
        st = runner.empty
        reply = ""
        for i, message in enumerate(script.messages):
            reply, st = chat_turn(runner, tok, message, st, i == 0, 30)
        hit = answer_matches(reply, script.fact.value)
        hits[script.fact.kind][0] += hit
        hits[script.fact.kind][1] += 1
        if c < 6:
            examples.append({"fact": script.fact.tell, "ask": script.fact.ask, "answer": reply})
    right = sum(h for h, _ in hits.values())
    return {"recall": right / conversations, "conversations": conversations,
            "by_kind": {k: {"recall": h / n if n else None, "conversations": n}
                        for k, (h, n) in hits.items()}, "examples": examples}


def value_choice(runner: CacheRunner, tok: Any, words: list[str], trials: int,
                 fillers: list[int], seed: int = 0) -> dict[str, Any]:
    """`training.chat_eval.value_choice`'s trials (top-1 of the told value among its topic's
    values, 20 filler words a message) with the cache."""
    topics = [t for t in TOPICS if t.kind == "words"]
    out: dict[str, Any] = {}
    for n in fillers:
        rng = random.Random(seed)
        top1, chance = 0, 0.0
        for trial in range(trials):
            topic = topics[trial % len(topics)]
            values = [str(v) for v in topic.values]
            told, ids, _ = value_trial(rng, tok, words, topic, n)
            _, st = runner.feed(ids, runner.empty)
            scores = []
            for v in values:
                c = tok.encode(f" {v}")
                assert st.logp is not None
                s = float(st.logp[c[0]])
                if len(c) > 1:
                    rows, _ = runner.feed(c[:-1], st)
                    s += float(rows.gather(1, torch.tensor(c[1:])[:, None]).sum())
                scores.append(s)
            top1 += int(torch.tensor(scores).argmax()) == told
            chance += 1 / len(values)
        out[str(n)] = {"top1": top1 / trials, "chance": chance / trials}
    return out


def train(model: Any, cache: CopyCache, tok: Any, args: argparse.Namespace) -> list[dict]:
    from training.data import Windows, default_cache_dir, load_token_stream

    stream = load_token_stream([args.data], tok, default_cache_dir())
    windows = Windows(stream.tokens, args.length)
    chats = ChatExamples(tok, at_start=1.0, max_fillers=args.max_fillers, acks=0.7)
    opt = torch.optim.AdamW(cache.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    curve = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        rows, masks = [], []
        for _ in range(args.batch_size):
            w = windows[rng.randrange(len(windows))]
            mask = torch.zeros(args.length, dtype=torch.bool)
            if rng.random() < args.chat_fraction:
                w, mask, _ = chats.make(w, rng)
            rows.append(w)
            masks.append(mask)
        batch, answer = torch.stack(rows), torch.stack(masks)
        with torch.no_grad():
            h, logits, _ = hidden_and_logits(model, batch[:, :-1])
        mixed, plain = cache.log_prob(h, logits, batch[:, 1:])
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
                   "seconds": round(time.time() - t0, 1)}
            curve.append(row)
            print(json.dumps(row), flush=True)
    return curve


def save_with_pointer(model: Any, tok: Any, cache: CopyCache, folder: str) -> None:
    """The model with ``cache`` as its `newllm.pointer.PointerCache` (the same computation),
    saved as a checkpoint folder in float16."""
    from newllm.checkpoint import save_pretrained
    from newllm.model import TransformerLM

    config = model.config.replace(pointer_dim=cache.dk)
    out = TransformerLM(config)
    missing = out.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pointer.") for k in missing), missing
    out.pointer.load_state_dict(cache.state_dict())
    save_pretrained(out.eval(), folder, tok, dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    from newllm.checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="newllm/checkpoints/default")
    p.add_argument("--data", help="prose to train on (text file)")
    p.add_argument("--filler", help="held-out prose for the evaluations")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chat-fraction", type=float, default=0.5)
    p.add_argument("--max-fillers", type=int, default=10)
    p.add_argument("--recall-weight", type=float, default=5.0)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--token-keys", action="store_true",
                   help="keys and queries also read the token's input embedding")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="of the training batches")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="of the evaluations' conversations (the same for every run)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--load", help="cache weights to start from (safetensors)")
    p.add_argument("--save", help="write the cache weights here (safetensors)")
    p.add_argument("--save-checkpoint",
                   help="write the model with these cache weights as its pointer "
                        "(`pointer_dim` = --dk; newllm.pointer) to this folder, in float16")
    p.add_argument("--no-cache", action="store_true", help="evaluate the model alone")
    p.add_argument("--value-choice", type=int, default=0)
    p.add_argument("--value-fillers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--chat", type=int, default=0, help="conversations of chat recall")
    p.add_argument("--out", help="JSON of the curve and the evaluations")
    args = p.parse_args(argv)
    if args.steps and not args.data:
        p.error("--steps needs --data")
    if args.save_checkpoint and args.token_keys:
        p.error("--save-checkpoint writes pointer_token_keys=false models; leave out --token-keys")
    if (args.value_choice or args.chat) and not args.filler:
        p.error("--value-choice and --chat need --filler")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_checkpoint(args.checkpoint, dtype=torch.float32)
    if model.pointer is not None:
        p.error(f"{args.checkpoint} already has a pointer (pointer_dim "
                f"{model.config.pointer_dim}); give the model without it")
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    cache = CopyCache(model.config.layer_hidden, model.config.vocab_size, args.dk,
                      token_keys=args.token_keys)
    if args.load:
        from safetensors.torch import load_file
        cache.load_state_dict(load_file(args.load))
    result: dict[str, Any] = {"args": vars(args)}
    if args.steps:
        result["curve"] = train(model, cache, tok, args)
        if args.save:
            from safetensors.torch import save_file
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in cache.state_dict().items()}, args.save)
    if args.save_checkpoint:
        save_with_pointer(model, tok, cache, args.save_checkpoint)
    runner = CacheRunner(model, None if args.no_cache else cache)
    words = filler_words(args.filler) if args.filler else []
    if args.value_choice:
        result["value_choice"] = value_choice(runner, tok, words, args.value_choice,
                                              args.value_fillers, args.eval_seed)
        print(json.dumps(result["value_choice"]), flush=True)
    if args.chat:
        result["chat"] = chat_recall(runner, tok, words, args.chat, args.eval_seed)
        print(json.dumps({k: v for k, v in result["chat"].items() if k != "examples"}),
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
