"""What is new in a request, as tokens, and how tokens are named in responses.

`Prompter` turns a job's messages or prompts into the text and token ids a turn must read after
what its session has already consumed (`server.transcript` says how much that is: 409 when the
history diverged), and names tokens as OpenAI's logprobs show them.
"""

from __future__ import annotations

from typing import Any

from server.protocol import ApiError
from server.transcript import (
    Diverged,
    Transcript,
    message_unit,
    new_messages,
    new_text_start,
    render_chat,
)


class Prompter:
    """Prompts and token names for one tokenizer (token names are cached)."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    def chat(self, job: dict[str, Any], t: Transcript, sid: str | None,
                     mode: str) -> tuple[list[tuple[str, list[int]]], list[str]]:
        units = [message_unit(role, content) for role, content in job["messages"]]
        skip = new_messages(t, units, mode) if sid is not None else 0
        new = [(role, content) for role, content in job["messages"][skip:]]
        text = render_chat(new, t.open_reply)
        return [(text, self.tokenizer.encode(text))], units[skip:]

    def text(self, job: dict[str, Any], t: Transcript, sid: str | None,
                      mode: str) -> list[tuple[str, list[int]]]:
        """(new text, its ids) per prompt. A token-id prompt on a session is matched as the
        text it decodes to (kind check and re-sent transcript), then cut at the token where
        the new text starts."""
        prompts = []
        for p in job["prompts"]:
            if isinstance(p, str):
                start = new_text_start(t, p, mode) if sid is not None else 0
                text = p[start:]
                ids = self.tokenizer.encode(text)
            else:
                text, ids = self.tokenizer.decode(p), list(p)
                start = new_text_start(t, text, mode) if sid is not None else 0
                if start:
                    cut = self._token_prefix(ids, text, start)
                    text, ids = text[start:], ids[cut:]
            if not ids:
                if sid is not None:
                    raise ApiError(400, f"the prompt adds no new text to session {sid!r} (it "
                                   "already consumed all of it); send new text",
                                   code="empty_prompt", param="prompt")
                ids = [self.eos]  # an empty text starts after EOS
            prompts.append((text, ids))
        return prompts

    def _token_prefix(self, ids: list[int], text: str, start: int) -> int:
        """How many leading ``ids`` spell ``text[:start]`` (``text`` is what ``ids`` decode
        to); Diverged when ``start`` falls inside a token."""
        target, size, k = len(text[:start].encode("utf-8")), 0, 0
        while k < len(ids) and size < target:
            size += len(self._piece(ids[k])[1])
            k += 1
        if size == target and self.tokenizer.decode(ids[:k]) == text[:start]:
            return k
        raise Diverged("the token prompt re-sends this session's transcript, but the "
                       "transcript does not end on one of its token boundaries; send only the "
                       "new tokens with metadata.session_input='new'")

    def token(self, token_id: int, lp: float | None,
               top: tuple[tuple[int, float], ...]) -> dict[str, Any]:
        text, raw = self._piece(token_id)
        return {"token": text, "bytes": raw, "lp": lp,
                "top": [[*self._piece(i), v] for i, v in top]}

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes, as OpenAI shows them (``bytes:\\xe2`` for a partial
        character), so that distinct tokens get distinct names in ``top_logprobs``."""
        if token_id not in self._pieces:
            raw = _token_bytes(self.tokenizer, token_id)
            if raw is None:
                text = self.tokenizer.decode([token_id])
                self._pieces[token_id] = (text, list(text.encode("utf-8", "replace")))
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
                self._pieces[token_id] = (text, list(raw))
        return self._pieces[token_id]


def _token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes of a byte-level BPE token (GPT-2 alphabet), or None for other tokenizers."""
    global _UNICODE_TO_BYTE
    if _UNICODE_TO_BYTE is None:
        from newllm.tokenizer import byte_to_unicode

        _UNICODE_TO_BYTE = {ch: b for b, ch in byte_to_unicode().items()}
    name = tokenizer.backend.id_to_token(token_id)
    if name is None or not all(ch in _UNICODE_TO_BYTE for ch in name):
        return None
    return bytes(_UNICODE_TO_BYTE[ch] for ch in name)


_UNICODE_TO_BYTE: dict[str, int] | None = None
