"""Faults against a live server (tiny-infini, one worker, batch 1, loopback): what survives.

- a worker SIGKILLed mid-turn, or while it saves a session: the request gets 503
  ``worker_died`` (no hang), the session file is byte-identical to its last good version,
  LitServe starts a new worker and the next request on that session succeeds and continues it;
- the whole server SIGKILLed mid-import (during the temp file write, and just after the rename):
  the session file is the old one or the new one, whole, never a mix; a restarted server removes
  the temp file and continues the session;
- a full disk (a real file size limit, RLIMIT_FSIZE, set on the running server; and ENOSPC)
  or a read-only session folder: 507/503 JSON for the writing request only, other requests go
  on, no file changes, and everything works again once space or permission returns;
- a memory upload racing a chat turn on one session: the result is exactly one of the two orders;
- an HTTP process SIGKILLed: the server stops with exit status 1 (rather than hang every
  connection), every process of it gone.

Faults that need the inside of a server process (ENOSPC, a read-only folder when the tests run as
root, a kill at a chosen point of a write) come from `FAULTS`: a ``sitecustomize`` module put on
the server's PYTHONPATH, test-only, that wraps ``os.fsync``, ``os.replace``, ``os.unlink`` and
``tempfile.mkstemp`` for files in the session folder while a trigger file names a fault. Every
server runs in its own process group and is killed as a group.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_hardening_memory import load_script

from newllm.checkpoint import load_checkpoint
from newllm.memory_file import load_memory
from server.store import read_header_metadata

soak = load_script("soak")
MODEL = "tiny-infini"
WAIT_S = 300.0  # liveness bound (a starved machine restarts workers slowly)

FAULTS = '''"""Test-only fault injection (tests/test_hardening_faults.py); never on a real server.

While the file $NEWLLM_TEST_FAULT_FILE exists, each of its lines "OP ACTION" makes OP fail for
files in $NEWLLM_TEST_FAULT_DIR. OP: mkstemp (creating a temp file there), fsync (of a temp
file there), replace (before the rename onto a session file), replaced (just after it), unlink
(of a session file). ACTION: an errno name (raise that OSError), "kill" (SIGKILL this process)
or "killpg" (SIGKILL its process group, the whole server); kills remove the trigger first.
"""
import errno
import os
import signal
import tempfile

_TRIGGER = os.environ.get("NEWLLM_TEST_FAULT_FILE")
_DIR = os.environ.get("NEWLLM_TEST_FAULT_DIR")


def _fault(op, path):
    if not str(path).startswith(_DIR + os.sep):
        return
    try:
        with open(_TRIGGER) as f:
            lines = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return
    for name, action in lines:
        if name != op:
            continue
        if action in ("kill", "killpg"):
            os.unlink(_TRIGGER)
            if action == "killpg":
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code), str(path))


if _TRIGGER and _DIR:
    _fsync, _replace, _unlink, _mkstemp = os.fsync, os.replace, os.unlink, tempfile.mkstemp

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, TypeError):
            path = ""
        if path.endswith(".tmp"):
            _fault("fsync", path)
        return _fsync(fd)

    def replace(src, dst, **kw):
        _fault("replace", os.fspath(dst))
        _replace(src, dst, **kw)
        _fault("replaced", os.fspath(dst))

    def unlink(path, **kw):
        if os.fspath(path).endswith(".safetensors"):
            _fault("unlink", os.fspath(path))
        return _unlink(path, **kw)

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        _fault("mkstemp", os.path.join(os.fspath(dir or "."), prefix or ""))
        return _mkstemp(suffix, prefix, dir, text)

    os.fsync, os.replace, os.unlink, tempfile.mkstemp = fsync, replace, unlink, mkstemp
'''


class Live:
    """The module's server; a test that kills it calls `ensure` to get a fresh one on the
    same session folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.dir = root, root / "sessions"
        self.trigger = root / "fault"
        (root / "inject").mkdir()
        (root / "inject" / "sitecustomize.py").write_text(FAULTS)
        self.server: Any = None
        self.starts = 0

    def ensure(self) -> Any:
        if self.server is not None and self.server.proc.poll() is None:
            return self.server
        if self.server is not None:
            self.server.kill()  # whatever of its group is left
        self.trigger.unlink(missing_ok=True)
        self.starts += 1
        metrics = self.root / f"metrics-{self.starts}"
        metrics.mkdir()
        env = {"PYTHONPATH": os.pathsep.join([str(self.root / "inject"), str(soak.REPO)]),
               "NEWLLM_TEST_FAULT_FILE": str(self.trigger),
               "NEWLLM_TEST_FAULT_DIR": str(self.dir.resolve()),
               "PROMETHEUS_MULTIPROC_DIR": str(metrics), "OMP_NUM_THREADS": "1"}
        self.server = soak.ServerProcess(self.dir, "--workers", "1", "--max-batch-size", "1",
                                         checkpoint=MODEL, env=env, log=self.root / "server.log")
        return self.server.wait_ready(2 * WAIT_S)  # killed by the fixture if never ready

    def fault(self, *lines: str) -> None:
        self.trigger.write_text("\n".join(lines) + "\n")

    def clear(self) -> None:
        self.trigger.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    holder = Live(tmp_path_factory.mktemp("faults"))
    try:
        holder.ensure()
        yield holder
    finally:
        if holder.server is not None:
            holder.server.kill()


@pytest.fixture(scope="module")
def local() -> Any:
    model, tokenizer = load_checkpoint(MODEL)
    return model.eval(), tokenizer


def chat_body(content: str, sid: str | None, max_tokens: int = 4, **meta: str) -> dict:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "temperature": 0, "max_tokens": max_tokens}
    if sid is not None:
        body["metadata"] = {"session_id": sid, "session_input": "new", **meta}
    return body


def turn(http: httpx.Client, sid: str | None, content: str = "hello",
         max_tokens: int = 4) -> httpx.Response:
    return http.post("/v1/chat/completions", json=chat_body(content, sid, max_tokens))


def ok_turn(http: httpx.Client, sid: str, content: str = "hello") -> dict[str, Any]:
    r = turn(http, sid, content)
    assert r.status_code == 200, r.text
    return r.json()["session"]


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                return True
    return False


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def others_still_work(http: httpx.Client, sid: str) -> None:
    """Requests that write nothing go on while a write fault lasts."""
    assert turn(http, None).status_code == 200  # a stateless chat
    assert http.get(f"/v1/sessions/{sid}/memory").status_code == 200
    assert http.get("/v1/sessions").status_code == 200


# a worker dies -------------------------------------------------------------------------------
class HealthPoller(threading.Thread):
    """Polls /health until stopped (after one more 200); `stop` returns the statuses seen."""

    def __init__(self, server: Any) -> None:
        super().__init__(daemon=True)
        self.server, self.statuses, self.done = server, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=5, trust_env=False) as c:
            while True:
                try:
                    status = c.get("/health").status_code
                except httpx.HTTPError:
                    status = 0  # no answer
                if not self.statuses or self.statuses[-1] != status:
                    self.statuses.append(status)
                if self.done.is_set() and status == 200:
                    return
                time.sleep(0.05)

    def stop(self) -> list[int]:
        self.done.set()
        self.join(WAIT_S)
        return self.statuses


def test_worker_killed_mid_turn_is_restarted_and_the_session_survives(live: Live) -> None:
    server = live.ensure()
    path = live.dir / "w.safetensors"
    with server.client(timeout=WAIT_S) as http:
        first = ok_turn(http, "w")
        before = path.read_bytes()
        [worker] = server.workers()
        body = chat_body("a long one", "w", max_tokens=4000)
        body["stream"] = True
        events: list[dict] = []
        health = HealthPoller(server)
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 5:  # mid-turn: it is generating
                    health.start()
                    os.kill(worker, signal.SIGKILL)
        assert len(events) > 5, "the turn ended before the worker was killed"
        assert events[-1]["error"]["code"] == "worker_died", events[-1]
        assert path.read_bytes() == before  # the last good file, byte for byte
        # the next request on the session waits for the new worker and continues the session
        second = ok_turn(http, "w", "again")
        assert second["turns"] == first["turns"] + 1
        assert server.workers() and server.workers() != [worker]
        statuses = health.stop()
        assert 503 in statuses and statuses[-1] == 200, statuses  # unhealthy while restarting
    assert temp_files(live.dir) == []


def test_worker_killed_while_saving_leaves_the_old_file(live: Live) -> None:
    server = live.ensure()
    path = live.dir / "ws.safetensors"
    with server.client(timeout=WAIT_S) as http:
        first = ok_turn(http, "ws")
        before = path.read_bytes()
        live.fault("replace kill")  # the worker dies with its temp file written, not renamed
        r = turn(http, "ws", "saved?")
        assert error_of(r, 503)["code"] == "worker_died"
        assert not live.trigger.exists()  # the fault fired: killed between write and rename
        assert path.read_bytes() == before
        second = ok_turn(http, "ws", "again")  # served by the restarted worker
        assert second["turns"] == first["turns"] + 1
    assert temp_files(live.dir) == []  # swept by the new worker


# the whole server dies mid-import --------------------------------------------------------
@pytest.mark.parametrize("point,keeps", [("fsync", "old"), ("replaced", "new")])
def test_server_killed_mid_import_keeps_old_or_new_file(live: Live, local: Any, point: str,
                                                        keeps: str) -> None:
    model, tokenizer = local
    server = live.ensure()
    sid, path = f"imp-{point}", live.dir / f"imp-{point}.safetensors"
    with server.client(timeout=WAIT_S) as http:
        ok_turn(http, sid)
        old = path.read_bytes()
        ok_turn(http, "imp-source", "something else entirely")
        upload = http.get("/v1/sessions/imp-source/memory").content
    live.fault(f"{point} killpg")
    with pytest.raises(httpx.TransportError), server.client(timeout=WAIT_S) as http:
        http.put(f"/v1/sessions/{sid}/memory", content=upload)
    server.proc.wait(WAIT_S)
    wait_for(lambda: not group_alive(server.proc.pid), "every server process is gone")
    assert not live.trigger.exists()  # the fault fired
    after = path.read_bytes()
    meta = read_header_metadata(path)
    if keeps == "old":
        assert after == old
        # the interrupted write's temp file (and the upload's, streamed in before the check)
        assert [n for n in temp_files(live.dir) if not n.startswith(".upload.")] \
            == [n for n in temp_files(live.dir) if n.startswith(f".imp-{point}.")]
        assert len([n for n in temp_files(live.dir) if n.startswith(f".imp-{point}.")]) == 1
    else:  # the uploaded state, re-serialised by the server
        source = read_header_metadata(live.dir / "imp-source.safetensors")
        assert after != old and meta["payload_sha256"] == source["payload_sha256"]
    load_memory(path, model, tokenizer_hash=tokenizer.sha256)  # whole, valid
    server = live.ensure()  # restarted on the same folder
    assert temp_files(live.dir) == []
    with server.client(timeout=WAIT_S) as http:
        assert ok_turn(http, sid, "still here")["turns"] == int(meta["session.turns"]) + 1


# full disk, read-only folder ------------------------------------------------------------
@contextmanager
def disk_full(live: Live, server: Any, how: str) -> Iterator[None]:
    """``file-size-limit``: RLIMIT_FSIZE of 4 KiB on every server process, so writes past it
    fail in the kernel (EFBIG), as on a full disk; ``enospc``: fsync of a session temp file
    fails with ENOSPC (the injected fault)."""
    old = {}
    try:
        if how == "file-size-limit":
            for pid in server.processes():
                old[pid] = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (4096, old[pid][1]))
        else:
            live.fault("fsync ENOSPC")
        yield
    finally:
        for pid, limits in old.items():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        live.clear()


@pytest.mark.parametrize("how", ["file-size-limit", "enospc"])
def test_full_disk_fails_that_request_only_and_recovers(live: Live, how: str) -> None:
    server = live.ensure()
    sid, path = f"full-{how}", live.dir / f"full-{how}.safetensors"
    with server.client(timeout=WAIT_S) as http:
        first = ok_turn(http, sid)
        before = path.read_bytes()
        upload = http.get(f"/v1/sessions/{sid}/memory").content
        assert len(before) > 4096
        with disk_full(live, server, how):
            for r in (turn(http, sid, "no room"),  # saved by the worker
                      http.put(f"/v1/sessions/{sid}/memory", content=upload),  # by HTTP
                      turn(http, f"{sid}-new")):  # a new session
                error = error_of(r, 507)
                assert error["code"] == "insufficient_storage", error
                assert "keeps its previous memory" in error["message"]
            others_still_work(http, sid)
        assert path.read_bytes() == before
        assert not (live.dir / f"{sid}-new.safetensors").exists()
        assert temp_files(live.dir) == []
        # space is back: the same requests succeed
        assert ok_turn(http, sid, "room again")["turns"] == first["turns"] + 1
        assert http.put(f"/v1/sessions/{sid}/memory", content=upload).status_code == 200
        assert ok_turn(http, f"{sid}-new")["created"]


def test_read_only_session_dir_fails_writes_only_and_recovers(live: Live) -> None:
    server = live.ensure()
    sid, path = "ro", live.dir / "ro.safetensors"
    with server.client(timeout=WAIT_S) as http:
        first = ok_turn(http, sid)
        before = path.read_bytes()
        upload = http.get(f"/v1/sessions/{sid}/memory").content
        as_root = os.geteuid() == 0  # root writes through chmod: inject EROFS instead
        if as_root:
            live.fault("mkstemp EROFS", "unlink EROFS")
        else:
            live.dir.chmod(0o555)
        try:
            for r in (turn(http, sid, "read only"), turn(http, "ro-new"),
                      http.put(f"/v1/sessions/{sid}/memory", content=upload),
                      http.delete(f"/v1/sessions/{sid}")):
                error = error_of(r, 503)
                assert error["code"] == "session_store_unwritable", error
                assert ("EROFS" if as_root else "EACCES") in error["message"]
            others_still_work(http, sid)
        finally:
            live.clear()
            live.dir.chmod(0o755)
        assert path.read_bytes() == before
        assert not (live.dir / "ro-new.safetensors").exists()
        assert temp_files(live.dir) == []
        assert ok_turn(http, sid, "writable again")["turns"] == first["turns"] + 1
        assert http.delete(f"/v1/sessions/{sid}").status_code == 200


# a memory upload races a chat turn ---------------------------------------------------------
def race(server: Any, upload: bytes, message: list, delay: float) -> tuple[httpx.Response,
                                                                        httpx.Response]:
    """PUT ``upload`` to session "race" and a chat turn on it at once (the PUT ``delay`` s
    later); their responses."""
    results: dict[str, httpx.Response] = {}
    go = threading.Barrier(2)

    def put() -> None:
        with server.client(timeout=WAIT_S) as c:
            go.wait()
            time.sleep(delay)
            results["put"] = c.put("/v1/sessions/race/memory", content=upload)

    def chat() -> None:
        with server.client(timeout=WAIT_S) as c:
            go.wait()
            results["chat"] = c.post("/v1/chat/completions", json={
                **chat_body("", "race", 24), "messages": message})

    threads = [threading.Thread(target=put), threading.Thread(target=chat)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return results["put"], results["chat"]


def test_concurrent_put_and_chat_give_one_of_the_two_orders(live: Live) -> None:
    server = live.ensure()

    def payload(sid: str) -> str:
        return read_header_metadata(live.dir / f"{sid}.safetensors")["payload_sha256"]

    message = chat_body("race", "x", max_tokens=24)["messages"]
    with server.client(timeout=WAIT_S) as http:
        ok_turn(http, "race-a", "first story")
        ok_turn(http, "race-m", "a different beginning")
        a = http.get("/v1/sessions/race-a/memory").content
        m = http.get("/v1/sessions/race-m/memory").content
        m_payload = payload("race-m")
        # the two outcomes, each computed alone: chat on A (then PUT M), or PUT M then chat
        outcomes = {}
        for name, data in (("chat-then-put", a), ("put-then-chat", m)):
            assert http.put(f"/v1/sessions/ref-{name}/memory", content=data).status_code == 201
            r = http.post("/v1/chat/completions", json={
                **chat_body("", f"ref-{name}", 24), "messages": message})
            outcomes[name] = r.json()["session"]["tokens_seen"]
        after_chat_on_m = payload("ref-put-then-chat")
        assert outcomes["chat-then-put"] != outcomes["put-then-chat"]

        seen = []
        for delay in (0.0, 0.01, 0.05, 0.0):
            assert http.put("/v1/sessions/race/memory", content=a).status_code in (200, 201)
            put, chat = race(server, m, message, delay)
            assert put.status_code == 200, put.text
            assert chat.status_code == 200, chat.text
            tokens = chat.json()["session"]["tokens_seen"]
            final = payload("race")
            if final == m_payload:  # the chat ran on A, then the upload replaced it
                assert tokens == outcomes["chat-then-put"]
                seen.append("chat-then-put")
            else:  # the upload, then the chat continued it
                assert final == after_chat_on_m
                assert tokens == outcomes["put-then-chat"]
                seen.append("put-then-chat")
    assert len(seen) == 4, seen


# an HTTP process dies ----------------------------------------------------------------------
def test_http_process_killed_stops_the_server_with_status_1(live: Live) -> None:
    """LitServe restarts no HTTP process; without one, every connection would hang. The
    server stops instead (exit status 1) so that its supervisor restarts it."""
    server = live.ensure()
    [http_process] = server.pids("http")
    os.kill(http_process, signal.SIGKILL)
    assert server.proc.wait(WAIT_S) == 1
    wait_for(lambda: not group_alive(server.proc.pid), "every server process is gone")
    assert "HTTP process" in server.tail() and "exit status 1" in server.tail()


def test_store_write_errors_map_to_507_and_503() -> None:
    from server.store import write_error

    for code, status in ((errno.ENOSPC, 507), (errno.EDQUOT, 507), (errno.EFBIG, 507),
                         (errno.EROFS, 503), (errno.EACCES, 503), (errno.EIO, 503)):
        e = write_error(OSError(code, os.strerror(code)), "saving session 'a'")
        assert e.status == status and "saving session 'a'" in str(e)
        assert e.code == ("insufficient_storage" if status == 507
                          else "session_store_unwritable")
