"""Typed results of the client: pydantic models of what the server answers.

Models ignore fields they do not know (a newer server may add some) and keep the whole answer
in ``raw``. The shapes are OpenAI's (``chat.completion``, ``text_completion``) plus newllm's
``session`` object, which the server adds to every answer of a request that named a session.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SessionTurn(_Model):
    """What a request did to its session (the ``session`` object of an answer)."""

    id: str
    tokens_seen: int
    turns: int = 0
    created: bool = False
    reset: bool = False
    bytes: int = 0


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Model):
    """One generated token of a chat answer with its log-probability and alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Model):
    content: list[TokenLogprob] = Field(default_factory=list)


class CompletionLogprobs(_Model):
    """OpenAI's completions logprobs; ``token_logprobs[0]`` is None for an echoed first token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class _Result(_Model):
    id: str = ""
    model: str = ""
    created: int = 0
    system_fingerprint: str | None = None
    usage: Usage | None = None
    session: SessionTurn | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)


class ChatResult(_Result):
    """A ``chat.completion``; ``text``/``finish_reason``/``logprobs`` are those of choice 0."""

    choices: list[ChatChoice] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def logprobs(self) -> ChatLogprobs | None:
        return self.choices[0].logprobs if self.choices else None


class CompletionResult(_Result):
    """A ``text_completion``; ``text``/``finish_reason``/``logprobs`` are those of choice 0."""

    choices: list[CompletionChoice] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def logprobs(self) -> CompletionLogprobs | None:
        return self.choices[0].logprobs if self.choices else None


class Delta(_Model):
    """One streamed piece: new ``text`` of choice ``index`` (``finish_reason`` on its last)."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    fingerprint: str | None = None
    parameters: int | None = None
    layers: list[str] | None = None
    dtype: str | None = None


class SessionInfo(_Model):
    """One entry of ``GET /v1/sessions``."""

    id: str
    tokens_seen: int = 0
    bytes: int = 0
    last_used: float = 0.0
    kind: str = ""
    turns: int = 0


class ImportResult(_Model):
    """The answer to ``PUT /v1/sessions/{id}/memory``.

    ``converted`` is set when the file was written at another precision or on another device
    than the server runs (``{"from": {"dtype", "device"}, "to": {...}}``): the server then
    stores the converted state, whose ``payload_sha256`` differs from the one received."""

    id: str
    created: bool = False
    tokens_seen: int = 0
    bytes: int = 0
    kind: str = ""
    turns: int = 0
    payload_sha256: str | None = None  # of the state stored (older servers: not sent)
    received_payload_sha256: str | None = None  # of the file received
    converted: dict[str, Any] | None = None

    def conversion_text(self) -> str:
        """``"converted from bfloat16 (cuda) to float32 (cpu)"``, or "" when nothing was."""
        if not self.converted:
            return ""
        a, b = self.converted.get("from", {}), self.converted.get("to", {})
        return (f"converted from {_precision(a)} ({a.get('device') or 'device not recorded'}) "
                f"to {_precision(b)} ({b.get('device')})")


def _precision(end: dict[str, Any]) -> str:
    """``float32``, or ``float32 with float16 weights`` (a server with ``--half-weights``)."""
    weights = end.get("weights_dtype")
    return f"{end.get('dtype')}" + (f" with {weights} weights" if weights else "")


class MoveResult(_Model):
    """What `move_session` did."""

    session: str
    new_id: str
    source: str
    target: str
    bytes: int
    tokens_seen: int
    payload_sha256: str
    created: bool
    source_deleted: bool
    converted: dict[str, Any] | None = None  # see ImportResult
