"""The prefix-state cache: stateless requests that resend a conversation read only what is new.

Chat front ends without a session id send the whole history every turn. For such requests
(chat and completions without ``metadata.session_id``) each worker keeps memory snapshots keyed
by a hash of the *exact token ids* they have read: the state after a request's prompt, and the
state after its prompt and the tokens it generated. A new request whose prompt starts with a
cached token sequence continues from the longest one and reads only the rest, so its output is
the one reading the whole prompt gives (the model's state after a token sequence does not depend
on how the sequence was split). Keys are token ids, not text: a text prefix whose tokenization
changes at the boundary simply does not match, and the request reads from the last snapshot
that does (at worst from the start).

The cache is bounded by bytes (``--prefix-cache-bytes``; least recently used snapshots go
first; 0 turns it off) and lives in each worker process: a request served by another worker
than the one that saw the previous turn misses it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from typing import Any

MIN_TOKENS = 2  # shorter prefixes save nothing worth a snapshot


def prefix_key(ids: list[int]) -> bytes:
    return hashlib.sha256(array("q", ids).tobytes()).digest()


class PrefixCache:
    """Snapshots of model states by the token ids they have read (LRU, bounded by bytes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[int, Any, int]] = OrderedDict()  # len, state, B
        self._lengths: Counter[int] = Counter()  # how many entries have each length
        self.bytes = 0

    def __bool__(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, ids: list[int]) -> tuple[int, Any] | None:
        """(k, state after ``ids[:k]``) for the longest cached prefix with k < len(ids) (at
        least one token is left to read, for the logits), or None."""
        # the digests of every cached length, from one pass of sha256 over the ids (copying its
        # state at each length) rather than hashing each prefix from the start
        data, hasher, done, found = array("q", ids).tobytes(), hashlib.sha256(), 0, None
        for k in sorted(n for n in self._lengths if n < len(ids)):
            hasher.update(data[done * 8:k * 8])
            done = k
            key = hasher.copy().digest()
            if key in self._entries:
                found = (k, key)
        if found is None:
            return None
        k, key = found
        self._entries.move_to_end(key)
        return k, self._entries[key][1]

    def put(self, ids: list[int], state: Any) -> None:
        """Keep ``state``, the state after reading ``ids`` (states are values: never changed
        after this)."""
        if not self or len(ids) < MIN_TOKENS:
            return
        size = int(state.nbytes())
        if size > self.max_bytes:
            return
        key = prefix_key(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (len(ids), state, size)
        self._lengths[len(ids)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (n, _, b) = self._entries.popitem(last=False)
            self.bytes -= b
            self._lengths[n] -= 1
            if not self._lengths[n]:
                del self._lengths[n]
