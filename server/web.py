"""The chat page at ``/``: its routes, its security headers, and opt-in CORS for moves.

The page is plain HTML, CSS and JavaScript in ``server/static/`` (no build step, no library,
nothing fetched from anywhere but this server). It is one more client of the public HTTP API
(`server.app`'s routes, the same API key): sessions from ``GET /v1/sessions``, turns streamed
from ``POST /v1/chat/completions``, the memory file from ``/v1/sessions/{id}/memory``, figures
from ``GET /v1/models/{id}`` (``kv_cache_bytes_per_token``) and ``GET /metrics``.

- `install` replaces LitServe's ``GET /`` ("litserve running") with the page and serves the
  files of ``static/`` at ``/static/{name}`` (only the files there: anything else is a JSON
  404). `server.http.Guard` lets exactly these through without the API key (`is_public`); the
  page asks for the key itself when a call gets 401.
- Every page and file response carries `CSP`: scripts and styles from this server only (no
  inline script or style), no plugins, no framing, forms post nowhere. ``connect-src`` is
  ``'self' http: https:``: moving a session sends it to a server URL the user types in, which
  no list written at start-up can know; what guards that call is the target's own opt-in
  (`Cors`) and its API key. Model output is untrusted text: the page only ever sets
  ``textContent`` with it.
- `Cors` (``--cors-origin``, off by default): answers preflight requests from the listed
  origins and adds ``Access-Control-Allow-Origin`` (and the ``X-Newllm-*`` headers the move
  checks) to their responses, 401s included, so another server's page can move a session
  here. Requests from other origins pass through untouched (the browser then refuses them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import Response

from server.protocol import ApiError

log = logging.getLogger("newllm.server")
STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}


def is_public(path: str) -> bool:
    """Paths served without the API key: the page and its static files (nothing else)."""
    return path == "/" or path.startswith("/static/")


def load_static(folder: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every servable file in ``folder`` (read once)."""
    if not folder.is_dir():
        return {}
    return {path.name: (path.read_bytes(), TYPES[path.suffix])
            for path in sorted(folder.iterdir()) if path.is_file() and path.suffix in TYPES}


def install(app: Any, folder: Path = STATIC) -> None:
    """Serve the page at ``/`` (replacing LitServe's own ``/``) and ``/static/{name}``.

    Without the files (a package installed without its package data) the API still serves,
    and ``/`` answers 404 saying what is missing."""
    files = load_static(folder)
    if "index.html" not in files:
        log.warning("the chat page is not installed (no index.html in %s); GET / answers 404",
                    folder)

    def respond(name: str) -> Response:
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    async def page() -> Response:
        if "index.html" not in files:
            raise ApiError(404, f"the chat page is not installed: no index.html in {folder} "
                           "(install the package with its data files, server/static/*)",
                           code="not_found")
        return respond("index.html")

    async def static(name: str) -> Response:
        if name not in files:
            raise ApiError(404, f"no static file {name[:80]!r}", code="not_found", param="name")
        return respond(name)

    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    app.add_api_route("/", page, methods=["GET"])
    app.add_api_route("/static/{name}", static, methods=["GET"])


CORS_METHODS = b"GET, HEAD, POST, PUT, DELETE"
CORS_HEADERS = b"Authorization, Content-Type, Idempotency-Key, X-API-Key"
CORS_EXPOSED = (b"X-Newllm-Store-Id, X-Newllm-Session-Id, X-Newllm-Tokens-Seen, "
                b"X-Newllm-Payload-Sha256, X-Newllm-Model-Fingerprint, X-Newllm-Tokenizer-Hash, "
                b"X-Newllm-Format-Version, X-Newllm-Dtype, X-Newllm-Session-Kind, "
                b"X-Newllm-Session-Turns, Content-Disposition, Retry-After")


class Cors:
    """ASGI middleware, outside `server.http.Guard`: CORS for ``origins`` only (see above)."""

    def __init__(self, app: Any, origins: tuple[str, ...]) -> None:
        self.app, self.origins = app, origins

    def allows(self, origin: bytes) -> bool:
        return "*" in self.origins or origin.decode("latin-1").lower() in self.origins

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        origin = headers.get(b"origin")
        if origin is None or not self.allows(origin):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204, "headers": [
                (b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                (b"access-control-allow-methods", CORS_METHODS),
                (b"access-control-allow-headers", CORS_HEADERS),
                (b"access-control-max-age", b"600")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", []), (b"access-control-allow-origin", origin),
                    (b"vary", b"Origin"), (b"access-control-expose-headers", CORS_EXPOSED)]}
            await send(message)

        await self.app(scope, receive, send_cors)
