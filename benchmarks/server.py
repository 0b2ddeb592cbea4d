"""server: latency and throughput of `newllm serve` under concurrent sessions, batching on vs off.

Two servers (``python -m server``) on free loopback ports, one with ``--max-batch-size 1``
(batching off) and one with ``--max-batch-size 8`` (on), each with its own temporary session
folder. For each number of concurrent clients (1, 8, 32), every client runs in its own thread
with its own session and sends streamed completions (greedy, a short new prompt each turn) for a
fixed duration: time to first token (the first streamed piece), per-request latency p50/p95/p99,
aggregate generated tokens/s and errors (must be 0). Afterwards every session's memory file is
downloaded (``GET /v1/sessions/{id}/memory``) and loaded with `newllm.load_memory` into the same
checkpoint: each must be valid. Exits 1 on any error, invalid file or lost session.

This file also holds the helpers that start and stop live servers for the benchmarks that need
them (`transfer`, `move`).

    python -m benchmarks.server [--quick] [--checkpoint PATH] [--clients 1 8 32] [--duration 20]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import new_figure, plot_path, save_figure, write_result
from clients import Client

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
# original prose used as conversation text and as filler (no file needed)
PROSE = (
    "The river ran low that autumn, and the ferryman spent his afternoons mending nets on the "
    "stones. Travellers were few. A merchant came through with two mules and a crate of copper "
    "pans, and asked the way to the market town beyond the hills. The ferryman pointed at the "
    "old road, which climbed between the orchards and then vanished into a fold of the land. "
    "In the evenings the village gathered at the well to trade news: who had married, whose "
    "roof had fallen in, how the barley stood in the upper fields. Children chased the geese "
    "along the bank until their mothers called them home. When the first frost came, the "
    "miller opened his doors to anyone who needed warmth, and the long winter talk began. "
)


# live servers --------------------------------------------------------------------------------
@dataclass
class LiveServer:
    """A ``python -m server`` subprocess on a loopback port."""

    url: str
    process: subprocess.Popen
    log: Path
    session_dir: Path

    def client(self, timeout: float = 300.0) -> Client:
        """A client that never retries, so every failure is counted."""
        return Client(self.url, timeout=timeout, max_retries=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(checkpoint: str | None, folder: Path, name: str, *, max_batch_size: int = 1,
                 workers: int = 1) -> LiveServer:
    """Start a server (not waiting for it); its log and sessions go under ``folder``."""
    port = free_port()
    log = folder / f"{name}.log"
    session_dir = folder / f"sessions-{name}"
    argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
            "--session-dir", str(session_dir), "--max-batch-size", str(max_batch_size),
            "--workers", str(workers), "--log-level", "warning"]
    if checkpoint is not None:
        argv += ["--checkpoint", checkpoint]
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEWLLM_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return LiveServer(f"http://127.0.0.1:{port}", process, log, session_dir)


def wait_ready(server: LiveServer, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"server {server.url} exited with {server.process.returncode}:"
                                   f"\n{server.log.read_text()[-3000:]}")
            try:
                if c.health():
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


@contextmanager
def running_servers(checkpoint: str | None, batch_sizes: dict[str, int],
                    workers: int = 1) -> Iterator[dict[str, LiveServer]]:
    """Servers named like ``batch_sizes``' keys, started together and always stopped."""
    with tempfile.TemporaryDirectory(prefix="newllm-bench-") as tmp:
        started: dict[str, LiveServer] = {}
        try:
            for name, batch in batch_sizes.items():
                started[name] = start_server(checkpoint, Path(tmp), name, max_batch_size=batch,
                                             workers=workers)
            for server in started.values():
                wait_ready(server)
            yield started
        finally:
            for server in started.values():
                stop_server(server)


# load ----------------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100)
    return ordered[int(rank) - 1]


def one_turn(client: Client, session: str, prompt: list[int],
             max_tokens: int) -> tuple[float, float, int]:
    """(time to first piece, latency, generated tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    stream = client.stream_complete(prompt, session, session_input="new", max_tokens=max_tokens,
                                    temperature=0, logprobs=0)  # logprobs: a piece per token
    for _ in stream.deltas():
        if first is None:
            first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    usage = stream.usage or {}
    return (latency if first is None else first), latency, int(usage.get("completion_tokens", 0))


def load_level(server: LiveServer, clients: int, duration: float, prompts: list[list[int]],
               max_tokens: int, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """``clients`` threads, each its own session, sending turns for ``duration`` seconds."""
    ttft: list[float] = []
    latency: list[float] = []
    tokens = [0] * clients
    done = [0] * clients  # successful turns per client
    errors: list[str] = []
    sessions = [f"{prefix}-c{clients}-{i}" for i in range(clients)]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=120)
    deadline = [0.0]

    def run(i: int) -> None:
        rng = random.Random(i)
        with server.client() as c:
            start.wait()
            while time.perf_counter() < deadline[0]:
                try:
                    f, lat, n = one_turn(c, sessions[i], rng.choice(prompts), max_tokens)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                with lock:
                    ttft.append(f)
                    latency.append(lat)
                    tokens[i] += n
                    done[i] += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not latency:
        raise RuntimeError(f"no request succeeded with {clients} clients: {errors[:3]}")
    row = {"clients": clients, "requests": len(latency), "errors": len(errors),
           "wall_s": wall, "generated_tokens": sum(tokens),
           "tokens_per_s": sum(tokens) / wall, "requests_per_s": len(latency) / wall}
    for name, samples in (("ttft_ms", ttft), ("latency_ms", latency)):
        row[name] = {f"p{q}": 1000 * percentile(samples, q) for q in (50, 95, 99)}
    row["error_messages"] = errors[:5]
    return row, [s for s, n in zip(sessions, done, strict=True) if n]


def check_memory_files(server: LiveServer, sessions: list[str], model: Any,
                       tokenizer_hash: str) -> dict[str, Any]:
    """Download every session's memory file and load it into the same checkpoint."""
    from newllm import MemoryFileError, load_memory

    valid, problems = 0, []
    with server.client() as c:
        listed = {s.id for s in c.sessions()}
        for sid in sessions:
            try:
                data = c.export_memory(sid)
                assert isinstance(data, bytes)
                state = load_memory(data, model, tokenizer_hash=tokenizer_hash)
                if state.position < 1:
                    raise MemoryFileError(f"session {sid} holds no tokens")
                valid += 1
            except Exception as e:  # noqa: BLE001 - reported
                problems.append(f"{sid}: {type(e).__name__}: {e}"[:300])
    missing = sorted(set(sessions) - listed)
    return {"checked": len(sessions), "valid": valid, "listed": len(listed),
            "missing": missing, "problems": problems[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-infini, 1 and 4 clients (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder or preset (default: the bundled default model)")
    ap.add_argument("--clients", type=int, nargs="*", default=None,
                    help="concurrent clients per level (default 1 8 32)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default 20)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="new tokens per turn")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens generated per turn")
    ap.add_argument("--workers", type=int, default=1, help="inference workers per server")
    args = ap.parse_args(argv)
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    levels = args.clients or ([1, 4] if args.quick else [1, 8, 32])
    duration = args.duration or (2.0 if args.quick else 20.0)
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    configs = {"batching_off": 1, "batching_on": 8}

    from newllm import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    ids = tok.encode(PROSE * 4)
    P = args.prompt_tokens
    prompts = [ids[i:i + P] for i in range(0, len(ids) - P, max(1, P // 2))]
    rows: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, dict[str, Any]] = {}
    with running_servers(checkpoint, configs, args.workers) as servers:
        for name, server in servers.items():
            with server.client() as c:  # warm-up, stateless
                for prompt in prompts[:3]:
                    c.complete(prompt, max_tokens=max_tokens, temperature=0)
            sessions: list[str] = []
            rows[name] = []
            for n in levels:
                row, used = load_level(server, n, duration, prompts, max_tokens, name)
                rows[name].append(row)
                sessions += used
                print(f"{name:13s} {n:3d} clients: {row['tokens_per_s']:8.1f} tokens/s, "
                      f"TTFT p50 {row['ttft_ms']['p50']:.0f} ms, latency p50 "
                      f"{row['latency_ms']['p50']:.0f} / p99 {row['latency_ms']['p99']:.0f} ms, "
                      f"{row['errors']} errors", flush=True)
            files[name] = check_memory_files(server, sessions, model, tok.sha256)
    speedup = {str(on["clients"]): on["tokens_per_s"] / off["tokens_per_s"]
               for on, off in zip(rows["batching_on"], rows["batching_off"], strict=True)}
    errors = sum(r["errors"] for rs in rows.values() for r in rs)
    all_valid = all(f["valid"] == f["checked"] and not f["missing"] for f in files.values())
    results = {"rows": rows, "batching_speedup": speedup, "errors": errors,
               "memory_files": files, "all_memory_files_valid": all_valid}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": model.config.name, "fingerprint": model.fingerprint(),
                "clients": levels, "duration_s": duration, "prompt_tokens": P,
                "max_tokens": max_tokens, "greedy": True, "workers": args.workers,
                "max_batch_size": configs, "loopback": True}
    path = write_result("server", settings, results, args.out)
    fig, ax = new_figure(f"Server throughput ({model.config.name}, loopback)",
                         "concurrent clients (own session each)", "generated tokens / s")
    for name, rs in rows.items():
        ax.plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o",
                label=f"{name} (max batch {configs[name]})")
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.legend()
    save_figure(fig, plot_path("server", args.out))
    print(f"wrote {path}; batching speed-up: " +
          ", ".join(f"{k} clients {v:.2f}x" for k, v in speedup.items()))
    if errors or not all_valid:
        print(f"FAILED: {errors} request errors; memory files: {files}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
