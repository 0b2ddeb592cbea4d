"""What the sync `Client` and the `AsyncClient` share: URLs, retry policy, request bodies,
answer parsing and the server-sent-events stream decoder. No I/O happens here.

Retry policy (`RetryPolicy`): a request is retried, with exponential backoff
``min(max_backoff, backoff * 2**attempt)`` (minus up to ``jitter`` of it at random; a
``Retry-After`` raises the wait, never above ``max_backoff``), at most ``max_retries`` times,
when the server answers 503 or 429 (too many uploads at once) or the connection failed before
the request was sent (connect errors and timeouts, pool timeouts). Failures after the request
was sent (read/write errors and timeouts, a dropped connection) are retried only for
idempotent requests: GET, PUT, DELETE, and chats and completions on a session, which carry an
``Idempotency-Key`` (`turn_headers`) that the server uses to apply a turn once however often it
arrives. A chat or completion without a session changes nothing on the server but is not
retried after it was sent. Any 4xx or other 5xx raises at once. A stream is retried only before
its first byte.

Timeouts: ``timeout=`` is seconds (read, write and pool; connecting takes at most 10 s of it)
or an ``httpx.Timeout``; the default waits 120 s for an answer and 10 s to connect. In a
stream the read timeout bounds the wait for each next piece, not the whole answer.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx

from clients.errors import (
    ProtocolError,
    RequestTimeout,
    ServerUnavailable,
    StreamInterrupted,
    stream_error,
)
from clients.types import ChatResult, CompletionResult, Delta

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # read timeout also bounds stream gaps
USER_AGENT = "newllm-client/0.1"
CHUNK_BYTES = 256 * 1024  # upload/download piece size (progress granularity)
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_BEFORE_SEND = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_AFTER_SEND = (httpx.ReadError, httpx.WriteError, httpx.ReadTimeout, httpx.WriteTimeout,
               httpx.RemoteProtocolError)


def normalize_url(url: str) -> str:
    """``http://host:port`` from what a user may paste (trailing ``/`` or ``/v1``)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"server URL {url!r} must start with http:// or https://, e.g. "
                         "http://127.0.0.1:8000")
    return url


def use_env_proxies(url: str) -> bool:
    """Honour HTTP(S)_PROXY / NO_PROXY / SSL_CERT_FILE, except for loopback servers."""
    host = httpx.URL(url).host
    return not (host in ("localhost", "::1") or host.startswith("127."))


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(float(timeout), connect=min(float(timeout), 10.0))


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@dataclass
class RetryPolicy:
    """Bounded exponential backoff (see the module docstring)."""

    max_retries: int = 3
    backoff: float = 0.5  # seconds before the first retry
    max_backoff: float = 8.0  # no wait is longer
    jitter: float = 0.1  # share of each wait removed at random (0 = deterministic)
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("max_retries, backoff and max_backoff must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        wait = min(self.max_backoff, self.backoff * (2 ** attempt))
        if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
            wait = max(wait, min(self.max_backoff, float(retry_after)))
        return wait * (1.0 - self.jitter * self.rng.random())

    def should_retry(self, attempt: int, error: Exception | None, method: str,
                     status: int | None = None, idempotent: bool = False) -> bool:
        """Whether a failed attempt (``attempt`` retries done so far) is worth another try;
        ``idempotent``: the request carries an Idempotency-Key (a retry cannot apply it twice)."""
        if attempt >= self.max_retries:
            return False
        if status is not None:  # busy (503) or too many at once (429): both say when to retry
            return status in (429, 503)
        if isinstance(error, _BEFORE_SEND):
            return True
        return isinstance(error, _AFTER_SEND) and (idempotent or method in IDEMPOTENT)


SESSION_HEADER = "X-Session-Id"


def turn_headers(session: str | None) -> dict[str, str]:
    """Headers of a chat or completion request: on a session, a fresh ``Idempotency-Key``,
    which every retry of the request repeats, so the server applies the turn once, and the
    session id (`SESSION_HEADER`)."""
    if session is None:
        return {}
    return {"Idempotency-Key": uuid.uuid4().hex, SESSION_HEADER: session}


def session_headers(path: str, headers: dict[str, str] | None) -> dict[str, str] | None:
    """``headers`` plus ``X-Session-Id`` for a request of one session (a turn, or a route under
    ``/v1/sessions/{id}``), so a load balancer in front of several replicas can keep a session's
    requests on one of them (its cache stays warm; correctness does not depend on it)."""
    prefix = "/v1/sessions/"
    if not path.startswith(prefix) or SESSION_HEADER in (headers or {}):
        return headers
    return {**(headers or {}), SESSION_HEADER: unquote(path[len(prefix):].split("/", 1)[0])}


def transport_error(error: httpx.TransportError, url: str, attempts: int) -> ServerUnavailable:
    """The typed exception for a connection failure that retries did not cure."""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    if isinstance(error, httpx.TimeoutException):
        return RequestTimeout(f"{url} did not answer in time{tries}: {type(error).__name__}; "
                              "raise the timeout or check the server", code="timeout")
    return ServerUnavailable(f"cannot reach {url}{tries}: {error or type(error).__name__}; is "
                             "the server running and the URL right?", code="connection_error")


# request bodies ------------------------------------------------------------------------------
def session_metadata(session: str | None, reset_session: bool, session_input: str | None,
                     metadata: dict[str, str] | None) -> dict[str, str] | None:
    meta = dict(metadata or {})
    if session is not None:
        meta["session_id"] = session
    if reset_session:
        meta["reset_session"] = "true"
    if session_input is not None:
        meta["session_input"] = session_input
    return meta or None


def messages_list(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': ..., 'content': ...}")
    return [dict(m) for m in messages]


def request_body(model: str, session: str | None, reset_session: bool,
                 session_input: str | None, sampling: dict[str, Any],
                 stream: bool) -> dict[str, Any]:
    body = {k: v for k, v in sampling.items() if v is not None}
    meta = session_metadata(session, reset_session, session_input, body.pop("metadata", None))
    body["model"] = model
    if meta:
        body["metadata"] = meta
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


# answers -------------------------------------------------------------------------------------
def json_body(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"the answer to {what} is not JSON (HTTP {response.status_code}, "
                            f"{response.headers.get('content-type', 'no content type')}): "
                            f"{response.text[:200]!r}") from None


def parse_result(cls: type[ChatResult] | type[CompletionResult], body: Any, what: str) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise ProtocolError(f"the answer to {what} has no 'choices' list: {str(body)[:200]}")
    try:
        return cls.model_validate({**body, "raw": body})
    except ValueError as e:
        raise ProtocolError(f"the answer to {what} does not have the expected shape: {e}") \
            from None


class SSEDecoder:
    """Server-sent events from lines: returns each event's data when its blank line arrives."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event/id/retry fields carry nothing the API uses

    def flush(self) -> str | None:
        """The pending event, if any (also at the end of the stream: LitServe may omit the
        blank line after an error event)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class StreamState:
    """Accumulates one stream's chunks: text per choice, finish reasons, usage, session."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.decoder = SSEDecoder()
        self.texts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.session: dict[str, Any] | None = None
        self.done = False

    def line(self, line: str) -> list[Delta]:
        data = self.decoder.feed(line)
        return self.event(data) if data is not None else []

    def end(self) -> list[Delta]:
        """At the end of the byte stream: flush, then insist that the stream finished."""
        data = self.decoder.flush()
        deltas = self.event(data) if data is not None else []
        if not self.done:
            raise StreamInterrupted("the stream ended before the server finished it (no "
                                    "[DONE]); the connection was cut")
        return deltas

    def event(self, data: str) -> list[Delta]:
        if self.done:
            return []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            payload = json.loads(data)
        except ValueError:
            raise ProtocolError(f"a stream event is not JSON: {data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise ProtocolError(f"a stream event is not a JSON object: {data[:200]!r}")
        if "error" in payload:
            raise stream_error(payload)
        for key in ("id", "model", "created", "system_fingerprint"):
            if key in payload:
                self.head[key] = payload[key]
        if payload.get("usage"):
            self.usage = payload["usage"]
        if payload.get("session"):
            self.session = payload["session"]
        deltas = []
        for choice in payload.get("choices") or []:
            index = int(choice.get("index", 0))
            if self.chat:
                text = (choice.get("delta") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            finish = choice.get("finish_reason")
            self.texts.setdefault(index, []).append(text)
            if finish is not None:
                self.finish_reasons[index] = finish
            if text or finish is not None or choice.get("logprobs"):
                deltas.append(Delta(index=index, text=text, finish_reason=finish,
                                    logprobs=choice.get("logprobs")))
        return deltas

    def text(self, index: int = 0) -> str:
        return "".join(self.texts.get(index, []))

    def result(self) -> ChatResult | CompletionResult:
        """The whole answer as a non-streaming call would have returned it (no logprobs)."""
        indices = sorted(set(self.texts) | set(self.finish_reasons))
        if self.chat:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": self.text(i)},
                 "finish_reason": self.finish_reasons.get(i)} for i in indices]
        else:
            choices = [{"index": i, "text": self.text(i),
                        "finish_reason": self.finish_reasons.get(i)} for i in indices]
        body = {**self.head, "choices": choices, "usage": self.usage, "session": self.session}
        return (ChatResult if self.chat else CompletionResult).model_validate(
            {**body, "raw": body})
