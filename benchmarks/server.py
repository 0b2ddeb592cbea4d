"""server: latency and throughput of `newllm serve` under concurrent sessions, batching on vs off.

Two servers (``python -m server``, started with `benchmarks.live`) on free loopback ports, one
with ``--max-batch-size 1`` (batching off) and one with ``--max-batch-size 32`` (on: 32 slots,
the default), each with its own temporary session folder; both run, but only one at a time is
under load. For each number of concurrent clients (1, 8, 32, 128), every client runs in its
own thread with its own session and sends streamed completions (greedy, a short new prompt
each turn) until the level's duration is over; a request still running then finishes (each is
bounded by ``--request-timeout``, after which it counts as an error), so a level lasts at most
duration + timeout. Per level: time to first token (the first streamed piece), per-request
latency p50/p95/p99, aggregate generated tokens/s and errors (must be 0). Afterwards every
session's memory file is downloaded
(``GET /v1/sessions/{id}/memory``) and loaded with `newllm.load_memory` into the same checkpoint:
each must be valid. Exits 1 on any error, invalid file or lost session.

    python -m benchmarks.server [--quick] [--checkpoint PATH] [--clients 1 8 32 128] [--duration 20]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROSE,
    new_figure,
    plot_path,
    results_folder,
    save_figure,
    write_result,
)
from benchmarks.live import LiveServer, running_servers
from clients import Client


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


def load_level(server: LiveServer | list[LiveServer], clients: int, duration: float,
               prompts: list[list[int]], max_tokens: int, prefix: str,
               request_timeout: float = 120.0) -> tuple[dict[str, Any], list[str]]:
    """``clients`` threads, each its own session, starting turns for ``duration`` seconds
    (several servers: replicas of one store, client i on server i mod their number).

    Returns the level's row and the sessions that completed at least one turn.
    """
    servers = server if isinstance(server, list) else [server]
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
        with servers[i % len(servers)].client(timeout=request_timeout) as c:
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
                    help="concurrent clients per level (default 1 8 32 128)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default 20)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="new tokens per turn")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens generated per turn")
    ap.add_argument("--workers", type=int, default=1, help="inference workers per server")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="--max-batch-size of the batching-on server")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds one request may take before it counts as an error")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    levels = args.clients or ([1, 4] if args.quick else [1, 8, 32, 128])
    duration = args.duration or (2.0 if args.quick else 20.0)
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    configs = {"batching_off": 1, "batching_on": args.batch_size}

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
                row, used = load_level(server, n, duration, prompts, max_tokens, name,
                                       args.request_timeout)
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
                "max_batch_size": configs, "request_timeout_s": args.request_timeout,
                "loopback": True}
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
