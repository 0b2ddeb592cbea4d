"""Typed exceptions of the client, and the mapping from HTTP error responses to them.

The server answers every error with OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``; each exception keeps those fields, so a
caller can branch on the class and show ``str(error)`` (the server's own message) to a person.

    NewllmError                     anything this package raises on purpose
    ├── APIError                    the server answered with an error (status, code, message)
    │   ├── BadRequest              400, 422: the request is wrong; fix it, do not retry
    │   │   ├── MemoryRefused       a memory file was refused on upload (400/413 of PUT .../memory)
    │   │   └── PayloadTooLarge     413: body over --max-request-bytes (memory: --max-memory-bytes)
    │   ├── AuthError               401, 403: missing or wrong API key
    │   ├── NotFound                404: no such session, model or route
    │   ├── Conflict                409: the session is busy or its history differs
    │   ├── RateLimited             429
    │   ├── ServerError             500 and other 5xx but 503
    │   ├── ServerUnavailable       503, or no answer at all (connection failed) after retries
    │   │   └── RequestTimeout      a connect, read or write timeout
    │   ├── StreamError             an ``error`` event in the middle of a stream
    │   └── StreamInterrupted       the stream broke off before it finished
    ├── IntegrityError              a transferred memory file failed its checksum (client side)
    └── ProtocolError               the server's answer is not what the API defines
"""

from __future__ import annotations

import json
from typing import Any


class NewllmError(Exception):
    """Base class of every error this package raises on purpose."""


class APIError(NewllmError):
    """The server answered with an error (or could not be reached: ``status`` is None)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 type: str | None = None, param: str | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code
        self.type, self.param, self.body = type, param, body

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
                f"message={self.message!r})")


class BadRequest(APIError):
    """400 or 422: the request is malformed or out of range (``param`` names the field)."""


class MemoryRefused(BadRequest):
    """The server refused an uploaded memory file (wrong model, corrupt, truncated, too large)."""


class PayloadTooLarge(BadRequest):
    """413: the request body is larger than the server accepts."""


class AuthError(APIError):
    """401 or 403: pass the server's API key (``api_key=`` / ``--api-key`` / NEWLLM_API_KEY)."""


class NotFound(APIError):
    """404: no such session, model or route."""


class Conflict(APIError):
    """409: the session is busy, or the request's history differs from the session's memory."""


class RateLimited(APIError):
    """429: too many requests."""


class ServerError(APIError):
    """A 5xx other than 503: the server failed on this request."""


class ServerUnavailable(APIError):
    """503, or the server could not be reached, after the client's retries ran out."""


class RequestTimeout(ServerUnavailable):
    """Connecting, sending or waiting for the answer took longer than the client's timeout."""


class StreamError(APIError):
    """The server sent an error event after a stream had started (``status`` is None)."""


class StreamInterrupted(APIError):
    """The connection broke during a stream; never retried (the turn may have completed)."""


class IntegrityError(NewllmError):
    """A memory file's bytes do not match its checksums; nothing was installed."""


class ProtocolError(NewllmError):
    """The server answered something the API does not define (e.g. a body that is not JSON)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest, 401: AuthError, 403: AuthError, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 422: BadRequest, 429: RateLimited, 503: ServerUnavailable,
}


def error_class(status: int, *, memory_upload: bool = False) -> type[APIError]:
    """The exception class for an HTTP error status (``memory_upload``: a PUT of a memory file)."""
    if memory_upload and status in (400, 413, 422):
        return MemoryRefused
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return APIError


def parse_error_body(content: bytes) -> tuple[str | None, dict[str, Any]]:
    """(message, fields) from an error body: OpenAI's shape, FastAPI's ``detail``, or text."""
    try:
        body = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        text = content.decode("utf-8", "replace").strip()
        return (text[:500] or None), {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = err.get("message")
        return (str(message) if message else None), {
            "code": err.get("code"), "type": err.get("type"), "param": err.get("param"),
            "body": body}
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), {"body": body}
    return None, {"body": body}


def error_from_response(status: int, content: bytes, *, memory_upload: bool = False,
                        what: str = "request") -> APIError:
    """The typed exception for an HTTP error response, carrying the server's message and code."""
    message, fields = parse_error_body(content)
    if not message:
        message = f"the server answered HTTP {status} to the {what} with no error message"
    return error_class(status, memory_upload=memory_upload)(message, status=status, **fields)


def stream_error(payload: dict[str, Any]) -> StreamError:
    """The exception for a mid-stream ``{"error": {...}}`` event."""
    err = payload.get("error")
    err = err if isinstance(err, dict) else {"message": str(err)}
    message = str(err.get("message") or "the server reported an error during the stream")
    return StreamError(message, code=err.get("code"), type=err.get("type"),
                       param=err.get("param"), body=payload)
