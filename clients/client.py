"""The synchronous client: chat, completions, streaming, session memory and moving sessions.

    from clients import Client
    with Client("http://127.0.0.1:8000", api_key="...") as c:
        reply = c.chat("My name is Ada.", session="ada", temperature=0)
        for piece in c.stream_chat("What is my name?", session="ada"):
            print(piece, end="", flush=True)
        c.export_memory("ada", "ada.safetensors")

Sessions: ``session="ada"`` becomes ``metadata.session_id``; the server keeps that session's
memory between requests, so a chat may send only its new message. ``reset_session=True``
starts the session over; ``session_input`` is ``"auto"`` (default), ``"full"`` or ``"new"``
(see the server's docs). Sampling options (``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, ``n``, ``logprobs``, ...) go to the server as given;
``temperature=0`` is greedy. The model name is asked of the server once unless ``model=``.

Retries and timeouts: see `clients._base`. Errors: see `clients.errors`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from clients import _base, memory
from clients.errors import (
    Conflict,
    IntegrityError,
    NewllmError,
    NotFound,
    ProtocolError,
    StreamInterrupted,
    error_from_response,
)
from clients.types import (
    ChatResult,
    CompletionResult,
    Delta,
    ImportResult,
    ModelCard,
    MoveResult,
    SessionInfo,
)

Progress = Callable[[int, "int | None"], None]  # (bytes done, total bytes or None)
StagedProgress = Callable[[str, int, "int | None"], None]  # ("download"/"upload", done, total)


def session_path(session: str, suffix: str = "") -> str:
    if not isinstance(session, str) or session in ("", ".", ".."):
        raise ValueError(f"invalid session id {session!r}: use letters, digits, '.', '_', '-'")
    return f"/v1/sessions/{quote(session, safe='')}{suffix}"


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_source(path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike) -> bytes:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes)
    return Path(path_or_bytes).read_bytes()


class Stream:
    """A streamed answer: iterate for text pieces (or `deltas` for per-choice pieces).

    Opens on first use; usable once. After the stream ended, ``text``, ``finish_reason``,
    ``usage`` and ``session`` hold the totals and `result` the whole typed answer. An error
    event raises `StreamError`; a broken connection raises `StreamInterrupted`.
    """

    def __init__(self, open_response: Callable[[], httpx.Response], chat: bool) -> None:
        self._open_response = open_response
        self._response: httpx.Response | None = None
        self._state = _base.StreamState(chat)
        self._used = False

    def __enter__(self) -> Stream:
        self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self) -> httpx.Response:
        if self._response is None:
            self._response = self._open_response()
        return self._response

    def close(self) -> None:
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Iterator[str]:
        for delta in self.deltas():
            if delta.text:
                yield delta.text

    def deltas(self) -> Iterator[Delta]:
        if self._used:
            raise RuntimeError("a stream can be read only once")
        self._used = True
        response = self._open()
        try:
            for line in response.iter_lines():
                yield from self._state.line(line)
            yield from self._state.end()
        except httpx.TransportError as e:
            raise StreamInterrupted(f"the stream broke off: {type(e).__name__}: {e} (not "
                                    "retried: the turn may have run on the server)",
                                    code="timeout" if isinstance(e, httpx.TimeoutException)
                                    else "connection_error") from e
        finally:
            self.close()

    @property
    def text(self) -> str:
        return self._state.text(0)

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reasons.get(0)

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._state.usage

    @property
    def session(self) -> dict[str, Any] | None:
        return self._state.session

    def result(self) -> ChatResult | CompletionResult:
        """The typed answer, reading the rest of the stream first if needed."""
        if not self._used:
            for _ in self.deltas():
                pass
        return self._state.result()


class Client:
    """A synchronous client of one newllm server (see the module docstring).

    ``api_key`` is sent as ``Authorization: Bearer``; ``timeout``, ``max_retries``,
    ``backoff``, ``max_backoff`` and ``jitter`` are described in `clients._base`; ``sleep`` is
    what waits between retries (tests pass a fake); ``transport`` replaces httpx's (e.g.
    ``httpx.MockTransport``); ``model`` skips asking the server for its model name.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None,
                 transport: httpx.BaseTransport | None = None, *, model: str | None = None,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 jitter: float = 0.1, sleep: Callable[[float], None] = time.sleep,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = _base.normalize_url(base_url)
        self.retry = _base.RetryPolicy(max_retries, backoff, max_backoff, jitter)
        self._sleep = sleep
        self._model = model
        self._http = httpx.Client(
            base_url=self.base_url, timeout=_base.make_timeout(timeout), transport=transport,
            trust_env=_base.use_env_proxies(self.base_url),
            headers={**_base.auth_headers(api_key), **(headers or {})})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    # transport with retries ------------------------------------------------------------------
    def _call(self, method: str, path: str, *, what: str, stream: bool = False,
              consume: Callable[[httpx.Response], Any] | None = None,
              content: Callable[[], Any] | None = None, memory_upload: bool = False,
              retry: bool = True, **kwargs: Any) -> Any:
        """Send with retries; a response (open if ``stream``) or what ``consume`` returns."""
        attempt = 0
        keyed = "Idempotency-Key" in (kwargs.get("headers") or {})
        kwargs["headers"] = _base.session_headers(path, kwargs.get("headers"))
        while True:
            try:
                request = self._http.build_request(
                    method, path, content=content() if content else None, **kwargs)
                response = self._http.send(request, stream=stream or consume is not None)
                status = response.status_code
                if status >= 400 and retry and self.retry.should_retry(attempt, None, method,
                                                                       status, keyed):
                    wait = self.retry.delay(attempt, response.headers.get("retry-after"))
                    response.close()
                    self._sleep(wait)
                    attempt += 1
                    continue
                if status >= 400:
                    try:
                        body = response.read()
                    finally:
                        response.close()
                    raise error_from_response(status, body, memory_upload=memory_upload,
                                              what=what)
                if consume is None:
                    return response
                try:
                    return consume(response)
                finally:
                    response.close()
            except httpx.TransportError as e:
                if retry and self.retry.should_retry(attempt, e, method, idempotent=keyed):
                    self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise _base.transport_error(e, self.base_url, attempt + 1) from e

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        return _base.json_body(self._call(method, path, what=what, **kwargs), what)

    # models and generation -------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        body = self._json("GET", "/v1/models", "GET /v1/models")
        try:
            return [ModelCard.model_validate(m) for m in body["data"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"GET /v1/models answered an unexpected shape: {e}") from None

    def model_name(self) -> str:
        """The model to name in requests: ``model=`` or the server's first (asked once)."""
        if self._model is None:
            cards = self.models()
            if not cards:
                raise ProtocolError(f"{self.base_url} serves no model (GET /v1/models is empty)")
            self._model = cards[0].id
        return self._model

    def chat(self, messages: str | list[dict[str, Any]], session: str | None = None, *,
             reset_session: bool = False, session_input: str | None = None,
             model: str | None = None, **sampling: Any) -> ChatResult:
        """One chat turn; ``messages`` is a list of {role, content} or one user message."""
        body = _base.request_body(model or self.model_name(), session, reset_session,
                                  session_input, sampling, stream=False)
        body["messages"] = _base.messages_list(messages)
        answer = self._json("POST", "/v1/chat/completions", "the chat request", json=body,
                                headers=_base.turn_headers(session))
        return _base.parse_result(ChatResult, answer, "the chat request")

    def complete(self, prompt: str | list[int], session: str | None = None, *,
                 echo: bool = False, logprobs: int | None = None, reset_session: bool = False,
                 session_input: str | None = None, model: str | None = None,
                 **sampling: Any) -> CompletionResult:
        """One text completion (``echo`` repeats the prompt; ``logprobs`` top alternatives)."""
        body = _base.request_body(model or self.model_name(), session, reset_session,
                                  session_input, sampling, stream=False)
        body.update(prompt=prompt, echo=echo or None, logprobs=logprobs)
        body = {k: v for k, v in body.items() if v is not None}
        answer = self._json("POST", "/v1/completions", "the completion request", json=body,
                                headers=_base.turn_headers(session))
        return _base.parse_result(CompletionResult, answer, "the completion request")

    def stream_chat(self, messages: str | list[dict[str, Any]], session: str | None = None, *,
                    reset_session: bool = False, session_input: str | None = None,
                    model: str | None = None, **sampling: Any) -> Stream:
        """Like `chat`, streamed: iterate the returned `Stream` for text pieces (it opens the
        request on first use; a 4xx raises then)."""
        def open_response() -> httpx.Response:
            body = _base.request_body(model or self.model_name(), session, reset_session,
                                      session_input, sampling, stream=True)
            body["messages"] = _base.messages_list(messages)
            return self._call("POST", "/v1/chat/completions", stream=True,
                              what="the chat request", json=body,
                                headers=_base.turn_headers(session))
        return Stream(open_response, chat=True)

    def stream_complete(self, prompt: str | list[int], session: str | None = None, *,
                        echo: bool = False, logprobs: int | None = None,
                        reset_session: bool = False, session_input: str | None = None,
                        model: str | None = None, **sampling: Any) -> Stream:
        """Like `complete`, streamed: iterate the returned `Stream` for text pieces."""
        def open_response() -> httpx.Response:
            body = _base.request_body(model or self.model_name(), session, reset_session,
                                      session_input, sampling, stream=True)
            body.update(prompt=prompt, echo=echo or None, logprobs=logprobs)
            body = {k: v for k, v in body.items() if v is not None}
            return self._call("POST", "/v1/completions", stream=True,
                              what="the completion request", json=body,
                                headers=_base.turn_headers(session))
        return Stream(open_response, chat=False)

    # sessions and memory ---------------------------------------------------------------------
    def sessions(self) -> list[SessionInfo]:
        body = self._json("GET", "/v1/sessions", "GET /v1/sessions")
        try:
            return [SessionInfo.model_validate(s) for s in body["data"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"GET /v1/sessions answered an unexpected shape: {e}") from None

    def _download(self, session: str, progress: Progress | None) -> tuple[bytes, httpx.Headers]:
        def consume(response: httpx.Response) -> tuple[bytes, httpx.Headers]:
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            parts, done = [], 0
            for chunk in response.iter_bytes(_base.CHUNK_BYTES):
                parts.append(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            data = b"".join(parts)
            if total is not None and len(data) != total:
                raise IntegrityError(f"the download has {len(data)} bytes, not the {total} "
                                     "the server announced")
            return data, response.headers

        return self._call("GET", session_path(session, "/memory"), consume=consume,
                          what=f"the export of session {session!r}")

    def export_memory(self, session: str, path: str | os.PathLike | None = None, *,
                      progress: Progress | None = None, verify: bool = True) -> bytes | Path:
        """The session's memory file: bytes, or written atomically to ``path`` (returned).

        ``verify`` checks the tensors against the payload SHA-256 the server sent.
        """
        data, headers = self._download(session, progress)
        if verify:
            memory.verify(data, headers.get(memory.PAYLOAD_HEADER))
        if path is None:
            return data
        write_file_atomic(Path(path), data)
        return Path(path)

    def store_id(self) -> str | None:
        """The server's session-store id (``X-Newllm-Store-Id``; None from older servers):
        equal for servers that share one session folder."""
        def consume(response: httpx.Response) -> str | None:
            return response.headers.get(memory.STORE_HEADER)

        return self._call("GET", "/health", consume=consume, what="GET /health")

    def memory_headers(self, session: str) -> dict[str, str] | None:
        """The export route's ``X-Newllm-*`` headers without the file; None if no session."""
        def consume(response: httpx.Response) -> dict[str, str]:
            return {k: v for k, v in response.headers.items() if k.startswith("x-newllm-")}

        try:
            return self._call("GET", session_path(session, "/memory"), consume=consume,
                              what=f"the export of session {session!r}")
        except NotFound:
            return None

    def import_memory(self, session: str,
                      path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike, *,
                      progress: Progress | None = None) -> ImportResult:
        """Upload a memory file as ``session`` (created or replaced); the server validates it
        and raises `MemoryRefused` with its reason if the file does not fit its model."""
        data = read_source(path_or_bytes)

        def content() -> Any:
            if progress is None:
                return data

            def pieces() -> Iterator[bytes]:
                for start in range(0, len(data), _base.CHUNK_BYTES):
                    piece = data[start:start + _base.CHUNK_BYTES]
                    yield piece
                    progress(start + len(piece), len(data))
            return pieces()

        answer = self._json("PUT", session_path(session, "/memory"),
                            f"the import of session {session!r}", content=content,
                            memory_upload=True,
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(len(data))})
        try:
            return ImportResult.model_validate(answer)
        except ValueError as e:
            raise ProtocolError(f"the import answered an unexpected shape: {e}") from None

    def delete_session(self, session: str, *, missing_ok: bool = False) -> bool:
        """Forget a session; False (with ``missing_ok``) or `NotFound` if there was none."""
        try:
            self._call("DELETE", session_path(session), what=f"deleting session {session!r}")
        except NotFound:
            if missing_ok:
                return False
            raise
        return True

    def move_session(self, session: str, target: Client, new_id: str | None = None, *,
                     keep_source: bool = False, overwrite: bool = False,
                     progress: StagedProgress | None = None) -> MoveResult:
        """Move a session's memory to ``target`` (see `move_session`)."""
        new_id = new_id or session
        if target.base_url == self.base_url and new_id == session:
            raise ValueError("source and target are the same session; pass new_id to copy it")
        download = progress and partial(progress, "download")
        data, headers = self._download(session, download)
        if (new_id == session and headers.get(memory.STORE_HEADER)
                and memory.same_store(headers, target.store_id())):
            raise Conflict(f"{self.base_url} and {target.base_url} share one session store: "
                           f"session {session!r} is already there, and moving it onto itself "
                           "would delete it; nothing was changed (pass new_id to copy it)",
                           code="same_store")
        info = memory.verify(data, headers.get(memory.PAYLOAD_HEADER))
        payload = str(info.payload_sha256)
        if not overwrite and target.memory_headers(new_id) is not None:
            raise Conflict(f"{target.base_url} already has a session {new_id!r}; pass "
                           "overwrite=True to replace it", code="session_exists")
        upload = progress and partial(progress, "upload")
        result = target.import_memory(new_id, data, progress=upload)
        landed = target.memory_headers(new_id) or {}
        # what the target stores: the file as sent, or its conversion to the target's
        # precision (then the target says it received the file as sent)
        stored = payload if not result.converted else result.payload_sha256
        if (landed.get(memory.PAYLOAD_HEADER.lower()) != stored
                or (result.converted and result.received_payload_sha256 != payload)
                or result.tokens_seen != info.tokens_seen):
            if result.created:
                target.delete_session(new_id, missing_ok=True)
            raise IntegrityError(f"session {new_id!r} on {target.base_url} does not match the "
                                 f"exported memory; the source {session!r} was kept")
        deleted = False
        if not keep_source:
            now = self.memory_headers(session)
            if now is not None and now.get(memory.PAYLOAD_HEADER.lower()) != payload:
                raise Conflict(f"session {session!r} changed on {self.base_url} during the move; "
                               f"it was kept, and {target.base_url} holds the state from before "
                               "the change", code="session_changed")
            deleted = self.delete_session(session, missing_ok=True)
        return MoveResult(session=session, new_id=new_id, source=self.base_url,
                          target=target.base_url, bytes=len(data),
                          tokens_seen=info.tokens_seen or 0, payload_sha256=payload,
                          created=result.created, source_deleted=deleted,
                          converted=result.converted)

    # operations ------------------------------------------------------------------------------
    def health(self) -> bool:
        """True once the server is ready; False while it starts (one attempt, no retries).
        Raises `ServerUnavailable` when nothing answers."""
        try:
            self._call("GET", "/health", what="GET /health", retry=False)
        except NewllmError as e:
            if getattr(e, "status", None) == 503:
                return False
            raise
        return True

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Poll `health` until it is True; `ServerUnavailable`/`TimeoutError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health():
                    return
                error: Exception | None = None
            except NewllmError as e:
                error = e
            if time.monotonic() >= deadline:
                raise error or TimeoutError(f"{self.base_url} was not ready in {timeout} s")
            time.sleep(interval)

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        return self._call("GET", "/metrics", what="GET /metrics").text


def move_session(session: str, source: Client | str, target: Client | str,
                 new_id: str | None = None, *, keep_source: bool = False,
                 overwrite: bool = False, api_key: str | None = None,
                 progress: StagedProgress | None = None) -> MoveResult:
    """Move ``session`` from ``source`` to ``target`` (clients or URLs), as ``new_id``.

    Export from the source, check the bytes against the payload SHA-256 (export header and the
    file's own metadata, recomputed over the tensors), refuse to replace an existing target
    session unless ``overwrite``, upload, check that the target now holds the same payload and
    token count, and only then delete the source (unless ``keep_source``; not if the source
    changed meanwhile: `Conflict`). Any failure before that leaves the source as it was.
    ``progress(stage, done, total)`` is called with stage ``"download"``, then ``"upload"``;
    ``api_key`` is used for the servers given as URLs.
    """
    src = Client(source, api_key) if isinstance(source, str) else source
    dst = Client(target, api_key) if isinstance(target, str) else target
    try:
        return src.move_session(session, dst, new_id, keep_source=keep_source,
                                overwrite=overwrite, progress=progress)
    finally:
        for made, given in ((src, source), (dst, target)):
            if isinstance(given, str):
                made.close()
