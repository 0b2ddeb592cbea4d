"""What a session has consumed, and which part of a new request is new.

A session's memory has read a transcript; a request either re-sends that transcript with
something new at the end (what chat clients usually do) or sends only the new part. Feeding a
turn twice would corrupt the memory, so the server keeps, in the session's memory file, a
`Transcript`: a hash chain over the *units* the memory consumed, never the text itself.

- **chat** sessions: a unit is one message, ``(role, content)``; the reply the server generated
  is recorded as the assistant message it returned.
- **text** sessions (``/v1/completions``): a unit is a piece of text (each prompt's new part and
  each generated completion), with its length in characters so a re-sent prompt can be cut at
  the same places.

Matching a request (``session_input`` = ``auto``, the default):
1. the request starts with everything the session consumed -> only the rest is new;
2. otherwise, if the request looks like a re-sent conversation (it starts with the session's
   first unit and is longer than that one unit) -> `Diverged` (HTTP 409): the client's history
   is not what the memory holds; resend it exactly, reset the session, or say ``new``;
3. otherwise the whole request is new (a client that sends only the new message).
``session_input="full"`` allows only case 1 (anything else is `Diverged`), ``"new"`` always
takes case 3. Case 2 can misfire when a client in "new" mode repeats the session's first
message together with more messages; such clients should pass ``session_input: "new"``.
A text session keeps the lengths of its last `MAX_PIECES` pieces only; past that, case 1 cannot
be checked, so in ``auto`` mode a prompt that starts with the first piece (whose length is kept
apart) is `Diverged` and anything else is new. A completions prompt given as token ids is
matched as the text it decodes to (`server.engine`).

The chat template is plain text (``newllm`` tokenizers carry no chat template), rendered by
`newllm.chat` (training renders its chat examples with the same functions)::

    System: {content}\\n  User: {content}\\n  Assistant: {content}\\n  ...  Assistant:

New messages are rendered one per line and followed by the generation cue ``Assistant:``; the
model's reply follows the cue. When the session's last unit is a generated reply, the new text
starts with ``\\n`` to end that reply's line, so the memory reads exactly the rendered
conversation. ``\\nUser:`` is an implicit stop string for chat. The transcript records the
reply as returned; the memory holds the same text (a reply cut by a stop string is re-read
without it, see `server.engine`), plus the EOS token when one ended the reply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from newllm.chat import CHAT_STOP as CHAT_STOP  # re-exported: the server's names for them
from newllm.chat import CUE as CUE
from newllm.chat import ROLES as ROLES
from newllm.chat import render_chat as render_chat

CHAIN_START = hashlib.sha256(b"newllm-transcript-v1").hexdigest()
KINDS = ("", "chat", "text")
INPUT_MODES = ("auto", "full", "new")
META_PREFIX = "session."
MAX_PIECES = 20_000  # text pieces kept in a memory file's metadata (a few hundred KB at most)


class Diverged(ValueError):
    """The request's history differs from what the session consumed (HTTP 409)."""


class KindMismatch(ValueError):
    """A chat session got a completions request or the other way round (HTTP 409)."""


def _link(chain: str, unit: str) -> str:
    unit_hash = hashlib.sha256(unit.encode("utf-8", "surrogatepass")).hexdigest()
    return hashlib.sha256(f"{chain}|{unit_hash}".encode()).hexdigest()


def message_unit(role: str, content: str) -> str:
    """The canonical string of one chat message (what the chain hashes)."""
    return json.dumps([role, content], ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Transcript:
    """A hash chain over the units a session consumed (see the module docstring)."""

    kind: str = ""  # "" (nothing recorded yet, e.g. an imported foreign memory), chat, text
    count: int = 0  # units consumed
    chain: str = CHAIN_START  # hash after all units
    first: str = ""  # hash after the first unit ("" when count == 0)
    lengths: tuple[int, ...] = field(default=())  # text sessions: characters per piece
    open_reply: bool = False  # the last unit is a reply the model generated
    turns: int = 0  # requests that changed this session
    first_length: int = 0  # text sessions: characters of the first piece (0: unknown)

    def extend(self, units: list[str], kind: str, *, lengths: list[int] | None = None,
               open_reply: bool) -> Transcript:
        chain, first = self.chain, self.first
        for unit in units:
            chain = _link(chain, unit)
            if not first:
                first = chain
        new_lengths = self.lengths + tuple(lengths or ()) if kind == "text" else ()
        first_length = self.first_length
        if kind == "text" and self.count == 0 and new_lengths:
            first_length = new_lengths[0]
        return replace(self, kind=kind, count=self.count + len(units), chain=chain, first=first,
                       lengths=new_lengths[-MAX_PIECES:], open_reply=open_reply,
                       turns=self.turns + 1, first_length=first_length)

    # metadata ------------------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        meta = {
            "session.kind": self.kind,
            "session.count": str(self.count),
            "session.chain": self.chain,
            "session.first": self.first,
            "session.open_reply": "1" if self.open_reply else "0",
            "session.turns": str(self.turns),
        }
        if self.kind == "text":
            meta["session.lengths"] = json.dumps(list(self.lengths), separators=(",", ":"))
            meta["session.first_length"] = str(self.first_length)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Transcript:
        """Read the ``session.*`` keys; absent -> empty transcript; malformed -> ValueError."""
        if not any(k.startswith(META_PREFIX) for k in meta):
            return cls()
        try:
            kind = meta["session.kind"]
            count = _uint(meta["session.count"])
            turns = _uint(meta.get("session.turns", "0"))
            chain, first = meta["session.chain"], meta["session.first"]
            open_reply = {"0": False, "1": True}[meta["session.open_reply"]]
            lengths: tuple[int, ...] = ()
            first_length = 0
            if kind == "text":
                raw = json.loads(meta["session.lengths"])
                if not isinstance(raw, list) or not all(
                        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in raw):
                    raise ValueError("session.lengths is not a list of non-negative integers")
                lengths = tuple(raw)
                first_length = _uint(meta.get("session.first_length", "0"))
        except (KeyError, ValueError, RecursionError) as e:
            raise ValueError(f"malformed session metadata ({e}); re-export the memory from a "
                             "newllm server or strip the session.* keys") from None
        if kind not in KINDS or not _is_hash(chain) or (first and not _is_hash(first)):
            raise ValueError("malformed session metadata: bad kind or hashes")
        if (count == 0) != (first == ""):
            raise ValueError("malformed session metadata: count and first hash disagree")
        if len(lengths) > count:
            raise ValueError("malformed session metadata: more lengths than pieces")
        if turns > count:  # every turn adds at least one piece
            raise ValueError("malformed session metadata: more turns than pieces")
        return cls(kind, count, chain, first, lengths, open_reply, turns, first_length)


def _uint(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValueError(f"{text[:20]!r} is not a non-negative integer")
    return int(text)


def _is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _check_mode(mode: str) -> None:
    if mode not in INPUT_MODES:
        raise ValueError(f"session_input must be one of {list(INPUT_MODES)}, got {mode!r}")


# chat ----------------------------------------------------------------------------------------
def new_messages(t: Transcript, units: list[str], mode: str = "auto") -> int:
    """How many leading request messages the session already consumed (the rest are new).

    ``units`` are `message_unit` strings of the request's messages.
    """
    _check_mode(mode)
    if t.kind == "text":
        raise KindMismatch("this session holds a completions transcript; continue it with "
                           "/v1/completions, or pass metadata.reset_session='true'")
    if mode == "new" or t.count == 0:
        return 0
    chain, first_ok = CHAIN_START, False
    for i, unit in enumerate(units[:t.count]):
        chain = _link(chain, unit)
        if i == 0:
            first_ok = chain == t.first
    if len(units) >= t.count and chain == t.chain:
        return t.count
    if mode == "full" or (first_ok and len(units) > 1):
        where = _first_difference(t, units)
        raise Diverged(
            f"the conversation differs from what this session consumed ({t.count} messages); "
            f"{where} Send the conversation exactly as before plus the new messages, send only "
            f"the new messages with metadata.session_input='new', or pass "
            f"metadata.reset_session='true' to start over"
        )
    return 0


def _first_difference(t: Transcript, units: list[str]) -> str:
    if len(units) < t.count:
        return f"the request has {len(units)} messages, fewer than the session consumed."
    return ("at least one earlier message was changed (assistant replies must be sent back "
            "exactly as the server returned them).")


# text ----------------------------------------------------------------------------------------
def new_text_start(t: Transcript, prompt: str, mode: str = "auto") -> int:
    """Index in ``prompt`` where its new part starts (0: all of it is new)."""
    _check_mode(mode)
    if t.kind == "chat":
        raise KindMismatch("this session holds a chat conversation; continue it with "
                           "/v1/chat/completions, or pass metadata.reset_session='true'")
    if mode == "new" or t.count == 0:
        return 0
    if len(t.lengths) != t.count:  # the oldest lengths were dropped (MAX_PIECES)
        n = t.first_length
        resent = 0 < n < len(prompt) and _link(CHAIN_START, prompt[:n]) == t.first
        if mode == "full" or resent:
            raise Diverged("this session's transcript is too long to match a re-sent prompt; "
                           "send only the new text with metadata.session_input='new'")
        return 0
    total = sum(t.lengths)
    chain, pos, first_ok = CHAIN_START, 0, False
    for i, n in enumerate(t.lengths):
        if pos + n > len(prompt):
            break
        chain = _link(chain, prompt[pos:pos + n])
        pos += n
        if i == 0:
            first_ok = chain == t.first
    if len(prompt) >= total and pos == total and chain == t.chain:
        return total
    if mode == "full" or (first_ok and len(prompt) > t.lengths[0]):
        raise Diverged(
            f"the prompt does not start with the {total} characters this session consumed; "
            "send the transcript exactly as before plus new text, send only the new text with "
            "metadata.session_input='new', or pass metadata.reset_session='true'"
        )
    return 0
