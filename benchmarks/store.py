"""store: what the Redis session store costs against the folder, per turn and under load.

1. Per turn, in one process: the store work of one turn of a session (take its lock or lease,
   read the file's metadata, read the file, write the new file, release), timed round-robin
   for the folder store (a temp folder) and the Redis store (a redis-server started here on a
   loopback port, AOF on with ``appendfsync always``, as a deployment that loses nothing),
   with memory files of the checkpoint after 100 and 10,000 tokens.
2. Under load: server tokens/s with N clients (own session each, streamed greedy completions)
   against one folder-backed server, one Redis-backed replica, and two Redis-backed replicas
   sharing the Redis (clients spread over them round-robin). On a 2-core machine two replicas
   share the same cores, so this shows the store's overhead, not scaling.

    python -m benchmarks.store [--quick] [--checkpoint PATH] [--clients 1 8 32] [--duration 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PROSE,
    new_figure,
    plot_path,
    results_folder,
    round_robin,
    save_figure,
    write_result,
)
from benchmarks.live import running_servers, start_redis, stop_redis
from benchmarks.server import load_level


def memory_file(model: Any, tokenizer: Any, tokens: int) -> bytes:
    """The memory file of a session of ``model`` that has read ``tokens`` tokens of prose."""
    import torch

    from newllm import save_memory
    from server.transcript import Transcript

    ids = tokenizer.encode(PROSE * (1 + tokens // 200))
    while len(ids) < tokens:
        ids = ids + ids
    state = model.init_state(1)
    with torch.no_grad():
        for start in range(0, tokens, 512):
            _, state = model(torch.tensor([ids[start:min(tokens, start + 512)]]), state,
                             last_only=True)
    transcript = Transcript().extend(["x" * tokens], "text", lengths=[tokens],
                                     open_reply=False)
    return save_memory(state, model, tokenizer_hash=tokenizer.sha256,
                       metadata=transcript.to_metadata())


def turn_of(store: Any, sid: str, data: bytes) -> Any:
    """One turn's store work on session ``sid`` (which exists): lock, metadata, read, write."""
    locks = store.locks()

    def turn() -> None:
        assert locks.try_acquire(sid)
        try:
            assert store.metadata(sid) is not None
            assert store.read(sid) is not None
            store.write(sid, data, locks)
        finally:
            locks.release(sid)
    return turn


def per_turn(model: Any, tokenizer: Any, lengths: list[int], repeat: int,
             redis_url: str, folder: Path) -> list[dict[str, Any]]:
    from server.redis_store import RedisStore
    from server.store import FolderStore

    stores = {"folder": FolderStore(folder), "redis": RedisStore(redis_url)}
    for store in stores.values():
        store.prepare()
    rows = []
    for n in lengths:
        data = memory_file(model, tokenizer, n)
        sid = f"t{n}"
        for store in stores.values():  # create it, so each timed turn replaces a file
            locks = store.locks()
            assert locks.try_acquire(sid)
            store.write(sid, data, locks)
            locks.release(sid)
        medians = round_robin({k: turn_of(s, sid, data) for k, s in stores.items()}, repeat)
        row = {"tokens": n, "file_bytes": len(data),
               **{f"{k}_ms": 1000 * v for k, v in medians.items()}}
        row["redis_vs_folder"] = row["redis_ms"] / row["folder_ms"]
        rows.append(row)
        print(f"{n:6d} tokens, {len(data):9,d} bytes: folder {row['folder_ms']:.2f} ms, "
              f"redis {row['redis_ms']:.2f} ms per turn", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-infini, short runs (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder or preset (default: the bundled default model)")
    ap.add_argument("--clients", type=int, nargs="*", default=None,
                    help="concurrent clients per level (default 1 8 32)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default 10)")
    ap.add_argument("--repeat", type=int, default=None, help="timed turns per store (default 200)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request")
    ap.add_argument("--redis-server", default="redis-server", help="the redis-server program")
    args = ap.parse_args(argv)
    if shutil.which(args.redis_server) is None:
        print(f"benchmarks.store: {args.redis_server!r} not found; install redis-server "
              "(Debian package redis-server)", file=sys.stderr)
        return 2
    args.out = results_folder(args.out, args.quick)
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    levels = args.clients or ([1, 4] if args.quick else [1, 8, 32])
    duration = args.duration or (2.0 if args.quick else 10.0)
    repeat = args.repeat or (20 if args.quick else 200)
    lengths = [100, 1000] if args.quick else [100, 10_000]
    max_tokens = args.max_tokens or (8 if args.quick else 32)

    import torch

    from newllm import load_checkpoint

    torch.set_num_threads(1)
    model, tok = load_checkpoint(checkpoint)
    model.eval()
    ids = tok.encode(PROSE * 4)
    prompts = [ids[i:i + 32] for i in range(0, len(ids) - 32, 16)]
    with tempfile.TemporaryDirectory(prefix="newllm-store-bench-") as tmp:
        redis = start_redis(Path(tmp) / "redis", binary=args.redis_server)
        try:
            turns = per_turn(model, tok, lengths, repeat, redis.url, Path(tmp) / "folder")
            redis.client().flushdb()
            shared = ["--session-store", redis.url]
            configs = {"folder": 1, "redis_1": 1, "redis_2a": 1, "redis_2b": 1}
            rows: dict[str, list[dict[str, Any]]] = {"folder": [], "redis_1_replica": [],
                                                    "redis_2_replicas": []}
            with running_servers(checkpoint, {k: 32 for k in configs}, folder=Path(tmp),
                                 extra={k: shared for k in configs if k != "folder"}) as srv:
                groups = {"folder": [srv["folder"]], "redis_1_replica": [srv["redis_1"]],
                          "redis_2_replicas": [srv["redis_2a"], srv["redis_2b"]]}
                for servers in groups.values():  # warm-up, stateless
                    for server in servers:
                        with server.client() as c:
                            c.complete(prompts[0], max_tokens=max_tokens, temperature=0)
                for n in levels:
                    for name, servers in groups.items():  # levels interleaved across setups
                        row, _ = load_level(servers, n, duration, prompts, max_tokens,
                                            f"{name}-{n}")
                        rows[name].append(row)
                        print(f"{name:17s} {n:3d} clients: {row['tokens_per_s']:8.1f} tokens/s,"
                              f" {row['errors']} errors", flush=True)
        finally:
            stop_redis(redis)
    errors = sum(r["errors"] for rs in rows.values() for r in rs)
    ratio = {name: {str(r["clients"]): r["tokens_per_s"] / f["tokens_per_s"]
                    for r, f in zip(rs, rows["folder"], strict=True)}
             for name, rs in rows.items() if name != "folder"}
    results = {"per_turn": turns, "rows": rows, "tokens_per_s_vs_folder": ratio,
               "errors": errors}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": model.config.name, "fingerprint": model.fingerprint(),
                "lengths": lengths, "repeat": repeat, "clients": levels,
                "duration_s": duration, "max_tokens": max_tokens, "max_batch_size": 32,
                "redis": "redis-server on loopback, appendonly yes, appendfsync always",
                "loopback": True}
    path = write_result("store", settings, results, args.out)
    fig, ax = new_figure(f"Session store: server tokens/s ({model.config.name})",
                         "concurrent clients (own session each)", "generated tokens / s")
    for name, rs in rows.items():
        ax.plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o",
                label=name.replace("_", " "))
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.legend()
    save_figure(fig, plot_path("store", args.out))
    print(f"wrote {path}")
    if errors:
        print(f"FAILED: {errors} request errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
