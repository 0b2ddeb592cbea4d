"""chat: per-turn latency of a 50-turn chat, for the ways a client can keep a conversation.

One live server with the prefix cache (the default) and one without (``--prefix-cache-bytes
0``), the bundled model, greedy replies of a few tokens, a short new user message per turn:

- ``stateless_no_cache``: the client resends the whole history every turn, no session id, to
  the server without the cache: each turn reads the whole conversation again.
- ``stateless_cache``: the same client against the server with the prefix cache: each turn
  reads what follows the longest prefix already read.
- ``responses_chain``: the Responses API with ``previous_response_id``: each turn sends only the
  new message.
- ``session``: chat completions with ``metadata.session_id``, sending only the new message.

Per turn: latency (ms) and the prompt tokens the server read (usage: prompt tokens minus
cached tokens). Goals (issue 16): with the cache or a chain, latency at the last turns within
1.5x of that at turn 2 on (medians of 10 turns each); the cache skips >= 95% of the resent
history's tokens from turn 2.

    python -m benchmarks.chat [--quick] [--turns 50] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import new_figure, plot_path, results_folder, save_figure, write_result
from benchmarks.live import running_servers

MESSAGES = ["Tell me about the sea.", "What happened next?", "Why did they leave?",
            "Describe the town.", "Who was there?", "And then?"]


def run_mode(mode: str, url: str, model: str, turns: int, max_tokens: int) -> list[dict]:
    rows: list[dict[str, Any]] = []
    history: list[dict[str, str]] = []
    previous: str | None = None
    with httpx.Client(base_url=url, timeout=300) as http:
        for t in range(turns):
            message = f"{MESSAGES[t % len(MESSAGES)]} ({t})"
            t0 = time.perf_counter()
            if mode == "responses_chain":
                body: dict[str, Any] = {"model": model, "input": message, "temperature": 0,
                                        "max_output_tokens": max_tokens}
                if previous:
                    body["previous_response_id"] = previous
                r = http.post("/v1/responses", json=body)
                r.raise_for_status()
                doc = r.json()
                previous = doc["id"]
                usage = doc["usage"]
                prompt, cached = usage["input_tokens"], usage["input_tokens_details"][
                    "cached_tokens"]
                reply = doc["output"][0]["content"][0]["text"]
            else:
                history.append({"role": "user", "content": message})
                messages = history if mode.startswith("stateless") else history[-1:]
                body = {"model": model, "messages": messages, "temperature": 0,
                        "max_tokens": max_tokens}
                if mode == "session":
                    body["metadata"] = {"session_id": "bench-chat", "session_input": "new"}
                r = http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                doc = r.json()
                usage = doc["usage"]
                prompt = usage["prompt_tokens"]
                cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
                reply = doc["choices"][0]["message"]["content"]
                history.append({"role": "assistant", "content": reply})
            rows.append({"turn": t + 1, "ms": 1000 * (time.perf_counter() - t0),
                         "prompt_tokens": prompt, "read_tokens": prompt - cached})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-infini, 8 turns")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder or preset (default: the bundled default model)")
    ap.add_argument("--turns", type=int, default=None, help="turns per chat (default 50)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    turns = args.turns or (8 if args.quick else 50)
    modes = {"stateless_no_cache": "plain", "stateless_cache": "cached",
             "responses_chain": "cached", "session": "cached"}
    rows: dict[str, list[dict[str, Any]]] = {}
    with running_servers(checkpoint, {"cached": 1, "plain": 1},
                         extra={"plain": ["--prefix-cache-bytes", "0"]}) as servers:
        with httpx.Client(base_url=servers["cached"].url) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
        for mode, server in modes.items():
            rows[mode] = run_mode(mode, servers[server].url, model, turns, args.max_tokens)
            r = rows[mode]
            print(f"{mode:19s} turn 2 {r[1]['ms']:7.1f} ms, turn {turns} {r[-1]['ms']:7.1f} ms,"
                  f" read at the last turn {r[-1]['read_tokens']} of {r[-1]['prompt_tokens']}",
                  flush=True)

    window = max(2, min(10, turns // 4))

    def tail(mode: str) -> float:
        """Median latency of the last turns against that of turns 2 on (``window`` turns
        each): one turn's latency on a shared machine is too noisy to compare alone."""
        ms = [r["ms"] for r in rows[mode]]
        return statistics.median(ms[-window:]) / statistics.median(ms[1:1 + window])

    cache = rows["stateless_cache"]
    resent = sum(r["prompt_tokens"] for r in cache[1:])
    new = sum(r["read_tokens"] for r in rows["session"][1:])  # what a session reads: the new
    skipped = sum(r["prompt_tokens"] - r["read_tokens"] for r in cache[1:])
    history_tokens = resent - new
    goals = {
        "cache_last_vs_turn2": {"value": tail("stateless_cache"), "target": 1.5},
        "chain_last_vs_turn2": {"value": tail("responses_chain"), "target": 1.5},
        "resent_history_skipped": {"value": skipped / max(1, history_tokens), "target": 0.95},
    }
    for g in goals.values():
        g["met"] = (g["value"] >= g["target"]) if g is goals["resent_history_skipped"] \
            else (g["value"] <= g["target"])
    results = {"rows": rows, "goals": goals,
               "no_cache_last_vs_turn2": tail("stateless_no_cache")}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default", "model": model,
                "turns": turns, "median_window": window, "max_tokens": args.max_tokens,
                "greedy": True,
                "loopback": True}
    path = write_result("chat", settings, results, args.out)
    fig, ax = new_figure(f"A {turns}-turn chat: latency per turn ({model})", "turn",
                         "latency (ms)", logx=False)
    for mode, rs in rows.items():
        ax.plot([r["turn"] for r in rs], [r["ms"] for r in rs], marker=".",
                label=mode.replace("_", " "))
    ax.legend()
    save_figure(fig, plot_path("chat", args.out))
    print(f"wrote {path}; goals: " + ", ".join(
        f"{k} {v['value']:.2f} ({'met' if v['met'] else 'not met'})" for k, v in goals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
