"""Load and soak: many sessions, mixed requests, against a live server on loopback.

Starts ``python -m server`` (a tiny model by default) on a free 127.0.0.1 port in its own
process group, drives it from ``--clients`` threads for ``--warmup`` then ``--duration``
seconds with a random mix of session chats (streamed or not), session completions, stateless
requests, memory exports, imports of exported files into other sessions, deletes and listings,
then checks what the server kept and stops it:

- every request got the answer it should (2xx, and the ``session.turns`` the client expects);
- every session file on disk loads with `newllm.memory_file.load_memory`, the sessions on disk
  are exactly those the clients left, and each holds the number of turns the clients sent
  (an import sets it to the imported file's count, a delete forgets it);
- no temp files are left;
- server memory: RSS summed over every server process (main, LitServe's manager, HTTP, workers)
  at the start (after the warm-up, with no client connected), at the end (likewise) and its
  peak while loaded, and the open file descriptors at start and end.

A client owns a session for the length of one request (sessions are checked out), so the
expected turn counts are exact; concurrent turns of one session are tested elsewhere
(tests/test_server.py, tests/test_hardening_faults.py).

    python scripts/soak.py --duration 600 --out soak.json          # 10 minutes
    python scripts/soak.py --duration 60 --clients 16 --sessions 64 --workers 2

Prints the JSON summary (requests by kind, errors, sessions, RSS and fds) and exits 1 when a
check failed. ``tests/test_soak.py`` runs it for ~30 s. `ServerProcess` is also used by
``tests/test_hardening_faults.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # for direct runs: newllm is imported to check the files
    sys.path.insert(0, str(REPO))
from benchmarks.live import descendants, free_port  # noqa: E402 (after the path fix above)

MiB = 1 << 20
WORDS = ("the cat sat on a mat while rain fell over old stone roads and quiet rivers ran "
         "north past seven hills where nobody had walked for years").split()


# the server under test --------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> tuple[int, int]:
    """(open fds, those that are files: paths, not sockets, pipes or event fds)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0, 0
    files = 0
    for fd in fds:
        try:
            files += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/")
        except OSError:
            pass
    return len(fds), files


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


class ServerProcess:
    """``python -m server`` on a free loopback port, in its own process group."""

    def __init__(self, session_dir: Path, *args: str, api_key: str = "soak-key-123",
                 checkpoint: str = "tiny-infini", env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.session_dir, self.api_key, self.port = Path(session_dir), api_key, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.session_dir.parent / f"server-{self.port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        full_env = {**os.environ, "PYTHONPATH": path}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        full_env.update(env or {})
        self.argv = [sys.executable, "-m", "server", "--checkpoint", checkpoint,
                     "--port", str(self.port), "--session-dir", str(self.session_dir),
                     "--api-key", api_key, "--log-level", "warning", *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def processes(self) -> list[int]:
        return [self.proc.pid, *sorted(descendants(self.proc.pid))]

    def roles(self) -> dict[int, str]:
        """Every server process by role: main, worker (spawned), resource_tracker, manager
        (LitServe's: the first process the main one forks), http (forked later, once the
        workers were ready)."""
        found: dict[int, tuple[str, int]] = {}
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            role = ("main" if pid == self.proc.pid else "worker" if b"spawn_main" in cmdline
                    else "resource_tracker" if b"resource_tracker" in cmdline else "forked")
            found[pid] = (role, int(stat.rsplit(")", 1)[1].split()[19]))  # start time
        forks = sorted((t, pid) for pid, (role, t) in found.items() if role == "forked")
        manager = forks[0][1] if forks else None
        return {pid: role if role != "forked" else "manager" if pid == manager else "http"
                for pid, (role, _) in found.items()}

    def pids(self, role: str) -> list[int]:
        return sorted(pid for pid, r in self.roles().items() if r == role)

    def workers(self) -> list[int]:
        """Pids of the inference workers (LitServe spawns them)."""
        return self.pids("worker")

    def usage(self) -> dict[str, Any]:
        """RSS and open fds of every server process, summed and per process."""
        roles = self.roles()
        procs = {pid: (rss_bytes(pid), *fd_count(pid)) for pid in roles}
        return {"rss_bytes": sum(r for r, _, _ in procs.values()),
                "fds": sum(f for _, f, _ in procs.values()),
                "file_fds": sum(f for _, _, f in procs.values()), "processes": len(procs),
                "threads": sum(thread_count(pid) for pid in procs),
                "per_process": {str(p): {"role": roles[p], "rss_mib": round(r / MiB, 1),
                                         "fds": f} for p, (r, f, _) in procs.items()}}

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL to whatever of the group is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and every child)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


# the workload -------------------------------------------------------------------------------
OPS = {"chat": 30, "chat_stream": 10, "completion": 18, "completion_stream": 5, "reset": 3,
       "export": 10, "import": 8, "delete": 4, "stateless": 6, "list": 4, "metrics": 2}


@dataclass
class Session:
    id: str
    exists: bool = False
    kind: str = ""  # "chat" or "text" once it exists
    turns: int = 0
    busy: bool = False


@dataclass
class Tally:
    requests: Counter = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, op: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.requests[op] += 1
            self.latency[op].append(seconds)
            if error is not None:
                self.errors.append({"op": op, "error": error[:300]})


class Workload:
    """Sessions, their expected contents, and the clients' operations on them."""

    def __init__(self, server: ServerProcess, model: str, sessions: int, max_tokens: int,
                 seed: int) -> None:
        self.server, self.model, self.max_tokens, self.seed = server, model, max_tokens, seed
        self.sessions = [Session(f"soak-{i:03d}") for i in range(sessions)]
        self.blobs: list[tuple[bytes, str, int]] = []  # exported files: (data, kind, turns)
        self.lock = threading.Lock()
        self.throttled = 0  # uploads answered 429 (too many at once) and retried
        self.tally = Tally()

    def checkout(self, rng: random.Random) -> Session | None:
        with self.lock:
            free = [s for s in self.sessions if not s.busy]
            if not free:
                return None
            s = rng.choice(free)
            s.busy = True
            return s

    def release(self, s: Session) -> None:
        with self.lock:
            s.busy = False

    def run_client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        names, weights = list(OPS), list(OPS.values())
        with self.server.client() as http:
            while time.monotonic() < deadline:
                op = rng.choices(names, weights)[0]
                t0 = time.monotonic()
                try:
                    error = self.one(http, op, rng)
                except Exception as e:  # noqa: BLE001 - a transport error is a soak error
                    error = f"{type(e).__name__}: {e}"
                self.tally.record(op, time.monotonic() - t0, error)

    def one(self, http: httpx.Client, op: str, rng: random.Random) -> str | None:
        """Run one operation; the problem found, or None."""
        if op == "stateless":
            return self.generate(http, rng, None, rng.random() < 0.5, rng.random() < 0.3)
        if op == "list":
            r = http.get("/v1/sessions")
            return None if r.status_code == 200 else f"list: {r.status_code} {r.text[:200]}"
        if op == "metrics":
            r = http.get("/metrics")
            return None if r.status_code == 200 else f"metrics: {r.status_code}"
        s = self.checkout(rng)
        if s is None:
            time.sleep(0.01)
            return None
        try:
            if op == "export":
                return self.export(http, s) if s.exists else None
            if op == "import":
                return self.import_(http, s, rng)
            if op == "delete":
                return self.delete(http, s) if s.exists else None
            if op == "reset":
                return self.generate(http, rng, s, True, False, reset=True)
            chat = op.startswith("chat") if not s.exists else s.kind == "chat"
            return self.generate(http, rng, s, chat, op.endswith("stream"))
        finally:
            self.release(s)

    def generate(self, http: httpx.Client, rng: random.Random, s: Session | None, chat: bool,
                 stream: bool, *, reset: bool = False) -> str | None:
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
        body: dict[str, Any] = {"model": self.model, "max_tokens": rng.randint(1, self.max_tokens),
                                "temperature": 0.8, "seed": rng.randint(0, 1 << 30)}
        body.update({"messages": [{"role": "user", "content": text}]} if chat
                    else {"prompt": text})
        if s is not None:
            body["metadata"] = {"session_id": s.id, "session_input": "new"}
            if reset:
                body["metadata"]["reset_session"] = "true"
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
            session, problem = self._stream(http, route, body)
        else:
            r = http.post(route, json=body)
            if r.status_code != 200:
                return f"{route}: {r.status_code} {r.text[:200]}"
            session, problem = r.json().get("session"), None
        if problem is not None or s is None:
            return problem
        want = 1 if reset or not s.exists else s.turns + 1
        if session is None or session.get("turns") != want or session.get("id") != s.id:
            return f"{route}: session {s.id} should have {want} turns, the server said {session}"
        s.exists, s.kind, s.turns = True, "chat" if chat else "text", want
        return None

    def _stream(self, http: httpx.Client, route: str,
                body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        session, done = None, False
        with http.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                r.read()
                return None, f"{route} stream: {r.status_code} {r.text[:200]}"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return None, f"{route} stream error: {chunk['error']}"
                session = chunk.get("session", session)
        return session, None if done else f"{route} stream ended without [DONE]"

    def export(self, http: httpx.Client, s: Session) -> str | None:
        r = http.get(f"/v1/sessions/{s.id}/memory")
        if r.status_code != 200:
            return f"export {s.id}: {r.status_code} {r.text[:200]}"
        turns = r.headers.get("x-newllm-session-turns")
        if turns != str(s.turns):
            return f"export {s.id}: {turns} turns in the file, {s.turns} sent"
        with self.lock:
            self.blobs = [*self.blobs[-7:], (r.content, s.kind, s.turns)]
        return None

    def import_(self, http: httpx.Client, s: Session, rng: random.Random) -> str | None:
        with self.lock:
            if not self.blobs:
                return None
            data, kind, turns = rng.choice(self.blobs)
        r = http.put(f"/v1/sessions/{s.id}/memory", content=data)
        for _ in range(20):  # too many uploads at once (--max-uploads): wait as told, retry
            if r.status_code != 429:
                break
            with self.lock:
                self.throttled += 1
            time.sleep(float(r.headers.get("retry-after", "1")))
            r = http.put(f"/v1/sessions/{s.id}/memory", content=data)
        if r.status_code != (200 if s.exists else 201):
            return f"import {s.id}: {r.status_code} {r.text[:200]}"
        if r.json().get("turns") != turns:
            return f"import {s.id}: {r.json()} should hold {turns} turns"
        s.exists, s.kind, s.turns = True, kind, turns
        return None

    def delete(self, http: httpx.Client, s: Session) -> str | None:
        r = http.delete(f"/v1/sessions/{s.id}")
        if r.status_code != 200:
            return f"delete {s.id}: {r.status_code} {r.text[:200]}"
        s.exists, s.kind, s.turns = False, "", 0
        return None

    def run_phase(self, clients: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.run_client, args=(i, deadline), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def check_sessions(work: Workload, session_dir: Path, model: Any,
                   tokenizer: Any) -> dict[str, Any]:
    """Every file loads and holds the turns the clients sent; the server lists the same."""
    from newllm.memory_file import load_memory, read_memory_metadata

    problems: list[str] = []
    with work.server.client() as http:
        served = http.get("/v1/models").json()["data"][0]["fingerprint"]
    if served != model.fingerprint():
        problems.append(f"the server's model ({served[:12]}) is not the one loaded here to "
                        f"check the files ({model.fingerprint()[:12]}); did the code change?")
    expected = {s.id: s for s in work.sessions if s.exists}
    on_disk = {p.name.removesuffix(".safetensors") for p in session_dir.glob("*.safetensors")}
    if on_disk != set(expected):
        problems.append(f"sessions on disk {sorted(on_disk ^ set(expected))} differ from what "
                        "the clients left")
    loaded = 0
    for sid in sorted(on_disk & set(expected)):
        path = session_dir / f"{sid}.safetensors"
        try:
            load_memory(path, model, tokenizer_hash=tokenizer.sha256)
            meta = read_memory_metadata(path)
        except Exception as e:  # noqa: BLE001 - reported
            problems.append(f"{sid}: does not load: {e}")
            continue
        loaded += 1
        if meta.get("session.turns") != str(expected[sid].turns):
            problems.append(f"{sid}: {meta.get('session.turns')} turns on disk, "
                            f"{expected[sid].turns} sent")
    with work.server.client() as http:
        listed = {d["id"]: d["turns"] for d in http.get("/v1/sessions").json()["data"]}
    if listed != {sid: s.turns for sid, s in expected.items()}:
        problems.append("GET /v1/sessions differs from what the clients sent")
    temps = sorted(p.name for p in session_dir.glob(".*.tmp"))
    if temps:
        problems.append(f"temp files left: {temps}")
    return {"expected": len(expected), "on_disk": len(on_disk), "loaded": loaded,
            "used": sum(1 for s in work.sessions if s.turns or s.exists),
            "turns_total": sum(s.turns for s in expected.values()), "problems": problems}


def quiet_usage(server: ServerProcess, settle: float = 1.0) -> dict[str, Any]:
    time.sleep(settle)  # closed client connections are closed on the server side too
    return server.usage()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(duration: float, *, warmup: float = 10.0, clients: int = 8, sessions: int = 40,
        max_tokens: int = 16, seed: int = 0, checkpoint: str = "tiny-infini",
        workers: int = 2, max_batch_size: int = 4, session_dir: Path | None = None,
        sample_every: float = 1.0, max_rss_growth: float = 0.10,
        rss_slack_mib: float = 48, fd_slack: int = 16,
        server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start a server, soak it, check it, stop it; the summary (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="newllm-soak-") as tmp:
        folder = Path(session_dir) if session_dir else Path(tmp) / "sessions"
        server = ServerProcess(folder, "--workers", str(workers), "--max-batch-size",
                               str(max_batch_size), "--max-tokens-limit", str(max_tokens),
                               checkpoint=checkpoint, env=server_env,
                               log=Path(tmp) / "server.log")
        try:
            from newllm.checkpoint import load_checkpoint

            model, tokenizer = load_checkpoint(checkpoint)  # the code the server runs now
            server.wait_ready(600)
            work = Workload(server, checkpoint, sessions, max_tokens, seed)
            t0 = time.monotonic()
            work.run_phase(clients, warmup)
            warm = sum(work.tally.requests.values())
            start = quiet_usage(server)
            peak, stop = [start["rss_bytes"]], threading.Event()
            timeline: list[tuple[float, int]] = []

            def sample() -> None:
                while not stop.wait(sample_every):
                    peak.append(server.usage()["rss_bytes"])
                    timeline.append((time.monotonic() - t1, peak[-1]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t1 = time.monotonic()
            work.run_phase(clients, duration)
            elapsed = time.monotonic() - t1
            stop.set()
            sampler.join()
            end = quiet_usage(server)
            sessions_report = check_sessions(work, folder, model, tokenizer)
            alive = server.proc.poll() is None and server.healthy()
        except BaseException:
            print(server.tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
        log_tail = server.tail(2000)
    total = sum(work.tally.requests.values())
    growth = end["rss_bytes"] - start["rss_bytes"]
    rss_bound = start["rss_bytes"] * max_rss_growth + rss_slack_mib * MiB
    problems = list(sessions_report.pop("problems"))
    if work.tally.errors:
        problems.append(f"{len(work.tally.errors)} requests failed")
    if not alive:
        problems.append("the server was not healthy at the end")
    if growth > rss_bound:
        problems.append(f"server RSS grew by {growth / MiB:.1f} MiB (bound "
                        f"{rss_bound / MiB:.1f} MiB)")
    # sockets: a thread's first call through a manager proxy opens a connection to LitServe's
    # manager (an fd at each end), e.g. each thread of an HTTP process's pool, so allow a few
    fd_bound = start["fds"] + fd_slack + 2 * max(0, end["threads"] - start["threads"])
    if end["fds"] > fd_bound:
        problems.append(f"open fds grew from {start['fds']} to {end['fds']} (bound {fd_bound})")
    if end["file_fds"] > start["file_fds"] + 2:  # session, lock and temp files
        problems.append(f"open files grew from {start['file_fds']} to {end['file_fds']}")
    return {
        "duration_s": round(elapsed, 1), "warmup_s": warmup, "wall_s": round(
            time.monotonic() - t0, 1), "clients": clients, "checkpoint": checkpoint,
        "workers": workers, "max_batch_size": max_batch_size,
        "requests": {"total": total, "warmup": warm, "measured": total - warm,
                     "per_second": round((total - warm) / max(elapsed, 1e-9), 1),
                     "by_kind": dict(sorted(work.tally.requests.items()))},
        "latency_ms": {op: {"p50": round(percentile(v, 0.5) * 1000, 1),
                            "p95": round(percentile(v, 0.95) * 1000, 1)}
                       for op, v in sorted(work.tally.latency.items())},
        "errors": {"count": len(work.tally.errors), "first": work.tally.errors[:10]},
        "uploads_throttled_and_retried": work.throttled,
        "sessions": {"pool": sessions, **sessions_report},
        "rss_mib": {"start": round(start["rss_bytes"] / MiB, 1),
                    "end": round(end["rss_bytes"] / MiB, 1),
                    "peak": round(max(peak + [end["rss_bytes"]]) / MiB, 1),
                    "growth": round(growth / MiB, 1), "bound": round(rss_bound / MiB, 1),
                    # (seconds into the measured phase, MiB) under load, at most 21 points
                    "timeline": [[round(t), round(r / MiB, 1)]
                                 for t, r in timeline[::max(1, -(-len(timeline) // 20))]]},
        "fds": {"start": start["fds"], "end": end["fds"], "bound": fd_bound,
                "files_start": start["file_fds"], "files_end": end["file_fds"]},
        "threads": {"start": start["threads"], "end": end["threads"]},
        "processes": {"start": start["processes"], "end": end["processes"],
                      "detail": {pid: {"role": e["role"],
                                       "rss_mib": [start["per_process"].get(pid, {}).get(
                                           "rss_mib"), e["rss_mib"]],
                                       "fds": [start["per_process"].get(pid, {}).get("fds"),
                                               e["fds"]]}
                                 for pid, e in end["per_process"].items()}},
        "problems": problems, "ok": not problems,
        "server_log_tail": log_tail if problems else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="measured seconds (default 600)")
    p.add_argument("--warmup", type=float, default=20, help="seconds before RSS is measured")
    p.add_argument("--clients", type=int, default=8, help="client threads")
    p.add_argument("--sessions", type=int, default=40, help="session ids in the pool")
    p.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens asked for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="tiny-infini", help="what the server serves")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--session-dir", type=Path, default=None,
                   help="keep the session files here (default: a temporary folder)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server (e.g. MALLOC_ARENA_MAX=2)")
    p.add_argument("--out", type=Path, default=None, help="also write the summary here")
    a = p.parse_args(argv)
    summary = run(a.duration, warmup=a.warmup, clients=a.clients, sessions=a.sessions,
                  max_tokens=a.max_tokens, seed=a.seed, checkpoint=a.checkpoint,
                  workers=a.workers, max_batch_size=a.max_batch_size,
                  session_dir=a.session_dir,
                  server_env=dict(item.split("=", 1) for item in a.server_env))
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
