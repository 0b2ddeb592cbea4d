"""The OpenAI-compatible wire format: request models, validation, errors and response bodies.

Requests are parsed strictly (pydantic strict mode, unknown fields refused): a wrong type, an
out-of-range value or a misspelt field is a 400 whose ``error.param`` names the field, instead
of LitServe 0.2.19's habit of dropping what it does not know. Fields OpenAI defines that newllm
cannot honour (penalties, logit_bias, tools, suffix) are accepted only at their neutral values.

Sessions are named in the request's ``metadata`` (chat: ``metadata={...}`` in the openai
client; completions: ``extra_body={"metadata": {...}}``):

- ``session_id``: the session to continue (see `server.store` for valid ids); absent: stateless.
- ``reset_session``: ``"true"`` starts the session over from an empty memory.
- ``session_input``: ``"auto"`` (default), ``"full"`` or ``"new"``; see `server.transcript`.

Defaults: ``max_tokens`` 16 for completions (as OpenAI), 256 for chat; both capped by the
server's ``--max-tokens-limit``. ``temperature`` 1, ``top_p`` 1 (``top_p`` 0 means greedy).
``n`` up to 16, and only 1 with a session (a session continues one conversation). With ``n`` > 1
and a ``seed``, choice i uses seed + i. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.store import SessionIdError, check_session_id
from server.transcript import INPUT_MODES

MAX_N = 16
MAX_STOP = 15  # stop strings per request (one more is reserved for chat's implicit stop)
MAX_MESSAGES = 4096
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "union"}


class ApiError(Exception):
    """An error to send as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after  # seconds, sent as Retry-After

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> ApiError:
        e = body.get("error", {})
        return cls(status, e.get("message", ""), code=e.get("code", "error"),
                   param=e.get("param"), type=e.get("type"))


# request models --------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (not in OpenAI's API)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    store: bool | None = None
    service_tier: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_elements(cls, value: Any) -> Any:
        """Name the element that makes a list prompt invalid (e.g. the ``null`` a client puts
        where a tokenizer without an EOS token left the prefix token)."""
        if not isinstance(value, list):
            return value
        texts = [isinstance(p, str) for p in value]
        if any(texts) and not all(texts):
            raise ValueError("a list prompt holds strings or token ids (integers), not both")
        for i, p in enumerate(value):
            for j, token in enumerate(p if isinstance(p, list) else [p]):
                where = f"prompt[{i}][{j}]" if isinstance(p, list) else f"prompt[{i}]"
                if isinstance(token, str) and not isinstance(p, list):
                    continue
                if not isinstance(token, int) or isinstance(token, bool):
                    shown = json.dumps(token)[:40]
                    raise ValueError(f"{where} is {shown}, not a token id: a token-id prompt "
                                     "holds integers only (a tokenizer that knows no EOS token "
                                     "may have left null where its id belongs)")
        return value


def _param(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p):
            break
        parts.append(str(p))
    return ".".join(parts)


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; raises `ApiError` 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"missing required field '{param}'"
            code = "missing_field"
        elif err["type"] == "extra_forbidden":
            message = f"unknown field '{param}'; see the API reference for supported fields"
            code = "unknown_field"
        else:
            message = f"invalid value for '{param}': {err['msg'].removeprefix('Value error, ')}"
            code = "invalid_value"
        raise ApiError(400, message, code=code, param=param) from None


# request -> job ------------------------------------------------------------------------------
def _session_fields(req: _Common) -> dict[str, Any]:
    meta = req.metadata or {}
    session_id = meta.get("session_id")
    if session_id is not None:
        try:
            check_session_id(session_id)
        except SessionIdError as e:
            raise ApiError(400, str(e), code="invalid_session_id",
                           param="metadata.session_id") from None
    reset = meta.get("reset_session", "false").lower()
    if reset not in ("true", "false"):
        raise ApiError(400, f"metadata.reset_session must be 'true' or 'false', got {reset!r}",
                       code="invalid_value", param="metadata.reset_session")
    mode = meta.get("session_input", "auto")
    if mode not in INPUT_MODES:
        raise ApiError(400, f"metadata.session_input must be one of {list(INPUT_MODES)}, "
                       f"got {mode!r}", code="invalid_value", param="metadata.session_input")
    return {"session_id": session_id, "reset": reset == "true", "input_mode": mode}


def _sampling(req: _Common, max_tokens: int | None, default_max: int, limit: int,
              minimum: int) -> dict[str, Any]:
    max_new = default_max if max_tokens is None else max_tokens
    if max_tokens is None:
        max_new = min(max_new, limit)
    if not minimum <= max_new <= limit:
        raise ApiError(400, f"max_tokens must be between {minimum} and {limit} (this server's "
                       f"--max-tokens-limit), got {max_new}", code="invalid_value",
                       param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not 1 <= len(s) <= 256 for s in stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP} non-empty strings of at most 256 "
                       "characters", code="invalid_value", param="stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:
        temperature, top_p = 0.0, 1.0
    if req.seed is not None and not -(2**63) <= req.seed < 2**64:
        raise ApiError(400, "seed must fit in 64 bits", code="invalid_value", param="seed")
    return {"max_new_tokens": max_new, "temperature": temperature, "top_p": top_p,
            "top_k": req.top_k or 0, "seed": req.seed, "stop": stop}


def chat_job(req: ChatRequest, limit: int) -> dict[str, Any]:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one",
                       code="invalid_value", param="max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    job = {"op": "chat", **_session_fields(req),
           "messages": [[m.role, m.text()] for m in req.messages],
           "n": req.n or 1, "logprobs": bool(req.logprobs), "want_tokens": bool(req.logprobs),
           "top_logprobs": req.top_logprobs or 0,
           "params": _sampling(req, max_tokens, DEFAULT_CHAT_MAX_TOKENS, limit, 1)}
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", code="invalid_value",
                       param="top_logprobs")
    _check_n(job)
    return job


def completion_job(req: CompletionRequest, limit: int, vocab_size: int) -> dict[str, Any]:
    prompts: list[str | list[int]]
    if isinstance(req.prompt, str):
        prompts = [req.prompt]
    elif req.prompt and all(isinstance(p, int) for p in req.prompt):
        prompts = [list(req.prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(req.prompt)  # type: ignore[arg-type]
    if not prompts:
        raise ApiError(400, "prompt is an empty list", code="invalid_value", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"prompt {i} holds token ids outside [0, {vocab_size})",
                           code="invalid_value", param="prompt")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, "best_of is not supported (use n)", code="unsupported",
                       param="best_of")
    job = {"op": "completion", **_session_fields(req), "prompts": prompts,
           "n": req.n or 1, "echo": bool(req.echo),
           "logprobs": req.logprobs, "top_logprobs": req.logprobs or 0,
           "want_tokens": req.logprobs is not None,
           "params": _sampling(req, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, limit, 0)}
    if job["session_id"] is not None and len(prompts) != 1:
        raise ApiError(400, "a session takes one prompt per request, not a list",
                       code="invalid_value", param="prompt")
    _check_n(job)
    return job


def _check_n(job: dict[str, Any]) -> None:
    if job["session_id"] is not None and job["n"] != 1:
        raise ApiError(400, "n must be 1 with a session (a session continues one conversation)",
                       code="invalid_value", param="n")
    if job["n"] * len(job.get("prompts", [None])) > MAX_N:
        raise ApiError(400, f"at most {MAX_N} choices per request (n times prompts)",
                       code="invalid_value", param="n")


# responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI chat ``logprobs.content`` from token events (token, bytes, logprob, top)."""
    def entry(token: str, raw: list[int], lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": raw}
    return {"content": [
        {**entry(t["token"], t["bytes"], t["lp"]),
         "top_logprobs": [entry(s, b, v) for s, b, v in t["top"]]}
        for t in tokens
    ]}


def completion_logprobs(tokens: list[dict[str, Any]], start_offset: int) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` (tokens, token_logprobs, top_logprobs, text_offset).

    ``top_logprobs`` maps token text to log-prob; if two alternatives share a text, the more
    likely one is kept. ``text_offset``: characters before each token, a token that is part of
    a character counting as one (exact for text whose tokens are whole characters).
    """
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += token_width(t)
    tops: list[dict[str, float] | None] = []
    for t in tokens:
        if t["lp"] is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for s, _, v in t["top"]:
            top.setdefault(s, v)
        tops.append(top)
    return {"tokens": [t["token"] for t in tokens],
            "token_logprobs": [t["lp"] for t in tokens], "top_logprobs": tops,
            "text_offset": offsets}


def token_width(token: dict[str, Any]) -> int:
    return len(bytes(token["bytes"]).decode("utf-8", "replace"))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens not read again (the prefix
    cache had the state after them), counted in ``prompt_tokens`` as OpenAI does."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out

