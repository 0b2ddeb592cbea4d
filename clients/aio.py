"""The asynchronous client: `AsyncClient`, the asyncio twin of `clients.client.Client`.

    async with AsyncClient("http://127.0.0.1:8000") as c:
        reply = await c.chat("Hello", session="s1", temperature=0)
        async for piece in c.stream_chat("Go on", session="s1"):
            print(piece, end="")

Same methods, arguments, results, retries and errors as `Client` (see its docstring), each a
coroutine; `stream_chat`/`stream_complete` return an `AsyncStream` at once (not awaited) that
opens on first use. `async_move_session` is `move_session` for async clients.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from clients import _base, memory
from clients.client import Progress, StagedProgress, read_source, session_path, write_file_atomic
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


class AsyncStream:
    """A streamed answer: ``async for`` text pieces (or `deltas`); see `clients.client.Stream`.

    To stop reading early, use ``async with`` (or call `aclose`) so the connection is closed
    at once rather than when the stream is garbage-collected.
    """

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]],
                 chat: bool) -> None:
        self._open_response = open_response
        self._response: httpx.Response | None = None
        self._state = _base.StreamState(chat)
        self._used = False

    async def __aenter__(self) -> AsyncStream:
        await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _open(self) -> httpx.Response:
        if self._response is None:
            self._response = await self._open_response()
        return self._response

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for delta in self.deltas():
            if delta.text:
                yield delta.text

    async def deltas(self) -> AsyncIterator[Delta]:
        if self._used:
            raise RuntimeError("a stream can be read only once")
        self._used = True
        response = await self._open()
        try:
            async for line in response.aiter_lines():
                for delta in self._state.line(line):
                    yield delta
            for delta in self._state.end():
                yield delta
        except httpx.TransportError as e:
            raise StreamInterrupted(f"the stream broke off: {type(e).__name__}: {e} (not "
                                    "retried: the turn may have run on the server)",
                                    code="timeout" if isinstance(e, httpx.TimeoutException)
                                    else "connection_error") from e
        finally:
            await self.aclose()

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

    async def result(self) -> ChatResult | CompletionResult:
        if not self._used:
            async for _ in self.deltas():
                pass
        return self._state.result()


class AsyncClient:
    """An asyncio client of one newllm server (see the module docstring)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, *,
                 model: str | None = None, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 8.0, jitter: float = 0.1,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = _base.normalize_url(base_url)
        self.retry = _base.RetryPolicy(max_retries, backoff, max_backoff, jitter)
        self._sleep = sleep
        self._model = model
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=_base.make_timeout(timeout), transport=transport,
            trust_env=_base.use_env_proxies(self.base_url),
            headers={**_base.auth_headers(api_key), **(headers or {})})

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.base_url!r})"

    # transport with retries ------------------------------------------------------------------
    async def _call(self, method: str, path: str, *, what: str, stream: bool = False,
                    consume: Callable[[httpx.Response], Awaitable[Any]] | None = None,
                    content: Callable[[], Any] | None = None, memory_upload: bool = False,
                    retry: bool = True, **kwargs: Any) -> Any:
        """Send with retries (see `clients._base`); as `Client._call`."""
        attempt = 0
        keyed = "Idempotency-Key" in (kwargs.get("headers") or {})
        kwargs["headers"] = _base.session_headers(path, kwargs.get("headers"))
        while True:
            try:
                request = self._http.build_request(
                    method, path, content=content() if content else None, **kwargs)
                response = await self._http.send(request, stream=stream or consume is not None)
                status = response.status_code
                if status >= 400 and retry and self.retry.should_retry(attempt, None, method,
                                                                       status, keyed):
                    wait = self.retry.delay(attempt, response.headers.get("retry-after"))
                    await response.aclose()
                    await self._sleep(wait)
                    attempt += 1
                    continue
                if status >= 400:
                    try:
                        body = await response.aread()
                    finally:
                        await response.aclose()
                    raise error_from_response(status, body, memory_upload=memory_upload,
                                              what=what)
                if consume is None:
                    return response
                try:
                    return await consume(response)
                finally:
                    await response.aclose()
            except httpx.TransportError as e:
                if retry and self.retry.should_retry(attempt, e, method, idempotent=keyed):
                    await self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise _base.transport_error(e, self.base_url, attempt + 1) from e

    async def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        return _base.json_body(await self._call(method, path, what=what, **kwargs), what)

    # models and generation -------------------------------------------------------------------
    async def models(self) -> list[ModelCard]:
        body = await self._json("GET", "/v1/models", "GET /v1/models")
        try:
            return [ModelCard.model_validate(m) for m in body["data"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"GET /v1/models answered an unexpected shape: {e}") from None

    async def model_name(self) -> str:
        if self._model is None:
            cards = await self.models()
            if not cards:
                raise ProtocolError(f"{self.base_url} serves no model (GET /v1/models is empty)")
            self._model = cards[0].id
        return self._model

    async def chat(self, messages: str | list[dict[str, Any]], session: str | None = None, *,
                   reset_session: bool = False, session_input: str | None = None,
                   model: str | None = None, **sampling: Any) -> ChatResult:
        body = _base.request_body(model or await self.model_name(), session, reset_session,
                                  session_input, sampling, stream=False)
        body["messages"] = _base.messages_list(messages)
        answer = await self._json("POST", "/v1/chat/completions", "the chat request", json=body,
                                headers=_base.turn_headers(session))
        return _base.parse_result(ChatResult, answer, "the chat request")

    async def complete(self, prompt: str | list[int], session: str | None = None, *,
                       echo: bool = False, logprobs: int | None = None,
                       reset_session: bool = False, session_input: str | None = None,
                       model: str | None = None, **sampling: Any) -> CompletionResult:
        body = _base.request_body(model or await self.model_name(), session, reset_session,
                                  session_input, sampling, stream=False)
        body.update(prompt=prompt, echo=echo or None, logprobs=logprobs)
        body = {k: v for k, v in body.items() if v is not None}
        answer = await self._json("POST", "/v1/completions", "the completion request",
                                  json=body, headers=_base.turn_headers(session))
        return _base.parse_result(CompletionResult, answer, "the completion request")

    def stream_chat(self, messages: str | list[dict[str, Any]], session: str | None = None, *,
                    reset_session: bool = False, session_input: str | None = None,
                    model: str | None = None, **sampling: Any) -> AsyncStream:
        async def open_response() -> httpx.Response:
            body = _base.request_body(model or await self.model_name(), session,
                                      reset_session, session_input, sampling, stream=True)
            body["messages"] = _base.messages_list(messages)
            return await self._call("POST", "/v1/chat/completions", stream=True,
                                    what="the chat request", json=body,
                                headers=_base.turn_headers(session))
        return AsyncStream(open_response, chat=True)

    def stream_complete(self, prompt: str | list[int], session: str | None = None, *,
                        echo: bool = False, logprobs: int | None = None,
                        reset_session: bool = False, session_input: str | None = None,
                        model: str | None = None, **sampling: Any) -> AsyncStream:
        async def open_response() -> httpx.Response:
            body = _base.request_body(model or await self.model_name(), session,
                                      reset_session, session_input, sampling, stream=True)
            body.update(prompt=prompt, echo=echo or None, logprobs=logprobs)
            body = {k: v for k, v in body.items() if v is not None}
            return await self._call("POST", "/v1/completions", stream=True,
                                    what="the completion request", json=body,
                                headers=_base.turn_headers(session))
        return AsyncStream(open_response, chat=False)

    # sessions and memory ---------------------------------------------------------------------
    async def sessions(self) -> list[SessionInfo]:
        body = await self._json("GET", "/v1/sessions", "GET /v1/sessions")
        try:
            return [SessionInfo.model_validate(s) for s in body["data"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"GET /v1/sessions answered an unexpected shape: {e}") from None

    async def _download(self, session: str,
                        progress: Progress | None) -> tuple[bytes, httpx.Headers]:
        async def consume(response: httpx.Response) -> tuple[bytes, httpx.Headers]:
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            parts, done = [], 0
            async for chunk in response.aiter_bytes(_base.CHUNK_BYTES):
                parts.append(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            data = b"".join(parts)
            if total is not None and len(data) != total:
                raise IntegrityError(f"the download has {len(data)} bytes, not the {total} "
                                     "the server announced")
            return data, response.headers

        return await self._call("GET", session_path(session, "/memory"), consume=consume,
                                what=f"the export of session {session!r}")

    async def export_memory(self, session: str, path: str | os.PathLike | None = None, *,
                            progress: Progress | None = None,
                            verify: bool = True) -> bytes | Path:
        data, headers = await self._download(session, progress)
        if verify:
            memory.verify(data, headers.get(memory.PAYLOAD_HEADER))
        if path is None:
            return data
        await asyncio.to_thread(write_file_atomic, Path(path), data)
        return Path(path)

    async def store_id(self) -> str | None:
        """As `clients.client.Client.store_id`."""
        async def consume(response: httpx.Response) -> str | None:
            return response.headers.get(memory.STORE_HEADER)

        return await self._call("GET", "/health", consume=consume, what="GET /health")

    async def memory_headers(self, session: str) -> dict[str, str] | None:
        async def consume(response: httpx.Response) -> dict[str, str]:
            return {k: v for k, v in response.headers.items() if k.startswith("x-newllm-")}

        try:
            return await self._call("GET", session_path(session, "/memory"), consume=consume,
                                    what=f"the export of session {session!r}")
        except NotFound:
            return None

    async def import_memory(self, session: str,
                            path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike,
                            *, progress: Progress | None = None) -> ImportResult:
        data = read_source(path_or_bytes)

        def content() -> Any:
            if progress is None:
                return data

            async def pieces() -> AsyncIterator[bytes]:
                for start in range(0, len(data), _base.CHUNK_BYTES):
                    piece = data[start:start + _base.CHUNK_BYTES]
                    yield piece
                    progress(start + len(piece), len(data))
            return pieces()

        answer = await self._json("PUT", session_path(session, "/memory"),
                                  f"the import of session {session!r}", content=content,
                                  memory_upload=True,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(len(data))})
        try:
            return ImportResult.model_validate(answer)
        except ValueError as e:
            raise ProtocolError(f"the import answered an unexpected shape: {e}") from None

    async def delete_session(self, session: str, *, missing_ok: bool = False) -> bool:
        try:
            await self._call("DELETE", session_path(session),
                             what=f"deleting session {session!r}")
        except NotFound:
            if missing_ok:
                return False
            raise
        return True

    async def move_session(self, session: str, target: AsyncClient, new_id: str | None = None,
                           *, keep_source: bool = False, overwrite: bool = False,
                           progress: StagedProgress | None = None) -> MoveResult:
        """As `clients.client.move_session`."""
        new_id = new_id or session
        if target.base_url == self.base_url and new_id == session:
            raise ValueError("source and target are the same session; pass new_id to copy it")
        download = progress and partial(progress, "download")
        data, headers = await self._download(session, download)
        if (new_id == session and headers.get(memory.STORE_HEADER)
                and memory.same_store(headers, await target.store_id())):
            raise Conflict(f"{self.base_url} and {target.base_url} share one session store: "
                           f"session {session!r} is already there, and moving it onto itself "
                           "would delete it; nothing was changed (pass new_id to copy it)",
                           code="same_store")
        info = memory.verify(data, headers.get(memory.PAYLOAD_HEADER))
        payload = str(info.payload_sha256)
        if not overwrite and await target.memory_headers(new_id) is not None:
            raise Conflict(f"{target.base_url} already has a session {new_id!r}; pass "
                           "overwrite=True to replace it", code="session_exists")
        upload = progress and partial(progress, "upload")
        result = await target.import_memory(new_id, data, progress=upload)
        landed = await target.memory_headers(new_id) or {}
        stored = payload if not result.converted else result.payload_sha256  # see Client
        if (landed.get(memory.PAYLOAD_HEADER.lower()) != stored
                or (result.converted and result.received_payload_sha256 != payload)
                or result.tokens_seen != info.tokens_seen):
            if result.created:
                await target.delete_session(new_id, missing_ok=True)
            raise IntegrityError(f"session {new_id!r} on {target.base_url} does not match the "
                                 f"exported memory; the source {session!r} was kept")
        deleted = False
        if not keep_source:
            now = await self.memory_headers(session)
            if now is not None and now.get(memory.PAYLOAD_HEADER.lower()) != payload:
                raise Conflict(f"session {session!r} changed on {self.base_url} during the move; "
                               f"it was kept, and {target.base_url} holds the state from before "
                               "the change", code="session_changed")
            deleted = await self.delete_session(session, missing_ok=True)
        return MoveResult(session=session, new_id=new_id, source=self.base_url,
                          target=target.base_url, bytes=len(data),
                          tokens_seen=info.tokens_seen or 0, payload_sha256=payload,
                          created=result.created, source_deleted=deleted,
                          converted=result.converted)

    # operations ------------------------------------------------------------------------------
    async def health(self) -> bool:
        try:
            await self._call("GET", "/health", what="GET /health", retry=False)
        except NewllmError as e:
            if getattr(e, "status", None) == 503:
                return False
            raise
        return True

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health():
                    return
                error: Exception | None = None
            except NewllmError as e:
                error = e
            if time.monotonic() >= deadline:
                raise error or TimeoutError(f"{self.base_url} was not ready in {timeout} s")
            await asyncio.sleep(interval)

    async def metrics(self) -> str:
        return (await self._call("GET", "/metrics", what="GET /metrics")).text


async def async_move_session(session: str, source: AsyncClient | str,
                             target: AsyncClient | str, new_id: str | None = None, *,
                             keep_source: bool = False, overwrite: bool = False,
                             api_key: str | None = None,
                             progress: StagedProgress | None = None) -> MoveResult:
    """`clients.client.move_session` for async clients (or URLs)."""
    src = AsyncClient(source, api_key) if isinstance(source, str) else source
    dst = AsyncClient(target, api_key) if isinstance(target, str) else target
    try:
        return await src.move_session(session, dst, new_id, keep_source=keep_source,
                                      overwrite=overwrite, progress=progress)
    finally:
        for made, given in ((src, source), (dst, target)):
            if isinstance(given, str):
                await made.aclose()
