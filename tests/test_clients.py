"""The client library and CLI against httpx's MockTransport (no server process, no network).

`FakeServer` is an in-memory stand-in for the newllm routes (chat, completions, models,
sessions, memory export/import/delete, health) that records every request and can be scripted
to fail first (503s, connection errors, error bodies). Memory files are real ones written by
``newllm.memory_file.save_memory`` for a tiny model. Sleeps are injected, so backoff is
checked by the waits it asked for, not by time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import clients
from clients import (
    AsyncClient,
    AuthError,
    BadRequest,
    Client,
    Conflict,
    IntegrityError,
    MemoryRefused,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServerError,
    ServerUnavailable,
    StreamError,
    StreamInterrupted,
    cli,
    memory,
)
from clients.errors import APIError

URL = "http://fake-a:8000"
URL_B = "http://fake-b:8000"
KEY = "test-key-123"


# a fake server ------------------------------------------------------------------------------
def error(status: int, message: str, code: str, param: str | None = None) -> httpx.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return httpx.Response(status, json={"error": {"message": message, "type": kind,
                                                  "param": param, "code": code}})


def sse(*events: Any, terminate_last: bool = True) -> bytes:
    parts = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if not terminate_last:
        parts[-1] = parts[-1][:-1]
    return "".join(parts).encode()


def chat_chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if text is not None:
        delta["content"] = text
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class FakeServer:
    """Routes of a newllm server in memory; ``script`` items are served first, in order."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.sessions: dict[str, bytes] = {}
        self.requests: list[httpx.Request] = []
        self.script: list[httpx.Response | Exception | Callable[[httpx.Request], Any]] = []
        self.reply = "Hello there world"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, Exception):
                raise item
            if callable(item):
                return item(request)
            return item
        path, method = request.url.path, request.method
        if path != "/health" and self.api_key and \
                request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "missing or invalid API key", "invalid_api_key")
        if path == "/health":
            return httpx.Response(200, text="ok")
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "fake", "object": "model", "created": 1, "owned_by": "newllm"}]})
        if path == "/v1/sessions":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": k, "object": "session", "tokens_seen": memory.inspect(v).tokens_seen,
                 "bytes": len(v), "last_used": 1.0, "kind": "chat", "turns": 1}
                for k, v in self.sessions.items()]})
        if path.startswith("/v1/sessions/"):
            return self._session_route(method, path.split("/")[3], path.endswith("/memory"),
                                       request)
        if path == "/v1/chat/completions":
            return self._chat(json.loads(request.content))
        if path == "/v1/completions":
            body = json.loads(request.content)
            return httpx.Response(200, json={
                "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "text": body["prompt"] + "!", "finish_reason": "length",
                             "logprobs": {"tokens": ["!"], "token_logprobs": [-0.5],
                                          "top_logprobs": [{"!": -0.5}], "text_offset": [5]}}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
        return error(404, "Not Found", "not_found")

    def _session_route(self, method: str, sid: str, is_memory: bool,
                       request: httpx.Request) -> httpx.Response:
        if method == "PUT" and is_memory:
            try:
                info = memory.verify(request.content)
            except IntegrityError as e:
                return error(400, f"memory file refused: {e}", "checksum_mismatch", "body")
            created = sid not in self.sessions
            self.sessions[sid] = request.content
            return httpx.Response(201 if created else 200, json={
                "id": sid, "object": "session", "created": created,
                "tokens_seen": info.tokens_seen, "bytes": len(request.content), "kind": "",
                "turns": 0})
        if sid not in self.sessions:
            return error(404, f"no session {sid!r}", "session_not_found", "session_id")
        if method == "DELETE":
            del self.sessions[sid]
            return httpx.Response(200, json={"id": sid, "deleted": True})
        data = self.sessions[sid]
        info = memory.inspect(data)
        return httpx.Response(200, content=data, headers={
            "X-Newllm-Payload-Sha256": str(info.payload_sha256),
            "X-Newllm-Tokens-Seen": str(info.tokens_seen)})

    def _chat(self, body: dict[str, Any]) -> httpx.Response:
        sid = (body.get("metadata") or {}).get("session_id")
        session = {"id": sid, "tokens_seen": 9, "turns": 1, "created": True, "reset": False,
                   "bytes": 10} if sid else None
        usage = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        if body.get("stream"):
            words = self.reply.split(" ")
            pieces = [chat_chunk(role=True)] + [
                chat_chunk(w if i == 0 else " " + w) for i, w in enumerate(words)]
            tail = {**chat_chunk(), "choices": [], "usage": usage, "session": session}
            return httpx.Response(200, content=sse(*pieces, chat_chunk(finish="stop"), tail,
                                                   "[DONE]"),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply},
                         "finish_reason": "stop", "logprobs": {"content": [
                             {"token": "Hello", "logprob": -0.25, "bytes": [72],
                              "top_logprobs": [{"token": "Hello", "logprob": -0.25}]}]}}],
            "usage": usage, "session": session})


@pytest.fixture(scope="module")
def memory_file() -> bytes:
    """A real memory file of a tiny-infini state after 21 tokens."""
    from conftest import make_tiny_model

    from newllm.memory_file import save_memory

    model = make_tiny_model("tiny-infini")
    with torch.no_grad():
        _, state = model(torch.arange(1, 22).unsqueeze(0))  # (1, 21)
    return save_memory(state, model)


def client(server: FakeServer, sleeps: list[float] | None = None, **kw: Any) -> Client:
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    kw.setdefault("jitter", 0.0)
    return Client(URL, transport=httpx.MockTransport(server), sleep=sleep, model="fake", **kw)


# the package stays light ----------------------------------------------------------------------
def test_import_pulls_in_no_torch_or_newllm() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'newllm', 'server', 'training', 'numpy',\n"
        "                                  'safetensors', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import clients, clients.cli, clients.aio\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'newllm', 'server')]\n"
        "print(bad)\n"
        "raise SystemExit(clients.cli.main(['--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "[]"
    assert "newllm-client" in out.stdout  # the CLI's help ran too


# retries and backoff --------------------------------------------------------------------------
def test_503_is_retried_with_exponential_backoff() -> None:
    server, sleeps = FakeServer(), []
    server.script = [error(503, "busy", "too_many_sessions"), error(503, "busy", "x")]
    with client(server, sleeps, backoff=0.5) as c:
        assert c.chat("hi").text == server.reply
    assert sleeps == [0.5, 1.0]
    assert len(server.requests) == 3


def test_retries_are_bounded_and_the_last_error_is_raised() -> None:
    server, sleeps = FakeServer(), []
    server.script = [error(503, "server full", "too_many_sessions")] * 10
    with client(server, sleeps, max_retries=4, backoff=1.0, max_backoff=3.0) as c:
        with pytest.raises(ServerUnavailable) as info:
            c.sessions()
    assert sleeps == [1.0, 2.0, 3.0, 3.0]  # doubled, capped at max_backoff
    assert len(server.requests) == 5
    assert info.value.status == 503 and info.value.code == "too_many_sessions"
    assert str(info.value) == "server full"


def test_retry_after_raises_the_wait_but_never_past_the_cap() -> None:
    server, sleeps = FakeServer(), []
    busy = error(503, "busy", "busy")
    server.script = [httpx.Response(503, headers={"Retry-After": "2"}, json=busy.json()),
                     httpx.Response(503, headers={"Retry-After": "60"}, json=busy.json())]
    with client(server, sleeps, backoff=0.1, max_backoff=5.0) as c:
        c.sessions()
    assert sleeps == [2.0, 5.0]


def test_jitter_only_shortens_waits() -> None:
    policy = clients._base.RetryPolicy(max_retries=5, backoff=1.0, max_backoff=4.0, jitter=0.5)
    for attempt in range(6):
        wait = policy.delay(attempt)
        full = min(4.0, 2.0 ** attempt)
        assert full * 0.5 <= wait <= full


def test_connection_errors_before_sending_are_retried_for_any_method() -> None:
    server, sleeps = FakeServer(), []
    req = httpx.Request("POST", URL)
    server.script = [httpx.ConnectError("refused", request=req),
                     httpx.ConnectTimeout("slow", request=req)]
    with client(server, sleeps) as c:
        assert c.chat("hi", session="s").session.id == "s"
    assert sleeps == [0.5, 1.0]


def test_errors_after_sending_are_retried_only_when_idempotent() -> None:
    server, sleeps = FakeServer(), []
    req = httpx.Request("POST", URL)
    server.script = [httpx.ReadError("reset", request=req)]
    with client(server, sleeps) as c:
        with pytest.raises(ServerUnavailable) as info:
            c.chat("hi")  # no session, no key: it may have run, it is not sent twice
        assert len(server.requests) == 1 and sleeps == []
        assert "idempotency-key" not in server.requests[0].headers
        assert info.value.code == "connection_error" and info.value.status is None
        server.script = [httpx.ReadError("reset", request=req)]
        assert c.sessions() == []  # a GET is safe to repeat
        assert sleeps == [0.5]
        server.script = [httpx.ReadError("reset", request=req)]
        c.chat("hi", session="s")  # a turn carries its key: retried, the server applies it once
        first, again = server.requests[-2:]
        assert first.headers["idempotency-key"] == again.headers["idempotency-key"]
        c.chat("hi", session="s")  # a new turn, a new key
        assert server.requests[-1].headers["idempotency-key"] != first.headers["idempotency-key"]
    assert sleeps == [0.5, 0.5]


def test_timeouts_raise_request_timeout_after_retries() -> None:
    server, sleeps = FakeServer(), []
    server.script = [httpx.ConnectTimeout("slow", request=httpx.Request("GET", URL))] * 3
    with client(server, sleeps, max_retries=2) as c:
        with pytest.raises(RequestTimeout, match="did not answer in time"):
            c.sessions()
    assert len(server.requests) == 3 and sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status,cls,code", [
    (400, BadRequest, "invalid_value"), (401, AuthError, "invalid_api_key"),
    (403, AuthError, "forbidden"), (404, NotFound, "session_not_found"),
    (409, Conflict, "session_conflict"), (413, PayloadTooLarge, "request_too_large"),
    (422, BadRequest, "invalid_value"),
    (500, ServerError, "internal_error"), (502, ServerError, "bad_gateway"),
])
def test_errors_map_to_types_and_are_never_retried(status: int, cls: type, code: str) -> None:
    server, sleeps = FakeServer(), []
    server.script = [error(status, f"the server says {code}", code, "messages")]
    with client(server, sleeps) as c:
        with pytest.raises(cls) as info:
            c.chat("hi")
    e = info.value
    assert (e.status, e.code, e.param, str(e)) == (status, code, "messages",
                                                   f"the server says {code}")
    assert len(server.requests) == 1 and sleeps == []


def test_too_many_at_once_is_retried_as_told_then_raised(memory_file: bytes) -> None:
    """429 (e.g. too many uploads at once) is retried after its Retry-After, like 503; when
    retries run out it raises RateLimited."""
    server, sleeps = FakeServer(), []
    busy = error(429, "2 memory uploads are being received", "too_many_uploads")
    busy.headers["Retry-After"] = "2"
    server.script = [busy]
    with client(server, sleeps) as c:
        assert c.import_memory("s", memory_file).created
        assert sleeps == [2.0]
        server.script = [error(429, "slow down", "rate_limited")] * 4
        with pytest.raises(RateLimited):
            c.import_memory("t", memory_file)
    assert sleeps == [2.0, 0.5, 1.0, 2.0]


def test_refused_memory_upload_is_memory_refused(memory_file: bytes) -> None:
    server = FakeServer()
    server.script = [error(400, "memory file refused: wrong model", "fingerprint_mismatch",
                           "body"),
                     error(413, "the request body is over 10 bytes", "request_too_large")]
    with client(server) as c:
        with pytest.raises(MemoryRefused, match="wrong model") as info:
            c.import_memory("s", memory_file)
        assert info.value.code == "fingerprint_mismatch" and isinstance(info.value, BadRequest)
        with pytest.raises(MemoryRefused, match="over 10 bytes"):
            c.import_memory("s", memory_file)


def test_error_bodies_that_are_not_openai_shaped_still_give_a_message() -> None:
    server = FakeServer()
    server.script = [httpx.Response(502, text="<html>Bad Gateway</html>"),
                     httpx.Response(404, json={"detail": "Not Found"}),
                     httpx.Response(500)]
    with client(server, max_retries=0) as c:
        with pytest.raises(ServerError, match="Bad Gateway"):
            c.sessions()
        with pytest.raises(NotFound, match="Not Found"):
            c.sessions()
        with pytest.raises(ServerError, match="HTTP 500"):
            c.sessions()


# auth and request bodies ----------------------------------------------------------------------
def test_auth_header_is_sent_on_every_route(memory_file: bytes) -> None:
    server = FakeServer(api_key=KEY)
    with client(server, api_key=KEY) as c:
        c.chat("hi")
        list(c.stream_chat("hi"))
        c.import_memory("s", memory_file)
        c.export_memory("s")
        c.sessions()
        c.delete_session("s")
    assert len(server.requests) == 6
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    with client(server) as c:
        with pytest.raises(AuthError, match="API key"):
            c.sessions()
    assert "authorization" not in server.requests[-1].headers


def test_request_body_carries_session_fields_and_sampling() -> None:
    server = FakeServer()
    c = Client(URL, transport=httpx.MockTransport(server))  # no model= : asked once
    c.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
           session="s1", reset_session=True, session_input="new", temperature=0,
           max_tokens=5, seed=7, stop=["\n"])
    c.complete("abc", session="s2", echo=True, logprobs=2, temperature=0)
    paths = [r.url.path for r in server.requests]
    assert paths == ["/v1/models", "/v1/chat/completions", "/v1/completions"]
    chat = json.loads(server.requests[1].content)
    assert chat["model"] == "fake"
    assert chat["metadata"] == {"session_id": "s1", "reset_session": "true",
                                "session_input": "new"}
    assert (chat["temperature"], chat["max_tokens"], chat["seed"], chat["stop"]) == \
        (0, 5, 7, ["\n"])
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    comp = json.loads(server.requests[2].content)
    assert (comp["prompt"], comp["echo"], comp["logprobs"]) == ("abc", True, 2)
    assert comp["metadata"] == {"session_id": "s2"} and "stream" not in comp


def test_results_are_typed() -> None:
    with client(FakeServer()) as c:
        chat = c.chat("hi", session="s")
        comp = c.complete("abc", logprobs=1)
    assert chat.text == "Hello there world" and chat.finish_reason == "stop"
    assert chat.usage is not None and chat.usage.total_tokens == 7
    assert chat.session is not None and chat.session.tokens_seen == 9
    assert chat.logprobs is not None and chat.logprobs.content[0].logprob == -0.25
    assert comp.text == "abc!" and comp.logprobs is not None
    assert comp.logprobs.token_logprobs == [-0.5] and comp.logprobs.text_offset == [5]


# streaming ----------------------------------------------------------------------------------
def test_stream_chat_yields_pieces_and_totals() -> None:
    server = FakeServer()
    with client(server) as c:
        stream = c.stream_chat("hi", session="s")
        pieces = list(stream)
    assert pieces == ["Hello", " there", " world"]
    assert stream.text == "Hello there world" and stream.finish_reason == "stop"
    assert stream.usage == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert stream.session is not None and stream.session["id"] == "s"
    result = stream.result()
    assert result.text == "Hello there world" and result.usage.completion_tokens == 3
    body = json.loads(server.requests[0].content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_sse_parser_handles_split_bytes_crlf_comments_and_multiline_data() -> None:
    raw = (b": keep-alive\r\n\r\n"
           + b'data: {"choices": [{"index": 0, "text": "a\\nb", "finish_reason": null}]}\r\n\r\n'
           + b'data: {"choices": [{"index": 0,\ndata: "text": "c", "finish_reason": "length"}]}'
           + b"\n\ndata: [DONE]\n\n")

    def handler(request: httpx.Request) -> httpx.Response:
        pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]  # events cut anywhere
        return httpx.Response(200, content=iter(pieces))

    server = FakeServer()
    server.script = [handler]
    with client(server) as c:
        stream = c.stream_complete("x")
        assert [d.text for d in stream.deltas()] == ["a\nb", "c"]
    assert stream.finish_reason == "length" and stream.text == "a\nbc"


@pytest.mark.parametrize("terminated", [True, False], ids=["blank-line", "litserve-style"])
def test_mid_stream_error_event_raises_stream_error(terminated: bool) -> None:
    server = FakeServer()
    err = {"error": {"message": "generation failed: out of memory", "type": "server_error",
                     "param": None, "code": "internal_error"}}
    server.script = [httpx.Response(200, content=sse(chat_chunk(role=True), chat_chunk("Hi"),
                                                     err, terminate_last=terminated))]
    got: list[str] = []
    with client(server) as c:
        with pytest.raises(StreamError, match="out of memory") as info:
            for piece in c.stream_chat("hi"):
                got.append(piece)
    assert got == ["Hi"]
    assert info.value.code == "internal_error" and info.value.status is None


@pytest.mark.parametrize("failure", [httpx.ReadError, httpx.ReadTimeout])
def test_stream_cut_off_raises_stream_interrupted_and_is_not_retried(failure: type) -> None:
    server, sleeps = FakeServer(), []

    def broken(request: httpx.Request) -> httpx.Response:
        def body() -> Any:
            yield sse(chat_chunk("Hi"))
            raise failure("connection reset", request=request)
        return httpx.Response(200, content=body())

    server.script = [httpx.Response(200, content=sse(chat_chunk("Hi"))), broken]
    with client(server, sleeps) as c:
        with pytest.raises(StreamInterrupted, match=r"\[DONE\]"):
            list(c.stream_chat("hi"))
        with pytest.raises(StreamInterrupted, match="broke off") as info:
            list(c.stream_chat("hi"))
    assert info.value.code == ("timeout" if failure is httpx.ReadTimeout else "connection_error")
    assert len(server.requests) == 2 and sleeps == []


def test_stream_is_retried_before_its_first_byte_and_4xx_raise_on_open() -> None:
    server, sleeps = FakeServer(), []
    server.script = [error(503, "busy", "busy"),
                     httpx.ConnectError("refused", request=httpx.Request("POST", URL))]
    with client(server, sleeps) as c:
        assert "".join(c.stream_chat("hi")) == "Hello there world"
        assert sleeps == [0.5, 1.0]
        server.script = [error(409, "history differs", "session_conflict", "messages")]
        with pytest.raises(Conflict, match="history differs"):
            with c.stream_chat("hi", session="s"):
                pass


# memory files ---------------------------------------------------------------------------------
def test_payload_hash_matches_newllm(memory_file: bytes) -> None:
    from newllm.memory_file import read_memory_metadata

    info = memory.verify(memory_file)
    assert memory.payload_sha256(memory_file) == read_memory_metadata(memory_file)[
        "payload_sha256"] == info.payload_sha256
    assert info.tokens_seen == 21 and info.size == len(memory_file)


def test_damaged_memory_files_fail_verification(memory_file: bytes) -> None:
    flipped = bytearray(memory_file)
    flipped[-3] ^= 0x40  # a tensor byte
    with pytest.raises(IntegrityError, match="damaged"):
        memory.verify(bytes(flipped))
    with pytest.raises(IntegrityError, match="cut off"):
        memory.verify(memory_file[:-10])
    with pytest.raises(IntegrityError, match="8-byte"):
        memory.verify(b"abc")
    with pytest.raises(IntegrityError, match="differs"):
        memory.verify(memory_file, expected_payload="0" * 64)


def test_edited_metadata_fails_verification(memory_file: bytes) -> None:
    from newllm.memory_file import metadata_sha256

    info = memory.verify(memory_file)
    assert memory.metadata_sha256(info.metadata) == metadata_sha256(info.metadata) \
        == info.metadata["metadata_sha256"]
    edited = memory_file.replace(b'"position":"21"', b'"position":"31"')  # same length
    assert edited != memory_file
    with pytest.raises(IntegrityError, match="metadata_sha256"):
        memory.verify(edited)
    unhashed = memory_file.replace(b'"metadata_sha256"', b'"metadata_sha257"')
    with pytest.raises(IntegrityError, match="no metadata_sha256"):
        memory.verify(unhashed)


def test_export_verifies_the_download(memory_file: bytes, tmp_path: Any) -> None:
    server = FakeServer()
    server.sessions["s"] = memory_file
    progress: list[tuple[int, int | None]] = []
    with client(server) as c:
        assert c.export_memory("s", progress=lambda d, t: progress.append((d, t))) == memory_file
        path = c.export_memory("s", tmp_path / "out" / "s.safetensors")
        assert path.read_bytes() == memory_file
        assert progress[-1] == (len(memory_file), len(memory_file))
        server.script = [httpx.Response(200, content=memory_file,
                                        headers={"X-Newllm-Payload-Sha256": "ab" * 32})]
        with pytest.raises(IntegrityError, match="altered"):
            c.export_memory("s")
        with pytest.raises(NotFound, match="no session 'zz'"):
            c.export_memory("zz")


def test_import_sends_the_bytes_unchanged_with_progress(memory_file: bytes) -> None:
    server = FakeServer()
    seen: list[tuple[int, int | None]] = []
    with client(server) as c:
        result = c.import_memory("s", memory_file, progress=lambda d, t: seen.append((d, t)))
        assert result.created and result.tokens_seen == 21
        assert not c.import_memory("s", memory_file).created
    assert server.sessions["s"] == memory_file
    assert server.requests[0].headers["content-length"] == str(len(memory_file))
    assert seen[-1] == (len(memory_file), len(memory_file))


def two_servers(**kw: Any) -> tuple[FakeServer, FakeServer, Client, Client]:
    a, b = FakeServer(), FakeServer(api_key=KEY)
    route = httpx.MockTransport(lambda r: (a if r.url.host == "fake-a" else b)(r))
    ca = Client(URL, transport=route, sleep=lambda s: None, **kw)
    cb = Client(URL_B, api_key=KEY, transport=route, sleep=lambda s: None, **kw)
    return a, b, ca, cb


def test_move_session_deletes_the_source_only_after_the_target_accepted(
        memory_file: bytes) -> None:
    a, b, ca, cb = two_servers()
    a.sessions["s"] = memory_file
    stages: list[str] = []
    result = clients.move_session("s", ca, cb, progress=lambda st, d, t: stages.append(st))
    assert b.sessions["s"] == memory_file and "s" not in a.sessions
    assert result.source_deleted and result.created and result.tokens_seen == 21
    assert result.payload_sha256 == memory.inspect(memory_file).payload_sha256
    assert stages[0] == "download" and stages[-1] == "upload"
    order = [(r.url.host, r.method) for r in a.requests + b.requests]
    assert ("fake-a", "DELETE") in order
    # the target refuses: the source stays
    a.sessions["t"] = memory_file
    b.script = [error(404, "no session", "session_not_found"),
                error(400, "memory file refused: wrong model", "fingerprint_mismatch", "body")]
    with pytest.raises(MemoryRefused, match="wrong model"):
        ca.move_session("t", cb)
    assert a.sessions["t"] == memory_file and "t" not in b.sessions
    # the target already has it: refused unless overwrite
    with pytest.raises(Conflict, match="already has"):
        ca.move_session("t", cb, new_id="s")
    assert a.sessions["t"] == memory_file
    result = ca.move_session("t", cb, new_id="s", overwrite=True, keep_source=True)
    assert not result.created and not result.source_deleted and "t" in a.sessions


def test_move_session_keeps_the_source_when_the_download_is_damaged(
        memory_file: bytes) -> None:
    a, b, ca, cb = two_servers()
    a.sessions["s"] = memory_file
    damaged = bytearray(memory_file)
    damaged[-1] ^= 1
    a.script = [httpx.Response(200, content=bytes(damaged), headers={
        "X-Newllm-Payload-Sha256": str(memory.inspect(memory_file).payload_sha256)})]
    with pytest.raises(IntegrityError):
        ca.move_session("s", cb)
    assert a.sessions["s"] == memory_file and b.sessions == {}
    with pytest.raises(ValueError, match="same session"):
        ca.move_session("s", ca)


# async ----------------------------------------------------------------------------------------
def test_async_client_retries_streams_and_moves(memory_file: bytes) -> None:
    a, b = FakeServer(), FakeServer(api_key=KEY)
    route = httpx.MockTransport(lambda r: (a if r.url.host == "fake-a" else b)(r))
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    err = {"error": {"message": "worker died", "type": "server_error", "param": None,
                     "code": "internal_error"}}

    async def run() -> None:
        async with AsyncClient(URL, transport=route, sleep=sleep, jitter=0.0) as ca, \
                AsyncClient(URL_B, KEY, transport=route, sleep=sleep, jitter=0.0) as cb:
            a.script = [error(503, "busy", "busy"),
                        httpx.ConnectError("refused", request=httpx.Request("GET", URL))]
            assert (await ca.chat("hi", session="s")).text == "Hello there world"
            assert sleeps == [0.5, 1.0]
            stream = ca.stream_chat("hi")
            assert [p async for p in stream] == ["Hello", " there", " world"]
            assert stream.usage is not None and stream.finish_reason == "stop"
            a.script = [httpx.Response(200, content=sse(chat_chunk("Hi"), err))]
            with pytest.raises(StreamError, match="worker died"):
                async for _ in ca.stream_chat("hi"):
                    pass
            with pytest.raises(BadRequest):
                a.script = [error(400, "bad", "invalid_value")]
                await ca.chat("hi")
            a.sessions["m"] = memory_file
            result = await clients.async_move_session("m", ca, cb, new_id="m2")
            assert result.source_deleted and b.sessions["m2"] == memory_file
            assert "m" not in a.sessions
            assert [s.id for s in await cb.sessions()] == ["m2"]
            assert await cb.export_memory("m2") == memory_file

    asyncio.run(run())
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in b.requests)


# CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeServer, FakeServer]:
    a, b = FakeServer(), FakeServer(api_key=KEY)
    route = httpx.MockTransport(lambda r: (a if r.url.host == "fake-a" else b)(r))
    monkeypatch.setattr(cli, "_TRANSPORT", route)
    monkeypatch.setenv("NEWLLM_URL", URL)
    monkeypatch.delenv("NEWLLM_API_KEY", raising=False)
    return a, b


def test_cli_export_import_round_trips_byte_for_byte(
        fake_cli: tuple[FakeServer, FakeServer], memory_file: bytes, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = fake_cli
    a.sessions["s1"] = memory_file
    out = tmp_path / "s1.safetensors"
    assert cli.main(["export", "s1", "-o", str(out), "--progress", "always"]) == 0
    assert out.read_bytes() == memory_file
    err = capsys.readouterr().err
    assert "export s1:" in err and "100%" in err and "21 tokens seen" in err
    assert cli.main(["import", "s2", str(out), "--url", URL_B, "--api-key", KEY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_seen"] == 21
    assert b.sessions["s2"] == memory_file  # what the server received
    again = tmp_path / "again.safetensors"
    assert cli.main(["--url", URL_B, "--api-key", KEY, "export", "s2", "-o", str(again)]) == 0
    assert again.read_bytes() == memory_file


def test_cli_refused_import_exits_nonzero_with_the_servers_message(
        fake_cli: tuple[FakeServer, FakeServer], memory_file: bytes, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = fake_cli
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(memory_file[:-40])
    assert cli.main(["import", "s", str(bad)]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "memory file refused" in err and "cut off" in err and "checksum_mismatch" in err
    assert "s" not in a.sessions
    assert cli.main(["import", "s", str(bad), "--json"]) == cli.EXIT_REFUSED
    body = json.loads(capsys.readouterr().out)
    assert body["error"]["type"] == "MemoryRefused" and body["error"]["status"] == 400


@pytest.mark.parametrize("script,argv,code", [
    ([], ["--url", URL_B, "sessions"], cli.EXIT_AUTH),
    ([], ["delete", "nope"], cli.EXIT_NOT_FOUND),
    ([error(409, "busy", "session_busy")], ["delete", "x"], cli.EXIT_CONFLICT),
    ([error(503, "full", "too_many_sessions")], ["sessions", "--retries", "0"],
     cli.EXIT_UNAVAILABLE),
    ([error(500, "boom", "internal_error")], ["sessions"], cli.EXIT_ERROR),
    ([], ["sessions", "--retries", "-1"], cli.EXIT_USAGE),
    ([], ["move", "s", "--to", "ftp://elsewhere"], cli.EXIT_USAGE),
    ([], ["no-such-command"], cli.EXIT_USAGE),
])
def test_cli_exit_codes(fake_cli: tuple[FakeServer, FakeServer], script: list, argv: list[str],
                        code: int, capsys: pytest.CaptureFixture[str]) -> None:
    fake_cli[0].script = list(script)
    assert cli.main(argv) == code
    assert capsys.readouterr().err.strip()  # a message says why


def test_cli_chat_streams_and_sends_only_new_messages_with_a_session(
        fake_cli: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = fake_cli
    assert cli.main(["chat", "--session", "s", "--system", "Be brief.", "-m", "one",
                     "-m", "two", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "Hello there world\nHello there world\n"
    bodies = [json.loads(r.content) for r in a.requests if r.url.path.endswith("completions")]
    assert [m["content"] for m in bodies[0]["messages"]] == ["Be brief.", "one"]
    assert [m["content"] for m in bodies[1]["messages"]] == ["two"]
    assert bodies[1]["metadata"] == {"session_id": "s", "session_input": "new"}
    assert bodies[0]["temperature"] == 0 and bodies[0]["stream"] is True
    assert cli.main(["chat", "-m", "x", "-m", "y", "--json"]) == 0  # no session: full history
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["Hello there world"] * 2
    last = json.loads(a.requests[-1].content)
    assert [m["content"] for m in last["messages"]] == ["x", "Hello there world", "y"]


def test_cli_move_health_and_sessions(fake_cli: tuple[FakeServer, FakeServer],
                                      memory_file: bytes,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    a, b = fake_cli
    a.sessions["s"] = memory_file
    assert cli.main(["move", "s", "--to", URL_B, "--to-api-key", KEY, "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["source_deleted"] and b.sessions["s"] == memory_file and a.sessions == {}
    assert cli.main(["sessions", "--url", URL_B, "--api-key", KEY, "--json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["sessions"]] == ["s"]
    assert cli.main(["health"]) == 0 and capsys.readouterr().out.strip() == "ok"
    a.script = [error(503, "not ready", "unavailable")]
    assert cli.main(["health"]) == cli.EXIT_UNAVAILABLE


def test_api_error_repr_and_class_hierarchy() -> None:
    e = MemoryRefused("no", status=400, code="truncated")
    assert isinstance(e, BadRequest) and isinstance(e, APIError)
    assert "truncated" in repr(e) and str(e) == "no"
    assert issubclass(RequestTimeout, ServerUnavailable)


def test_cli_import_and_move_refuse_to_replace_a_session_alike(
        fake_cli: tuple[FakeServer, FakeServer], memory_file: bytes, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Both refuse an existing target session unless --overwrite, in the CLI's own words."""
    a, b = fake_cli
    f = tmp_path / "m.safetensors"
    f.write_bytes(memory_file)
    a.sessions["s"] = b.sessions["s"] = memory_file
    assert cli.main(["import", "s", str(f)]) != 0
    err = capsys.readouterr().err
    assert "already has a session 's'" in err and "--overwrite" in err
    assert "overwrite=True" not in err
    assert cli.main(["move", "s", "--to", URL_B, "--to-api-key", KEY]) != 0
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err and "s" in a.sessions
    assert cli.main(["import", "s", str(f), "--overwrite"]) == 0
    assert cli.main(["move", "s", "--to", URL_B, "--to-api-key", KEY, "--overwrite"]) == 0
    assert b.sessions["s"] == memory_file
