"""OpenAI's statefulness on compressed memory: the Responses and Conversations APIs.

Both map onto sessions of the session store, so they need no state beyond what sessions have:

- **A stored response is a session** named by the response id (``resp_...``) whose memory is the
  state after the response, and whose file also keeps the response object
  (``response.record``) and its input items (``response.input``). ``previous_response_id``
  continues from that state and reads only the new input; a stored response is never changed
  afterwards, so any number of responses can branch from one (states are values). ``store:
  false`` keeps nothing. Stored responses are sessions in every other way: bounded by
  ``--max-sessions`` and ``--session-ttl``, listed by ``GET /v1/sessions``, exported, imported
  and moved by the memory routes. ``DELETE /v1/responses/{id}`` frees one.
- **A conversation is a session** named ``conv_...``: ``responses.create(conversation=...)``
  is a turn of it, which reads the items added since the last turn and the response's input,
  and appends them and the reply to the conversation's items (``conversation.items``, the
  newest kept within `MAX_ITEMS_BYTES` of text: the memory keeps everything, the listing keeps
  what fits). Items added with ``POST .../items`` wait (``conversation.pending``) until the
  next response reads them; only those can be deleted, since what the memory has read cannot
  be taken out of it (409 ``item_in_memory``). A response in a conversation is also stored as
  its own response (unless ``store`` is false).

Differences from OpenAI's service, by design: ``instructions`` become a system message read
into the memory, so later responses of the chain still carry them; a chain's earlier turns are
not re-sent to the model (that is the point), so ``truncation`` is always "disabled".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from newllm.memory_file import MemoryFileError, load_memory_report, save_memory
from server.http import read_json
from server.protocol import (
    ApiError,
    ChatRequest,
    _Strict,
    chat_job,
    now,
)
from server.protocol import parse as parse_request
from server.responses import Builder, sse
from server.store import StoreFull, check_session_id
from server.transcript import Transcript

MAX_ITEMS_BYTES = 256 << 10  # text of a conversation's items kept for listing
LOCK_WAIT_S = 30.0
CARRIED = ("session.", "conversation.")  # metadata a rewrite of a conversation keeps


# requests ----------------------------------------------------------------------------------------
class ContentPart(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = Field(None, max_length=0)


class InputItem(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ConversationRef(_Strict):
    id: str


class TextFormat(_Strict):
    type: Literal["text"]


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    include: list[str] | None = Field(None, max_length=0)

    @field_validator("input", mode="before")
    @classmethod
    def _some_input(cls, value: Any) -> Any:
        if value == []:  # else the error would be the string branch's "not a valid string"
            raise ValueError("an empty list; send a string or at least one message item")
        return value


class ConversationCreate(_Strict):
    items: list[InputItem] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = Field(None, max_length=16)


class ConversationUpdate(_Strict):
    metadata: dict[str, str] = Field(max_length=16)


class ItemsCreate(_Strict):
    items: list[InputItem] = Field(min_length=1, max_length=20)


# items -------------------------------------------------------------------------------------------
def new_hex() -> str:
    return uuid.uuid4().hex[:24]


def new_item_id() -> str:
    return f"msg_{new_hex()}"


def message_item(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "id": item_id or new_item_id(), "status": "completed",
            "role": role, "content": [{"type": kind, "text": text, "annotations": []}
                                      if kind == "output_text" else {"type": kind, "text": text}]}


def item_text(item: dict[str, Any]) -> str:
    return "".join(str(p.get("text", "")) for p in item.get("content", []))


def input_items(value: str | list[InputItem]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [message_item("user", value)]
    return [message_item(it.role, it.content if isinstance(it.content, str)
                         else "".join(p.text for p in it.content)) for it in value]


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _load_json(meta: dict[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        return default


def _bounded(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest items whose text fits in `MAX_ITEMS_BYTES`."""
    kept, size = [], 0
    for item in reversed(items):
        size += len(item_text(item).encode()) + 128
        if size > MAX_ITEMS_BYTES:
            break
        kept.append(item)
    return kept[::-1]


def pending_messages(carried: dict[str, str]) -> list[list[str]]:
    """A conversation's items added since its last response, as job messages."""
    return [[it["role"], item_text(it)] for it in _load_json(carried, "conversation.pending", [])
            if it.get("role") in ("user", "system", "developer", "assistant")]


def finish_metadata(job: dict[str, Any], reply: str, usage: dict[str, Any],
                    finish_reason: str | None, carried: dict[str, str]
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """Metadata to save with a Responses turn: (for the session the turn saves, for the
    response's own snapshot when it is in a conversation). The engine calls this at the end of
    a turn whose job has ``response``."""
    record = response_object(job["response"], reply, usage, finish_reason)
    output = record["output"]
    own = {"response.record": _dump(record), "response.input": _dump(job["response_input"])}
    if not job.get("conversation"):
        return own, {}
    items = _load_json(carried, "conversation.items", [])
    pending = _load_json(carried, "conversation.pending", [])
    conv = {k: v for k, v in carried.items() if k.startswith("conversation.")}
    conv["conversation.items"] = _dump(_bounded(items + pending + job["response_input"]
                                                + output))
    conv["conversation.pending"] = "[]"
    return conv, own


def response_object(template: dict[str, Any], reply: str, usage: dict[str, Any] | None,
                    finish_reason: str | None, status: str | None = None) -> dict[str, Any]:
    """The ``response`` object: ``template`` (what the request fixed) with its output."""
    item = message_item("assistant", reply, template["output_id"])
    done = finish_reason is not None
    if status is None:
        status = ("incomplete" if finish_reason == "length" else "completed") if done \
            else "in_progress"
    body = {k: v for k, v in template.items() if k != "output_id"}
    body.update(status=status, output=[item] if done else [],
                incomplete_details={"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                usage=None if usage is None else responses_usage(usage))
    return body


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


# streaming ---------------------------------------------------------------------------------------
class ResponsesBuilder(Builder):
    """Engine events -> a ``response`` object, or the Responses API's stream events."""

    def __init__(self, template: dict[str, Any]) -> None:
        super().__init__(template["model"], "", 1, logprobs=False, include_usage=False)
        self.template = template
        self.id = template["id"]
        self.seq = 0
        self.finish_reason: str | None = None

    def frame(self, chunk: dict[str, Any]) -> str:
        return f"event: {chunk['type']}\n" + sse(chunk)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _item(self, status: str) -> dict[str, Any]:
        item = message_item("assistant", self.choices[0].text, self.template["output_id"])
        item["status"] = status
        if status == "in_progress":
            item["content"] = []
        return item

    def add(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["t"]
        if kind == "toks":  # several tokens in one message from the worker (server.engine)
            return [chunk for e in event["events"] for chunk in self.add(e)]
        oid = self.template["output_id"]
        where = {"item_id": oid, "output_index": 0, "content_index": 0}
        if kind == "start":
            now_obj = response_object(self.template, "", None, None)
            return [self._event("response.created", response=now_obj),
                    self._event("response.in_progress", response=now_obj),
                    self._event("response.output_item.added", output_index=0,
                                item=self._item("in_progress")),
                    self._event("response.content_part.added", **where,
                                part={"type": "output_text", "text": "", "annotations": []})]
        if kind == "tok":
            self.choices[0].text += event["text"]
            if not event["text"]:
                return []
            return [self._event("response.output_text.delta", **where, delta=event["text"],
                                logprobs=[])]
        if kind == "end":
            self.finish_reason = event["finish_reason"]
            return []
        if kind == "done":
            self.usage, self.session = event["usage"], event["session"]
            text = self.choices[0].text
            final = self.response()
            done_kind = ("response.incomplete" if final["status"] == "incomplete"
                         else "response.completed")
            return [self._event("response.output_text.done", **where, text=text, logprobs=[]),
                    self._event("response.content_part.done", **where,
                                part={"type": "output_text", "text": text,
                                      "annotations": []}),
                    self._event("response.output_item.done", output_index=0,
                                item=final["output"][0]),
                    self._event(done_kind, response=final)]
        return []

    def response(self) -> dict[str, Any]:
        return response_object(self.template, self.choices[0].text, self.usage,
                               self.finish_reason or "stop")


# the routes --------------------------------------------------------------------------------------
def _resource_id(value: str, prefix: str, what: str) -> str:
    if not value.startswith(prefix):
        raise ApiError(404, f"no {what} {value[:80]!r} (its id starts with {prefix!r})",
                       code=f"{what}_not_found")
    try:
        return check_session_id(value)
    except ValueError:
        raise ApiError(404, f"no {what} {value[:80]!r}", code=f"{what}_not_found") from None


class StatefulRoutes:
    """The Responses and Conversations routes, mixed into `server.app.NewllmAPI` (which gives
    ``store``, ``settings``, ``info``, ``_validator``, ``_respond`` and ``_check_model``)."""

    store: Any
    settings: Any
    info: Any
    _validator: tuple[Any, str] | None

    def stateful_routes(self) -> list[tuple[str, Any, list[str]]]:
        return [
            ("/v1/responses", self.create_response, ["POST"]),
            ("/v1/responses/{response_id}", self.get_response, ["GET"]),
            ("/v1/responses/{response_id}", self.delete_response, ["DELETE"]),
            ("/v1/responses/{response_id}/input_items", self.response_input_items, ["GET"]),
            ("/v1/conversations", self.create_conversation, ["POST"]),
            ("/v1/conversations/{conversation_id}", self.get_conversation, ["GET"]),
            ("/v1/conversations/{conversation_id}", self.update_conversation, ["POST"]),
            ("/v1/conversations/{conversation_id}", self.delete_conversation, ["DELETE"]),
            ("/v1/conversations/{conversation_id}/items", self.add_items, ["POST"]),
            ("/v1/conversations/{conversation_id}/items", self.list_items, ["GET"]),
            ("/v1/conversations/{conversation_id}/items/{item_id}", self.get_item, ["GET"]),
            ("/v1/conversations/{conversation_id}/items/{item_id}", self.delete_item,
             ["DELETE"]),
        ]

    # responses ---------------------------------------------------------------------------------
    async def create_response(self, request: Request) -> Response:
        t0 = time.monotonic()
        req = parse_request(ResponsesRequest, await read_json(request))
        self._check_model(req.model)  # type: ignore[attr-defined]
        store = True if req.store is None else req.store
        conversation = None
        if req.conversation is not None:
            conversation = _resource_id(req.conversation if isinstance(req.conversation, str)
                                        else req.conversation.id, "conv_", "conversation")
            if req.previous_response_id is not None:
                raise ApiError(400, "previous_response_id and conversation cannot be used "
                               "together (a conversation continues itself)",
                               code="invalid_value", param="conversation")
            if not await asyncio.to_thread(self.store.exists, conversation):
                raise ApiError(404, f"no conversation {conversation!r}",
                               code="conversation_not_found", param="conversation")
        previous = None
        if req.previous_response_id is not None:
            previous = _resource_id(req.previous_response_id, "resp_", "response")
            meta = await asyncio.to_thread(self.store.metadata, previous)
            if meta is None or "response.record" not in meta:
                raise ApiError(404, f"no stored response {previous!r} (deleted, expired, or "
                               "created with store=false)", code="response_not_found",
                               param="previous_response_id")
        items = input_items(req.input)
        messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
        messages += [{"role": it["role"], "content": item_text(it)} for it in items]
        try:
            chat = parse_request(ChatRequest, {
                "model": req.model, "messages": messages, "temperature": req.temperature,
                "top_p": req.top_p, "max_tokens": req.max_output_tokens, "user": req.user})
            job = chat_job(chat, self.settings.max_tokens_limit)
        except ApiError as e:  # name the Responses API's fields, not chat's
            if e.param == "max_tokens":
                e.param, e.message = "max_output_tokens", e.message.replace(
                    "max_tokens", "max_output_tokens")
            raise
        rid = f"resp_{new_hex()}"
        job.update(session_id=conversation or (rid if store else None), input_mode="new",
                   reset=False, load_from=previous, conversation=conversation is not None,
                   snapshot_id=rid if conversation and store else None,
                   response_input=items)
        template = {"id": rid, "object": "response", "created_at": now(), "model": req.model,
                    "output_id": new_item_id(), "previous_response_id": previous,
                    "conversation": {"id": conversation} if conversation else None,
                    "instructions": req.instructions, "metadata": req.metadata or {},
                    "temperature": job["params"]["temperature"],
                    "top_p": job["params"]["top_p"],
                    "max_output_tokens": req.max_output_tokens, "store": store,
                    "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
                    "text": {"format": {"type": "text"}}, "truncation": "disabled",
                    "error": None, "user": req.user}
        job["response"] = template
        builder = ResponsesBuilder(template)
        return await self._respond(job, builder, bool(req.stream),  # type: ignore[attr-defined]
                                   "/v1/responses", t0)

    async def _record(self, response_id: str) -> dict[str, str]:
        rid = _resource_id(response_id, "resp_", "response")
        meta = await asyncio.to_thread(self.store.metadata, rid)
        if meta is None or "response.record" not in meta:
            raise ApiError(404, f"no stored response {rid!r}", code="response_not_found",
                           param="response_id")
        return meta

    async def get_response(self, response_id: str) -> Response:
        meta = await self._record(response_id)
        return JSONResponse(json.loads(meta["response.record"]))

    async def response_input_items(self, response_id: str, request: Request) -> Response:
        meta = await self._record(response_id)
        return _item_list(_load_json(meta, "response.input", []), request)

    async def delete_response(self, response_id: str) -> Response:
        meta = await self._record(response_id)
        rid = json.loads(meta["response.record"])["id"]
        await asyncio.to_thread(self._delete, rid, "response")
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})

    def _delete(self, sid: str, what: str) -> None:
        locks = self.store.locks()
        if not locks.acquire(sid, LOCK_WAIT_S):
            raise ApiError(409, f"{what} {sid!r} stayed busy for {LOCK_WAIT_S:.0f} s; retry",
                           code="session_busy")
        try:
            self.store.delete(sid, locks)
        finally:
            locks.release(sid)

    # conversations -----------------------------------------------------------------------------
    async def create_conversation(self, request: Request) -> Response:
        body = await read_json(request) if await request.body() else {}
        req = parse_request(ConversationCreate, body)
        cid = f"conv_{new_hex()}"
        record = {"id": cid, "object": "conversation", "created_at": now(),
                  "metadata": req.metadata or {}}
        pending = input_items(req.items) if req.items else []
        meta = {"conversation.record": _dump(record), "conversation.items": "[]",
                "conversation.pending": _dump(pending)}
        await asyncio.to_thread(self._rewrite, cid, lambda old: meta, True)
        return JSONResponse(record)

    async def _conversation(self, conversation_id: str) -> tuple[str, dict[str, str]]:
        cid = _resource_id(conversation_id, "conv_", "conversation")
        meta = await asyncio.to_thread(self.store.metadata, cid)
        if meta is None or "conversation.record" not in meta:
            raise ApiError(404, f"no conversation {cid!r}", code="conversation_not_found",
                           param="conversation_id")
        return cid, meta

    async def get_conversation(self, conversation_id: str) -> Response:
        _, meta = await self._conversation(conversation_id)
        return JSONResponse(json.loads(meta["conversation.record"]))

    async def update_conversation(self, conversation_id: str, request: Request) -> Response:
        cid, _ = await self._conversation(conversation_id)
        req = parse_request(ConversationUpdate, await read_json(request))

        def change(old: dict[str, str]) -> dict[str, str]:
            record = json.loads(old["conversation.record"])
            record["metadata"] = req.metadata
            return {**old, "conversation.record": _dump(record)}
        new = await asyncio.to_thread(self._rewrite, cid, change, False)
        return JSONResponse(json.loads(new["conversation.record"]))

    async def delete_conversation(self, conversation_id: str) -> Response:
        cid, _ = await self._conversation(conversation_id)
        await asyncio.to_thread(self._delete, cid, "conversation")
        return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})

    async def add_items(self, conversation_id: str, request: Request) -> Response:
        cid, _ = await self._conversation(conversation_id)
        added = input_items(parse_request(ItemsCreate, await read_json(request)).items)

        def change(old: dict[str, str]) -> dict[str, str]:
            pending = _load_json(old, "conversation.pending", [])
            return {**old, "conversation.pending": _dump(_bounded(pending + added))}
        await asyncio.to_thread(self._rewrite, cid, change, False)
        return JSONResponse({"object": "list", "data": added, "first_id": added[0]["id"],
                             "last_id": added[-1]["id"], "has_more": False})

    async def list_items(self, conversation_id: str, request: Request) -> Response:
        _, meta = await self._conversation(conversation_id)
        items = (_load_json(meta, "conversation.items", [])
                 + _load_json(meta, "conversation.pending", []))
        return _item_list(items, request, default_order="desc")

    async def get_item(self, conversation_id: str, item_id: str) -> Response:
        _, meta = await self._conversation(conversation_id)
        for item in (_load_json(meta, "conversation.items", [])
                     + _load_json(meta, "conversation.pending", [])):
            if item.get("id") == item_id:
                return JSONResponse(item)
        raise ApiError(404, f"no item {item_id[:80]!r} in this conversation",
                       code="item_not_found", param="item_id")

    async def delete_item(self, conversation_id: str, item_id: str) -> Response:
        cid, meta = await self._conversation(conversation_id)
        if any(it.get("id") == item_id for it in _load_json(meta, "conversation.items", [])):
            raise ApiError(409, f"item {item_id!r} has been read into the conversation's "
                           "memory, which cannot forget one item; start a new conversation "
                           "without it", code="item_in_memory", param="item_id")

        def change(old: dict[str, str]) -> dict[str, str]:
            pending = _load_json(old, "conversation.pending", [])
            left = [it for it in pending if it.get("id") != item_id]
            if len(left) == len(pending):
                raise ApiError(404, f"no item {item_id[:80]!r} in this conversation",
                               code="item_not_found", param="item_id")
            return {**old, "conversation.pending": _dump(left)}
        new = await asyncio.to_thread(self._rewrite, cid, change, False)
        return JSONResponse(json.loads(new["conversation.record"]))

    def _rewrite(self, sid: str, change: Any, create: bool) -> dict[str, str]:
        """Rewrite a conversation's file with ``change(old metadata)`` under its lock (the
        memory itself unchanged; a new one starts empty); returns the new metadata."""
        if self._validator is None:
            raise ApiError(503, "this process cannot write memory files", code="unavailable")
        model, tokenizer_sha = self._validator
        locks = self.store.locks()
        if not locks.acquire(sid, LOCK_WAIT_S):
            raise ApiError(409, f"conversation {sid!r} stayed busy for {LOCK_WAIT_S:.0f} s; "
                           "retry", code="session_busy", param="conversation_id")
        try:
            if create:
                state, old = model.init_state(1), Transcript().to_metadata()
            else:
                data = self.store.read(sid)
                if data is None:
                    raise ApiError(404, f"no conversation {sid!r}",
                                   code="conversation_not_found", param="conversation_id")
                try:
                    loaded = load_memory_report(data, model, tokenizer_hash=tokenizer_sha)
                except MemoryFileError as e:
                    raise ApiError(409, f"conversation {sid!r} cannot be changed: {e}",
                                   code="session_unusable") from None
                state = loaded.state
                old = {k: v for k, v in loaded.metadata.items() if k.startswith(CARRIED)
                       or k == "session.replies"}
            new = change(old)
            blob = save_memory(state, model, tokenizer_hash=tokenizer_sha, metadata=new)
            try:
                self.store.write(sid, blob, locks)
            except StoreFull as e:
                raise ApiError(503, str(e), code="too_many_sessions") from None
            return new
        finally:
            locks.release(sid)


def _item_list(items: list[dict[str, Any]], request: Request,
               default_order: str = "asc") -> Response:
    params = request.query_params
    order = params.get("order", default_order)
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be asc or desc, got {order[:20]!r}",
                       code="invalid_value", param="order")
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be an integer from 1 to 100", code="invalid_value",
                       param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = params.get("after")
    if after is not None:
        ids = [it.get("id") for it in ordered]
        if after not in ids:
            raise ApiError(400, f"after: no item {after[:80]!r}", code="invalid_value",
                           param="after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return JSONResponse({"object": "list", "data": page,
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None,
                         "has_more": len(ordered) > limit})
