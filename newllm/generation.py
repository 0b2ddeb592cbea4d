"""Text generation on top of the explicit state: sampling, stop strings, batching, scoring.

``generate(model, prompt_ids, state)`` prefills the prompt in one forward call, then picks one
token at a time and yields it as a `GeneratedToken` (id, log-prob, newly released text). When
the stream is exhausted it exposes the final ``.state``, which has consumed the prompt *and every
generated token*, the one that ended generation included, so a session's state always equals its
whole transcript (this costs one forward call for the last token, whose logits are thrown away).

Choices, written down:
- **Empty prompts are refused.** A state stores no logits, so without at least one new token
  there is nothing to sample the first token from, even when the state has seen text. Callers
  who want OpenAI's behaviour for an empty prompt pass ``[eos_token_id]``: training joins
  documents with EOS, so EOS is the natural start of a text.
- **Log-probs are the model's**: ``log_softmax(logits)`` over the whole vocabulary, before
  temperature, top-k and top-p (what evaluation harnesses expect from ``echo`` + ``logprobs``).
- **Stop strings follow OpenAI**: text that could be the start of a stop string is held back;
  when a stop string appears, the text before it is released, the stop string and everything
  after it never are, and generation ends with ``finish_reason="stop"``. A stop token (by default
  the model's EOS) also ends generation with "stop"; its text is never released.
- **Determinism**: sampling runs on the CPU with a `torch.Generator` seeded per request, so the
  same seed gives the same tokens for the same logits. Greedy decoding (temperature 0) needs none.
- ``generate_batch`` runs independent sessions together on `newllm.slots.Slots` (one forward
  per step for all of them, prompts read in chunks in the same loop) and gives what separate
  `generate` calls give; `GenerationRun` is the per-session sampler that both use, for callers
  (the server) that run their own batching loop.
- Bad arguments raise `InvalidParameter`, a ValueError whose ``.param`` names the argument,
  before any work is done.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from newllm.slots import Slots, compile_enabled
from newllm.state import ModelState

Decode = Callable[[Sequence[int]], str]

MAX_NEW_TOKENS = 65536  # per request; the server may set a lower limit of its own
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
MIN_TEMPERATURE = 1e-5  # temperatures below this decode greedily (dividing by ~0 overflows)
FINISH_REASONS = ("stop", "length")


class InvalidParameter(ValueError):
    """A bad generation argument; ``.param`` names it (the server answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidParameter(name, f"{name} must be between {lo} and {hi}, got {value}")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated on creation (errors name the field)."""

    max_new_tokens: int = 16  # tokens to generate at most (0..MAX_NEW_TOKENS); hit -> "length"
    temperature: float = 1.0  # >= 0; 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with probability >= top_p; 0 < p <= 1
    seed: int | None = None  # same seed -> same tokens; None = fresh randomness
    stop: tuple[str, ...] = ()  # stop strings (a single string is accepted too)
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos; () = none
    top_logprobs: int = 0  # most likely alternatives reported per token (0..MAX_TOP_LOGPROBS)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 0, MAX_NEW_TOKENS)
        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise InvalidParameter("temperature",
                                   f"temperature must be >= 0 (0 = greedy), got {temperature}")
        object.__setattr__(self, "temperature", temperature)
        _check_int("top_k", self.top_k, 0, 2**31 - 1)
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {top_p}")
        object.__setattr__(self, "top_p", top_p)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**64 - 1)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)):
            raise InvalidParameter("stop",
                                   f"stop must be a string or a list of strings, got {stop!r}")
        if len(stop) > MAX_STOP:
            raise InvalidParameter("stop",
                                   f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidParameter("stop", f"each stop string must be a non-empty string of "
                                               f"at most {MAX_STOP_CHARS} characters, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS:
                raise InvalidParameter(
                    "stop_token_ids",
                    f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids",
                )
            for i in ids:
                _check_int("stop_token_ids", i, 0, 2**31 - 1)
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token: its id, the model's log-prob of it, and the text it released."""

    id: int
    logprob: float
    text: str = ""  # text released with this token (may be empty: held back or a stop token)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, log-prob), most likely first


@dataclass(frozen=True)
class TokenScore:
    """A scored input token: log-prob given everything before it (None: nothing before it)."""

    id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] = ()


# helpers -------------------------------------------------------------------------------------
def _as_ids(name: str, ids: Sequence[int] | Tensor, vocab_size: int) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point():
            raise InvalidParameter(name, f"{name} must be a 1-D sequence of token ids, got a "
                                         f"{ids.dtype} tensor of shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise InvalidParameter(name, f"{name} must be token ids, not text; encode it first")
    out = []
    for i in ids:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)  # int, numpy integer, ...
        except TypeError:
            raise InvalidParameter(name, f"{name} holds {i!r}, not a token id") from None
        if not 0 <= i < vocab_size:
            raise InvalidParameter(name, f"{name} holds {i}, not a token id in [0, {vocab_size})")
        out.append(i)
    return out


def _check_state(model: Any, state: ModelState | None) -> ModelState:
    if state is None:
        return model.init_state(1)
    if state.batch_size != 1:
        raise ValueError(f"generation takes a state of batch size 1, got {state.batch_size}")
    return state


def _top(logprobs: Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k largest entries of logprobs (V,) as (id, log-prob) pairs, largest first."""
    if k == 0:
        return ()
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


def _sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick a token id from logits (V,) float32 on the CPU."""
    if params.greedy or params.top_k == 1:
        return int(logits.argmax())
    x = logits / params.temperature  # (V,)
    if 0 < params.top_k < x.shape[0]:
        kth = x.topk(params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        p_sorted, order = torch.sort(x.softmax(-1), descending=True, stable=True)
        before = p_sorted.cumsum(-1) - p_sorted  # mass of the more likely tokens
        drop = before >= params.top_p
        drop[0] = False  # the most likely token always stays
        x = x.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


class _IncrementalDecoder:
    """Turns token ids into text pieces, holding back incomplete characters (U+FFFD at the end).

    Decodes a short window (from the last clean boundary) each time, as transformers' streamers
    and vLLM do, so the cost per token does not grow with the text.
    """

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been released

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class GenerationRun:
    """One session's generation, driven from outside: sampling, text release, stop handling.

    `generate` and `generate_batch` drive it; so can a server's own batching loop:
    ``token = run.take(logits)`` for each next-token logits (V,) until ``run.done``, feeding each
    token to the model, then set ``run.state`` to the state after the last token (or call
    ``run.finish_empty(state_after_prompt)`` when ``params.max_new_tokens == 0``). The
    constructor checks every argument (`InvalidParameter` names the bad one) and runs nothing.
    Read: ``prompt_ids``, ``start_state``, ``params``, ``tokens``, ``finish_reason``, ``done``.
    """

    def __init__(self, model: Any, prompt_ids: Sequence[int] | Tensor, state: ModelState | None,
                 params: SamplingParams | None, decode: Decode | None,
                 vocab_size: int | None) -> None:
        V = model.config.vocab_size
        self.params = params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameter("params",
                                   f"params must be a SamplingParams, got {type(params).__name__}")
        self.prompt_ids = _as_ids("prompt_ids", prompt_ids, V)
        if not self.prompt_ids:
            raise InvalidParameter(
                "prompt_ids", "prompt_ids is empty: generation needs at least one token to "
                "condition on (a state stores no logits); to start from nothing, pass "
                "[eos_token_id]")
        self.start_state = _check_state(model, state)
        stop_ids = (params.stop_token_ids if params.stop_token_ids is not None
                    else (model.config.eos_token_id,))
        for i in stop_ids:
            if i >= V:
                raise InvalidParameter(
                    "stop_token_ids", f"stop_token_ids holds {i}, outside the vocabulary of {V}")
        self.stop_ids = frozenset(stop_ids)
        if params.stop and decode is None:
            raise InvalidParameter("stop",
                                   "stop strings need a decode function (token ids -> text)")
        if vocab_size is not None and not 1 <= vocab_size <= V:
            raise ValueError(f"vocab_size must be between 1 and the model's {V}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.decoder = _IncrementalDecoder(decode) if decode is not None else None
        self.pending = ""  # decoded text not yet released (could start a stop string)
        self.tokens: list[GeneratedToken] = []
        self.finish_reason: str | None = None
        self.state: ModelState | None = None  # set when the last token has been consumed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, logits: Tensor) -> GeneratedToken:
        """Pick the next token from logits (V,) and work out the text it releases."""
        if self.done:
            raise RuntimeError(f"this generation has finished ({self.finish_reason}); "
                               f"start a new one")
        logits = logits.detach().float().cpu()  # (V,)
        logprobs = torch.log_softmax(logits, dim=-1)
        allowed = logits
        if self.vocab_size is not None and self.vocab_size < logits.shape[0]:
            allowed = logits.clone()
            allowed[self.vocab_size:] = float("-inf")
        token_id = _sample(allowed, self.params, self.generator)
        is_stop_token = token_id in self.stop_ids
        if self.decoder is not None and not is_stop_token:
            self.pending += self.decoder.push(token_id)
        text = self._release(is_stop_token, len(self.tokens) + 1 >= self.params.max_new_tokens)
        token = GeneratedToken(token_id, float(logprobs[token_id]), text,
                               _top(logprobs, self.params.top_logprobs))
        self.tokens.append(token)
        return token

    def _release(self, stop_token: bool, last: bool) -> str:
        """Text that can be released now; sets finish_reason when generation ends."""
        if stop_token or last:
            self.finish_reason = "stop" if stop_token else "length"
            if self.decoder is not None:
                self.pending += self.decoder.flush()
        cut = min((i for i in (self.pending.find(s) for s in self.params.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            text, self.pending = self.pending[:cut], ""
            return text
        if self.done:
            text, self.pending = self.pending, ""
            return text
        hold = 0  # longest tail of pending that could begin a stop string
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        text = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return text

    def finish_empty(self, state: ModelState) -> None:
        """max_new_tokens == 0: nothing is generated, the state has read the prompt."""
        self.finish_reason, self.state = "length", state




class TokenStream:
    """Iterator over the `GeneratedToken`s of one generation; the results once exhausted.

    ``.state``, the final state, is only available after the last token (iterate to the end or
    call ``.collect()``); ``.text``, ``.token_ids`` and ``.tokens`` grow as tokens come.
    ``.token_ids`` holds every generated token, a stop token that ended generation included,
    since the state has consumed it too; its text is never part of ``.text``.
    """

    def __init__(self, run: GenerationRun, steps: Iterator[GeneratedToken]) -> None:
        self._run = run
        self._steps = steps

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> GeneratedToken:
        return next(self._steps)

    def collect(self) -> TokenStream:
        """Run to the end; returns self."""
        for _ in self:
            pass
        return self

    @property
    def done(self) -> bool:
        return self._run.state is not None

    @property
    def tokens(self) -> list[GeneratedToken]:
        return list(self._run.tokens)

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self._run.tokens]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self._run.tokens)

    @property
    def finish_reason(self) -> str | None:
        """"stop" (stop string or stop token) or "length" (max_new_tokens); None while running."""
        return self._run.finish_reason if self.done else None

    @property
    def prompt_tokens(self) -> int:
        return len(self._run.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self._run.tokens)

    @property
    def state(self) -> ModelState:
        """The state after the prompt and every generated token."""
        if self._run.state is None:
            raise RuntimeError("the generation has not finished: iterate the stream to the end "
                               "(or call .collect()) before reading .state")
        return self._run.state

    def __repr__(self) -> str:
        return (f"TokenStream(prompt_tokens={self.prompt_tokens}, "
                f"completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason!r}, text={self.text!r})")


def tokens_as_returned(ids: Sequence[int], reply: str, tokenizer: Any) -> list[int]:
    """Token ids whose text is ``reply``, where a stop string cut the text of the generated
    ``ids``: the tokens that lie wholly inside the reply (a stop string spans only the last
    few), then the rest of the reply tokenized (e.g. where one token held both text and the
    start of the stop string). What a session's memory reads so that it holds the reply as
    returned (the server's saved state, `training.chat_eval`)."""
    keep = len(ids)
    while keep and not reply.startswith(tokenizer.decode(ids[:keep])):
        keep -= 1
    rest = reply[len(tokenizer.decode(ids[:keep])):]
    return list(ids[:keep]) + (tokenizer.encode(rest) if rest else [])


# single session ------------------------------------------------------------------------------
@torch.no_grad()
def _steps(model: Any, run: GenerationRun, compile: bool = False) -> Iterator[GeneratedToken]:
    ids = torch.tensor([run.prompt_ids], dtype=torch.long, device=model.device)  # (1, T)
    logits, state = model(ids, run.start_state, last_only=True)  # (1, 1, V)
    if run.params.max_new_tokens == 0:
        run.finish_empty(state)
        return
    if compile:
        yield from _slot_steps(model, run, logits[0, -1], state)
        return
    while True:
        token = run.take(logits[0, -1])
        ids = torch.tensor([[token.id]], dtype=torch.long, device=model.device)  # (1, 1)
        logits, state = model(ids, state, last_only=True)
        if run.done:
            run.state = state
            yield token
            return
        yield token


@torch.no_grad()
def _slot_steps(model: Any, run: GenerationRun, logits: Tensor,
                state: ModelState) -> Iterator[GeneratedToken]:
    """The decode loop of `_steps` on a one-slot `Slots` with the compiled step."""
    slots = Slots(model, 1, compile=True)
    handle = slots.add(state)
    while True:
        token = run.take(logits)
        logits = slots.step([handle], [token.id])[0]  # (V,)
        if run.done:
            run.state = slots.remove(handle)
            yield token
            return
        yield token


def generate(model: Any, prompt_ids: Sequence[int] | Tensor, state: ModelState | None = None,
             params: SamplingParams | None = None, *, decode: Decode | None = None,
             vocab_size: int | None = None, compile: bool | None = None) -> TokenStream:
    """Continue ``state`` (None: empty) with ``prompt_ids`` and generate; see the module doc.

    ``decode`` (token ids -> text, e.g. ``tokenizer.decode``) turns tokens into text pieces and
    is needed for stop strings. ``vocab_size`` restricts sampling to ids below it (a tokenizer
    smaller than the model's padded embedding). Arguments are checked here, before any work;
    the prompt is read when the stream is first advanced.

    ``compile``: decode with the compiled step (`newllm.slots.Slots` with ``compile``; the
    prompt is read eagerly). The first call compiles (seconds to minutes; later calls in the
    process reuse the code, and a second process finds it in torch's on-disk cache), after
    which a token costs less Python and per-op dispatch (`benchmarks/latency.py` measures
    how much). Default: ``NEWLLM_COMPILE=1`` in the environment, else eager;
    ``NEWLLM_COMPILE=0`` always decodes eagerly. Compiled and eager logits agree to float
    rounding (tests: 1e-5).
    """
    run = GenerationRun(model, prompt_ids, state, params, decode, vocab_size)
    use = compile_enabled(compile) and hasattr(model, "layers") and hasattr(model, "embed_in")
    return TokenStream(run, _steps(model, run, use))


def generate_batch(model: Any, prompts: Sequence[Sequence[int] | Tensor],
                   states: Sequence[ModelState | None] | None = None,
                   params_list: SamplingParams | Sequence[SamplingParams | None] | None = None,
                   decode: Decode | None = None, *, vocab_size: int | None = None,
                   max_batch: int | None = None,
                   compile: bool | None = None) -> list[TokenStream]:
    """Several independent generations at once; the same results as separate `generate` calls.

    Continuous batching over `Slots` (at most ``max_batch`` sessions at once, default all):
    prompts are read in chunks by the `Scheduler`, each session joins a slot when its prompt is
    read and leaves when it finishes (after its last token is consumed), and every step decodes
    one token for all sessions in the slots in one forward. Returns finished `TokenStream`s.
    A model without slot support (any object with ``forward(ids, state)``) is run one
    generation at a time. ``compile``: the slots' step compiled (see `generate`).
    """
    from newllm.model import TransformerLM  # local: newllm.model does not import generation
    from newllm.scheduler import Scheduler

    n = len(prompts)
    states = list(states) if states is not None else [None] * n
    if params_list is None or isinstance(params_list, SamplingParams):
        params_list = [params_list] * n
    if len(states) != n or len(params_list) != n:
        raise ValueError(f"{n} prompts but {len(states)} states and {len(params_list)} params")
    if max_batch is not None:
        _check_int("max_batch", max_batch, 1, 2**31 - 1)
    runs = [GenerationRun(model, p, s, sp, decode, vocab_size)
            for p, s, sp in zip(prompts, states, params_list, strict=True)]
    if not isinstance(model, TransformerLM):
        for run in runs:
            for _ in _steps(model, run):
                pass
        return [TokenStream(run, iter(())) for run in runs]
    slots = Slots(model, max(1, min(n, max_batch or n)), compile=compile)
    sched = Scheduler(model, slots)
    queue = list(range(n))  # prompts not yet handed to the scheduler (it reads them in turn)
    live: dict[int, tuple[int, Tensor]] = {}  # session -> (slot handle, next-token logits (V,))
    reading = 0  # sessions queued in the scheduler, not yet in a slot
    with torch.no_grad():
        while queue or reading or live:
            while queue and len(live) + reading < slots.num_slots:
                i = queue.pop(0)
                sched.read(i, runs[i].prompt_ids, runs[i].start_state)
                reading += 1
            order = list(live)
            tokens = {live[i][0]: runs[i].take(live[i][1]).id for i in order}
            ready, logits = sched.step(tokens)
            for row, i in enumerate(order):
                assert logits is not None
                handle = live[i][0]
                if runs[i].done:
                    runs[i].state = slots.remove(handle)
                    del live[i]
                else:
                    live[i] = (handle, logits[row])
            for p in ready:
                if p.error is not None:
                    raise p.error
                assert p.logits is not None
                i, reading = int(p.key), reading - 1  # type: ignore[call-overload]
                if runs[i].params.max_new_tokens == 0:
                    runs[i].finish_empty(p.state)
                else:
                    live[i] = (slots.add(p.state), p.logits)
    return [TokenStream(run, iter(())) for run in runs]


# scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def score(model: Any, ids: Sequence[int] | Tensor, state: ModelState | None = None,
          top_logprobs: int = 0, *, chunk_size: int = 512) -> list[TokenScore]:
    """The log-prob of each token of ``ids`` given the ones before it (and the state).

    The first token has no log-prob (None), as in OpenAI's ``echo``: a state stores no logits,
    so nothing predicts it, even when the state has seen text. ``top_logprobs`` most likely
    alternatives come with each later token. The text is fed in pieces of ``chunk_size`` tokens
    (equal to one call, since any split gives the same logits) to bound the logits' memory.
    """
    _check_int("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
    _check_int("chunk_size", chunk_size, 1, 2**31 - 1)
    token_ids = _as_ids("ids", ids, model.config.vocab_size)
    state = _check_state(model, state)
    out: list[TokenScore] = [TokenScore(token_ids[0], None)] if token_ids else []
    for start in range(0, len(token_ids), chunk_size):
        piece = token_ids[start:start + chunk_size]
        x = torch.tensor([piece], dtype=torch.long, device=model.device)  # (1, T)
        logits, state = model(x, state)  # (1, T, V)
        logprobs = torch.log_softmax(logits[0].float(), dim=-1).cpu()  # (T, V)
        targets = token_ids[start + 1:start + 1 + len(piece)]  # predicted by this piece
        for t, target in enumerate(targets):
            out.append(TokenScore(target, float(logprobs[t, target]),
                                  _top(logprobs[t], top_logprobs)))
    return out


# convenience ---------------------------------------------------------------------------------
def complete_text(model: Any, tokenizer: Any, text: str,
                  params: SamplingParams | None = None) -> str:
    """The generated continuation of ``text`` (empty state; stops at EOS and stop strings).

    An empty ``text`` starts from EOS, the token that begins every document in training.
    """
    prompt = tokenizer.encode(text)
    if not prompt:
        prompt = [model.config.eos_token_id]
    vocab = min(int(getattr(tokenizer, "vocab_size", model.config.vocab_size)),
                model.config.vocab_size)
    return generate(model, prompt, None, params, decode=tokenizer.decode,
                    vocab_size=vocab).collect().text
