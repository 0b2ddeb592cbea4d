"""Session stores: where sessions live, the source of truth. Two kinds behind one interface
(`SessionStore`): a folder on this machine (`FolderStore`, the embedded default) and Redis
(`server.redis_store.RedisStore`, ``--session-store redis://...``, for several replicas).
`open_store` picks one from the settings. Both keep the same canonical memory file per session.

The folder store: one memory file per session in a directory.

LitServe workers are separate processes and any of them may get any request, so no session lives
only in a worker's memory. A session ``abc`` is the file ``{dir}/abc.safetensors``: a newllm
memory file (`newllm.memory_file`) whose metadata also carries the session's `Transcript`
(``session.*`` keys). Files are replaced atomically (temp file + fsync + rename), so a reader
(``GET .../memory``) always sees a whole file, old or new.

Locks: one exclusive ``fcntl.flock`` per session, held for a whole turn (load, generate, save),
so concurrent turns of one session run one after the other and none is lost, while sessions of
different ids run in parallel. Lock files are *stripes*, ``{dir}/.locks/NNN.lock`` chosen by a
hash of the id, never deleted (deleting a lock file others wait on breaks flock) and bounded in
number; two ids sharing a stripe only ever wait for each other. `StripeLocks` counts stripes it
holds, so one worker can hold two sessions of one stripe in the same batch. Workers only ever
*try* locks (never block while holding one), so no two processes can deadlock.

``--session-ttl``: a session not written for that long is deleted (the folder store at the next
listing or new session; Redis expires it on time).

``--max-sessions`` policy: when a new session would exceed the limit, the least recently used
*idle* session (its lock free) is evicted (deleted) to make room; the eviction is logged and
counted in ``/metrics``. If every session is busy, the new one is refused (HTTP 503). Existing
sessions are never refused. A new session's file is written while the store lock
(``.locks/store.lock``) is held, from counting the files to the rename, so two new sessions
can never both take the last free place. A turn that would create a session asks
`SessionStore.check_room` first and is refused before it generates anything; room is not
reserved, so a new session created by someone else in the meantime can still make the final
write fail (also 503, the session file unchanged).

Cancel flags: the HTTP process whose client went away mid-turn drops a file
``{dir}/.cancel/{request uid}``; the worker serving that request sees it, drops the turn without
saving it and removes the flag (`cancel`, `cancelled`, `clear_cancel`). A worker notes which
request runs a turn of a session (``.cancel/{id}.running``), so ``DELETE`` of a busy session
cancels that turn (reason "deleted": it ends with a 409 ``session_deleted`` error) instead of
waiting for it. Flags nobody consumed
(the turn had already ended) are removed after `CANCEL_TTL_S` and at start-up.

Storage faults: an ``OSError`` while writing, deleting or locking a session (disk full, quota,
file size limit, read-only or unwritable folder) becomes `StoreWriteError`, which the routes
answer with a JSON error for that request only: 507 ``insufficient_storage`` when space ran out,
503 ``session_store_unwritable`` otherwise. The session keeps its previous file (the atomic
write removes its temp file) and the next write succeeds once space or permission returns. A
writer killed between creating its temp file and the rename leaves a ``.{id}.safetensors.*.tmp``
beside an intact session file; `SessionStore.sweep_temp` removes those whose session is idle
(a restarted worker calls it; `prepare` removes them all at start-up).

Session ids: 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit,
so an id is always a plain file name (no ``/``, no ``..``, no hidden files).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newllm.memory_file import write_atomic

log = logging.getLogger("newllm.server")

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUFFIX = ".safetensors"
NUM_STRIPES = 1024
MAX_HEADER = 1 << 20
CANCEL_TTL_S = 600.0  # an unconsumed cancel flag is this old at most
REQUEST_UID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as `server.app` names requests


class SessionIdError(ValueError):
    """A session id that is not a plain, safe name (HTTP 400)."""


class StoreFull(RuntimeError):
    """--max-sessions reached and every session is busy (HTTP 503)."""


class StoreWriteError(RuntimeError):
    """A session file could not be written or removed (HTTP ``status``: 507 or 503)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # 507: free space, then retry


def write_error(e: OSError, what: str) -> StoreWriteError:
    """The `StoreWriteError` for an OS error met while ``what`` (e.g. "saving session 'a'")."""
    reason = f"{e.strerror or e}" + (f" (errno {errno.errorcode.get(e.errno, e.errno)})"
                                     if e.errno else "")
    if e.errno in OUT_OF_SPACE:
        return StoreWriteError(
            f"{what} failed: the session store is out of space: {reason}. The session keeps "
            "its previous memory; free disk space on the server and retry", 507,
            "insufficient_storage")
    return StoreWriteError(
        f"{what} failed: the session store cannot be written: {reason}. The session keeps "
        "its previous memory; check the session folder (--session-dir) and retry", 503,
        "session_store_unwritable")


@contextmanager
def timed(op: str) -> Iterator[None]:
    """Time a store operation into ``newllm_store_seconds{op}``; count it failed on OSError."""
    from server import metrics

    t0 = time.perf_counter()
    try:
        yield
    except OSError:
        metrics.safely(lambda: metrics.STORE_ERRORS.labels(op).inc())
        raise
    finally:
        seconds = time.perf_counter() - t0
        metrics.safely(lambda: metrics.STORE_SECONDS.labels(op).observe(seconds))


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        shown = repr(session_id)[:60]
        raise SessionIdError(
            f"invalid session id {shown}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return session_id


def _stripe(session_id: str) -> int:
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:4], "big") % NUM_STRIPES


class SessionLocks:
    """The session locks (or leases) one thread of one process holds; each store gives its
    own kind (`SessionStore.locks`)."""

    def try_acquire(self, session_id: str) -> bool:
        """Take ``session_id`` without waiting; False if anyone (even this object) holds it."""
        raise NotImplementedError

    def acquire(self, session_id: str, timeout: float, poll: float = 0.01) -> bool:
        """Try until ``timeout`` seconds have passed (for HTTP handlers, which hold no other)."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire(session_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def release(self, session_id: str) -> None:
        raise NotImplementedError

    def holds(self, session_id: str) -> bool:
        raise NotImplementedError

    def release_all(self) -> None:
        raise NotImplementedError

    def renew(self) -> list[str]:
        """Keep held locks alive; the ids whose lock was lost (see `RedisLeases.renew`)."""
        return []


class StripeLocks(SessionLocks):
    """Session locks held by one thread of one process (see the module docstring).

    Not thread-safe: a worker (single-threaded) keeps one; HTTP handlers make one per request.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fds: dict[int, list[int]] = {}  # stripe -> [fd, holders]
        self._held: set[str] = set()

    def try_acquire(self, session_id: str) -> bool:
        """Lock ``session_id`` without waiting; False if anyone (even this object) holds it."""
        if session_id in self._held:
            return False
        stripe = _stripe(session_id)
        if stripe in self._fds:
            self._fds[stripe][1] += 1
        else:
            try:
                fd = os.open(self.folder / f"{stripe:04d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise write_error(e, f"locking session {session_id!r}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fds[stripe] = [fd, 1]
        self._held.add(session_id)
        return True

    def release(self, session_id: str) -> None:
        self._held.discard(session_id)
        stripe = _stripe(session_id)
        entry = self._fds.get(stripe)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._fds[stripe]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def holds(self, session_id: str) -> bool:
        return session_id in self._held

    def release_all(self) -> None:
        for session_id in list(self._held):
            self.release(session_id)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    tokens_seen: int
    bytes: int
    last_used: float  # unix time of the last change
    kind: str
    turns: int

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "object": "session", "tokens_seen": self.tokens_seen,
                "bytes": self.bytes, "last_used": round(self.last_used, 3), "kind": self.kind,
                "turns": self.turns}


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file given whole (one the server wrote)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    return {str(k): str(v) for k, v in meta.items()}


def read_header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header (for listings)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise ValueError(f"{path.name} has an oversized header")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


class SessionStore:
    """What the routes and workers need of a session store (picklable: settings, not
    connections). Sessions are canonical memory files (bytes); ``locks()`` gives a per-thread
    holder of session locks (or leases) that every write and delete must hold; a write of a new
    session may evict idle ones (``max_sessions``) or raise StoreFull; failures of the store
    itself are StoreWriteError (HTTP 503/507/409 for that request only)."""

    def __init__(self, max_sessions: int = 1000, ttl_s: float = 0.0) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if ttl_s < 0:
            raise ValueError(f"the session TTL must be >= 0 seconds, got {ttl_s}")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s

    def describe(self) -> str:
        """Where the sessions are, for the log."""
        raise NotImplementedError

    @property
    def scratch(self) -> Path:
        """A local folder for uploads while they arrive."""
        raise NotImplementedError

    def prepare(self) -> None:
        raise NotImplementedError

    def store_id(self) -> str:
        raise NotImplementedError

    def locks(self) -> SessionLocks:
        raise NotImplementedError

    def exists(self, session_id: str) -> bool:
        raise NotImplementedError

    def read(self, session_id: str) -> bytes | None:
        raise NotImplementedError

    def metadata(self, session_id: str) -> dict[str, str] | None:
        """The header metadata of a session's memory file (None: no such session)."""
        raise NotImplementedError

    def size(self, session_id: str) -> int:
        raise NotImplementedError

    def ids(self) -> list[str]:
        raise NotImplementedError

    def info(self, session_id: str) -> SessionInfo | None:
        raise NotImplementedError

    def list(self) -> list[SessionInfo]:
        """Every session of the store, most recently used first."""
        raise NotImplementedError

    def total_bytes(self) -> tuple[int, int]:
        raise NotImplementedError

    def write(self, session_id: str, data: bytes, locks: Any) -> list[str]:
        raise NotImplementedError

    def check_room(self, session_id: str, locks: Any) -> None:
        raise NotImplementedError

    def delete(self, session_id: str, locks: Any) -> bool:
        raise NotImplementedError

    def sweep_temp(self) -> list[Path]:
        """Remove what a writer killed mid-write left (nothing, where writes are atomic)."""
        return []

    def _remove(self, victim: str, locks: Any) -> None:
        """Delete an evicted session whose lock ``locks`` holds."""
        raise NotImplementedError

    def _evict(self, oldest_first: list[str], new_id: str, locks: Any, *,
               dry_run: bool) -> list[str]:
        """Evict least recently used idle sessions (of ``oldest_first``, every session of the
        store) until one more fits, under the store's lock; ``dry_run`` only checks that enough
        of them are idle. StoreFull when they are not."""
        excess = len(oldest_first) + 1 - self.max_sessions
        evicted: list[str] = []
        for victim in oldest_first:
            if excess <= 0:
                break
            if victim == new_id or locks.holds(victim) or not locks.try_acquire(victim):
                continue  # busy: a turn runs on it
            try:
                if not dry_run:
                    self._remove(victim, locks)
            finally:
                locks.release(victim)
            excess -= 1
            if not dry_run:
                evicted.append(victim)
                log.info("session limit %d reached: evicted idle session %r",
                         self.max_sessions, victim)
        if excess > 0:
            raise StoreFull(
                f"the server holds its maximum of {self.max_sessions} sessions and all are "
                "busy; try again later, or DELETE /v1/sessions/{id} sessions you no longer need"
            )
        return evicted

    def cancel(self, uid: str, reason: str = "") -> None:
        raise NotImplementedError

    def cancelled_many(self, uids: list[str]) -> set[str]:
        raise NotImplementedError

    def cancelled(self, uid: str) -> bool:
        return bool(self.cancelled_many([uid]))

    def cancel_reason(self, uid: str) -> str:
        raise NotImplementedError

    def clear_cancel(self, uid: str) -> None:
        raise NotImplementedError

    def mark_running(self, session_id: str, uid: str) -> None:
        raise NotImplementedError

    def clear_running(self, session_id: str, uid: str) -> None:
        raise NotImplementedError

    def running(self, session_id: str) -> str | None:
        raise NotImplementedError


def open_store(settings: Any) -> SessionStore:
    """The store ``settings.session_store`` names: "folder" (``settings.session_dir``) or a
    redis:// / rediss:// URL."""
    spec = settings.session_store or "folder"
    if spec == "folder":
        return FolderStore(settings.session_dir, settings.max_sessions, settings.session_ttl)
    from server.redis_store import RedisStore

    return RedisStore(spec, settings.max_sessions, settings.session_ttl,
                      settings.session_lease)


class FolderStore(SessionStore):
    """Files, locks and the session limit of one session directory (picklable: paths only)."""

    def __init__(self, folder: str | Path, max_sessions: int = 1000,
                 ttl_s: float = 0.0) -> None:
        super().__init__(max_sessions, ttl_s)
        self.folder = Path(folder).expanduser().resolve()
        self.lock_folder = self.folder / ".locks"
        self.cancel_folder = self.folder / ".cancel"

    def describe(self) -> str:
        return str(self.folder)

    @property
    def scratch(self) -> Path:
        return self.folder

    def prepare(self) -> None:
        """Create the folders; remove temp files a killed writer may have left and old flags."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock_folder.mkdir(exist_ok=True)
        self.cancel_folder.mkdir(exist_ok=True)
        for stale in [*self.folder.glob(".*.tmp"), *self.cancel_folder.iterdir()]:
            stale.unlink(missing_ok=True)

    def store_id(self) -> str:
        """This store's identity: a random id kept in ``{dir}/.store-id``, made on first use.
        Two servers that share a session folder share it, so a client can tell that moving a
        session between them would move it onto itself (`clients.move_session` refuses)."""
        path = self.folder / ".store-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: of two servers starting together, one writes it, both read the same
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another server is writing it: wait for its few bytes
            deadline = time.monotonic() + 5
            while not (found := path.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.01)
            return found
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(16).hex())
        return path.read_text().strip()

    def locks(self) -> StripeLocks:
        return StripeLocks(self.lock_folder)

    def path(self, session_id: str) -> Path:
        return self.folder / f"{check_session_id(session_id)}{SUFFIX}"

    def exists(self, session_id: str) -> bool:
        return self.path(session_id).is_file()

    def metadata(self, session_id: str) -> dict[str, str] | None:
        try:
            return read_header_metadata(self.path(session_id))
        except FileNotFoundError:
            return None

    def size(self, session_id: str) -> int:
        try:
            return self.path(session_id).stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, session_id: str) -> bytes | None:
        with timed("read"):
            try:
                return self.path(session_id).read_bytes()
            except FileNotFoundError:
                return None

    def ids(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}")
                      if SESSION_ID.fullmatch(p.name[:-len(SUFFIX)]))

    def info(self, session_id: str) -> SessionInfo | None:
        path = self.path(session_id)
        try:
            st = path.stat()
            meta = read_header_metadata(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("session file %s is unreadable: %s", path, e)
            return SessionInfo(session_id, -1, 0, 0.0, "unreadable", 0)
        position = meta.get("position", "0")
        turns = meta.get("session.turns", "0")
        return SessionInfo(session_id, int(position) if position.isdigit() else -1, st.st_size,
                           st.st_mtime, meta.get("session.kind", ""),
                           int(turns) if turns.isdigit() else 0)

    def list(self) -> list[SessionInfo]:
        self.expire()
        infos = [self.info(i) for i in self.ids()]
        return sorted((i for i in infos if i is not None), key=lambda i: -i.last_used)

    def total_bytes(self) -> tuple[int, int]:
        """(number of sessions, bytes of their files)."""
        n = size = 0
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                size += p.stat().st_size
                n += 1
            except FileNotFoundError:
                pass
        return n, size

    def write(self, session_id: str, data: bytes, locks: StripeLocks) -> list[str]:
        """Install ``data`` for a session whose lock ``locks`` holds; returns evicted ids.

        A new session is written under the store lock (see the module docstring); StoreFull
        when no idle session can make room for it.
        """
        if not locks.holds(session_id):
            raise RuntimeError(f"writing session {session_id!r} without holding its lock")
        path = self.path(session_id)
        try:
            if path.exists():  # no one else can create or delete it: we hold its lock
                with timed("write"):
                    write_atomic(path, data)
                return []
            self.expire()
            fd = self._lock_store()
            try:
                evicted = self._make_room(session_id, locks, dry_run=False)
                with timed("write"):
                    write_atomic(path, data)
                return evicted
            finally:
                _unlock(fd)
        except OSError as e:  # write_atomic removed its temp file; the old file is intact
            raise write_error(e, f"saving session {session_id!r}") from e

    def check_room(self, session_id: str, locks: StripeLocks) -> None:
        """StoreFull now if a new ``session_id`` could not be saved (every session busy).

        Evicts nothing: the eviction happens when the new session is written."""
        if self.path(session_id).exists():
            return
        try:
            fd = self._lock_store()
        except OSError as e:
            raise write_error(e, f"creating session {session_id!r}") from e
        try:
            self._make_room(session_id, locks, dry_run=True)
        finally:
            _unlock(fd)

    def delete(self, session_id: str, locks: StripeLocks) -> bool:
        if not locks.holds(session_id):
            raise RuntimeError(f"deleting session {session_id!r} without holding its lock")
        try:
            self.path(session_id).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise write_error(e, f"deleting session {session_id!r}") from e

    def expire(self) -> list[str]:
        """Delete the idle sessions not written for ``ttl_s`` seconds (``--session-ttl``)."""
        if not self.ttl_s:
            return []
        cutoff, expired, locks = time.time() - self.ttl_s, [], self.locks()
        for p in self.folder.glob(f"*{SUFFIX}"):
            sid = p.name[:-len(SUFFIX)]
            try:
                if p.stat().st_mtime >= cutoff or not SESSION_ID.fullmatch(sid):
                    continue
                if not locks.try_acquire(sid):
                    continue  # a turn is running: it is not idle
            except (OSError, StoreWriteError):
                continue
            try:
                if p.stat().st_mtime < cutoff:  # not written since we looked
                    p.unlink(missing_ok=True)
                    expired.append(sid)
            except OSError:
                pass
            finally:
                locks.release(sid)
        if expired:
            log.info("removed %d session(s) idle for more than --session-ttl %g s",
                     len(expired), self.ttl_s)
        return expired

    def sweep_temp(self) -> list[Path]:
        """Remove temp files of idle sessions (left by a writer killed mid-write); returns them.

        A temp file ``.{id}.safetensors.*.tmp`` whose session lock is free has no writer: every
        write holds the session's lock from before the temp file exists until the rename."""
        removed, locks = [], self.locks()
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            # ".{id}.safetensors.{random, no dots}.tmp"
            sid = tmp.name[1:].removesuffix(".tmp").rsplit(".", 1)[0].removesuffix(SUFFIX)
            if not SESSION_ID.fullmatch(sid):
                continue
            try:
                if not locks.try_acquire(sid):
                    continue  # being written now
            except StoreWriteError:
                return removed  # the folder cannot be written: nothing to sweep with
            try:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
            except OSError as e:
                log.warning("could not remove the stale temp file %s: %s", tmp, e)
            finally:
                locks.release(sid)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted write", len(removed))
        return removed

    def _lock_store(self) -> int:
        """Take the store lock. Blocking is safe: its holder only ever *tries* session locks
        and holds it for one count-evict-write, never for a turn."""
        fd = os.open(self.lock_folder / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _make_room(self, new_id: str, locks: StripeLocks, *, dry_run: bool) -> list[str]:
        """Evict least recently used idle sessions until one more fits (under the store lock);
        ``dry_run`` only checks that enough of them are idle."""
        files = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                files.append((p.stat().st_mtime, p.name[:-len(SUFFIX)]))
            except FileNotFoundError:
                pass
        return self._evict([sid for _, sid in sorted(files)], new_id, locks, dry_run=dry_run)

    def _remove(self, victim: str, locks: StripeLocks) -> None:
        self.path(victim).unlink(missing_ok=True)

    # cancel flags --------------------------------------------------------------------------
    def _flag(self, uid: str) -> Path:
        if not REQUEST_UID.fullmatch(uid):
            raise ValueError(f"invalid request uid {uid[:40]!r}")
        return self.cancel_folder / uid

    def cancel(self, uid: str, reason: str = "") -> None:
        """Ask the worker serving request ``uid`` to drop it unsaved (see module docstring);
        ``reason`` "deleted": its session is being deleted (the turn ends with an error)."""
        self.cancel_folder.mkdir(exist_ok=True)
        self._flag(uid).write_text(reason)
        cutoff = time.time() - CANCEL_TTL_S
        for flag in self.cancel_folder.iterdir():
            try:
                if flag.stat().st_mtime < cutoff:
                    flag.unlink()
            except FileNotFoundError:
                pass

    def cancelled_many(self, uids: list[str]) -> set[str]:
        return {u for u in uids
                if REQUEST_UID.fullmatch(u) and (self.cancel_folder / u).exists()}

    def cancel_reason(self, uid: str) -> str:
        """The reason a cancelled request was given ("" when none, or not cancelled)."""
        try:
            return self._flag(uid).read_text()[:64]
        except (OSError, ValueError):
            return ""

    def clear_cancel(self, uid: str) -> None:
        if REQUEST_UID.fullmatch(uid):
            (self.cancel_folder / uid).unlink(missing_ok=True)

    # which request runs a turn of a session (so DELETE can cancel it) ------------------------
    def mark_running(self, session_id: str, uid: str) -> None:
        """Note that request ``uid`` holds ``session_id``'s lock for a turn."""
        self.cancel_folder.mkdir(exist_ok=True)
        self._running_path(session_id).write_text(uid)

    def clear_running(self, session_id: str, uid: str) -> None:
        if self.running(session_id) == uid:
            self._running_path(session_id).unlink(missing_ok=True)

    def running(self, session_id: str) -> str | None:
        """The request running a turn of ``session_id`` now, if any."""
        try:
            uid = self._running_path(session_id).read_text()
        except OSError:
            return None
        return uid if REQUEST_UID.fullmatch(uid) else None

    def _running_path(self, session_id: str) -> Path:
        return self.cancel_folder / f"{check_session_id(session_id)}.running"


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
