"""Idempotent turns: a retried request with the same ``Idempotency-Key`` is answered, not re-run.

A client that timed out cannot know whether its turn ran; if it sends the request again, the
turn must not be applied twice. A chat or completion request on a session may carry an
``Idempotency-Key`` header (1 to 64 characters from ``A-Z a-z 0-9 . _ : -``). The worker saves
the key with the turn, in the session's memory file (metadata ``session.replies``: the last
`WINDOW` keys of the session, each with a hash of its request and the events of its answer), in
the same atomic write as the turn itself. The oldest keys go first when the window would pass
`MAX_TOTAL_BYTES`, and an answer too large for it alone keeps only its key (a retry then gets
409 ``idempotent_answer_not_kept``: it ran, nothing is applied again). A request whose key is
already there gets that first answer again (streamed or not, as it asks), and the session is
left as it is; a key reused with
a different request is refused (422 ``idempotency_key_reused``). Two copies sent at once queue
on the session's lock like any two turns, so the second is answered from the first. The window
travels with the session (export, import, move). A request without a session ignores the key:
it changes nothing. Answers over `MAX_EVENT_BYTES` keep their text and finish reasons but not
their per-token log-probs.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from server.protocol import ApiError

META_KEY = "session.replies"
WINDOW = 16  # keys kept per session, oldest dropped first
MAX_EVENT_BYTES = 64 << 10  # the JSON of one answer's events; larger answers are compacted
MAX_TOTAL_BYTES = 256 << 10  # all of a session's kept answers (memory file headers stay < 1 MiB)
KEY = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


class Replay(Exception):  # noqa: N818 - not an error: control flow to answer from the record
    """The request's key is in the session: answer with ``entry`` (see `answer`)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__("replay")
        self.entry = entry
        self.session: dict[str, Any] = {}  # the session as it is now (set by the engine)


def check_key(value: str | None) -> str | None:
    """The header's key, or None; 400 for a malformed one."""
    if value is None:
        return None
    if not KEY.fullmatch(value):
        raise ApiError(400, "Idempotency-Key must be 1 to 64 characters from A-Z a-z 0-9 . _ "
                       ": -", code="invalid_idempotency_key", param="Idempotency-Key")
    return value


def request_hash(job: dict[str, Any]) -> str:
    """What the request asked for (the key itself left out), to tell a retry from a reuse."""
    fields = {k: v for k, v in job.items() if k != "idempotency_key"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def load(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The replies a session file holds ({} when none, or when the entry is malformed)."""
    try:
        replies = json.loads(meta.get(META_KEY, "{}"))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(replies, dict):
        return {}
    return {k: v for k, v in replies.items()
            if isinstance(k, str) and KEY.fullmatch(k) and isinstance(v, dict)
            and isinstance(v.get("h"), str) and isinstance(v.get("events"), list)}


def lookup(replies: dict[str, dict[str, Any]], key: str, job: dict[str, Any]) -> None:
    """Raise `Replay` when ``key`` answered this request before; 422 when it answered another."""
    entry = replies.get(key)
    if entry is None:
        return
    if entry["h"] != request_hash(job):
        raise ApiError(422, f"Idempotency-Key {key!r} was used for a different request on "
                       "this session; use a new key for a new request",
                       code="idempotency_key_reused", param="Idempotency-Key")
    if entry.get("too_large"):
        raise ApiError(409, f"the request with Idempotency-Key {key!r} already ran and its turn "
                       "was applied; its answer was too large to keep for a replay (read the "
                       "session instead)", code="idempotent_answer_not_kept",
                       param="Idempotency-Key")
    raise Replay(entry)


def remember(replies: dict[str, dict[str, Any]], key: str, job: dict[str, Any],
             events: list[dict[str, Any]]) -> dict[str, str]:
    """The metadata entry after a turn answered with ``events`` under ``key``."""
    events = _compact(events)
    kept = {k: v for k, v in replies.items() if k != key}
    kept[key] = {"h": request_hash(job), "events": events}
    while len(kept) > WINDOW:
        kept.pop(next(iter(kept)))
    text = json.dumps(kept, separators=(",", ":"), ensure_ascii=True)
    while len(text) > MAX_TOTAL_BYTES and len(kept) > 1:  # the file header stays small
        kept.pop(next(iter(kept)))
        text = json.dumps(kept, separators=(",", ":"), ensure_ascii=True)
    if len(text) > MAX_TOTAL_BYTES:  # this answer alone is too large: keep that it ran
        kept[key] = {"h": kept[key]["h"], "events": [], "too_large": True}
        text = json.dumps(kept, separators=(",", ":"), ensure_ascii=True)
    return {META_KEY: text}


def remember_all(replies: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The metadata entry that keeps the window as it is (a turn without a key)."""
    return {META_KEY: json.dumps(replies, separators=(",", ":"), ensure_ascii=True)}


def _compact(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` as they are, or (over `MAX_EVENT_BYTES`) with each choice's tokens merged
    into one text piece and their log-probs dropped."""
    if len(json.dumps(events)) <= MAX_EVENT_BYTES:
        return events
    out: list[dict[str, Any]] = []
    texts: dict[int, str] = {}
    for e in events:
        if e.get("t") == "tok":
            texts[e["c"]] = texts.get(e["c"], "") + e.get("text", "")
        else:
            if e.get("t") == "end" and e["c"] in texts:
                out.append({"t": "tok", "c": e["c"], "text": texts.pop(e["c"])})
            out.append({k: v for k, v in e.items() if k != "tokens"})
    out += [{"t": "tok", "c": c, "text": t} for c, t in texts.items()]  # choices with no end
    return out


def answer(entry: dict[str, Any], session: dict[str, Any]) -> list[dict[str, Any]]:
    """The events that answer a replayed request: the first answer's, then ``done`` with its
    usage and the session as it is now (``replayed``: true)."""
    events = [e for e in entry["events"] if e.get("t") != "done"]
    done = next((e for e in entry["events"] if e.get("t") == "done"), {"usage": None})
    return [*events, {"t": "done", "usage": done.get("usage"),
                      "session": {**session, "replayed": True}}]
