"""Server parts without a server: transcripts, the session store and its locks, request
validation, and the streamed error event the openai client must raise."""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import Any

import pytest

from server import transcript as transcript_module
from server.cli import build_parser
from server.http import Guard
from server.protocol import ApiError, ChatRequest, CompletionRequest, chat_job, completion_job
from server.protocol import parse as parse_request
from server.responses import ChatBuilder, CompletionBuilder, sse
from server.store import FolderStore, SessionIdError, StoreFull, check_session_id
from server.transcript import (
    Diverged,
    KindMismatch,
    Transcript,
    message_unit,
    new_messages,
    new_text_start,
    render_chat,
)


def _units(messages: list[tuple[str, str]]) -> list[str]:
    return [message_unit(r, c) for r, c in messages]


# transcripts -------------------------------------------------------------------------------
def test_chat_resend_append_and_divergence() -> None:
    t = Transcript().extend(_units([("user", "hi"), ("assistant", " yo")]), "chat",
                            open_reply=True)
    resent = [("user", "hi"), ("assistant", " yo"), ("user", "next")]
    assert new_messages(t, _units(resent)) == 2  # only the last message is new
    assert new_messages(t, _units([("user", "next")])) == 0  # a client sending only new ones
    assert new_messages(t, _units([("user", "hi")])) == 0  # repeating the first line alone
    with pytest.raises(Diverged):  # same start, edited reply
        new_messages(t, _units([("user", "hi"), ("assistant", "edited"), ("user", "x")]))
    with pytest.raises(Diverged):
        new_messages(t, _units([("user", "other")]), mode="full")
    assert new_messages(t, _units(resent), mode="new") == 0
    with pytest.raises(KindMismatch):
        new_text_start(t, "text")


def test_text_resend_and_pieces() -> None:
    t = Transcript().extend(["Once upon", " a time"], "text", lengths=[9, 7], open_reply=False)
    assert new_text_start(t, "Once upon a time, there") == 16
    assert new_text_start(t, ", there") == 0
    with pytest.raises(Diverged):
        new_text_start(t, "Once upon another time")
    with pytest.raises(KindMismatch):
        new_messages(t, _units([("user", "x")]))


def test_text_resend_past_the_kept_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the oldest piece lengths are dropped, a re-sent transcript cannot be cut where it
    ends; in auto mode it must be refused (409), not fed to the memory a second time."""
    monkeypatch.setattr(transcript_module, "MAX_PIECES", 2)
    t = Transcript().extend(["Once upon", " a time"], "text", lengths=[9, 7], open_reply=False)
    t = t.extend([", there", " was"], "text", lengths=[7, 4], open_reply=False)
    assert t.count == 4 and t.lengths == (7, 4) and t.first_length == 9
    assert Transcript.from_metadata(t.to_metadata()) == t
    with pytest.raises(Diverged, match="session_input='new'"):
        new_text_start(t, "Once upon a time, there was a fox")
    assert new_text_start(t, " a fox") == 0  # only new text: fine
    assert new_text_start(t, "Once upon a time", mode="new") == 0
    with pytest.raises(Diverged):
        new_text_start(t, " a fox", mode="full")


def test_transcript_metadata_round_trip_and_refusals() -> None:
    t = Transcript().extend(["ab", "c"], "text", lengths=[2, 1], open_reply=False)
    assert Transcript.from_metadata(t.to_metadata()) == t
    assert Transcript.from_metadata({"format": "x"}) == Transcript()
    bad = {**t.to_metadata(), "session.count": "-1"}
    with pytest.raises(ValueError, match="malformed"):
        Transcript.from_metadata(bad)
    with pytest.raises(ValueError, match="malformed"):
        Transcript.from_metadata({**t.to_metadata(), "session.chain": "zz"})


def test_render_chat_template() -> None:
    text = render_chat([("system", "be brief"), ("user", "hi")], open_reply=False)
    assert text == "System: be brief\nUser: hi\nAssistant:"
    assert render_chat([("user", "more")], open_reply=True) == "\nUser: more\nAssistant:"


# store -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 129, "a b", "é", None])
def test_bad_session_ids(bad: object) -> None:
    with pytest.raises(SessionIdError):
        check_session_id(bad)


def test_store_write_lock_and_evict(tmp_path) -> None:
    store = FolderStore(tmp_path, max_sessions=2)
    store.prepare()
    locks = store.locks()
    for sid in ("a", "b"):
        assert locks.try_acquire(sid)
        store.write(sid, b"data-" + sid.encode(), locks)
        locks.release(sid)
    os.utime(store.path("a"), (1, 1))  # "a" is the least recently used
    other = store.locks()  # another holder (as another thread or process would be)
    assert other.try_acquire("b")
    assert not locks.try_acquire("b")  # busy elsewhere
    assert locks.try_acquire("c")
    assert store.write("c", b"new", locks) == ["a"]  # idle "a" evicted, busy "b" kept
    assert sorted(store.ids()) == ["b", "c"]
    locks.release("c")
    assert locks.try_acquire("d")
    os.utime(store.path("c"), (1, 1))
    assert other.try_acquire("c")
    with pytest.raises(StoreFull):  # every session busy: the new one is refused
        store.write("d", b"x", locks)
    assert not store.exists("d")


def test_a_new_session_is_written_under_the_store_lock(tmp_path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting the sessions and writing the new file happen under one store lock, so two new
    sessions cannot both take the last free place."""
    import fcntl

    from server import store as store_module

    store = FolderStore(tmp_path, max_sessions=2)
    store.prepare()
    held_while_writing: list[bool] = []
    real_write = store_module.write_atomic

    def write_atomic(path: Any, data: bytes) -> None:
        fd = os.open(store.lock_folder / "store.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held_while_writing.append(False)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held_while_writing.append(True)
        finally:
            os.close(fd)
        real_write(path, data)

    monkeypatch.setattr(store_module, "write_atomic", write_atomic)
    locks = store.locks()
    assert locks.try_acquire("a")
    store.write("a", b"new", locks)  # a new session
    store.write("a", b"again", locks)  # an existing one needs no store lock
    assert held_while_writing == [True, False]


def test_check_room_refuses_without_evicting(tmp_path) -> None:
    store = FolderStore(tmp_path, max_sessions=1)
    store.prepare()
    locks, other = store.locks(), store.locks()
    assert locks.try_acquire("old")
    store.write("old", b"x", locks)
    locks.release("old")
    assert locks.try_acquire("new")
    store.check_room("new", locks)  # "old" is idle: it could be evicted...
    assert store.ids() == ["old"]  # ...but only the write evicts
    assert other.try_acquire("old")
    with pytest.raises(StoreFull):
        store.check_room("new", locks)
    other.release("old")
    assert store.write("new", b"y", locks) == ["old"]
    store.check_room("new", locks)  # an existing session always has room


def test_cancel_flags(tmp_path) -> None:
    store = FolderStore(tmp_path)
    store.prepare()
    uid = "0123456789abcdef0123456789abcdef"
    assert not store.cancelled(uid)
    store.cancel(uid)
    assert store.cancelled(uid)
    store.clear_cancel(uid)
    assert not store.cancelled(uid)
    for bad in ("../x", "abc", uid + "0", uid.upper()):
        with pytest.raises(ValueError):
            store.cancel(bad)
        assert not store.cancelled(bad)
    store.cancel(uid)
    FolderStore(tmp_path).prepare()  # a restart forgets every flag
    assert not store.cancelled(uid)


def test_memory_uploads_have_their_own_size_limit() -> None:
    args = build_parser().parse_args(["--max-memory-bytes", "2MiB", "--max-request-bytes", "1KB"])
    assert (args.max_memory_bytes, args.max_request_bytes) == (2 << 20, 1024)
    assert build_parser().parse_args([]).max_memory_bytes == 512 << 20
    guard = Guard(None, None, max_bytes=100, max_memory_bytes=5000)
    assert guard.limit("PUT", "/v1/sessions/abc/memory") == (5000, "--max-memory-bytes")
    assert guard.limit("GET", "/v1/sessions/abc/memory")[0] == 100
    assert guard.limit("POST", "/v1/chat/completions") == (100, "--max-request-bytes")


def _try_in_child(folder: str, out: Any) -> None:
    locks = FolderStore(folder).locks()
    out.put((locks.try_acquire("s1"), locks.try_acquire("s2")))


def test_locks_exclude_other_processes(tmp_path) -> None:
    store = FolderStore(tmp_path)
    store.prepare()
    locks = store.locks()
    assert locks.try_acquire("s1")
    ctx = multiprocessing.get_context("fork")
    for expected in [(False, True), (True, True)]:
        out = ctx.Queue()
        child = ctx.Process(target=_try_in_child, args=(str(tmp_path), out))
        child.start()
        assert out.get(timeout=30) == expected
        child.join(10)
        locks.release("s1")  # the second child finds s1 free


# request validation ------------------------------------------------------------------------
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change,param", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"stop": 5}, "stop"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"metadata": {"session_id": 3}}, "metadata.session_id"),
    ({"max_tokenz": 3}, "max_tokenz"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"model": None}, "model"),
])
def test_chat_validation_names_the_field(change: dict, param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(ChatRequest, {**CHAT, **change})
    assert e.value.status == 400 and e.value.param == param


def test_chat_job_limits_and_session_fields() -> None:
    with pytest.raises(ApiError) as e:
        chat_job(parse_request(ChatRequest, {**CHAT, "max_tokens": 10**6}), limit=100)
    assert e.value.param == "max_tokens"
    with pytest.raises(ApiError) as e:
        chat_job(parse_request(ChatRequest, {**CHAT, "metadata": {"session_id": "../x"}}), 100)
    assert e.value.param == "metadata.session_id"
    with pytest.raises(ApiError) as e:
        chat_job(parse_request(ChatRequest, {**CHAT, "n": 2, "metadata": {"session_id": "s"}}),
                 100)
    assert e.value.param == "n"
    job = chat_job(parse_request(ChatRequest, {**CHAT, "seed": 3, "top_p": 0, "metadata": {
        "session_id": "s", "reset_session": "true"}}), 100)
    assert job["session_id"] == "s" and job["reset"] and job["params"]["temperature"] == 0
    with pytest.raises(ApiError):
        parse_request(ChatRequest, [1, 2])


def test_completion_prompts() -> None:
    job = completion_job(parse_request(CompletionRequest, {"model": "m", "prompt": [5, 6]}),
                         100, vocab_size=10)
    assert job["prompts"] == [[5, 6]] and job["params"]["max_new_tokens"] == 16
    with pytest.raises(ApiError) as e:
        completion_job(parse_request(CompletionRequest, {"model": "m", "prompt": [50]}), 100, 10)
    assert e.value.param == "prompt"
    with pytest.raises(ApiError) as e:
        parse_request(CompletionRequest, {"model": "m"})
    assert e.value.param == "prompt" and e.value.code == "missing_field"


# responses ---------------------------------------------------------------------------------
def test_builders_assemble_openai_shapes() -> None:
    b = ChatBuilder("m", "fp", 1, logprobs=True, include_usage=True)
    b.add({"t": "start", "prompt_tokens": 3})
    b.add({"t": "tok", "c": 0, "text": "h", "token": "h", "bytes": [104], "lp": -1.0,
           "top": [["h", [104], -1.0]]})
    b.add({"t": "tok", "c": 0, "text": "i", "token": "i", "bytes": [105], "lp": -2.0, "top": []})
    b.add({"t": "end", "c": 0, "finish_reason": "length"})
    chunks = b.add({"t": "done", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                           "total_tokens": 5}, "session": None})
    body = b.response()
    assert body["choices"][0]["message"]["content"] == "hi"
    assert [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]] == [-1.0, -2.0]
    assert chunks[0]["choices"] == [] and chunks[0]["usage"]["total_tokens"] == 5
    c = CompletionBuilder("m", "fp", 1, logprobs=True, include_usage=False)
    c.add({"t": "echo", "c": 0, "text": "ab", "tokens": [
        {"token": "a", "bytes": [97], "lp": None, "top": []},
        {"token": "b", "bytes": [98], "lp": -0.5, "top": [["b", [98], -0.5], ["b", [98], -0.9]]}]})
    c.add({"t": "tok", "c": 0, "text": "\u00e9", "token": "bytes:\\xc3", "bytes": [195],
           "lp": -0.1, "top": [["bytes:\\xc3", [195], -0.1]]})
    c.add({"t": "tok", "c": 0, "text": "", "token": "bytes:\\xa9", "bytes": [169], "lp": -0.2,
           "top": []})
    lp = c.response()["choices"][0]["logprobs"]
    assert c.response()["choices"][0]["text"] == "ab\u00e9"
    assert lp["token_logprobs"] == [None, -0.5, -0.1, -0.2]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"b": -0.5}


def test_several_tokens_in_one_message_stream_as_they_would_one_by_one() -> None:
    events = [{"t": "tok", "c": 0, "text": t, "token": t, "bytes": list(t.encode()),
               "lp": -float(i), "top": []} for i, t in enumerate("abc")]
    for builder in (ChatBuilder, CompletionBuilder):
        one = builder("m", "fp", 1, logprobs=True, include_usage=False)
        merged = builder("m", "fp", 1, logprobs=True, include_usage=False)
        chunks = [c for e in events for c in one.add(e)]
        together = merged.add(events[0]) + merged.add({"t": "toks", "events": events[1:]})
        strip = [{k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]
        assert len(together) == 3
        assert [{k: v for k, v in c.items() if k not in ("id", "created")}
                for c in together] == strip
        assert merged.choices[0].text == one.choices[0].text == "abc"


def test_openai_client_raises_a_mid_stream_error_event() -> None:
    """The exact bytes the server streams after an error are parsed and raised by openai."""
    import httpx2
    import openai

    b = ChatBuilder("m", "fp", 1, logprobs=False, include_usage=False)
    body = "".join(sse(c) for c in b.add({"t": "start", "prompt_tokens": 1}))
    body += "".join(sse(c) for c in b.add({"t": "tok", "c": 0, "text": "x"}))
    body += sse({"error": ApiError(500, "generation failed", code="internal_error").body()[
        "error"]})

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=body.encode())

    client = openai.OpenAI(api_key="k", base_url="http://test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    stream = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                  "content": "hi"}], stream=True)
    got = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "x"]
    assert json.loads(body.split("\n\n")[-2][len("data: "):])["error"]["code"] == \
        "internal_error"


def test_sse_events_survive_clients_that_split_on_every_unicode_line_break():
    """Found by the soak: a streamed token holding U+2028 cut the event in httpx's iter_lines."""
    from server.responses import sse

    text = "a\u2028b\x85c\x1cd\u2029e\re\nf é"
    event = sse({"choices": [{"text": text}]})
    lines = event.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["text"] == text


def test_metrics_folders_of_dead_servers_are_swept(tmp_path: Any) -> None:
    """kill -9 leaves a metrics folder behind; the next start removes it, never a live one."""
    import subprocess
    import sys

    from server.cli import METRICS_PREFIX, sweep_metrics_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    gone = tmp_path / f"{METRICS_PREFIX}{dead}-abc"
    live = tmp_path / f"{METRICS_PREFIX}{os.getpid()}-def"
    old_style = tmp_path / f"{METRICS_PREFIX}xyz"  # before pids were in the name: left alone
    for folder in (gone, live, old_style):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert sweep_metrics_dirs(tmp_path) == [gone]
    assert not gone.exists() and live.exists() and old_style.exists()


def test_a_quick_benchmark_run_writes_beside_the_results() -> None:
    from pathlib import Path

    from benchmarks.common import RESULTS, results_folder

    assert results_folder(None, False) == RESULTS
    assert results_folder(None, True) == RESULTS / "quick"
    assert results_folder(Path("x"), True) == Path("x")


def test_idempotent_answers_stay_within_their_budget() -> None:
    """The kept answers never pass MAX_TOTAL_BYTES (the memory file's header stays small): the
    oldest go first, and one answer too large alone keeps only that it ran (409 on a retry)."""
    from server import replies

    job = {"op": "chat", "messages": [["user", "hi"]]}
    kept: dict[str, Any] = {}
    piece = "x" * 20_000
    for i in range(16):  # 16 answers of ~20 KB each would be ~320 KB
        events = [{"t": "tok", "c": 0, "text": piece}, {"t": "end", "c": 0}]
        kept = replies.load(replies.remember(kept, f"k{i}", job, events))
    text = replies.remember(kept, "k-last", job, [])[replies.META_KEY]
    assert len(text) <= replies.MAX_TOTAL_BYTES and "k15" in kept and "k0" not in kept
    huge = [{"t": "tok", "c": 0, "text": "y" * (replies.MAX_TOTAL_BYTES + 1)}]
    kept = replies.load(replies.remember({}, "big", job, huge))
    assert kept["big"]["too_large"] and kept["big"]["events"] == []
    with pytest.raises(ApiError) as e:
        replies.lookup(kept, "big", job)
    assert e.value.status == 409 and e.value.code == "idempotent_answer_not_kept"
    with pytest.raises(replies.Replay):  # a kept answer replays
        replies.lookup(replies.load(replies.remember({}, "k", job, [])), "k", job)
