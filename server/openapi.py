"""The OpenAPI document at ``/openapi.json``: every route with its body, security and errors.

The handlers take a starlette ``Request`` and parse JSON themselves (`server.protocol.parse`,
strict pydantic models), so FastAPI sees no body and no error answers. `OPERATIONS` says, for
each route (method and path as the document spells them), what FastAPI cannot infer: the
request body (a pydantic model's JSON schema, or raw bytes), the success answers with their
content types (JSON, ``text/event-stream`` for streams, ``text/plain``,
``application/octet-stream``), the error statuses it can answer, each with the body
``{"error": {"message", "type", "param", "code"}}``, and the query parameters it reads.
`install` replaces ``app.openapi`` with `document`, which starts from FastAPI's own document
(paths, path parameters, operation ids) and fills in the rest.

Security: one scheme, HTTP Bearer (``Authorization: Bearer <key>``; ``X-API-Key`` is accepted
too), on every operation but ``GET /health`` and the chat page (``/``, ``/static/{name}``).
The document itself (``/openapi.json``, and FastAPI's ``/docs`` and ``/redoc``) needs the key
like the routes it describes (`server.http.Guard`): it names the served model in its request
examples, which only ``/v1/models`` tells, behind the key; and it is the same document for every
newllm server of a version, so there is nothing to discover without the key. Fetch it with the
key (``curl -H "Authorization: Bearer $KEY" .../openapi.json``, schemathesis ``-H``). The
Swagger UI at ``/docs`` cannot send the key while it loads, so it is useful on servers run
without one (it also loads its script from a CDN, jsDelivr).
A route the table does not know still appears (with the security scheme and a warning in the
log); ``tests/test_openapi.py`` fails on it. Not documented: 500 (a bug, never an answer by
design), 405 (any method a path does not list; the answer carries ``Allow``), and the Guard's
400 for a malformed Content-Length header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from newllm import __version__
from server import replies
from server.protocol import ChatRequest, CompletionRequest
from server.stateful import ConversationCreate, ConversationUpdate, ItemsCreate, ResponsesRequest
from server.store import SESSION_ID

log = logging.getLogger("newllm.server")

SECURITY = [{"bearer": []}]
JSON, SSE, TEXT, BYTES = ("application/json", "text/event-stream", "text/plain",
                          "application/octet-stream")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema with these required (and optional) properties; others allowed."""
    return {"type": "object", "required": list(required),
            "properties": {**required, **(optional or {})}}


STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
NULLABLE_STR = {"type": ["string", "null"]}
LIST_OF = {"type": "array"}

# response bodies (what the handlers build; loose where the shape is OpenAI's)
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj({"error": _obj({"message": STR, "type": STR, "param": NULLABLE_STR,
                                  "code": STR})}),
    "Model": _obj({"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR,
                   "fingerprint": STR, "parameters": INT,
                   "layers": {"type": "array", "items": STR}, "dtype": STR,
                   "kv_cache_bytes_per_token": INT}),
    "ModelList": _obj({"object": {"const": "list"},
                       "data": {"type": "array", "items": _ref("Model")}}),
    "Session": _obj({"id": STR, "object": {"const": "session"}, "tokens_seen": INT,
                     "bytes": INT, "last_used": NUM, "kind": STR, "turns": INT}),
    "SessionList": _obj({"object": {"const": "list"},
                         "data": {"type": "array", "items": _ref("Session")}}),
    "SessionImported": _obj({"id": STR, "object": {"const": "session"}, "created":
                             {"type": "boolean"}, "tokens_seen": INT, "bytes": INT,
                             "kind": STR, "turns": INT, "payload_sha256": STR,
                             "received_payload_sha256": STR,
                             "converted": {"type": ["object", "null"]}}),
    "Deleted": _obj({"id": STR, "object": STR, "deleted": {"const": True}}),
    "ChatCompletion": _obj({"id": STR, "object": {"const": "chat.completion"},
                            "created": INT, "model": STR, "choices": LIST_OF},
                           {"usage": {"type": ["object", "null"]}, "session": {"type": "object"}}),
    "Completion": _obj({"id": STR, "object": {"const": "text_completion"}, "created": INT,
                        "model": STR, "choices": LIST_OF},
                       {"usage": {"type": ["object", "null"]}, "session": {"type": "object"}}),
    "Response": _obj({"id": STR, "object": {"const": "response"}, "created_at": INT,
                      "model": STR, "status": STR, "output": LIST_OF}),
    "Conversation": _obj({"id": STR, "object": {"const": "conversation"}, "created_at": INT,
                          "metadata": {"type": "object"}}),
    "Item": _obj({"type": {"const": "message"}, "id": STR, "role": STR, "content": LIST_OF}),
    "ItemList": _obj({"object": {"const": "list"},
                      "data": {"type": "array", "items": _ref("Item")},
                      "first_id": NULLABLE_STR, "last_id": NULLABLE_STR,
                      "has_more": {"type": "boolean"}}),
    "Info": _obj({"model": {"type": ["object", "null"]}, "server": {"type": "object"}}),
}
REQUESTS: tuple[type[BaseModel], ...] = (ChatRequest, CompletionRequest, ResponsesRequest,
                                         ConversationCreate, ConversationUpdate, ItemsCreate)

ERROR_TEXT = {
    400: "invalid request: bad JSON, a wrong or unknown field, an invalid id or value",
    401: "missing or invalid API key",
    404: "no such model, session, response, conversation or item",
    409: "the session is busy, was deleted, or its history differs from the request's",
    413: "the request body is over the limit (--max-request-bytes, --max-memory-bytes)",
    422: "the session's memory cannot continue (non-finite values), or an Idempotency-Key "
         "was reused for another request",
    429: "too many memory uploads at once; retry after Retry-After seconds",
    503: "the session store is unavailable or full, or the worker serving the request died",
    507: "no space left to save the session",
}
READ = (401, 404, 503)  # a read of a stored thing
WRITE = (400, 401, 404, 409, 413, 503, 507)  # a change with a JSON body
TURN = (400, 401, 404, 409, 413, 422, 503, 507)  # generation


@dataclass(frozen=True)
class Op:
    """One operation: a summary, its body, success answers, error statuses and query."""

    summary: str
    ok: dict[int, dict[str, Any]]  # status -> {content type: media type object}
    errors: tuple[int, ...] = (401,)
    body: type[BaseModel] | str | None = None  # a model, BYTES, or None
    body_required: bool = True
    query: tuple[dict[str, Any], ...] = ()
    secure: bool = True
    headers: tuple[dict[str, Any], ...] = ()  # header parameters it reads


def _json(name: str) -> dict[str, Any]:
    return {JSON: {"schema": _ref(name)}}


IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "description": "applies a turn on a session once (server/replies.py)",
               "schema": {"type": "string", "pattern": f"^{replies.KEY.pattern}$"}}
PAGE = (
    {"name": "order", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["asc", "desc"]}},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "the id of the item after which the page starts"},
)


def _events(chunk: str) -> dict[str, Any]:
    """``text/event-stream`` whose events carry JSON ``data`` (in OpenAPI 3.1 the schema
    describes one event): ``chunk`` objects, an ``{"error": ...}`` object if the turn fails
    after it started, and ``[DONE]`` last (chat and completions)."""
    return {SSE: {"schema": {"type": "object", "required": ["data"], "properties": {
        "event": STR, "data": {"type": "string", "contentMediaType": JSON,
                               "description": f"a {chunk} as JSON, an error object, or [DONE]"}}}}}


PLAIN = {TEXT: {"schema": STR}}
CONV, RESP = "/v1/conversations/{conversation_id}", "/v1/responses/{response_id}"
SESSION = "/v1/sessions/{session_id}"

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/health"): Op("200 'ok' once every worker has loaded the model, else 503",
                           {200: PLAIN, 503: PLAIN}, errors=(), secure=False),
    ("GET", "/"): Op("the chat page (server/web.py); 404 when its files are not installed",
                     {200: {"text/html": {"schema": STR}}}, (404,), secure=False),
    ("GET", "/static/{name}"): Op(
        "a file of the chat page", {200: {t: {"schema": STR} for t in (
            "text/javascript", "text/css", "text/html", "image/svg+xml")}}, (404,),
        secure=False),
    ("GET", "/info"): Op("LitServe's server information", {200: _json("Info")}),
    ("GET", "/metrics"): Op("Prometheus text format, merged over processes",
                            {200: PLAIN}),
    ("POST", "/v1/chat/completions"): Op(
        "chat completion (a session's turn with metadata.session_id)",
        {200: {**_json("ChatCompletion"), **_events("chat.completion.chunk")}}, TURN,
        ChatRequest, headers=(IDEMPOTENCY,)),
    ("POST", "/v1/completions"): Op(
        "text completion, with echo and logprobs",
        {200: {**_json("Completion"), **_events("text_completion chunk")}}, TURN,
        CompletionRequest, headers=(IDEMPOTENCY,)),
    ("GET", "/v1/models"): Op("the served model", {200: _json("ModelList")}),
    ("GET", "/v1/models/{model_id}"): Op("the served model's card", {200: _json("Model")},
                                         (401, 404)),
    ("GET", "/v1/sessions"): Op("every session of the store", {200: _json("SessionList")},
                                (401, 503)),
    ("GET", SESSION + "/memory"): Op(
        "the session's memory file (safetensors), with X-Newllm-* headers",
        {200: {BYTES: {"schema": {"type": "string", "format": "binary"}}}}, (400, *READ)),
    ("PUT", SESSION + "/memory"): Op(
        "install a memory file as this session (checked against the served model)",
        {200: _json("SessionImported"), 201: _json("SessionImported")},
        (400, 401, 409, 413, 429, 503, 507), BYTES),
    ("DELETE", SESSION): Op("forget a session (cancels a running turn)", {200: _json("Deleted")},
                            (400, 401, 404, 409, 503)),
    ("POST", "/v1/responses"): Op(
        "create a response (stored as a session unless store=false)",
        {200: {**_json("Response"), **_events("Responses API event")}}, TURN, ResponsesRequest),
    ("GET", RESP): Op("a stored response", {200: _json("Response")}, READ),
    ("DELETE", RESP): Op("delete a stored response", {200: _json("Deleted")}, (*READ, 409)),
    ("GET", RESP + "/input_items"): Op("a stored response's input items",
                                       {200: _json("ItemList")}, (400, *READ), query=PAGE),
    ("POST", "/v1/conversations"): Op("create a conversation (a session)",
                                      {200: _json("Conversation")}, WRITE, ConversationCreate,
                                      body_required=False),
    ("GET", CONV): Op("a conversation", {200: _json("Conversation")}, READ),
    ("POST", CONV): Op("set a conversation's metadata", {200: _json("Conversation")}, WRITE,
                       ConversationUpdate),
    ("DELETE", CONV): Op("delete a conversation", {200: _json("Deleted")}, (*READ, 409)),
    ("POST", CONV + "/items"): Op("add items, read by the next response",
                                  {200: _json("ItemList")}, WRITE, ItemsCreate),
    ("GET", CONV + "/items"): Op("a conversation's items", {200: _json("ItemList")},
                                 (400, *READ), query=PAGE),
    ("GET", CONV + "/items/{item_id}"): Op("one item", {200: _json("Item")}, READ),
    ("DELETE", CONV + "/items/{item_id}"): Op(
        "delete an item not yet read into the memory (409 once it is)",
        {200: _json("Conversation")}, (*READ, 409, 507)),
}
PATH_PATTERNS = {"session_id": f"^{SESSION_ID.pattern}$"}
HELLO = {"role": "user", "content": "Hello"}
EXAMPLES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {  # "MODEL": the served model
    ("POST", "/v1/chat/completions"): {
        "chat": {"model": "MODEL", "messages": [HELLO], "max_tokens": 8},
        "session": {"model": "MODEL", "messages": [HELLO], "max_tokens": 8,
                    "metadata": {"session_id": "example-session"}},
        "stream": {"model": "MODEL", "messages": [HELLO], "max_tokens": 8, "stream": True}},
    ("POST", "/v1/completions"): {
        "text": {"model": "MODEL", "prompt": "Once upon a time", "max_tokens": 8},
        "logprobs": {"model": "MODEL", "prompt": [1, 2, 3], "max_tokens": 0, "echo": True,
                     "logprobs": 1},
        "stream": {"model": "MODEL", "prompt": "Once upon a time", "max_tokens": 8,
                   "stream": True}},
    ("POST", "/v1/responses"): {
        "input": {"model": "MODEL", "input": "Hello", "max_output_tokens": 8},
        "stream": {"model": "MODEL", "input": "Hello", "max_output_tokens": 8,
                   "stream": True}},
    ("POST", "/v1/conversations"): {"items": {"items": [HELLO], "metadata": {"topic": "demo"}}},
    ("POST", CONV): {"metadata": {"metadata": {"topic": "renamed"}}},
    ("POST", CONV + "/items"): {"items": {"items": [HELLO]}},
}


def _link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method}", "parameters": parameters}


BY_ID = {"conversation_id": "$response.body#/id"}
SAME_CONV = {"conversation_id": "$request.path.conversation_id"}
LINKS: dict[tuple[str, str], dict[str, Any]] = {  # what a 200 answer's ids lead to
    ("POST", "/v1/responses"): {
        "GetResponse": _link(RESP, "get", response_id="$response.body#/id"),
        "InputItems": _link(RESP + "/input_items", "get", response_id="$response.body#/id"),
        "DeleteResponse": _link(RESP, "delete", response_id="$response.body#/id")},
    ("POST", "/v1/conversations"): {
        "GetConversation": _link(CONV, "get", **BY_ID),
        "UpdateConversation": _link(CONV, "post", **BY_ID),
        "AddItems": _link(CONV + "/items", "post", **BY_ID),
        "ListItems": _link(CONV + "/items", "get", **BY_ID),
        "DeleteConversation": _link(CONV, "delete", **BY_ID)},
    ("POST", CONV + "/items"): {
        "GetItem": _link(CONV + "/items/{item_id}", "get", **SAME_CONV,
                         item_id="$response.body#/first_id"),
        "DeleteItem": _link(CONV + "/items/{item_id}", "delete", **SAME_CONV,
                            item_id="$response.body#/first_id")},
}


def _answers(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, content in op.ok.items():
        text = "OK" if status < 300 else "not ready"
        out[str(status)] = {"description": "created" if status == 201 else text,
                            "content": content}
    for status in sorted(op.errors):
        answer: dict[str, Any] = {"description": ERROR_TEXT[status],
                                  "content": {JSON: {"schema": _ref("Error")}}}
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": STR}}
        if status == 429:
            answer["headers"] = {"Retry-After": {"schema": INT}}
        out[str(status)] = answer
    return out


def _request_body(op: Op, examples: dict[str, dict[str, Any]], model: str
                  ) -> dict[str, Any] | None:
    if op.body is None:
        return None
    if op.body == BYTES:
        content = {BYTES: {"schema": {"type": "string", "format": "binary"}}}
    else:
        assert not isinstance(op.body, str)
        content = {JSON: {"schema": _ref(op.body.__name__)}}
        if examples:
            content[JSON]["examples"] = {
                name: {"value": {k: model if v == "MODEL" else v for k, v in body.items()}}
                for name, body in examples.items()}
    return {"required": op.body_required, "content": content}


def _request_schemas() -> dict[str, Any]:
    """The JSON schemas of the request models, their nested models hoisted to components."""
    out: dict[str, Any] = {}
    for model in REQUESTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def document(app: Any, model: str = "MODEL") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, filled in from `OPERATIONS`; request
    examples name ``model``, the served model."""
    doc = get_openapi(title="newllm", version=__version__, routes=app.routes,
                      description="OpenAI-compatible server whose sessions keep a compressed "
                                  "memory (server/README.md)")
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            op = OPERATIONS.get((method.upper(), path))
            if op is None:
                log.warning("%s %s has no entry in server/openapi.py", method.upper(), path)
                operation["security"] = SECURITY
                continue
            operation["summary"] = op.summary
            operation["responses"] = _answers(op)
            links = LINKS.get((method.upper(), path))
            if links:
                operation["responses"]["200"]["links"] = links
            params = [p for p in operation.get("parameters", []) if p["in"] == "path"]
            for p in params:
                p["schema"] = {"type": "string", "minLength": 1}
                if p["name"] in PATH_PATTERNS:
                    p["schema"]["pattern"] = PATH_PATTERNS[p["name"]]
            params += [*op.query, *op.headers]
            if params:
                operation["parameters"] = params
            body = _request_body(op, EXAMPLES.get((method.upper(), path), {}), model)
            if body is not None:
                operation["requestBody"] = body
            operation["security"] = SECURITY if op.secure else []
    components = doc.setdefault("components", {})
    components["schemas"] = {**SCHEMAS, **_request_schemas()}
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "the server's API key (--api-key or $NEWLLM_API_KEY); X-API-Key "
                       "is accepted too. Servers started without a key accept any"}}
    return doc


def install(app: Any, model: str) -> None:
    """Serve `document` at ``/openapi.json`` (built once, at the first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, model)
        return app.openapi_schema

    app.openapi = openapi
