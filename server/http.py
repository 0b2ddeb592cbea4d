"""HTTP plumbing shared by every route: the `Guard` middleware and OpenAI-shaped errors.

`Guard` (pure ASGI, outermost but for `server.web.Cors` with ``--cors-origin``) checks the API
key (``Authorization: Bearer <key>`` or ``X-API-Key``) on every route except ``/health`` and
the chat page with its static files (`server.web.is_public`: ``/`` and ``/static/*``); the
OpenAPI document (``/openapi.json``, ``/docs``) needs the key like the API it describes. It refuses
bodies over the limit with 413 (from Content-Length, or while the body is read, so an
oversized body is never held whole), and
counts requests by route and status with their latency. The limit is ``--max-memory-bytes``
for memory uploads (``PUT /v1/sessions/{id}/memory``) and ``--max-request-bytes`` for every
other route. ``HEAD`` is answered as ``GET`` without a body (health checkers use it). JSON
bodies nested too deeply or holding lone surrogates get 400 (`read_json`; an integral number
such as ``3.0`` reads as the integer 3).
`install_error_handlers` turns every error, FastAPI's own 404/405 and the session store's
write failures (507/503, `server.store.StoreWriteError`) included, into
``{"error": {"message", "type", "param", "code"}}``; a 405 carries ``Allow`` with every method
of its path (`allowed_methods`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server import metrics
from server.protocol import ApiError
from server.store import StoreWriteError
from server.web import is_public

log = logging.getLogger("newllm.server")

EXEMPT = ("/health",)  # routes that need no API key


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_body")
    try:
        data = json.loads(body, parse_float=_number)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    where = _lone_surrogate(data)
    if where is not None:
        raise ApiError(400, f"{where} holds a lone surrogate (\\ud800-\\udfff without its pair); "
                       "that is not Unicode text: send valid UTF-16 pairs or the character "
                       "itself", code="invalid_text", param=where)
    return data


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an int when it is integral (``3.0``, ``1e2``),
    since JSON (and JSON Schema's ``integer``) makes no difference between 3 and 3.0, while the
    strict request models refuse a float where they take an int (they take ints for floats)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _lone_surrogate(data: Any) -> str | None:
    """The path (``messages.0.content``) of the first string that is not valid Unicode text
    (a lone UTF-16 surrogate, which JSON's \\u escapes can carry), or None. No recursion: the
    nesting is as deep as the parser allowed."""
    todo: list[tuple[str, Any]] = [("body", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where.removeprefix("body.")
        elif isinstance(value, dict):
            todo.extend((f"{where}.{k}", v) for k, v in value.items())
            todo.extend((f"{where}.<key>", k) for k in value)
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}", v) for i, v in enumerate(value))
    return None



_ROUTES = {"/", "/health", "/info", "/metrics", "/openapi.json", "/docs", "/v1/models",
           "/v1/sessions", "/v1/chat/completions", "/v1/completions"}


def route_label(path: str) -> str:
    """A bounded route name for metrics (ids never become label values)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions/{id}/memory" if path.endswith("/memory") else "/v1/sessions/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/static/"):
        return "/static/{name}"
    return "other"


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


class Guard:
    """ASGI middleware: API key, request body limit, request metrics (see module docstring)."""

    def __init__(self, app: Any, api_key: str | None, max_bytes: int,
                 max_memory_bytes: int | None = None, store_id: str | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        # every response names the session store (X-Newllm-Store-Id), so clients can tell two
        # servers that share one store apart from two that do not
        self.store_header = [(b"x-newllm-store-id", store_id.encode())] if store_id else []
        self.max_memory_bytes = max_memory_bytes if max_memory_bytes is not None else max_bytes
        self.api_key = api_key.encode() if api_key else None

    def limit(self, method: str, path: str) -> tuple[int, str]:
        """The body limit of a request and the flag that sets it."""
        if method == "PUT" and route_label(path) == "/v1/sessions/{id}/memory":
            return self.max_memory_bytes, "--max-memory-bytes"
        return self.max_bytes, "--max-request-bytes"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, t0, status = route_label(scope["path"]), time.monotonic(), [500]
        head = scope.get("method") == "HEAD"  # answered as GET without the body (RFC 9110)
        if head:
            scope = {**scope, "method": "GET"}

        async def send_counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.store_header:
                    message = {**message,
                               "headers": [*message.get("headers", []), *self.store_header]}
            elif message["type"] == "http.response.body":
                if not message.get("more_body"):
                    metrics.REQUESTS.labels(route, str(status[0])).inc()
                    metrics.LATENCY.labels(route).observe(time.monotonic() - t0)
                if head:
                    message = {**message, "body": b""}
            await send(message)

        headers = dict(scope["headers"])
        max_bytes, flag = self.limit(scope.get("method", ""), scope["path"])
        refusal = self._refuse(scope["path"], headers, max_bytes, flag)
        if refusal is not None:
            metrics.ERRORS.labels(refusal.code).inc()
            await _error_response(refusal)(scope, receive, send_counted)
            return
        seen = 0

        async def receive_limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise ApiError(413, f"the request body is over {max_bytes} bytes ({flag})",
                               code="request_too_large")
            return message

        await self.app(scope, receive_limited, send_counted)

    def _refuse(self, path: str, headers: dict[bytes, bytes], max_bytes: int,
                flag: str) -> ApiError | None:
        if self.api_key is not None and path not in EXEMPT and not is_public(path):
            auth = headers.get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token.strip(), self.api_key):
                return ApiError(401, "missing or invalid API key; send 'Authorization: Bearer "
                                "<key>'", code="invalid_api_key", type="authentication_error")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "invalid Content-Length", code="invalid_body")
            if int(length) > max_bytes:
                return ApiError(413, f"the request body is {int(length)} bytes, over the limit "
                                f"of {max_bytes} ({flag})", code="request_too_large")
        return None


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at the request's path (HEAD with GET).

    Starlette's own 405 names only the methods of the first route whose path matched, and a
    path declared once per method (``GET`` and ``PUT .../memory``) is several routes."""
    scope = {**request.scope, "method": "\x00"}  # no route answers it: paths match partially
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")  # the Guard answers HEAD as GET
    return sorted(methods)


def plain_text_health(app: Any) -> None:
    """LitServe's ``GET /health`` answers "ok" / "not ready" with no Content-Type: wrap it so
    the answer says ``text/plain`` (as the OpenAPI document does)."""
    for route in app.router.routes:
        if getattr(route, "path", None) == "/health" and "GET" in route.methods:
            original = route.endpoint
            break
    else:
        return

    async def health(request: Request) -> Response:
        answer = await original(request)
        return Response(answer.body, status_code=answer.status_code, media_type="text/plain")

    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    app.add_api_route("/health", health, methods=["GET"])


def install_error_handlers(app: Any) -> None:
    """Every error as OpenAI-shaped JSON, counted by code."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        metrics.ERRORS.labels(exc.code).inc()
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ApiError(exc.status_code, str(exc.detail), code=code)
        metrics.ERRORS.labels(code).inc()
        response = _error_response(error)
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    async def store_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreWriteError)
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        metrics.ERRORS.labels(exc.code).inc()
        return _error_response(ApiError(exc.status, str(exc), code=exc.code))

    async def validation_error(request: Request, exc: Exception) -> Response:
        metrics.ERRORS.labels("invalid_value").inc()
        return _error_response(ApiError(400, f"invalid request: {exc}", code="invalid_value"))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        metrics.ERRORS.labels("internal_error").inc()
        return _error_response(ApiError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StoreWriteError, store_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
