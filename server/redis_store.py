"""The Redis session store: every session of every replica in one Redis, with no lost or
doubled turn (``newllm serve --session-store redis://HOST:PORT/DB``).

The value of a session is the same canonical memory file the folder store keeps, so an export
from a Redis-backed server is byte-for-byte what a folder-backed one gives, and sessions move
between the two kinds. Keys (all under ``newllm:``):

- ``s:{id}``: a hash: ``data`` (the memory file), ``meta`` (its header metadata, JSON, so a
  worker checks its cached state without fetching the file), ``version``, and the listing's
  ``bytes position turns kind last_used``. With ``--session-ttl`` it expires that long after its
  last write.
- ``lru``: a sorted set of ids by last write, for listings and ``--max-sessions`` eviction.
- ``lease:{id}``: who may change the session now (a random token, ``SET NX PX``). A turn holds
  it from load to save, renewed while it runs (`RedisLeases.renew`); a replica that dies
  leaves it to expire after ``--session-lease`` seconds. Turns of one session therefore queue
  across replicas as they queue inside one server.
- ``version``: a counter; every write gives the session a new, never reused version. A write is
  a compare-and-set (one Lua script): it happens only while the writer's lease is still the
  session's lease *and* the session is at the version seen when the lease was taken, so a
  replica that stalled past its lease can never apply a turn over another replica's.
- ``cancel:{uid}``, ``running:{id}``: cancel flags and which request runs a session's turn, as
  the folder store keeps them in files (so a DELETE on one replica cancels a turn on another).
- ``store-id``: the store's identity (`SessionStore.store_id`).

Redis unreachable (or failing) makes the request in hand fail with a 503
``session_store_unavailable`` JSON error (a StoreWriteError) after at most a few seconds, never a
hang; redis-py reconnects on the next call, so the server serves again once Redis is back,
without a restart. A Redis out of memory (``maxmemory`` with ``noeviction``) is a 507.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from server.store import (
    CANCEL_TTL_S,
    REQUEST_UID,
    SessionInfo,
    SessionLocks,
    SessionStore,
    StoreWriteError,
    check_session_id,
    header_metadata,
)

log = logging.getLogger("newllm.server")

PASSWORD_ENV = "NEWLLM_REDIS_PASSWORD"
PREFIX = "newllm:"
STORE_LOCK_S = 10.0  # longest a replica holds the store lock (count, evict, write one file)
T = TypeVar("T")

# KEYS: lease, session. ARGV: token, lease ms. -> the session's version (0: none), or -1 if
# someone else holds the lease
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
end
return -1
"""
# KEYS: lease. ARGV: token, lease ms. -> 1 renewed, 0 lost
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease. ARGV: token -> 1 released, 0 it was not ours (any more)
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lease, session, lru, version counter. ARGV: token, expected version, data, meta, bytes,
# position, turns, kind, now, ttl ms, id. -> the new version, -1 lease lost, -2 version moved
WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if tonumber(redis.call('HGET', KEYS[2], 'version') or '0') ~= tonumber(ARGV[2]) then
  return -2
end
local v = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[2], 'data', ARGV[3], 'meta', ARGV[4], 'version', v, 'bytes', ARGV[5],
           'position', ARGV[6], 'turns', ARGV[7], 'kind', ARGV[8], 'last_used', ARGV[9])
if tonumber(ARGV[10]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[10]) end
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[11])
return v
"""
# KEYS: lease, session, lru. ARGV: token, id -> 1 deleted, 0 there was none, -1 lease lost
DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('ZREM', KEYS[3], ARGV[2])
return redis.call('DEL', KEYS[2])
"""
# KEYS: running. ARGV: uid -> 1 cleared
CLEAR_RUNNING = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def shown_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> None:
    """ValueError naming the problem when ``url`` is not a usable Redis URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"--session-store must be 'folder' or a redis:// or rediss:// URL, "
                         f"got {shown_url(url)!r}")
    if not parts.hostname:
        raise ValueError(f"--session-store {shown_url(url)!r} names no host "
                         "(redis://HOST:PORT/DB)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"--session-store {shown_url(url)!r}: the database must be a number "
                         f"(redis://HOST:PORT/0), got {db!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"--session-store {shown_url(url)!r}: {e}") from None


class RedisLeases(SessionLocks):
    """The leases one thread of one process holds (the Redis `StripeLocks`; not thread-safe).

    A lease also remembers the session's version when it was taken: that is the version the
    holder's write must find (the compare-and-set)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._held: dict[str, tuple[str, int, float]] = {}  # id -> (token, version, renewed)

    def try_acquire(self, session_id: str) -> bool:
        """Take ``session_id``'s lease without waiting; False if anyone (even this object)
        holds it."""
        if session_id in self._held:
            return False
        token = uuid.uuid4().hex
        version = self.store._call("lease", lambda r: r.eval(
            ACQUIRE, 2, self.store.key("lease", session_id), self.store.key("s", session_id),
            token, self.store.lease_ms))
        if int(version) < 0:
            return False
        self._held[session_id] = (token, int(version), time.monotonic())
        return True

    def release(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is None:
            return
        try:
            self.store._call("release", lambda r: r.eval(
                RELEASE, 1, self.store.key("lease", session_id), held[0]))
        except StoreWriteError as e:  # it expires on its own
            log.warning("could not release the lease of session %r: %s", session_id, e)

    def holds(self, session_id: str) -> bool:
        return session_id in self._held

    def release_all(self) -> None:
        for session_id in list(self._held):
            self.release(session_id)

    def renew(self) -> list[str]:
        """Extend the leases taken or renewed more than a third of a lease ago; the ids whose
        lease was lost (expired and maybe taken: their write will be refused)."""
        now, lost = time.monotonic(), []
        due = [(sid, held) for sid, held in self._held.items()
               if now - held[2] > self.store.lease_s / 3]
        for sid, (token, version, _) in due:
            ok = self.store._call("renew", lambda r, sid=sid, token=token: r.eval(
                RENEW, 1, self.store.key("lease", sid), token, self.store.lease_ms))
            if int(ok):
                self._held[sid] = (token, version, now)
            else:
                lost.append(sid)
                log.warning("the lease of session %r expired during its turn; its save will "
                            "be refused", sid)
        return lost

    def token(self, session_id: str) -> tuple[str, int]:
        """(lease token, version seen when it was taken) of a held session."""
        token, version, _ = self._held[session_id]
        return token, version

    def advance(self, session_id: str, version: int) -> None:
        """The holder wrote the session: its next write under this lease expects ``version``."""
        token, _, renewed = self._held[session_id]
        self._held[session_id] = (token, version, renewed)


class RedisStore(SessionStore):
    """Sessions in Redis (see the module docstring); picklable (the URL, not a connection)."""

    def __init__(self, url: str, max_sessions: int = 1000, ttl_s: float = 0.0,
                 lease_s: float = 30.0, password: str | None = None) -> None:
        check_url(url)
        super().__init__(max_sessions, ttl_s)
        if lease_s <= 0:
            raise ValueError(f"the session lease must be > 0 seconds, got {lease_s}")
        self.url = url
        self.password = password if password is not None else os.environ.get(PASSWORD_ENV)
        self.lease_s = lease_s
        self._client: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_pid": -1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def describe(self) -> str:
        return f"Redis at {shown_url(self.url)}"

    @property
    def scratch(self) -> Path:
        folder = Path(tempfile.gettempdir()) / "newllm-uploads"
        folder.mkdir(exist_ok=True)
        return folder

    def key(self, kind: str, name: str = "") -> str:
        return f"{PREFIX}{kind}:{name}" if name else f"{PREFIX}{kind}"

    # connection --------------------------------------------------------------------------------
    def client(self) -> Any:
        """This process's connection pool (made on first use; a forked child makes its own)."""
        if self._client is None or self._pid != os.getpid():
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry

            url = self.url
            kwargs: dict[str, Any] = {
                "socket_timeout": 5.0, "socket_connect_timeout": 2.0,
                "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
                "health_check_interval": 30}
            if self.password and urlsplit(url).password is None:
                kwargs["password"] = self.password
            self._client = redis.Redis.from_url(url, **kwargs)
            self._pid = os.getpid()
        return self._client

    def _call(self, op: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)``, timed into ``newllm_store_seconds{op}``; a Redis failure becomes the
        request's StoreWriteError (503 unreachable, 507 out of memory)."""
        import redis

        from server import metrics  # not at import: `serve` sets its multiprocess folder first

        t0 = time.perf_counter()
        try:
            out = fn(self.client())
        except redis.exceptions.RedisError as e:
            metrics.safely(lambda: metrics.STORE_ERRORS.labels(op).inc())
            text = str(e) or type(e).__name__
            if isinstance(e, redis.exceptions.ResponseError) and text.startswith("OOM"):
                raise StoreWriteError(
                    f"the session store ({self.describe()}) is out of memory: {text}. The "
                    "session keeps its previous memory; free memory in Redis (or raise "
                    "maxmemory) and retry", 507, "insufficient_storage") from None
            raise StoreWriteError(
                f"the session store ({self.describe()}) is unavailable: {text}. Nothing was "
                "changed; retry when it is back", 503, "session_store_unavailable") from None
        finally:
            seconds = time.perf_counter() - t0
            metrics.safely(lambda: metrics.STORE_SECONDS.labels(op).observe(seconds))
        return out

    def prepare(self) -> None:
        """Check that Redis answers (RuntimeError naming the problem otherwise) and warn about
        settings that lose sessions: an evicting ``maxmemory-policy``, no persistence."""
        try:
            self._call("ping", lambda r: r.ping())
        except StoreWriteError as e:
            raise RuntimeError(str(e).split(". Nothing")[0]) from None
        try:
            config = self.client().config_get("maxmemory-policy", "appendonly", "save")
        except Exception as e:  # noqa: BLE001 - CONFIG may be renamed or refused by an ACL
            log.info("could not read Redis' configuration (%s); not checking its eviction "
                     "policy and persistence", e)
            return
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            log.warning("Redis' maxmemory-policy is %r: when it fills up, Redis will silently "
                        "drop sessions; set maxmemory-policy noeviction (full Redis then "
                        "answers 507 and nothing is lost)", policy)
        if config.get("appendonly", "no") != "yes" and not config.get("save"):
            log.warning("Redis has no persistence (appendonly no, no save points): a restart "
                        "of Redis loses every session; set appendonly yes")

    def store_id(self) -> str:
        key = self.key("store-id")

        def get(r: Any) -> str:
            r.set(key, uuid.uuid4().hex, nx=True)
            return r.get(key).decode()
        return self._call("store_id", get)

    def locks(self) -> RedisLeases:
        return RedisLeases(self)

    # sessions ----------------------------------------------------------------------------------
    def exists(self, session_id: str) -> bool:
        key = self.key("s", check_session_id(session_id))
        return bool(self._call("exists", lambda r: r.exists(key)))

    def read(self, session_id: str) -> bytes | None:
        key = self.key("s", check_session_id(session_id))
        return self._call("read", lambda r: r.hget(key, "data"))

    def metadata(self, session_id: str) -> dict[str, str] | None:
        key = self.key("s", check_session_id(session_id))
        raw = self._call("metadata", lambda r: r.hget(key, "meta"))
        return None if raw is None else json.loads(raw)

    def size(self, session_id: str) -> int:
        key = self.key("s", check_session_id(session_id))
        raw = self._call("info", lambda r: r.hget(key, "bytes"))
        return int(raw or 0)

    def ids(self) -> list[str]:
        return sorted(i.id for i in self.list())

    def info(self, session_id: str) -> SessionInfo | None:
        found = self._infos([check_session_id(session_id)])
        return found[0] if found else None

    def list(self) -> list[SessionInfo]:
        ids = [i.decode() for i in self._call("list", lambda r: r.zrevrange(self.key("lru"),
                                                                            0, -1))]
        return self._infos(ids)

    def _infos(self, ids: list[str]) -> list[SessionInfo]:
        fields = ("bytes", "position", "turns", "kind", "last_used")

        def get(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for sid in ids:
                pipe.hmget(self.key("s", sid), fields)
            return pipe.execute()
        rows = self._call("list", get) if ids else []
        out, gone = [], []
        for sid, row in zip(ids, rows, strict=True):
            if row[0] is None:  # expired (--session-ttl) or deleted since the listing
                gone.append(sid)
                continue
            out.append(SessionInfo(sid, int(row[1]), int(row[0]), float(row[4]),
                                   row[3].decode(), int(row[2])))
        if gone:
            self._call("list", lambda r: r.zrem(self.key("lru"), *gone))
        return out

    def total_bytes(self) -> tuple[int, int]:
        infos = self.list()
        return len(infos), sum(i.bytes for i in infos)

    def write(self, session_id: str, data: bytes, locks: Any) -> list[str]:
        if not locks.holds(session_id):
            raise RuntimeError(f"writing session {session_id!r} without holding its lease")
        token, version = locks.token(session_id)
        evicted: list[str] = []
        if version == 0:  # a new session: under the store lock, make room, then write
            with self._store_lock(locks):
                evicted = self._make_room(session_id, locks, dry_run=False)
                new = self._write(session_id, data, token, version)
        else:
            new = self._write(session_id, data, token, version)
        locks.advance(session_id, new)
        return evicted

    def _write(self, sid: str, data: bytes, token: str, version: int) -> int:
        meta = header_metadata(data)
        position, turns = meta.get("position", "0"), meta.get("session.turns", "0")
        ttl_ms = int(self.ttl_s * 1000)
        new = int(self._call("write", lambda r: r.eval(
            WRITE, 4, self.key("lease", sid), self.key("s", sid), self.key("lru"),
            self.key("version"), token, version, data, json.dumps(meta), len(data),
            int(position) if position.isdigit() else -1, int(turns) if turns.isdigit() else 0,
            meta.get("session.kind", ""), repr(time.time()), ttl_ms, sid)))
        if new == -1:
            raise StoreWriteError(
                f"saving session {sid!r} refused: this server's lease on it expired (the turn "
                f"ran longer than --session-lease {self.lease_s:g} s without renewing it, or "
                "Redis lost it); the session keeps what another write left; retry", 409,
                "session_lease_lost")
        if new == -2:
            raise StoreWriteError(
                f"saving session {sid!r} refused: it changed since this turn loaded it (another "
                "server wrote it after this server's lease expired); nothing of this turn was "
                "kept; retry", 409, "session_conflict")
        return new

    def check_room(self, session_id: str, locks: Any) -> None:
        if self.exists(session_id):
            return
        with self._store_lock(locks):
            self._make_room(session_id, locks, dry_run=True)

    @contextmanager
    def _store_lock(self, locks: Any) -> Iterator[None]:
        """The lease on the store itself (new sessions: count, evict, write)."""
        name = "-store-"  # not a valid session id, so no session's lease
        store_locks = RedisLeases(self)
        deadline = time.monotonic() + STORE_LOCK_S
        while not store_locks.try_acquire(name):
            if time.monotonic() > deadline:
                raise StoreWriteError("the session store's lock stayed busy for "
                                      f"{STORE_LOCK_S:g} s; retry", 503, "session_store_busy")
            time.sleep(0.01)
        try:
            yield
        finally:
            store_locks.release(name)

    def _make_room(self, new_id: str, locks: Any, *, dry_run: bool) -> list[str]:
        oldest_first = [i.id for i in reversed(self.list())]
        return self._evict(oldest_first, new_id, locks, dry_run=dry_run)

    def _remove(self, victim: str, locks: Any) -> None:
        self.delete(victim, locks)

    def delete(self, session_id: str, locks: Any) -> bool:
        if not locks.holds(session_id):
            raise RuntimeError(f"deleting session {session_id!r} without holding its lease")
        token, _ = locks.token(session_id)
        done = int(self._call("delete", lambda r: r.eval(
            DELETE, 3, self.key("lease", session_id), self.key("s", session_id),
            self.key("lru"), token, session_id)))
        if done < 0:
            raise StoreWriteError(f"deleting session {session_id!r} refused: this server's "
                                  "lease on it expired; retry", 409, "session_lease_lost")
        locks.advance(session_id, 0)
        return done > 0

    # cancel flags and running turns ------------------------------------------------------------
    def cancel(self, uid: str, reason: str = "") -> None:
        if not REQUEST_UID.fullmatch(uid):
            raise ValueError(f"invalid request uid {uid[:40]!r}")
        self._call("cancel", lambda r: r.set(self.key("cancel", uid), reason,
                                             px=int(CANCEL_TTL_S * 1000)))

    def cancelled_many(self, uids: list[str]) -> set[str]:
        uids = [u for u in uids if REQUEST_UID.fullmatch(u)]
        if not uids:
            return set()

        def get(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for uid in uids:
                pipe.exists(self.key("cancel", uid))
            return pipe.execute()
        return {u for u, hit in zip(uids, self._call("cancelled", get), strict=True) if hit}

    def cancel_reason(self, uid: str) -> str:
        if not REQUEST_UID.fullmatch(uid):
            return ""
        raw = self._call("cancelled", lambda r: r.get(self.key("cancel", uid)))
        return "" if raw is None else raw.decode()[:64]

    def clear_cancel(self, uid: str) -> None:
        if REQUEST_UID.fullmatch(uid):
            self._call("cancel", lambda r: r.delete(self.key("cancel", uid)))

    def mark_running(self, session_id: str, uid: str) -> None:
        key = self.key("running", check_session_id(session_id))
        self._call("running", lambda r: r.set(key, uid, px=int(CANCEL_TTL_S * 1000)))

    def clear_running(self, session_id: str, uid: str) -> None:
        key = self.key("running", check_session_id(session_id))
        self._call("running", lambda r: r.eval(CLEAR_RUNNING, 1, key, uid))

    def running(self, session_id: str) -> str | None:
        key = self.key("running", check_session_id(session_id))
        raw = self._call("running", lambda r: r.get(key))
        uid = None if raw is None else raw.decode()
        return uid if uid is not None and REQUEST_UID.fullmatch(uid) else None
