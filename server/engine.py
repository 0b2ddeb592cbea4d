"""The inference worker: turns jobs into token events, with sessions and batched decoding.

Each LitServe worker process runs one `Engine` under `SessionLoop` (a custom `LitLoop`), which
replaces LitServe's request loops so that requests of *different* sessions can be decoded
together (continuous batching: a request joins the batch as soon as its session lock is free
and leaves it when done), while turns of *one* session never overlap (see `server.store`).

One turn (a request):
1. **open**: try the session's lock (busy -> the job waits, the worker keeps decoding others);
   load the session's memory and `Transcript` (a worker keeps recent states in memory and reuses
   one when the file's payload hash still matches), work out which part of the request is new
   (`server.transcript`: 409 if the history diverged), tokenize it, prefill it in chunks.
2. **decode**: every live choice of every turn in the batch takes one token per step; the
   model runs them together with `TransformerLM.decode_step` (sessions at different positions).
3. **finish**: save the state (which has consumed the prompt and every generated token) and
   the extended transcript atomically, release the lock, report usage. A failure before this
   point leaves the session exactly as it was.

Events sent to the HTTP side (plain dicts; ``c`` is the choice index):
``start`` (prompt tokens), ``echo`` (completions echo), ``tok`` (released text, and token,
log-prob and alternatives when logprobs were asked for), ``end`` (finish reason), ``done``
(usage, session), ``error`` (status and OpenAI error body), then LitServe's FINISH_STREAMING.
A client that disconnects does not stop its turn: the turn completes and is saved.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

import torch
from torch import Tensor

# GenerationRun is generation's per-choice sampler (take(logits) -> token, .done, .state); it
# is what generate_batch uses, and continuous batching with streaming needs it a step at a time
from newllm.generation import GenerationRun, SamplingParams, score
from newllm.memory_file import MemoryFileError, load_memory, save_memory
from newllm.state import ModelState
from server import metrics
from server.protocol import ApiError, usage
from server.store import SessionStore, StoreFull, read_header_metadata
from server.transcript import (
    CHAT_STOP,
    Diverged,
    KindMismatch,
    Transcript,
    message_unit,
    new_messages,
    new_text_start,
    render_chat,
)

log = logging.getLogger("newllm.server")

PREFILL_CHUNK = 512  # tokens per forward call when reading a prompt (bounds attention memory)
CACHE_STATES = 32  # session states a worker keeps in memory (reused while the file is unchanged)
CACHE_BYTES = 256 << 20  # ... and at most this many bytes of them
Send = Callable[[int, str, Any], None]


@torch.no_grad()
def prefill(model: Any, ids: list[int], state: ModelState) -> tuple[Tensor, ModelState]:
    """Feed ``ids`` after ``state`` in chunks; the last token's logits (V,) and the new state."""
    logits = None
    for start in range(0, len(ids), PREFILL_CHUNK):
        x = torch.tensor([ids[start:start + PREFILL_CHUNK]], dtype=torch.long,
                         device=model.device)  # (1, T)
        logits, state = model(x, state, last_only=True)  # (1, 1, V)
    assert logits is not None, "prefill needs at least one token"
    return logits[0, -1], state


def _header_of(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


@dataclass
class Task:
    """One choice of one turn."""

    choice: int
    run: GenerationRun
    logits: Tensor  # (V,) logits for the next token
    state: ModelState

    @property
    def finished(self) -> bool:
        return self.run.state is not None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.run.tokens)


@dataclass
class Turn:
    """One request being served."""

    rqid: int
    uid: str
    job: dict[str, Any]
    session_id: str | None
    transcript: Transcript
    created: bool
    prompts: list[tuple[str, list[int]]]  # (new text, its token ids) per prompt
    new_units: list[str]
    tasks: list[Task] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.tasks)

    @property
    def wants_tokens(self) -> bool:
        return bool(self.job["want_tokens"])


class Engine:
    """Serves jobs for one model in one worker process (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, store: SessionStore,
                 max_prompt_tokens: int) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_prompt_tokens = max_prompt_tokens
        self.locks = store.locks()
        self.vocab = min(int(tokenizer.vocab_size), model.config.vocab_size)
        self.cache: OrderedDict[str, tuple[str, ModelState]] = OrderedDict()
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    # the loop ----------------------------------------------------------------------------------
    def serve(self, queue: Any, send: Send, max_batch: int) -> None:
        """Take jobs from LitServe's request queue until the sentinel; never returns otherwise."""
        waiting: deque[tuple[int, str, float, dict[str, Any]]] = deque()
        active: list[Turn] = []
        while True:
            room = max_batch - len(active) - len(waiting)
            while room > 0:
                idle = not active and not waiting
                try:
                    item = queue.get(timeout=1.0) if idle else queue.get_nowait()
                except Empty:
                    break
                if item == (None, None, None, None):  # LitServe's sentinel: shut down
                    return
                waiting.append(item)
                room -= 1
            for item in list(waiting):
                rqid, uid, _, job = item
                turn = None
                try:
                    turn = self.open(rqid, uid, job)
                    if turn is None:
                        continue  # its session is busy; try again next step
                    waiting.remove(item)
                    self._start(turn, send)
                    active.append(turn)
                except Exception as e:  # noqa: BLE001 - reported to the client
                    if item in waiting:
                        waiting.remove(item)
                    if turn is not None:
                        self._release(turn)
                    if not isinstance(e, ApiError):
                        log.exception("opening a request failed")
                        e = ApiError(500, f"internal error: {e}", code="internal_error")
                    self._fail(rqid, uid, e, send)
            if not active:
                if waiting:
                    time.sleep(0.005)
                continue
            try:
                self.step(active, send)
            except Exception as e:  # noqa: BLE001 - every turn in the batch fails, none is saved
                log.exception("decoding failed")
                for turn in active:
                    self._release(turn)
                    self._fail(turn.rqid, turn.uid, ApiError(
                        500, f"generation failed: {e}", code="internal_error"), send)
                active.clear()
                continue
            for turn in [t for t in active if t.finished]:
                active.remove(turn)
                self.finish(turn, send)

    # open --------------------------------------------------------------------------------------
    def open(self, rqid: int, uid: str, job: dict[str, Any]) -> Turn | None:
        """Lock, load, diff, tokenize and prefill a job; None when its session is busy."""
        sid = job["session_id"]
        if sid is not None and not self.locks.try_acquire(sid):
            return None
        try:
            return self._open(rqid, uid, job, sid)
        except BaseException:
            if sid is not None:
                self.locks.release(sid)
            raise

    def _open(self, rqid: int, uid: str, job: dict[str, Any], sid: str | None) -> Turn:
        state, transcript, created = None, Transcript(), sid is not None
        if sid is not None:
            created = not self.store.exists(sid)
            if not job["reset"] and not created:
                state, transcript = self._load(sid)
        mode = job["input_mode"]
        try:
            if job["op"] == "chat":
                prompts, new_units = self._chat_prompt(job, transcript, sid, mode)
            else:
                prompts, new_units = self._text_prompts(job, transcript, sid, mode), []
        except (Diverged, KindMismatch) as e:
            raise ApiError(409, str(e), code="session_conflict",
                           param="messages" if job["op"] == "chat" else "prompt") from None
        total = sum(len(ids) for _, ids in prompts)
        if total > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {total} new tokens; this server reads at most "
                           f"{self.max_prompt_tokens} per request (--max-prompt-tokens)",
                           code="prompt_too_long",
                           param="messages" if job["op"] == "chat" else "prompt")
        turn = Turn(rqid, uid, job, sid, transcript, created, prompts, new_units)
        start = state if state is not None else self.model.init_state(1)
        p = job["params"]
        stop = list(dict.fromkeys(p["stop"] + ([CHAT_STOP] if job["op"] == "chat" else [])))
        for pi, (_, ids) in enumerate(prompts):
            logits, after = prefill(self.model, ids, start)
            for j in range(job["n"]):
                seed = None if p["seed"] is None else p["seed"] + j
                try:
                    params = SamplingParams(
                        max_new_tokens=p["max_new_tokens"], temperature=p["temperature"],
                        top_k=p["top_k"], top_p=p["top_p"], seed=seed, stop=tuple(stop[:16]),
                        top_logprobs=job["top_logprobs"])
                except ValueError as e:
                    raise ApiError(400, str(e), code="invalid_value") from None
                run = GenerationRun(self.model, ids, start, params, self.tokenizer.decode,
                                    self.vocab)
                if params.max_new_tokens == 0:
                    run.finish_empty(after)
                turn.tasks.append(Task(pi * job["n"] + j, run, logits, after))
        return turn

    def _load(self, sid: str) -> tuple[ModelState, Transcript]:
        path = self.store.path(sid)
        try:
            meta = read_header_metadata(path)
            transcript = Transcript.from_metadata(meta)
            cached = self.cache.get(sid)
            if cached is not None and cached[0] == meta.get("payload_sha256"):
                self.cache.move_to_end(sid)
                return cached[1], transcript
            state = load_memory(path, self.model, tokenizer_hash=self.tokenizer.sha256)
        except (MemoryFileError, ValueError, OSError) as e:
            raise ApiError(409, f"session {sid!r} cannot be continued by this server: {e}; "
                           "DELETE it or pass metadata.reset_session='true'",
                           code="session_unusable", param="metadata.session_id") from None
        return state, transcript

    def _chat_prompt(self, job: dict[str, Any], t: Transcript, sid: str | None,
                     mode: str) -> tuple[list[tuple[str, list[int]]], list[str]]:
        units = [message_unit(role, content) for role, content in job["messages"]]
        skip = new_messages(t, units, mode) if sid is not None else 0
        new = [(role, content) for role, content in job["messages"][skip:]]
        text = render_chat(new, t.open_reply)
        return [(text, self.tokenizer.encode(text))], units[skip:]

    def _text_prompts(self, job: dict[str, Any], t: Transcript, sid: str | None,
                      mode: str) -> list[tuple[str, list[int]]]:
        prompts = []
        for p in job["prompts"]:
            if isinstance(p, str):
                start = new_text_start(t, p, mode) if sid is not None else 0
                text = p[start:]
                ids = self.tokenizer.encode(text)
            else:
                text, ids = self.tokenizer.decode(p), list(p)
            if not ids:
                if sid is not None:
                    raise ApiError(400, f"the prompt adds no new text to session {sid!r} (it "
                                   "already consumed all of it); send new text",
                                   code="empty_prompt", param="prompt")
                ids = [self.model.config.eos_token_id]  # an empty text starts after EOS
            prompts.append((text, ids))
        return prompts

    # events ------------------------------------------------------------------------------------
    def _start(self, turn: Turn, send: Send) -> None:
        send(turn.rqid, turn.uid, {"t": "start",
                                   "prompt_tokens": sum(len(ids) for _, ids in turn.prompts)})
        job = turn.job
        if job["op"] != "completion" or not job["echo"]:
            return
        for pi, (text, ids) in enumerate(turn.prompts):
            tokens = None
            if job["logprobs"] is not None:
                start = turn.tasks[pi * job["n"]].run.start_state
                scores = score(self.model, ids, start, top_logprobs=job["logprobs"])
                tokens = [self._token(s.id, s.logprob, s.top_logprobs) for s in scores]
            for j in range(job["n"]):
                send(turn.rqid, turn.uid, {"t": "echo", "c": pi * job["n"] + j, "text": text,
                                           "tokens": tokens})

    def _token(self, token_id: int, lp: float | None,
               top: tuple[tuple[int, float], ...]) -> dict[str, Any]:
        text, raw = self._piece(token_id)
        return {"token": text, "bytes": raw, "lp": lp,
                "top": [[*self._piece(i), v] for i, v in top]}

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes, as OpenAI shows them (``bytes:\\xe2`` for a partial
        character), so that distinct tokens get distinct names in ``top_logprobs``."""
        if token_id not in self._pieces:
            raw = _token_bytes(self.tokenizer, token_id)
            if raw is None:
                text = self.tokenizer.decode([token_id])
                self._pieces[token_id] = (text, list(text.encode("utf-8", "replace")))
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
                self._pieces[token_id] = (text, list(raw))
        return self._pieces[token_id]

    @torch.no_grad()
    def step(self, turns: list[Turn], send: Send) -> None:
        """One token for every live choice of every turn, decoded as one batch."""
        live = [(turn, task) for turn in turns for task in turn.tasks if not task.finished]
        if not live:
            return
        ids = []
        for turn, task in live:
            tok = task.run.take(task.logits)
            ids.append(tok.id)
            event: dict[str, Any] = {"t": "tok", "c": task.choice, "text": tok.text}
            if turn.wants_tokens:
                event.update(self._token(tok.id, tok.logprob, tok.top_logprobs))
            send(turn.rqid, turn.uid, event)
        metrics.BATCH.observe(len(live))
        logits, states = self.model.decode_step(
            torch.tensor(ids, dtype=torch.long, device=self.model.device),  # (B,)
            [task.state for _, task in live])  # logits (B, V)
        for row, (turn, task) in enumerate(live):
            task.state = states[row]
            if task.run.done:
                task.run.state = states[row]
                send(turn.rqid, turn.uid, {"t": "end", "c": task.choice,
                                           "finish_reason": task.run.finish_reason})
            else:
                task.logits = logits[row]

    # finish ------------------------------------------------------------------------------------
    def finish(self, turn: Turn, send: Send) -> None:
        """Save the session (if any) and release its lock, then report usage.

        The lock is released before the last event, so a client that got its response can
        count on the session being free (and its file updated).
        """
        for task in turn.tasks:  # choices that ended in prefill (max_tokens 0)
            if task.run.params.max_new_tokens == 0:
                send(turn.rqid, turn.uid, {"t": "end", "c": task.choice,
                                           "finish_reason": task.run.finish_reason})
        try:
            session = self._save(turn) if turn.session_id is not None else None
        except StoreFull as e:
            error: ApiError | None = ApiError(503, str(e), code="too_many_sessions")
        except Exception as e:  # noqa: BLE001 - reported; the session file is unchanged
            log.exception("saving session %r failed", turn.session_id)
            error = ApiError(500, f"saving the session failed: {e}", code="internal_error")
        else:
            error = None
        finally:
            self._release(turn)
        if error is not None:
            self._fail(turn.rqid, turn.uid, error, send)
            return
        prompt_tokens = sum(len(ids) for _, ids in turn.prompts)
        completion = sum(len(t.run.tokens) for t in turn.tasks)
        send(turn.rqid, turn.uid, {"t": "done", "usage": usage(prompt_tokens, completion),
                                   "session": session})
        send(turn.rqid, turn.uid, None)

    def _save(self, turn: Turn) -> dict[str, Any]:
        sid = turn.session_id
        assert sid is not None
        task = turn.tasks[0]
        if turn.job["op"] == "chat":
            units = turn.new_units + [message_unit("assistant", task.text)]
            transcript = turn.transcript.extend(units, "chat", open_reply=True)
        else:
            new_text, reply = turn.prompts[0][0], task.text
            transcript = turn.transcript.extend([new_text, reply], "text",
                                                lengths=[len(new_text), len(reply)],
                                                open_reply=False)
        state = task.run.state
        data = save_memory(state, self.model, tokenizer_hash=self.tokenizer.sha256,
                           metadata=transcript.to_metadata())
        self.store.write(sid, data, self.locks)
        self.cache[sid] = (_header_of(data)["payload_sha256"], state)
        self.cache.move_to_end(sid)
        while len(self.cache) > CACHE_STATES or (
                len(self.cache) > 1 and sum(s.nbytes() for _, s in self.cache.values())
                > CACHE_BYTES):
            self.cache.popitem(last=False)
        return {"id": sid, "tokens_seen": state.position, "turns": transcript.turns,
                "created": turn.created, "reset": bool(turn.job["reset"]), "bytes": len(data)}

    def _release(self, turn: Turn) -> None:
        if turn.session_id is not None and self.locks.holds(turn.session_id):
            self.locks.release(turn.session_id)

    @staticmethod
    def _fail(rqid: int, uid: str, error: ApiError, send: Send) -> None:
        send(rqid, uid, {"t": "error", "status": error.status, **error.body()})
        send(rqid, uid, None)


def _token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes of a byte-level BPE token (GPT-2 alphabet), or None for other tokenizers."""
    global _UNICODE_TO_BYTE
    if _UNICODE_TO_BYTE is None:
        from newllm.tokenizer import byte_to_unicode

        _UNICODE_TO_BYTE = {ch: b for b, ch in byte_to_unicode().items()}
    name = tokenizer.backend.id_to_token(token_id)
    if name is None or not all(ch in _UNICODE_TO_BYTE for ch in name):
        return None
    return bytes(_UNICODE_TO_BYTE[ch] for ch in name)


_UNICODE_TO_BYTE: dict[str, int] | None = None


def worker_threads(threads: int, workers: int) -> int:
    """Torch threads per worker: ``threads``, or (0) the CPU cores shared among the workers.

    One thread is the default: decoding a small batch is a chain of small matrix products that
    extra threads barely speed up, and on a busy machine their synchronisation made decoding
    ~10x slower in our measurements (tiny-infini: 2.5 ms/token with 1 thread, 21-32 with 2).
    """
    return threads or max(1, (os.cpu_count() or 1) // max(1, workers))
