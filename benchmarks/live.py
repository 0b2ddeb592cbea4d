"""Live ``python -m server`` processes on free loopback ports, for benchmarks and live tests.

One helper owns starting, waiting for, and stopping a real server subprocess: each gets a free
port on 127.0.0.1, its own session folder and log file under a given folder, and a process group
of its own, so stopping it (SIGTERM for a clean shutdown, then SIGKILL to whatever of the group is
left) never touches other processes. Nothing here imports torch.

    with running_servers("tiny-infini", {"a": 1, "b": 8}) as servers:  # name -> max batch size
        with servers["a"].client() as c:
            c.complete([1, 2, 3], max_tokens=4)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import Client

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
# a key in the caller's environment would apply to every server started here
DROPPED_ENV = ("NEWLLM_API_KEY", "PROMETHEUS_MULTIPROC_DIR")


@dataclass
class LiveServer:
    """A ``python -m server`` subprocess on a loopback port."""

    url: str
    process: subprocess.Popen
    log: Path
    session_dir: Path
    api_key: str | None = None
    workers: int = 1

    def client(self, timeout: float = 300.0, max_retries: int = 0) -> Client:
        """A client of this server; by default it never retries, so every failure is seen."""
        return Client(self.url, self.api_key, timeout=timeout, max_retries=max_retries)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def start_server(checkpoint: str | None, folder: Path, name: str, *, max_batch_size: int = 1,
                 workers: int = 1, api_key: str | None = None, port: int | None = None,
                 extra: list[str] | None = None) -> LiveServer:
    """Start a server (not waiting for it); its log and sessions go under ``folder``.

    ``checkpoint`` None serves the bundled default model; ``api_key`` makes it require one;
    ``port`` None takes a free one; ``extra``: more ``newllm serve`` flags (e.g.
    ``["--session-store", redis.url]``). The weights are float32 (``--no-half-weights``: the
    mode the library's `load_checkpoint` gives, which benchmarks compare against) unless
    ``extra`` says ``--half-weights``.
    """
    port = port or free_port()
    log = folder / f"{name}.log"
    session_dir = folder / f"sessions-{name}"
    argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
            "--session-dir", str(session_dir), "--max-batch-size", str(max_batch_size),
            "--workers", str(workers), "--log-level", "warning"]
    if checkpoint is not None:
        argv += ["--checkpoint", checkpoint]
    argv += extra or []
    if not {"--half-weights", "--no-half-weights"} & set(argv):
        argv.append("--no-half-weights")
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    if api_key:
        env["NEWLLM_API_KEY"] = api_key  # the environment, not argv: not shown by ps
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return LiveServer(f"http://127.0.0.1:{port}", process, log, session_dir, api_key, workers)


def decode_workers(metrics_text: str) -> dict[str, float]:
    """``newllm_decode_workers`` by step from a /metrics text: how many workers decode with
    the eager step, compile in the background, or decode with the compiled step."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith('newllm_decode_workers{step="'):
            step = line.split('"')[1]
            out[step] = out.get(step, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def wait_ready(server: LiveServer, timeout: float = START_TIMEOUT_S, *,
               compiled: bool = True) -> None:
    """Poll ``/health`` until it answers and (``compiled``) every worker has its decode step
    (a compiled step compiles in the background while the server already answers:
    measurements wait for it); RuntimeError with the log's tail if that never happens."""
    deadline = time.monotonic() + timeout
    with server.client(timeout=10.0) as c:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"server {server.url} exited with {server.process.returncode}:"
                                   f"\n{server.log.read_text()[-3000:]}")
            try:
                if c.health():
                    if not compiled:
                        return
                    steps = decode_workers(c.metrics())
                    if not steps.get("compiling") and sum(steps.values()) >= server.workers:
                        return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {server.url} not ready in {timeout:.0f} s:\n"
                                   f"{server.log.read_text()[-3000:]}")
            time.sleep(0.2)


def stop_server(server: LiveServer) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL to anything left of its process group."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait(5)


@dataclass
class RedisProcess:
    """A ``redis-server`` subprocess on a loopback port, its data in ``folder``."""

    url: str
    port: int
    folder: Path
    process: subprocess.Popen
    appendonly: bool = True

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def start_redis(folder: Path, *, port: int | None = None, appendonly: bool = True,
                binary: str = "redis-server", timeout: float = 20.0) -> RedisProcess:
    """Start redis-server on 127.0.0.1 (a free port, or ``port`` to restart one where it was),
    its data and log in ``folder``, AOF persistence on unless ``appendonly`` is False; wait
    until it answers PING."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(folder / "redis.log")]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = RedisProcess(f"redis://127.0.0.1:{port}/0", port, folder, process, appendonly)
    deadline = time.monotonic() + timeout
    client = server.client()
    while True:
        if process.poll() is not None:
            log = folder / "redis.log"
            raise RuntimeError(f"redis-server exited with {process.returncode}: "
                               f"{log.read_text()[-2000:] if log.exists() else ''}")
        try:
            if client.ping():
                return server
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        if time.monotonic() > deadline:
            stop_redis(server)
            raise RuntimeError(f"redis-server on port {port} did not answer in {timeout:g} s")
        time.sleep(0.05)


def stop_redis(server: RedisProcess) -> None:
    """SIGTERM (Redis writes its AOF and exits), again each second while it refuses (it does
    while an AOF rewrite runs), SIGKILL after 20 s."""
    for _ in range(20):
        if server.process.poll() is not None:
            return
        server.process.terminate()
        try:
            server.process.wait(1)
        except subprocess.TimeoutExpired:
            pass
    server.process.kill()
    server.process.wait(5)


@contextmanager
def running_servers(checkpoint: str | None, batch_sizes: dict[str, int], workers: int = 1,
                    folder: Path | None = None,
                    api_keys: dict[str, str] | None = None,
                    extra: dict[str, list[str]] | None = None,
                    ) -> Iterator[dict[str, LiveServer]]:
    """Servers named like ``batch_sizes``' keys, started together, ready, and always stopped
    (``extra``: more flags for some of them, by name).

    Logs and session folders go under ``folder`` (default: a temporary folder, removed after).
    """
    with tempfile.TemporaryDirectory(prefix="newllm-live-") as tmp:
        where = Path(folder) if folder is not None else Path(tmp)
        started: dict[str, LiveServer] = {}
        try:
            for name, batch in batch_sizes.items():
                started[name] = start_server(checkpoint, where, name, max_batch_size=batch,
                                             workers=workers,
                                             api_key=(api_keys or {}).get(name),
                                             extra=(extra or {}).get(name))
            for server in started.values():
                wait_ready(server)
            yield started
        finally:
            for server in started.values():
                stop_server(server)
