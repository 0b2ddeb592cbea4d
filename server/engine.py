"""The inference worker: turns jobs into token events, with sessions and batched decoding.

Each LitServe worker process runs one `Engine` under `SessionLoop` (a custom `LitLoop`), which
replaces LitServe's request loops so that requests of *different* sessions can be decoded
together (continuous batching: a request joins the batch as soon as its session lock is free
and leaves it when done), while turns of *one* session never overlap (see `server.store`).

One turn (a request):
1. **open**: try the session's lock (busy -> the job is parked and retried while the worker
   serves other jobs); load the session's memory and `Transcript` (a worker keeps recent
   states in memory and reuses one while the file's metadata, payload hash and position
   included, is unchanged), work out which part of the request is new (`server.transcript`:
   409 if the history diverged), tokenize it and queue it to be read. A turn that would create
   a session is refused here (503) when the store is full of busy sessions.
2. **read and decode**: the parts are the library's. `newllm.scheduler.Scheduler` decides each
   step: a chunk of the waiting prompts is read (so a long prompt delays the others by one
   chunk per step), then every live choice of every turn takes one token, all of them in one
   forward over `newllm.slots.Slots` (each choice holds a slot from the end of its prompt to
   its last token). A turn is admitted while its choices fit in the free slots
   (``--max-batch-size`` slots; a turn wider than that runs when the worker is idle).
3. **finish**: save the state and the extended transcript atomically, release the lock, report
   usage. A failure before this point leaves the session exactly as it was; so does a failed
   save (disk full or read-only: 507/503 for this request, see `server.store`).

What a session's memory holds after a turn: the prompt and the reply *as returned*. When a
stop string ended the reply (``finish_reason`` "stop" with text cut off, the implicit
``"\\nUser:"`` of chat included), the state that decoding produced has also read the stop
string, so the saved state is rebuilt from the state after the prompt by reading the tokens of
the returned text (the generated tokens that lie wholly inside it, then the rest of it
tokenized): the memory then equals the rendered conversation, which is what the next turn's
text continues. When a stop token (EOS) ended the reply, the memory keeps that token.

Failures are per turn: a turn whose choice fails (an error while sampling, or logits that are
not finite or beyond ``MAX_LOGIT``, which only a damaged or forged memory produces: 422
``non_finite_memory``) gets its error and is dropped, its session unchanged; the other turns in
the batch go on. If the batched forward pass itself fails, each row is retried alone so that
only the turn that caused it fails (a failed step leaves the slots as they were).

Cancellation: when the HTTP side sees its client go away mid-turn it drops a cancel flag
(`SessionStore.cancel`); between steps (every `CANCEL_POLL_S` at most: with Redis each read is a
round trip) the worker drops flagged turns (and parked jobs)
without saving anything. ``DELETE`` of a session flags the turn that holds it (the worker notes
which one, `SessionStore.mark_running`), which then ends with a 409 ``session_deleted`` error.
A turn with an ``Idempotency-Key`` already saved in its session is answered from the record
without running (`server.replies`); otherwise its events are recorded and saved with it.

Parked jobs: a worker takes a job from the shared queue only while its slots have room (a
thread of its own waits on the queue, `JobFeed`, so decoding never pays a round trip to
LitServe's queue per step; it takes one job at a time, when the loop asks for one), and
keeps jobs whose session is busy (or that wait for room) aside (at most ``MAX_PARKED``), so a
busy session never stops it from serving other jobs, and turns of one session start in the
order they arrived.

Events sent to the HTTP side (plain dicts; ``c`` is the choice index):
``start`` (prompt tokens), ``echo`` (completions echo), ``tok`` (released text, and token,
log-prob and alternatives when logprobs were asked for), ``end`` (finish reason), ``done``
(usage, session), ``error`` (status and OpenAI error body), then LitServe's FINISH_STREAMING.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from queue import Empty, Queue
from typing import Any, TypeVar

import torch
from torch import Tensor

# GenerationRun is generation's per-choice sampler (take(logits) -> token, .done, .state); it
# is what generate_batch uses, and continuous batching with streaming needs it a step at a time
from newllm.generation import GenerationRun, SamplingParams, score, tokens_as_returned
from newllm.memory_file import MemoryFileError, load_memory, save_memory
from newllm.scheduler import PREFILL_CHUNK, Prompt, Scheduler
from newllm.slots import Slots, compile_enabled
from newllm.state import ModelState
from server import metrics, replies, stateful
from server.prefix_cache import PrefixCache
from server.prompts import Prompter
from server.protocol import ApiError, usage
from server.store import SessionStore, StoreFull, StoreWriteError, header_metadata
from server.transcript import CHAT_STOP, Diverged, KindMismatch, Transcript, message_unit
from server.turns import MAX_LOGIT, Task, Turn, healthy, job_width

T = TypeVar("T")
log = logging.getLogger("newllm.server")

CACHE_STATES = 32  # session states a worker keeps in memory (reused while the file is unchanged)
CACHE_BYTES = 256 << 20  # ... and at most this many bytes of them
MAX_PARKED = 256  # jobs a worker keeps aside while their sessions are busy
PARK_POLL_S = 0.005  # how often parked jobs are retried while nothing else runs
CANCEL_POLL_S = 0.02  # how often running turns' cancel flags are read (a store round trip)
SENTINEL = (None, None, None, None)  # LitServe's "shut down" item on the request queue
Send = Callable[[int, str, Any], None]
Job = tuple[int, str, float, dict[str, Any]]  # LitServe's queue item: (rqid, uid, time, job)


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


class Engine:
    """Serves jobs for one model in one worker process (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, store: SessionStore,
                 max_prompt_tokens: int, prefix_cache_bytes: int = 0,
                 compile: bool | None = None, stream_interval: float = 0.0) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.stream_interval = stream_interval  # seconds between messages (`Outbox`)
        # the compiled decode step (newllm.slots): on unless turned off (NEWLLM_COMPILE=0)
        self.compile = compile_enabled(compile, default=True)
        self.max_prompt_tokens = max_prompt_tokens
        self.locks = store.locks()
        self.vocab = min(int(tokenizer.vocab_size), model.config.vocab_size)
        # session id -> (the file's metadata, the state it holds)
        self.cache: OrderedDict[str, tuple[dict[str, str], ModelState]] = OrderedDict()
        self.prompter = Prompter(tokenizer, model.config.eos_token_id)
        self.max_batch = 1  # slots per worker, set by `serve`
        self.slots = Slots(model, 1, compile=self.compile)
        self.scheduler = Scheduler(model, self.slots, PREFILL_CHUNK)
        self.reading: dict[tuple[str, int], Turn] = {}  # (uid, prompt) -> its turn
        self.recording: dict[str, list[dict[str, Any]]] = {}  # uid -> events (idempotent turns)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # stateless requests
        self._compiling: threading.Event | None = None  # set when a background compile ends
        self._compiled_ok = False  # ... and whether it compiled
        metrics.safely(metrics.prepare_labels)

    def warm_up(self, num_slots: int) -> bool:
        """Compile the decode step for ``num_slots`` slots (the engine's shapes): one row and
        two rows (two makes torch compile code with the row count dynamic, which then serves
        every batch size), on slots of its own. Logged with the time it took; returns whether
        it compiled (on a failure, logged by `newllm.slots`, decoding stays eager)."""
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                slots = Slots(self.model, num_slots, compile=True)
                empty = self.model.init_state(1)
                rows = [slots.add(empty) for _ in range(min(2, num_slots))]
                for n in sorted({1, len(rows)}):
                    for _ in range(2):
                        slots.step(rows[:n], [self.model.config.eos_token_id] * n)
        except Exception:  # not torch.compile's own failure (that falls back in Slots)
            log.exception("compiling the decode step failed; decoding eagerly")
            return False
        if slots.compiled:
            log.info("decode step compiled in %.1f s (torch.compile, while serving eagerly; "
                     "--no-compile or NEWLLM_COMPILE=0 to skip it)", time.perf_counter() - t0)
        return slots.compiled

    def start_compiling(self, num_slots: int) -> threading.Thread:
        """Compile the decode step in a background thread (`warm_up`) while the loop serves
        with the eager step, so the first requests after a start wait for nothing; the loop
        takes the compiled step between two steps once it is ready (`_take_compiled`)."""
        self.compile = self.slots.compiled = False
        done = threading.Event()

        def run() -> None:
            self._compiled_ok = self.warm_up(num_slots)
            done.set()

        self._compiling = done
        thread = threading.Thread(target=run, name="newllm-compile", daemon=True)
        thread.start()
        return thread

    def _take_compiled(self) -> None:
        """Switch to the compiled step once the background compile is done. Between steps
        the slot buffers are the same for both steps, so busy slots switch too."""
        if self._compiling is None or not self._compiling.is_set():
            return
        self._compiling = None
        self.compile = self.slots.compiled = self._compiled_ok and compile_enabled(True)
        metrics.safely(lambda: metrics.decode_step("compiled" if self.compile else "eager"))

    @property
    def compile_pending(self) -> bool:
        """Whether a background compile runs (the step is eager until it ends)."""
        return self._compiling is not None

    def _use_slots(self, n: int) -> None:
        """Serve with ``n`` slots (only while none is busy)."""
        assert not len(self.slots) and not self.scheduler.busy
        self.slots = Slots(self.model, n, compile=self.compile)
        self.scheduler = Scheduler(self.model, self.slots, PREFILL_CHUNK)

    def _fits(self, width: int, active: list[Turn]) -> bool:
        """Whether a turn this wide can start now: its choices fit in the free slots, or the
        worker is idle (a turn wider than all slots then runs alone, with more slots)."""
        if not active and self.slots.num_slots != max(self.max_batch, width):
            self._use_slots(max(self.max_batch, width))  # back to max_batch once it is done
        return _used(active) + width <= self.slots.num_slots

    # the loop ----------------------------------------------------------------------------------
    def serve(self, queue: Any, send: Send, max_batch: int) -> None:
        """Take jobs from LitServe's request queue until the sentinel; never returns otherwise."""
        parked: deque[Job] = deque()  # taken, not started: session busy or no room yet
        active: list[Turn] = []
        self.max_batch = max_batch
        if self.compile:
            self.start_compiling(max_batch)
        metrics.safely(lambda: metrics.decode_step("compiling" if self.compile_pending
                                                   else "eager"))
        outbox = Outbox(send, self.stream_interval)
        try:
            self._serve(JobFeed(queue), self._recorded(outbox), parked, active)
        finally:
            outbox.close()

    def _serve(self, queue: Any, send: Send, parked: deque[Job], active: list[Turn]) -> None:
        if self.slots.num_slots != self.max_batch:
            self._use_slots(self.max_batch)
        polled = 0.0  # when cancel flags were last read
        while True:
            self._take_compiled()
            tried: set[str] = set()  # sessions found busy in this pass
            waiting_room = False  # a parked job waits for slots: it goes before new ones
            for item in list(parked):  # oldest first, so one session's turns keep their order
                sid = item[3]["session_id"]
                if not self._fits(job_width(item[3]), active):
                    waiting_room = True
                    break
                if sid in tried:
                    continue
                if self._admit(item, active, send):
                    parked.remove(item)
                else:
                    tried.add(sid)
            while not waiting_room and len(parked) < MAX_PARKED and (
                    not active or _used(active) < self.slots.num_slots):
                try:
                    if active:
                        item = queue.get_nowait()
                    else:
                        item = queue.get(timeout=PARK_POLL_S if parked else 1.0)
                except Empty:
                    break
                if item == SENTINEL:
                    return
                busy = item[3]["session_id"] is not None and any(
                    p[3]["session_id"] == item[3]["session_id"] for p in parked)
                if busy or not self._fits(job_width(item[3]), active):
                    parked.append(item)
                    waiting_room = not busy
                elif not self._admit(item, active, send):
                    parked.append(item)
            if not active:
                if len(parked) >= MAX_PARKED:  # nothing to do until a parked session frees
                    time.sleep(PARK_POLL_S)
                continue
            # leases of a shared store (Redis) outlive long turns; a store that fails here
            # fails the turns' saves later, not the loop
            self._advisory(self.locks.renew, [])
            if time.monotonic() - polled >= CANCEL_POLL_S:
                polled = time.monotonic()
                flagged = self._advisory(
                    lambda: self.store.cancelled_many([t.uid for t in active]), set())
                for turn in [t for t in active if t.uid in flagged]:
                    self._drop_cancelled(turn, send)
            active[:] = [t for t in active if not t.failed]
            self.step(active, send)
            active[:] = [t for t in active if not t.failed]
            for turn in [t for t in active if t.finished]:
                active.remove(turn)
                self.finish(turn, send)

    def _recorded(self, send: Send) -> Send:
        """``send``, also keeping the events of turns with an Idempotency-Key (`recording`)."""
        def record(rqid: int, uid: str, data: Any) -> None:
            if data is not None and uid in self.recording:
                self.recording[uid].append(data)
            send(rqid, uid, data)
        return record

    def _admit(self, item: Job, active: list[Turn], send: Send) -> bool:
        """Open a job and add it to ``active``; False when its session is busy (park it).

        True also when the job ended here: refused (its error sent) or cancelled."""
        rqid, uid, _, job = item
        turn = None
        try:
            if self.store.cancelled(uid):
                self.store.clear_cancel(uid)
                log.info("request %s cancelled by its client before it started", uid)
                send(rqid, uid, None)
                return True
            turn = self.open(rqid, uid, job)
            if turn is None:
                return False
            active.append(turn)
        except replies.Replay as r:  # a retry of a turn that ran: its first answer again
            log.info("request %s repeats an Idempotency-Key of session %r: answered from the "
                     "record, nothing run", uid, job["session_id"])
            for event in replies.answer(r.entry, r.session):
                send(rqid, uid, event)
            send(rqid, uid, None)
        except Exception as e:  # noqa: BLE001 - reported to the client
            if turn is not None:
                self._release(turn)
            self._fail(rqid, uid, self._api_error(e, "opening a request failed"), send)
        return True

    def _drop_cancelled(self, turn: Turn, send: Send) -> None:
        turn.failed = True
        reason = self._advisory(lambda: self.store.cancel_reason(turn.uid), "")
        self._release(turn)
        self._advisory(lambda: self.store.clear_cancel(turn.uid), None)
        if reason == "deleted":  # DELETE of the session: the client is still there, tell it
            log.info("request %s cancelled: session %r is being deleted", turn.uid,
                     turn.session_id)
            self._fail(turn.rqid, turn.uid, ApiError(
                409, f"session {turn.session_id!r} was deleted during this turn; nothing of "
                "the turn was kept", code="session_deleted", param="metadata.session_id"), send)
            return
        log.info("request %s cancelled by its client: turn dropped, session %r unchanged",
                 turn.uid, turn.session_id)
        send(turn.rqid, turn.uid, None)

    @staticmethod
    def _api_error(e: Exception, what: str) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, StoreFull):
            return ApiError(503, str(e), code="too_many_sessions")
        if isinstance(e, StoreWriteError):  # disk full, read-only: this request only
            log.warning("%s", e)
            return ApiError(e.status, str(e), code=e.code)
        log.exception(what)
        return ApiError(500, f"{what}: {e}", code="internal_error")

    # open --------------------------------------------------------------------------------------
    def open(self, rqid: int, uid: str, job: dict[str, Any]) -> Turn | None:
        """Lock, load, diff, tokenize and prefill a job; None when its session is busy."""
        sid = job["session_id"]
        if sid is not None and not self.locks.try_acquire(sid):
            return None
        try:
            if sid is not None:
                self.store.mark_running(sid, uid)  # a DELETE of the session cancels this turn
            return self._open(rqid, uid, job, sid)
        except BaseException:
            self.recording.pop(uid, None)
            if sid is not None:
                self._advisory(lambda: self.store.clear_running(sid, uid), None)
                self.locks.release(sid)
            raise

    def _open(self, rqid: int, uid: str, job: dict[str, Any], sid: str | None) -> Turn:
        state, transcript, created = None, Transcript(), sid is not None
        kept: dict[str, Any] = {}
        key = job.get("idempotency_key") if sid is not None else None
        if sid is not None:
            try:  # one store read tells whether it exists and what its file holds
                meta = self.store.metadata(sid)
            except (ValueError, OSError):  # there, but its header is unreadable: _load says so
                meta = {}
            created = meta is None
            if not job["reset"] and meta is not None:
                state, transcript, kept = self._load(sid, meta)
        carried: dict[str, str] = {}
        if job.get("load_from") is not None and state is None:  # a stored response's state
            state, transcript = self._load_response(job["load_from"])
        if job.get("conversation") and meta:  # items added since its last response come first
            carried = {k: v for k, v in meta.items() if k.startswith("conversation.")}
            job = {**job, "messages": stateful.pending_messages(carried) + job["messages"]}
        if key is not None:
            try:
                replies.lookup(kept, key, job)
            except replies.Replay as r:  # answered before: say so with the session as it is
                assert sid is not None and state is not None
                r.session = {"id": sid, "tokens_seen": state.position,
                             "turns": transcript.turns, "created": False, "reset": False,
                             "bytes": self.store.size(sid)}
                raise
            self.recording[uid] = []
        mode = job["input_mode"]
        try:
            if job["op"] == "chat":
                prompts, new_units = self.prompter.chat(job, transcript, sid, mode)
            else:
                prompts, new_units = self.prompter.text(job, transcript, sid, mode), []
        except (Diverged, KindMismatch) as e:
            raise ApiError(409, str(e), code="session_conflict",
                           param="messages" if job["op"] == "chat" else "prompt") from None
        total = sum(len(ids) for _, ids in prompts)
        if total > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {total} new tokens; this server reads at most "
                           f"{self.max_prompt_tokens} per request (--max-prompt-tokens)",
                           code="prompt_too_long",
                           param="messages" if job["op"] == "chat" else "prompt")
        if sid is not None and created:
            self.store.check_room(sid, self.locks)  # StoreFull -> 503 before generating
        p = job["params"]
        stop = list(dict.fromkeys(p["stop"] + ([CHAT_STOP] if job["op"] == "chat" else [])))
        try:
            params = [SamplingParams(
                max_new_tokens=p["max_new_tokens"], temperature=p["temperature"],
                top_k=p["top_k"], top_p=p["top_p"],
                seed=None if p["seed"] is None else p["seed"] + j, stop=tuple(stop[:16]),
                top_logprobs=job["top_logprobs"]) for j in range(job["n"])]
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        start = state if state is not None else self.model.init_state(1)
        prefix: list[int] = []
        if self._cacheable(job, sid, prompts):
            hit = self.prefix_cache.longest(prompts[0][1])
            if hit is not None:  # read only what follows the longest prefix already read
                k, start = hit
                prefix, rest = prompts[0][1][:k], prompts[0][1][k:]
                prompts = [(prompts[0][0], rest)]
                metrics.safely(lambda: metrics.PREFIX_TOKENS.labels("cached").inc(k))
            read = len(prompts[0][1])
            metrics.safely(lambda: metrics.PREFIX_TOKENS.labels("read").inc(read))
        turn = Turn(rqid, uid, job, sid, transcript, created, prompts, new_units,
                    loaded=state is not None, start=start, params=params, replies=kept,
                    prefix=prefix, carried=carried)
        for pi, (_, ids) in enumerate(prompts):  # read by the scheduler, a chunk per step
            self.scheduler.read((uid, pi), ids, start)
            self.reading[(uid, pi)] = turn
            turn.reading += 1
        return turn

    def _prompt_read(self, prompt: Prompt, send: Send) -> None:
        """A prompt of a turn has been read: its choices start, each in a slot of its own."""
        turn = self.reading.pop(prompt.key)  # type: ignore[arg-type]
        pi = int(prompt.key[1])  # type: ignore[index]
        turn.reading -= 1
        if turn.failed:
            return
        try:
            if prompt.error is not None:
                raise prompt.error
            assert prompt.logits is not None
            if not healthy(prompt.logits):
                raise self._broken(turn)
            ids = turn.prompts[pi][1]
            if self._cacheable(turn.job, turn.session_id, turn.prompts):
                self.prefix_cache.put(turn.prefix + ids, prompt.state)
            for j, params in enumerate(turn.params):
                run = GenerationRun(self.model, ids, turn.start, params, self.tokenizer.decode,
                                    self.vocab)
                task = Task(pi * len(turn.params) + j, run, prompt.logits, prompt.state)
                if params.max_new_tokens == 0:
                    run.finish_empty(prompt.state)
                else:
                    task.slot = self.slots.add(prompt.state)
                turn.tasks.append(task)
            if not turn.reading:  # all its prompts read: the response starts
                self._start(turn, send)
        except Exception as e:  # noqa: BLE001 - this turn alone fails
            self._abort(turn, self._api_error(e, "reading the prompt failed"), send)

    @staticmethod
    def _broken(turn: Turn) -> ApiError:
        """The error for logits that are not finite (see `healthy`)."""
        if turn.loaded:
            return ApiError(422, f"the memory of session {turn.session_id!r} produces "
                            "non-finite values (a damaged or forged memory file); reset it with "
                            "metadata.reset_session='true' or DELETE the session",
                            code="non_finite_memory", param="metadata.session_id")
        return ApiError(500, "the model produced non-finite logits; check the checkpoint",
                        code="non_finite_logits")

    def _load_response(self, rid: str) -> tuple[ModelState, Transcript]:
        """The state and transcript of stored response ``rid`` (never changed once stored, so
        read without its lock)."""
        meta = self.store.metadata(rid)
        if meta is None or "response.record" not in meta:
            raise ApiError(404, f"no stored response {rid!r} (deleted or expired)",
                           code="response_not_found", param="previous_response_id")
        state, transcript, _ = self._load(rid, meta)
        return state, transcript

    def _load(self, sid: str, meta: dict[str, str]
              ) -> tuple[ModelState, Transcript, dict[str, Any]]:
        """The session's state (cached while its file's metadata is unchanged), transcript
        and kept answers; ``meta``: its file's metadata, read under its lock ({}: unreadable)."""
        try:
            if not meta:
                meta = self.store.metadata(sid) or {}  # raises what made it unreadable
            transcript = Transcript.from_metadata(meta)
            kept = replies.load(meta)
            cached = self.cache.get(sid)
            if cached is not None and cached[0] == meta:  # payload hash, position, everything
                self.cache.move_to_end(sid)
                return cached[1], transcript, kept
            data = self.store.read(sid)
            if data is None:
                raise ValueError("it was deleted while this turn started")
            state = load_memory(data, self.model, tokenizer_hash=self.tokenizer.sha256)
            if state.batch_size != 1:
                raise ValueError(f"its memory holds {state.batch_size} sequences, not 1")
        except (MemoryFileError, ValueError, OSError) as e:
            raise ApiError(409, f"session {sid!r} cannot be continued by this server: {e}; "
                           "DELETE it or pass metadata.reset_session='true'",
                           code="session_unusable", param="metadata.session_id") from None
        return state, transcript, kept

    # events ------------------------------------------------------------------------------------
    def _start(self, turn: Turn, send: Send) -> None:
        read = sum(len(ids) for _, ids in turn.prompts)
        send(turn.rqid, turn.uid, {"t": "start", "prompt_tokens": len(turn.prefix) + read})
        job = turn.job
        if job["op"] != "completion" or not job["echo"]:
            return
        for pi, (text, ids) in enumerate(turn.prompts):
            tokens = None
            if job["logprobs"] is not None:
                scores = score(self.model, ids, turn.start, top_logprobs=job["logprobs"])
                tokens = [self.prompter.token(s.id, s.logprob, s.top_logprobs) for s in scores]
            for j in range(job["n"]):
                send(turn.rqid, turn.uid, {"t": "echo", "c": pi * job["n"] + j, "text": text,
                                           "tokens": tokens})

    @torch.no_grad()
    def step(self, turns: list[Turn], send: Send) -> None:
        """One scheduler step: a chunk of the waiting prompts, then one token for every live
        choice of every turn, all in one forward over the slots.

        A turn that fails here is marked ``failed``, its lock and slots released and its error
        sent; the others go on (see the module docstring)."""
        live: list[tuple[Turn, Task, int]] = []
        for turn in turns:
            if turn.failed or turn.reading:  # its choices start when all its prompts are read
                continue
            try:
                picked = []
                for task in turn.tasks:
                    if not task.finished:
                        if not task.healthy:
                            raise self._broken(turn)
                        picked.append((task, task.run.take(task.logits)))
            except Exception as e:  # noqa: BLE001 - this turn alone fails
                self._abort(turn, self._api_error(e, "sampling failed"), send)
                continue
            for task, tok in picked:
                event: dict[str, Any] = {"t": "tok", "c": task.choice, "text": tok.text}
                if turn.wants_tokens:
                    event.update(self.prompter.token(tok.id, tok.logprob, tok.top_logprobs))
                send(turn.rqid, turn.uid, event)
                live.append((turn, task, tok.id))
        for prompt in self.scheduler.prefill():
            self._prompt_read(prompt, send)
        if not live:
            return
        metrics.BATCH.observe(len(live))
        for (turn, task, _), (logits, ok) in zip(live, self._decode(live, send), strict=True):
            if logits is None or turn.failed:
                continue
            if task.run.done:
                assert task.slot is not None
                task.run.state, task.slot = self.slots.remove(task.slot), None
                send(turn.rqid, turn.uid, {"t": "end", "c": task.choice,
                                           "finish_reason": task.run.finish_reason})
            else:
                task.logits, task.healthy = logits, ok

    def _decode(self, live: list[tuple[Turn, Task, int]],
                send: Send) -> list[tuple[Tensor | None, bool]]:
        """One `Slots.step` over the batch: (logits (V,), healthy) per row. If the step fails
        (the slots are then as they were), row by row, failing only the bad rows' turns (None
        for those)."""
        def run(rows: list[tuple[Turn, Task, int]]) -> list[tuple[Tensor | None, bool]]:
            handles = [task.slot for _, task, _ in rows]
            logits = self.slots.step(handles, [i for _, _, i in rows])  # (B, V)
            assert self.slots.peaks is not None  # max |logit| per row, from the same forward
            ok = [peak <= MAX_LOGIT for peak in self.slots.peaks.tolist()]  # NaN: False
            return list(zip(logits, ok, strict=True))

        try:
            return run(live)
        except Exception:  # noqa: BLE001 - find the row that caused it
            if len(live) > 1:
                log.exception("batched decoding failed; retrying each row alone")
        outs: list[tuple[Tensor | None, bool]] = []
        for row in live:
            turn = row[0]
            try:
                outs.append((None, False) if turn.failed else run([row])[0])
            except Exception as e:  # noqa: BLE001 - this turn alone fails
                self._abort(turn, self._api_error(e, "decoding failed"), send)
                outs.append((None, False))
        return outs

    def _abort(self, turn: Turn, error: ApiError, send: Send) -> None:
        turn.failed = True
        self._release(turn)
        self._fail(turn.rqid, turn.uid, error, send)

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
        if self._advisory(lambda: self.store.cancelled(turn.uid), False):  # client gone
            self._drop_cancelled(turn, send)
            return
        prompt_tokens = sum(len(ids) for _, ids in turn.prompts) + len(turn.prefix)
        completion = sum(len(t.run.tokens) for t in turn.tasks)
        counts = usage(prompt_tokens, completion, len(turn.prefix))
        if len(turn.tasks) == 1 and self._cacheable(turn.job, turn.session_id, turn.prompts):
            run = turn.tasks[0].run  # its state has read the prompt and every generated token
            self.prefix_cache.put(turn.prefix + turn.prompts[0][1] +
                                  [t.id for t in run.tokens], run.state)
        try:
            session = self._save(turn, counts) if turn.session_id is not None else None
        except Exception as e:  # noqa: BLE001 - reported; the session file is unchanged
            error: ApiError | None = self._api_error(
                e, f"saving session {turn.session_id!r} failed")
        else:
            error = None
        finally:
            self._release(turn)
        if error is not None:
            self._fail(turn.rqid, turn.uid, error, send)
            return
        send(turn.rqid, turn.uid, {"t": "done", "usage": counts, "session": session})
        send(turn.rqid, turn.uid, None)

    def saved_state(self, task: Task) -> ModelState:
        """The state a session keeps after ``task``: the prompt and the reply as returned
        (rebuilt when a stop string cut the reply; see the module docstring)."""
        run, reply = task.run, task.text
        assert run.state is not None, "the task has not finished"
        if run.finish_reason != "stop":
            return run.state
        ids = [t.id for t in run.tokens if t.id not in run.stop_ids]
        if self.tokenizer.decode(ids) == reply:
            return run.state  # a stop token ended it, nothing was cut
        ids = tokens_as_returned(ids, reply, self.tokenizer)
        return prefill(self.model, ids, task.prompt_state)[1] if ids else task.prompt_state

    def _save(self, turn: Turn, counts: dict[str, Any]) -> dict[str, Any]:
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
        state = self.saved_state(task)
        meta = transcript.to_metadata()
        key = turn.job.get("idempotency_key")
        if key is not None:  # saved with the turn: a retry finds it (server.replies)
            events = [*self.recording.get(turn.uid, []), {"t": "done", "usage": counts}]
            meta.update(replies.remember(turn.replies, key, turn.job, events))
        elif turn.replies:
            meta.update(replies.remember_all(turn.replies))
        snapshot: dict[str, str] | None = None
        if turn.job.get("response") is not None:  # the Responses API (server.stateful)
            own, snap = stateful.finish_metadata(turn.job, task.text, counts,
                                                 task.run.finish_reason, turn.carried)
            meta.update(own)
            if turn.job.get("snapshot_id"):
                snapshot = {**transcript.to_metadata(), **snap}
        data = save_memory(state, self.model, tokenizer_hash=self.tokenizer.sha256,
                           metadata=meta)
        self.store.write(sid, data, self.locks)
        if snapshot is not None:  # a response in a conversation is also stored on its own
            self._save_snapshot(turn.job["snapshot_id"], state, snapshot)
        self.cache[sid] = (header_metadata(data), state)
        self.cache.move_to_end(sid)
        while len(self.cache) > CACHE_STATES or (
                len(self.cache) > 1 and sum(s.nbytes() for _, s in self.cache.values())
                > CACHE_BYTES):
            self.cache.popitem(last=False)
        return {"id": sid, "tokens_seen": state.position, "turns": transcript.turns,
                "created": turn.created, "reset": bool(turn.job["reset"]), "bytes": len(data)}

    def _save_snapshot(self, rid: str, state: ModelState, meta: dict[str, str]) -> None:
        """Store ``state`` as the new response ``rid`` (a fresh id: its lock is free)."""
        data = save_memory(state, self.model, tokenizer_hash=self.tokenizer.sha256,
                           metadata=meta)
        if not self.locks.try_acquire(rid):
            raise ApiError(409, f"response id {rid!r} is in use", code="session_busy")
        try:
            self.store.write(rid, data, self.locks)
        finally:
            self.locks.release(rid)

    def _release(self, turn: Turn) -> None:
        """Give back what the turn holds: its session's lock, its slots, its unread prompts."""
        self.recording.pop(turn.uid, None)
        for task in turn.tasks:
            if task.slot is not None:
                self.slots.discard(task.slot)
                task.slot = None
        for pi in range(len(turn.prompts)):
            if self.reading.pop((turn.uid, pi), None) is not None:
                self.scheduler.cancel((turn.uid, pi))
                turn.reading -= 1
        if turn.session_id is not None and self.locks.holds(turn.session_id):
            sid = turn.session_id
            self._advisory(lambda: self.store.clear_running(sid, turn.uid), None)
            self.locks.release(sid)

    def _cacheable(self, job: dict[str, Any], sid: str | None,
                   prompts: list[tuple[str, list[int]]]) -> bool:
        """Whether a job reads and keeps prefix-cache snapshots: no session, one prompt, and
        no echo (echo scores every prompt token, so it reads them all)."""
        return (bool(self.prefix_cache) and sid is None and len(prompts) == 1
                and not (job["op"] == "completion" and job["echo"]))

    @staticmethod
    def _advisory(call: Callable[[], T], default: T) -> T:
        """``call()``, or ``default`` when the store fails (Redis down): for what only helps
        (cancel flags, running markers, lease renewal), so the loop never dies of it; what a
        turn needs (its lock, load and save) fails that turn with the store's error."""
        try:
            return call()
        except StoreWriteError as e:
            log.warning("session store: %s", e)
            return default

    @staticmethod
    def _fail(rqid: int, uid: str, error: ApiError, send: Send) -> None:
        send(rqid, uid, {"t": "error", "status": error.status, **error.body()})
        send(rqid, uid, None)


class JobFeed:
    """LitServe's request queue as the loop reads it: a thread of its own takes the jobs.

    LitServe's request queue is a `multiprocessing.Manager` queue, so each ``get_nowait`` is a
    round trip to the manager process. The loop looks for new jobs between steps whenever its
    slots have room, i.e. after every token of a lone streaming turn; doing that on the queue
    itself cost a one-client server with 32 slots a fifth of its tokens/s on a 2-core CPU
    against one with a single slot (which never looks while busy). Here the thread blocks on
    the queue (no round trips while nothing comes) and hands what it takes to a local queue
    the loop reads for free.

    The thread takes a job only after the loop has asked for one and found none (``get`` or
    ``get_nowait``), one at a time, so a worker whose slots are full holds at most one job
    it cannot start yet (that job waits, parked, for room, as a busy session's jobs do) and
    the other jobs stay on the shared queue for the other workers. The sentinel passes through
    and ends the thread; an error reading the queue (the manager gone at shutdown) is raised
    to the loop on its next read.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._ready: Queue[Any] = Queue()
        self._wanted = threading.Event()  # the loop found nothing: take the next job
        self._thread = threading.Thread(target=self._run, name="newllm-jobs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            try:
                item = self._source.get()
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
                self._ready.put(_Failed(e))
                return
            self._wanted.clear()
            self._ready.put(item)
            if item == SENTINEL:
                return

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            item = self._ready.get_nowait()
        except Empty:
            if not self._wanted.is_set():  # (asked after every step of a busy loop)
                self._wanted.set()
            if not block:
                raise
            item = self._ready.get(True, timeout)
        if isinstance(item, _Failed):
            raise item.error
        return item

    def get_nowait(self) -> Any:
        return self.get(block=False)


class _Failed:
    """What `JobFeed`'s thread met instead of a job."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Outbox:
    """A worker's events on their way to the HTTP side, sent from a thread of their own.

    LitServe's transport is a `multiprocessing.Manager` queue: every message is a round trip
    to the manager process (~0.1-0.3 ms here), which the decode loop would otherwise wait for
    once per token. Here the loop only appends to a list; the sender thread sends what has
    gathered, per request in order, with consecutive tokens of one request merged into one
    ``toks`` message (``{"t": "toks", "events": [tok, ...]}``; `server.responses` unpacks
    it). So the more tokens come while a message is under way, the fewer messages there are,
    without ever holding a token back. A request's first token always travels alone as a
    ``tok`` (the HTTP side measures time to first token on it).

    With an ``interval`` (seconds), the thread waits that long after each round of sends
    before the next, unless a request's first token or its end (the final ``None``) comes
    meanwhile, which go at once: so the interval delays only tokens in the middle of a reply,
    never its start or its completion. At several hundred tokens a second each message costs
    the decode loop time (the thread's round trip to the manager takes the GIL from the loop
    a few times), so fewer messages mean more tokens/s: one streaming client on a 2-core CPU
    measured 8-13% more with 5 ms than with one message per token, and 7-11% more again
    with 25 ms (the default) than with 5 ms.
    """

    def __init__(self, send: Send, interval: float = 0.0) -> None:
        self._send = send
        self._interval = interval
        self._pending: list[tuple[int, str, Any]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._streaming: set[str] = set()  # requests whose first token has been sent
        self._gathering = False  # the thread waits out the interval (no wake per token)
        self._thread = threading.Thread(target=self._run, name="newllm-outbox", daemon=True)
        self._thread.start()

    def __call__(self, rqid: int, uid: str, data: Any) -> None:
        with self._wake:
            self._pending.append((rqid, uid, data))
            if not self._gathering or self._at_once(uid, data):  # else it waits anyway
                self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Send what is left, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        sent = -float("inf")  # when the last round of sends ended
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                self._gathering = True
                while not self._closed and not self._urgent():  # gather for the interval
                    left = sent + self._interval - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                self._gathering = False
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
            for rqid, uid, data in self._messages(batch):
                try:
                    self._send(rqid, uid, data)
                except (BrokenPipeError, EOFError, ConnectionError):  # shutting down
                    return
                except Exception:  # noqa: BLE001 - one lost message never stops the others
                    log.exception("sending an event of request %s failed", uid)
            sent = time.monotonic()

    def _urgent(self) -> bool:
        """Whether a pending event never waits (`_at_once`)."""
        return any(self._at_once(uid, data) for _, uid, data in self._pending)

    def _at_once(self, uid: str, data: Any) -> bool:
        """A request's first token or its end (its events close with ``None``)."""
        return data is None or (data.get("t") == "tok" and uid not in self._streaming)

    def _messages(self, batch: list[tuple[int, str, Any]]) -> list[tuple[int, str, Any]]:
        """The messages for a batch of events: per request in order, runs of tokens merged."""
        by_uid: dict[str, list[tuple[int, str, Any]]] = {}
        for item in batch:
            by_uid.setdefault(item[1], []).append(item)
        out: list[tuple[int, str, Any]] = []
        for uid, items in by_uid.items():
            run: list[dict[str, Any]] = []
            rqid = items[0][0]
            for rqid, _, data in items:
                if data is not None and data.get("t") == "tok" and uid in self._streaming:
                    run.append(data)
                    continue
                out.extend(_tokens(rqid, uid, run))
                run = []
                if data is None:
                    self._streaming.discard(uid)
                elif data.get("t") == "tok":
                    self._streaming.add(uid)
                out.append((rqid, uid, data))
            out.extend(_tokens(rqid, uid, run))
        return out


def _tokens(rqid: int, uid: str, run: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    """A run of token events as messages: none, the event itself, or one ``toks``."""
    if not run:
        return []
    if len(run) == 1:
        return [(rqid, uid, run[0])]
    return [(rqid, uid, {"t": "toks", "events": run})]


def _used(active: list[Turn]) -> int:
    """Slots the active turns hold or will hold (one per choice)."""
    return sum(t.width for t in active)


def worker_threads(threads: int, workers: int) -> int:
    """Torch threads per worker: ``threads``, or (0) the CPU cores shared among the workers.

    One thread is the default: decoding a small batch is a chain of small matrix products that
    extra threads barely speed up, and on a busy machine their synchronisation made decoding
    ~10x slower in our measurements (tiny-infini: 2.5 ms/token with 1 thread, 21-32 with 2).
    """
    return threads or max(1, (os.cpu_count() or 1) // max(1, workers))
