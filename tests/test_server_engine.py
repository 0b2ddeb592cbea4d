"""The inference worker (`server.engine.Engine`) in this process, without HTTP: one `Engine`
serves a `queue.Queue` in a thread, as a LitServe worker serves LitServe's queue, and the test
reads the events it sends. Covers per-turn failures in a batch, what a session's memory holds
after a stop string, cancellation, parked jobs, the state cache, token-id prompts on sessions
and refusing a new session before generating when the store is full. tiny-infini, CPU.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from newllm.checkpoint import load_checkpoint
from newllm.memory_file import load_memory, read_memory_metadata, save_memory
from newllm.slots import Slots
from server import engine as engine_module
from server.engine import SENTINEL, Engine
from server.protocol import ChatRequest, CompletionRequest, chat_job, completion_job
from server.protocol import parse as parse_request
from server.store import FolderStore
from server.transcript import Transcript, render_chat

MODEL = "tiny-infini"
WAIT_S = 60.0  # liveness bound: a request that needs longer than this is stuck


@pytest.fixture(scope="module")
def local() -> Any:
    model, tokenizer = load_checkpoint(MODEL)
    return model.eval(), tokenizer


class Worker:
    """An `Engine` serving a queue in a thread; `submit` jobs, then `start`, then `result`."""

    def __init__(self, local: Any, folder: Path, *, max_batch: int = 4,
                 max_sessions: int = 100, prefix_cache_bytes: int = 0,
                 compile: bool | None = None) -> None:
        model, tokenizer = local
        self.model, self.tokenizer = model, tokenizer
        self.store = FolderStore(folder, max_sessions)
        self.store.prepare()
        self.engine = Engine(model, tokenizer, self.store, max_prompt_tokens=4096,
                             prefix_cache_bytes=prefix_cache_bytes, compile=compile)
        self.queue: queue.Queue[Any] = queue.Queue()
        self.events: dict[str, list[Any]] = {}
        self.ended: dict[str, threading.Event] = {}
        self.thread = threading.Thread(target=self.engine.serve,
                                       args=(self.queue, self._send, max_batch), daemon=True)

    def _send(self, rqid: int, uid: str, data: Any) -> None:
        if data is not None and data["t"] == "toks":  # several tokens in one message
            assert data["events"] and all(e["t"] == "tok" for e in data["events"])
            self.events[uid].extend(data["events"])
            return
        self.events[uid].append(data)
        if data is None:
            self.ended[uid].set()

    def start(self) -> Worker:
        self.thread.start()
        return self

    def submit(self, job: dict[str, Any]) -> str:
        uid = uuid.uuid4().hex
        self.events[uid], self.ended[uid] = [], threading.Event()
        self.queue.put((0, uid, time.monotonic(), job))
        return uid

    def result(self, uid: str) -> list[dict[str, Any]]:
        assert self.ended[uid].wait(WAIT_S), "the worker never finished this request"
        return [e for e in self.events[uid] if e is not None]

    def run(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return self.result(self.submit(job))

    def close(self) -> None:
        self.queue.put(SENTINEL)
        self.thread.join(WAIT_S)


@pytest.fixture
def worker(local: Any, tmp_path: Path) -> Any:
    workers: list[Worker] = []

    def make(**kw: Any) -> Worker:
        workers.append(Worker(local, tmp_path / f"sessions-{len(workers)}", **kw))
        return workers[-1]

    yield make
    for w in workers:
        if w.thread.is_alive():
            w.close()


def chat(content: str, session: str | None = None, **kw: Any) -> dict[str, Any]:
    meta = kw.pop("metadata", {})
    if session is not None:
        meta = {"session_id": session, **meta}
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 8, **kw}
    if meta:
        body["metadata"] = meta
    return chat_job(parse_request(ChatRequest, body), 512)


def complete(prompt: str | list[int], session: str | None = None, **kw: Any) -> dict[str, Any]:
    meta = kw.pop("metadata", {})
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 4, **kw}
    if session is not None:
        body["metadata"] = {"session_id": session, **meta}
    return completion_job(parse_request(CompletionRequest, body), 512, vocab_size=257)


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["t"] == "tok")


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["t"] for e in events]


def last(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["t"] == kind]
    assert found, f"no {kind!r} event in {kinds(events)}"
    return found[-1]


def put_state(w: Worker, sid: str, state: Any, transcript: Transcript | None = None) -> bytes:
    """Install a session file holding ``state`` (as an upload would)."""
    data = save_memory(state, w.model, tokenizer_hash=w.tokenizer.sha256,
                       metadata=(transcript or Transcript()).to_metadata())
    locks = w.store.locks()
    assert locks.try_acquire(sid)
    try:
        w.store.write(sid, data, locks)
    finally:
        locks.release(sid)
    return data


@torch.no_grad()
def read(model: Any, ids: list[int]) -> Any:
    return model(torch.tensor([ids]))[1]


# one bad session never fails the others -----------------------------------------------------
def test_non_finite_memory_fails_its_turn_alone(worker: Any, local: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory whose logits are NaN (a forged file the loader let through) gets 422 before
    generating; the turn already decoding in the same batch finishes and is saved."""
    model, tokenizer = local
    w = worker()
    base = read(model, tokenizer.encode("a forged memory"))
    bad_file = put_state(w, "bad", base)
    real_load = engine_module.load_memory

    def load(source: Any, *args: Any, **kw: Any) -> Any:
        state = real_load(source, *args, **kw)
        if source == bad_file:  # the engine loads a session's bytes
            first = state.layers[0]
            poisoned = dataclasses.replace(first, memory=torch.full_like(first.memory, 1e30))
            state = dataclasses.replace(state, layers=(poisoned, *state.layers[1:]))
        return state

    monkeypatch.setattr(engine_module, "load_memory", load)
    good = w.submit(chat("c", "good", max_tokens=200))  # both are queued before start(),
    # so the bad one is opened while the good one decodes
    bad = w.submit(chat("hi", "bad", temperature=1.0, seed=1,
                        metadata={"session_input": "new"}))
    w.start()
    bad_events = w.result(bad)
    assert kinds(bad_events) == ["error"]
    assert bad_events[0]["status"] == 422
    assert bad_events[0]["error"]["code"] == "non_finite_memory"
    assert "reset" in bad_events[0]["error"]["message"]
    good_events = w.result(good)
    assert "error" not in kinds(good_events) and len(text(good_events)) > 20
    assert last(good_events, "done")["session"]["id"] == "good"
    assert w.store.read("bad") == bad_file  # unchanged


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_a_turn_failing_mid_decode_fails_alone(worker: Any, local: Any, failure: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits that turn non-finite (422), or a forward pass that raises for one row (500),
    in the middle of decoding fail that turn only; its session file is unchanged."""
    model, tokenizer = local
    w = worker()
    far = 300  # the bad session's memory is past this position, the good one never gets there
    bad_file = put_state(w, "far", read(model, tokenizer.encode("x" * far)))
    real_step = Slots.step
    calls = [0]

    def step(self: Slots, handles: list[int], tokens: Any) -> Any:
        calls[0] += 1
        far_rows = [row for row, h in enumerate(handles) if self.position_of(h) > far]
        if failure == "raise" and calls[0] > 3 and far_rows:
            raise RuntimeError("this state broke the forward pass")
        logits = real_step(self, handles, tokens)
        if failure == "nan" and calls[0] > 3:
            for row in far_rows:  # as a forward pass that produced NaN there would give
                logits[row] = self.peaks[row] = float("nan")
        return logits

    monkeypatch.setattr(Slots, "step", step)
    good = w.submit(chat("c", "near", max_tokens=40))
    bad = w.submit(chat("go on", "far", max_tokens=40, metadata={"session_input": "new"}))
    w.start()
    bad_events = w.result(bad)
    assert kinds(bad_events)[0] == "start" and "tok" in kinds(bad_events)  # failed mid-way
    error = last(bad_events, "error")
    assert (error["status"], error["error"]["code"]) == (
        (422, "non_finite_memory") if failure == "nan" else (500, "internal_error"))
    assert "done" not in kinds(bad_events)
    good_events = w.result(good)
    assert "error" not in kinds(good_events)
    assert len([e for e in good_events if e["t"] == "tok"]) > 10  # it outlived the bad turn
    assert last(good_events, "done")["session"]["id"] == "near"
    assert w.store.read("far") == bad_file
    assert w.store.locks().try_acquire("far")  # released


# what the memory holds ----------------------------------------------------------------------
def test_memory_after_a_stop_string_equals_the_rendered_conversation(worker: Any,
                                                                     local: Any) -> None:
    model, tokenizer = local
    w = worker().start()
    for prompt in ("hello", "Tell me", "story", "yes", "why", "the", "a", "b", "c", "go"):
        # what greedy decoding says unstopped; a stop string cuts it in its readable start
        free = text(w.run(chat(prompt, max_tokens=24)))
        readable = free.split("\ufffd")[0]  # the random model's bytes are not all UTF-8
        cut = next((i for i in range(len(readable) - 1, 0, -1)
                    if readable[i] not in readable[:i]), None)
        if cut is not None:
            break
    else:
        pytest.fail("no candidate prompt starts its reply with two readable characters")
    reply, stop = readable[:cut], readable[cut]
    events = w.run(chat(prompt, "stopped", max_tokens=24, stop=[stop]))
    assert text(events) == reply and last(events, "end")["finish_reason"] == "stop"
    conversation = render_chat([("user", prompt)], open_reply=False) + reply
    expected = read(model, tokenizer.encode(conversation))
    saved = load_memory(w.store.path("stopped"), model)
    assert saved.position == expected.position
    assert last(events, "done")["session"]["tokens_seen"] == expected.position
    got, want = saved.flat_tensors(), expected.flat_tensors()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    # the next turn goes on from there: "\nUser: more\nAssistant:" is read once, after it
    done = last(w.run(chat("more", "stopped", max_tokens=3,
                           metadata={"session_input": "new"})), "done")
    new = render_chat([("user", "more")], open_reply=True)
    assert done["usage"]["prompt_tokens"] == len(tokenizer.encode(new))
    assert done["session"]["tokens_seen"] == expected.position + done["usage"]["total_tokens"]


# cancellation --------------------------------------------------------------------------------
def test_a_cancelled_turn_is_dropped_unsaved(worker: Any) -> None:
    w = worker().start()
    assert last(w.run(chat("start", "c")), "done")["session"]["turns"] == 1
    before = w.store.read("c")
    uid = w.submit(chat("c", "c", max_tokens=400, metadata={"session_input": "new"}))
    deadline = time.monotonic() + WAIT_S
    while sum(e is not None and e["t"] == "tok" for e in list(w.events[uid])) < 3:
        assert time.monotonic() < deadline, "no tokens came"
        time.sleep(0.005)
    w.store.cancel(uid)
    events = w.result(uid)
    assert "done" not in kinds(events) and "error" not in kinds(events)
    assert len([e for e in events if e["t"] == "tok"]) < 400
    assert w.store.read("c") == before
    assert not w.store.cancelled(uid)  # the worker consumed the flag
    assert w.store.locks().try_acquire("c")
    # a job cancelled before a worker took it never starts
    w2 = worker()
    uid = w2.submit(chat("never", "d"))
    w2.store.cancel(uid)
    w2.start()
    assert w2.result(uid) == [] and not w2.store.exists("d")


# scheduling ----------------------------------------------------------------------------------
def test_a_busy_session_does_not_stall_a_batch_of_one(worker: Any) -> None:
    """max_batch 1: a job whose session another worker holds is parked; other jobs run."""
    w = worker(max_batch=1)
    put_state(w, "held", w.model.init_state(1))
    elsewhere = w.store.locks()
    assert elsewhere.try_acquire("held")
    waiting = w.submit(chat("me first", "held", metadata={"session_input": "new"}))
    other = w.submit(chat("and me", "free"))
    w.start()
    assert last(w.result(other), "done")["session"]["id"] == "free"
    assert not w.ended[waiting].is_set()
    elsewhere.release("held")
    assert last(w.result(waiting), "done")["session"]["id"] == "held"


def test_a_full_store_refuses_a_new_session_before_generating(worker: Any) -> None:
    w = worker(max_sessions=1)
    put_state(w, "only", w.model.init_state(1))
    elsewhere = w.store.locks()
    assert elsewhere.try_acquire("only")  # busy: it cannot be evicted
    w.start()
    events = w.run(chat("hello", "newcomer"))
    assert kinds(events) == ["error"] and events[0]["status"] == 503
    assert events[0]["error"]["code"] == "too_many_sessions"
    assert not w.store.exists("newcomer")
    elsewhere.release("only")
    assert last(w.run(chat("hello", "newcomer")), "done")["session"]["created"]
    assert w.store.ids() == ["newcomer"]  # the idle one was evicted to make room


def test_the_state_cache_follows_the_file_not_only_its_payload(worker: Any) -> None:
    """The same tensors under another position are another state: not served from cache."""
    w = worker().start()
    first = last(w.run(complete("Once", "k")), "done")["session"]["tokens_seen"]
    path = w.store.path("k")
    state = load_memory(path, w.model)
    transcript = Transcript.from_metadata(read_memory_metadata(path))
    moved = dataclasses.replace(state, position=first + 32)  # same shapes, same payload
    put_state(w, "k", moved, transcript)
    done = last(w.run(complete(" more", "k", metadata={"session_input": "new"})), "done")
    assert done["session"]["tokens_seen"] == first + 32 + done["usage"]["total_tokens"]


# token-id prompts on sessions ----------------------------------------------------------------
def test_token_prompts_on_sessions_are_matched_like_text(worker: Any, local: Any) -> None:
    _, tokenizer = local
    w = worker().start()
    reply = text(w.run(complete("Once", "tk")))
    resent = tokenizer.encode("Once" + reply + " more")
    done = last(w.run(complete(resent, "tk")), "done")
    assert done["usage"]["prompt_tokens"] == len(tokenizer.encode(" more"))  # only the new part
    w.run(chat("hi", "chat-session"))
    events = w.run(complete(tokenizer.encode("x"), "chat-session"))
    assert kinds(events) == ["error"] and events[0]["status"] == 409
    assert events[0]["error"]["code"] == "session_conflict"
    assert "chat" in events[0]["error"]["message"]


# slots ------------------------------------------------------------------------------------
def test_turns_wider_than_the_free_slots_wait_their_turn(worker: Any) -> None:
    """Two slots: a turn of 2 prompts x 2 choices (4 slots, wider than all of them) runs when
    the worker is idle, a 2-choice turn waits until two slots are free; every reply is what it
    is alone, and the slots go back to two afterwards."""
    jobs = [complete(["Once", "Twice"], n=2, max_tokens=6), complete("Seven", n=2, max_tokens=9),
            complete("Eight", max_tokens=12), chat("hello", "s", max_tokens=10)]
    alone = [text(worker(max_batch=1).start().run(j)) for j in jobs]
    w = worker(max_batch=2)
    uids = [w.submit(j) for j in jobs]
    w.start()
    together = [w.result(u) for u in uids]
    assert [text(e) for e in together] == alone
    assert all(kinds(e)[-1] == "done" for e in together)
    assert {e["c"] for e in together[0] if e["t"] == "tok"} == {0, 1, 2, 3}
    w.close()
    assert w.engine.slots.num_slots == 2 and not len(w.engine.slots)


def test_a_long_prompt_is_read_in_chunks_while_others_decode(worker: Any,
                                                             monkeypatch: Any) -> None:
    """A 300-token prompt is read 32 tokens per step: a turn already decoding takes tokens in
    between (its reply is unchanged), and the long one's reply is what it is alone."""
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 32)
    long_prompt = "a fairly long prompt about rivers, " * 9  # 315 bytes: 10 chunks
    jobs = [complete("The river", max_tokens=30),  # 30 tokens, no EOS before
            complete(long_prompt, max_tokens=5)]
    alone = [text(worker(max_batch=1).start().run(j)) for j in jobs]
    w = worker(max_batch=2)
    first = w.submit(jobs[0])
    seen: dict[str, int] = {}

    def toks() -> int:
        return sum(1 for e in list(w.events[first]) if e and e["t"] == "tok")

    real = w.engine._prompt_read

    def prompt_read(prompt: Any, send: Any) -> None:
        if prompt.key[0] != first:
            seen["read"] = toks()  # the first turn's tokens when the long prompt is read
        real(prompt, send)

    monkeypatch.setattr(w.engine, "_prompt_read", prompt_read)
    w.start()
    while not toks():
        time.sleep(0.001)
    seen["submit"] = toks()
    second = w.submit(jobs[1])
    results = [w.result(first), w.result(second)]
    assert [text(e) for e in results] == alone
    assert w.engine.scheduler.prefill_chunk == 32
    assert len(text(results[0])) and last(results[0], "end")["finish_reason"] == "length"
    assert seen["read"] - seen["submit"] >= 8  # ~10 decode steps ran while it was read


# idempotent turns -----------------------------------------------------------------------------
def keyed(job: dict[str, Any], key: str) -> dict[str, Any]:
    return {**job, "idempotency_key": key}


def test_a_retried_turn_with_its_key_is_answered_not_applied_again(worker: Any) -> None:
    """Five copies of one first message with one Idempotency-Key (a client's retries, all at
    once): one turn is applied, every copy gets its answer; a later retry too; the key with
    another request is refused; a new key is a new turn."""
    w = worker()
    uids = [w.submit(keyed(chat("hello there", "idem", max_tokens=6), "k-1")) for _ in range(5)]
    w.start()
    results = [w.result(u) for u in uids]
    texts = {text(r) for r in results}
    assert len(texts) == 1 and texts.pop()
    sessions = [last(r, "done")["session"] for r in results]
    assert all(s["turns"] == 1 for s in sessions)
    assert sum(bool(s.get("replayed")) for s in sessions) == 4
    before = w.store.read("idem")
    later = w.run(keyed(chat("hello there", "idem", max_tokens=6), "k-1"))
    assert text(later) == text(results[0]) and last(later, "done")["session"]["replayed"]
    assert last(later, "done")["usage"] == last(results[0], "done")["usage"]
    assert w.store.read("idem") == before  # nothing applied
    reused = w.run(keyed(chat("something else", "idem", max_tokens=6,
                              metadata={"session_input": "new"}), "k-1"))
    assert kinds(reused) == ["error"] and reused[0]["status"] == 422
    assert reused[0]["error"]["code"] == "idempotency_key_reused"
    fresh = w.run(keyed(chat("again", "idem", max_tokens=6, metadata={"session_input": "new"}),
                        "k-2"))
    assert last(fresh, "done")["session"]["turns"] == 2
    # both keys are in the window and survive the next turn without a key
    w.run(chat("more", "idem", max_tokens=2, metadata={"session_input": "new"}))
    again = w.run(keyed(chat("hello there", "idem", max_tokens=6), "k-1"))
    assert text(again) == text(results[0]) and last(again, "done")["session"]["turns"] == 3


# the prefix-state cache ------------------------------------------------------------------------
def test_a_resent_history_reads_only_what_is_new_and_answers_as_without_the_cache(
        worker: Any) -> None:
    """A 20-turn chat from a client that sends the whole history and no session id: from turn
    2 the cache has the state after an earlier prefix (usage's cached_tokens), and every turn's
    reply equals the reply of a server without the cache."""
    cached, plain = worker(prefix_cache_bytes=64 << 20).start(), worker().start()
    history: list[dict[str, str]] = []
    resent = skipped = 0
    for turn in range(20):
        history.append({"role": "user", "content": f"Turn {turn}: tell me more about {turn}."})
        job = chat("", max_tokens=6)
        job["messages"] = [(m["role"], m["content"]) for m in history]
        got, want = cached.run(dict(job)), plain.run(dict(job))
        assert text(got) == text(want)
        use, ref = last(got, "done")["usage"], last(want, "done")["usage"]
        assert use["prompt_tokens"] == ref["prompt_tokens"]  # counted whole, as OpenAI does
        assert "prompt_tokens_details" not in ref
        hit = use.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        if turn:
            assert hit > 0
            resent, skipped = resent + use["prompt_tokens"], skipped + hit
        history.append({"role": "assistant", "content": text(got)})
    assert skipped / resent > 0.5
    assert len(cached.engine.prefix_cache) > 0 and len(plain.engine.prefix_cache) == 0


def test_prefix_cache_keeps_the_longest_prefix_within_its_bytes() -> None:
    from server.prefix_cache import PrefixCache

    class State:
        def __init__(self, name: str, size: int) -> None:
            self.name, self.size = name, size

        def nbytes(self) -> int:
            return self.size

    cache = PrefixCache(250)
    cache.put([1, 2], State("a", 100))
    cache.put([1, 2, 3, 4], State("b", 100))
    assert cache.longest([1, 2, 3, 4, 5])[0] == 4
    assert cache.longest([1, 2, 3, 4])[0] == 2  # at least one token is left to read
    assert cache.longest([1, 2, 9])[0] == 2 and cache.longest([2, 1, 3]) is None
    cache.put([7, 7, 7], State("c", 100))  # over 250 bytes: the least recently used goes
    assert cache.longest([1, 2, 3, 4, 5])[0] == 2 and cache.bytes == 200
    cache.put([8, 8], State("huge", 1000))  # larger than the whole cache: not kept
    assert len(cache) == 2
    assert not PrefixCache(0) and cache.longest([1]) is None


# the compiled decode step and the outbox -------------------------------------------------------
def test_a_compiled_engine_answers_what_an_eager_one_does(worker: Any,
                                                          monkeypatch: Any) -> None:
    """The engine compiles its step in the background while it serves eagerly, then takes
    the compiled step between two steps (busy slots included) and serves the same replies,
    token log-probs included, one turn alone and several batched, crossing segment
    boundaries."""
    monkeypatch.delenv("NEWLLM_COMPILE", raising=False)  # conftest turns it off elsewhere
    jobs = [complete("The river", max_tokens=40, logprobs=2), complete("Once", max_tokens=25),
            chat("hello", "s", max_tokens=30), complete(["a", "b"], n=2, max_tokens=20)]
    eager = worker(compile=False).start()
    assert not eager.engine.compile
    want = [eager.run(j) for j in jobs]

    compiled = worker(compile=True)
    assert compiled.engine.compile
    release, warm_up = threading.Event(), compiled.engine.warm_up

    def held_warm_up(num_slots: int) -> bool:  # the compile waits until the test says
        assert release.wait(WAIT_S)
        return warm_up(num_slots)

    monkeypatch.setattr(compiled.engine, "warm_up", held_warm_up)
    compiled.start()
    first = compiled.submit(jobs[0])
    while not compiled.events[first]:  # served while the compile has not even begun
        time.sleep(0.01)
    assert not compiled.engine.slots.compiled
    release.set()  # the compile runs while this turn (and the next) decode eagerly
    during = compiled.result(first)
    deadline = time.monotonic() + 5 * WAIT_S  # compiling on a busy machine takes a while
    while not compiled.engine.slots.compiled:
        assert time.monotonic() < deadline, "the engine never took the compiled step"
        compiled.run(complete("x", max_tokens=2))  # the loop switches between two steps
        time.sleep(0.2)
    alone = compiled.run(jobs[0])  # one row
    uids = [compiled.submit(j) for j in jobs]  # together: rows join and leave
    got = [during, alone] + [compiled.result(u) for u in uids]
    for g, w in zip(got, [want[0], want[0], *want], strict=True):
        assert text(g) == text(w) and kinds(g) == kinds(w)
        assert [e.get("token") for e in g] == [e.get("token") for e in w]
        lps = [[e["lp"] for e in evs if e["t"] == "tok" and "lp" in e] for evs in (g, w)]
        assert lps[0] == pytest.approx(lps[1], abs=1e-4)


def test_the_outbox_merges_tokens_and_keeps_each_requests_order() -> None:
    sent: list[tuple[str, Any]] = []
    box = engine_module.Outbox(lambda rqid, uid, data: sent.append((uid, data)))
    messages = box._messages([
        (0, "a", {"t": "start"}), (0, "a", {"t": "tok", "text": "1"}),
        (0, "b", {"t": "tok", "text": "x"}), (0, "a", {"t": "tok", "text": "2"}),
        (0, "b", {"t": "tok", "text": "y"}), (0, "a", {"t": "tok", "text": "3"}),
        (0, "b", {"t": "tok", "text": "z"}), (0, "a", {"t": "end"}),
        (0, "a", {"t": "tok", "text": "4"}), (0, "a", None)])
    a = [m[2] for m in messages if m[1] == "a"]
    assert a[:2] == [{"t": "start"}, {"t": "tok", "text": "1"}]  # the first token alone
    assert a[2] == {"t": "toks", "events": [{"t": "tok", "text": "2"}, {"t": "tok", "text": "3"}]}
    assert a[3:] == [{"t": "end"}, {"t": "tok", "text": "4"}, None]
    b = [m[2] for m in messages if m[1] == "b"]
    assert b == [{"t": "tok", "text": "x"},
                 {"t": "toks", "events": [{"t": "tok", "text": "y"}, {"t": "tok", "text": "z"}]}]
    assert "a" not in box._streaming  # finished: forgotten
    box(0, "c", {"t": "tok", "text": "q"})  # the thread sends what is put, then stops
    box.close()
    assert sent == [("c", {"t": "tok", "text": "q"})]


def test_the_outbox_interval_gathers_tokens_but_never_holds_a_first_token_or_an_end() -> None:
    sent: list[tuple[float, str, Any]] = []
    box = engine_module.Outbox(lambda rqid, uid, data: sent.append((time.monotonic(), uid, data)),
                               interval=1.0)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 5
        while len(sent) < n and time.monotonic() < deadline:
            time.sleep(0.005)

    t0 = time.monotonic()
    box(0, "a", {"t": "tok", "text": "1"})  # a reply's first token: at once
    wait_for(1)
    for k in range(2, 6):  # the next ones wait for the interval...
        box(0, "a", {"t": "tok", "text": str(k)})
    time.sleep(0.2)
    assert len(sent) == 1
    t1 = time.monotonic()
    box(0, "b", {"t": "tok", "text": "x"})  # ... unless another reply's first token comes
    wait_for(3)
    box(0, "a", {"t": "tok", "text": "6"})
    box(0, "a", {"t": "end"})
    t2 = time.monotonic()
    box(0, "a", None)  # ... or a reply's end: what it has gathered goes with it
    wait_for(6)
    t3 = time.monotonic()
    box(0, "b", {"t": "end"})
    box.close()  # sends what is left at once
    assert sent[0][0] - t0 < 0.8 and sent[2][0] - t1 < 0.8  # first tokens never waited
    assert sent[5][0] - t2 < 0.8 and t3 - t2 < 0.8  # nor did an end
    assert [m[1:] for m in sent] == [
        ("a", {"t": "tok", "text": "1"}),
        ("a", {"t": "toks", "events": [{"t": "tok", "text": str(k)} for k in range(2, 6)]}),
        ("b", {"t": "tok", "text": "x"}), ("a", {"t": "tok", "text": "6"}), ("a", {"t": "end"}),
        ("a", None), ("b", {"t": "end"})]


def test_the_job_feed_takes_one_job_at_a_time_and_only_when_asked() -> None:
    source: queue.Queue[Any] = queue.Queue()
    for k in range(3):
        source.put((0, f"u{k}", 0.0, {"k": k}))
    feed = engine_module.JobFeed(source)
    time.sleep(0.1)
    assert source.qsize() == 3  # nothing asked for: the jobs stay for the other workers
    with pytest.raises(queue.Empty):
        feed.get_nowait()  # none here yet; the thread now takes one

    def taken(n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while source.qsize() > 3 - n and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # ... and no more than that
        assert source.qsize() == 3 - n

    taken(1)
    assert feed.get_nowait()[1] == "u0"
    assert source.qsize() == 2  # taking the one it had asks for nothing more
    assert feed.get(timeout=WAIT_S)[1] == "u1"  # a waiting get asks and waits
    taken(2)
    source.put(SENTINEL)
    assert feed.get(timeout=WAIT_S)[1] == "u2"
    assert feed.get(timeout=WAIT_S) == SENTINEL  # passed through; the thread ends
    feed._thread.join(WAIT_S)
    assert not feed._thread.is_alive()


def test_the_job_feed_raises_what_reading_the_queue_raised() -> None:
    class Gone:
        def get(self) -> Any:
            raise EOFError("the manager is gone")

    feed = engine_module.JobFeed(Gone())
    with pytest.raises(EOFError, match="manager is gone"):
        feed.get(timeout=WAIT_S)
