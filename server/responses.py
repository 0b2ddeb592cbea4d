"""Worker events -> OpenAI response bodies and server-sent-event chunks.

A builder receives the engine's events for one request (see `server.engine`) in order and
produces either streaming chunks as they come or the whole response at the end, in the shapes
the official openai client parses: ``chat.completion`` / ``chat.completion.chunk`` and
``text_completion``. Streams end with ``data: [DONE]``; ``usage`` comes in a last chunk with no
choices when ``stream_options.include_usage`` is set (as OpenAI does). An error after the stream
started is sent as ``data: {"error": {...}}`` followed by the blank line that ends an SSE event
(LitServe 0.2.19 omits it, and the openai client then drops the error); the client raises it.
Non-standard but harmless: a ``session`` object (id, tokens_seen, turns, ...) in the response
body and in the usage chunk.
"""

from __future__ import annotations

import json
from typing import Any

from server.protocol import chat_logprobs, completion_logprobs, new_id, now, token_width


def sse(payload: dict[str, Any] | str) -> str:
    # ASCII-escaped JSON: generated text may hold U+2028, U+0085, \x1c..., which SSE allows in a
    # line but clients that split lines like str.splitlines (httpx's iter_lines) cut at
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


DONE = sse("[DONE]")


class _Choice:
    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[dict[str, Any]] = []  # echo and generated tokens (logprobs)
        self.offset = 0  # characters of text already streamed (completions text_offset)
        self.finish_reason: str | None = None
        self.started = False


class Builder:
    """Common bookkeeping; subclasses give the two response shapes."""

    object_name = ""
    prefix = ""

    def __init__(self, model: str, fingerprint: str, choices: int, *, logprobs: bool,
                 include_usage: bool) -> None:
        self.id = new_id(self.prefix)
        self.created = now()
        self.model, self.fingerprint = model, fingerprint
        self.choices = [_Choice() for _ in range(choices)]
        self.logprobs, self.include_usage = logprobs, include_usage
        self.usage: dict[str, int] | None = None
        self.session: dict[str, Any] | None = None

    def frame(self, chunk: dict[str, Any]) -> str:
        """One chunk as a server-sent event."""
        return sse(chunk)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def add(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Record an event; returns the streaming chunks it makes."""
        kind = event["t"]
        if kind == "toks":  # several tokens in one message from the worker (server.engine)
            return [chunk for e in event["events"] for chunk in self.add(e)]
        if kind == "done":
            self.usage, self.session = event["usage"], event["session"]
            if not self.include_usage:
                return []
            chunk = {**self._head(self.object_name + self.chunk_suffix), "choices": [],
                     "usage": self.usage}
            if self.session is not None:
                chunk["session"] = self.session
            return [chunk]
        if kind == "start":
            return self.on_start()
        choice = self.choices[event["c"]]
        if kind == "end":
            choice.finish_reason = event["finish_reason"]
            return [self.end_chunk(event["c"], choice)]
        if kind == "echo":
            return self.on_echo(event, choice)
        if kind == "tok":
            if self.logprobs:
                choice.tokens.append({k: event[k] for k in ("token", "bytes", "lp", "top")})
            choice.text += event["text"]
            return self.token_chunks(event, choice)
        return []

    chunk_suffix = ""

    def on_start(self) -> list[dict[str, Any]]:
        return []

    def on_echo(self, event: dict[str, Any], choice: _Choice) -> list[dict[str, Any]]:
        return []

    def token_chunks(self, event: dict[str, Any], choice: _Choice) -> list[dict[str, Any]]:
        raise NotImplementedError

    def end_chunk(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError


class ChatBuilder(Builder):
    object_name = "chat.completion"
    chunk_suffix = ".chunk"
    prefix = "chatcmpl"

    def on_start(self) -> list[dict[str, Any]]:
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for i in range(len(self.choices))]

    def token_chunks(self, event: dict[str, Any], choice: _Choice) -> list[dict[str, Any]]:
        if not event["text"] and not self.logprobs:
            return []
        lp = chat_logprobs(choice.tokens[-1:]) if self.logprobs else None
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": event["c"], "delta": {"content": event["text"]}, "logprobs": lp,
             "finish_reason": None}]}]

    def end_chunk(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [
            {"index": index, "delta": {}, "logprobs": None,
             "finish_reason": choice.finish_reason}]}

    def response(self) -> dict[str, Any]:
        body = {**self._head("chat.completion"), "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": chat_logprobs(c.tokens) if self.logprobs else None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(self.choices)], "usage": self.usage}
        if self.session is not None:
            body["session"] = self.session
        return body


class CompletionBuilder(Builder):
    object_name = "text_completion"
    prefix = "cmpl"

    def on_echo(self, event: dict[str, Any], choice: _Choice) -> list[dict[str, Any]]:
        choice.text += event["text"]
        tokens = event["tokens"] or []
        if self.logprobs:
            choice.tokens.extend(tokens)
        return [self._chunk(event["c"], event["text"], choice, tokens)]

    def token_chunks(self, event: dict[str, Any], choice: _Choice) -> list[dict[str, Any]]:
        if not event["text"] and not self.logprobs:
            return []
        return [self._chunk(event["c"], event["text"], choice, choice.tokens[-1:])]

    def _chunk(self, index: int, text: str, choice: _Choice,
               tokens: list[dict[str, Any]]) -> dict[str, Any]:
        lp = completion_logprobs(tokens, choice.offset) if self.logprobs else None
        choice.offset += sum(token_width(t) for t in tokens) if self.logprobs else len(text)
        return {**self._head("text_completion"), "choices": [
            {"index": index, "text": text, "logprobs": lp, "finish_reason": None}]}

    def end_chunk(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {**self._head("text_completion"), "choices": [
            {"index": index, "text": "", "logprobs": None,
             "finish_reason": choice.finish_reason}]}

    def response(self) -> dict[str, Any]:
        body = {**self._head("text_completion"), "choices": [
            {"index": i, "text": c.text,
             "logprobs": completion_logprobs(c.tokens, 0) if self.logprobs else None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(self.choices)], "usage": self.usage}
        if self.session is not None:
            body["session"] = self.session
        return body
