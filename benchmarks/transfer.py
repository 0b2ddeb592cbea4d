"""transfer: exporting and importing a session's memory, through the library and a live server.

A session reads a conversation of ~100 and ~10,000 tokens (prose; quick: ~100 and ~1,000). Then:

- **library**: `save_memory` to bytes and to a file (atomic write), `load_memory` from bytes
  (every check included); bytes of the file and ms, and that the round trip is exact;
- **server**: the same conversation fed to a session of a live ``python -m server`` (loopback,
  its own temporary session folder), then ``GET /v1/sessions/{id}/memory`` (export) and
  ``PUT /v1/sessions/{id}/memory`` (import as another session) with `clients.Client`: bytes and
  ms per call; the exported file must load into the same checkpoint and hold the state the
  library computed from the same tokens (within float noise: the server reads in other chunks);
- **what moving a Pythia session would cost** at the same length: its KV cache bytes
  (`newllm.sizes.state_bytes`) and the time to re-run the prompt (prefill) instead, for Pythia
  of the checkpoint's own shape (every layer a full-attention ``pythia`` layer) and for the
  reference preset (``pythia-70m``; quick: ``tiny-pythia``). Our own re-run time is reported too.

    python -m benchmarks.transfer [--quick] [--checkpoint PATH] [--lengths 100 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PROSE,
    new_figure,
    plot_path,
    results_folder,
    save_figure,
    time_it,
    write_result,
)
from benchmarks.decode import prefill
from benchmarks.live import running_servers
from newllm import ModelConfig, TransformerLM, load_checkpoint, load_memory, save_memory
from newllm.sizes import pythia_of_shape, state_bytes

DIFF_TOLERANCE = 1e-3  # server (chunks of 512) vs library (chunks of 1024): same within float noise


def conversation(tokenizer: Any, n: int, vocab_size: int) -> list[int]:
    """``n`` tokens of prose (repeated as needed), all inside the model's vocabulary."""
    ids = [t for t in tokenizer.encode(PROSE) if t < vocab_size]
    return [ids[i % len(ids)] for i in range(n)]


def rerun_ms(model: TransformerLM, n: int, repeat: int) -> float:
    """Milliseconds to prefill ``n`` tokens from an empty state (re-running the prompt)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    with torch.no_grad():
        return 1000 * time_it(lambda: prefill(model, ids), repeat, warmup=0)["median_s"]


def library_row(model: TransformerLM, tokenizer_hash: str, ids: list[int],
                repeat: int) -> tuple[dict[str, Any], Any]:
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        t0 = time.perf_counter()
        _, state = prefill(model, x)
        prefill_ms = 1000 * (time.perf_counter() - t0)
    data = save_memory(state, model, tokenizer_hash=tokenizer_hash)
    save = time_it(lambda: save_memory(state, model, tokenizer_hash=tokenizer_hash), repeat)
    load = time_it(lambda: load_memory(data, model, tokenizer_hash=tokenizer_hash), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        to_file = time_it(lambda: save_memory(state, model, path, tokenizer_hash=tokenizer_hash),
                          repeat)
        from_file = time_it(lambda: load_memory(path, model, tokenizer_hash=tokenizer_hash),
                            repeat)
    back = load_memory(data, model, tokenizer_hash=tokenizer_hash)
    exact = back.position == state.position and all(
        torch.equal(a, b) for a, b in zip(back.flat_tensors().values(),
                                          state.flat_tensors().values(), strict=True))
    row = {"tokens": len(ids), "file_bytes": len(data), "state_bytes": state.nbytes(),
           "resident_bytes": state.resident_bytes(),
           "save_ms": 1000 * save["median_s"], "load_ms": 1000 * load["median_s"],
           "save_file_ms": 1000 * to_file["median_s"],
           "load_file_ms": 1000 * from_file["median_s"],
           "prefill_ms": prefill_ms, "round_trip_exact": exact}
    return row, state


def server_row(client: Any, session: str, ids: list[int], model: TransformerLM,
               tokenizer_hash: str, reference: Any, repeat: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    fed = client.complete(ids, session, session_input="new", max_tokens=0)
    feed_ms = 1000 * (time.perf_counter() - t0)
    data = client.export_memory(session)
    export = time_it(lambda: client.export_memory(session), repeat)
    result = client.import_memory(f"{session}-copy", data)
    imp = time_it(lambda: client.import_memory(f"{session}-copy", data), repeat)
    state = load_memory(data, model, tokenizer_hash=tokenizer_hash)
    diff = None  # the server's state against the library's after the same tokens
    if state.position == reference.position:
        diff = max(float((a - b).abs().max()) if a.numel() else 0.0
                   for a, b in zip(state.flat_tensors().values(),
                                   reference.flat_tensors().values(), strict=True))
    return {"tokens": len(ids), "tokens_seen": state.position,
            "prompt_tokens": fed.usage.prompt_tokens if fed.usage else 0,
            "file_bytes": len(data), "feed_ms": feed_ms,
            "export_ms": 1000 * export["median_s"], "import_ms": 1000 * imp["median_s"],
            "imported_tokens_seen": result.tokens_seen,
            "max_abs_diff_vs_library_state": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-infini, 100 and 1000 tokens")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder or preset (default: the bundled default model)")
    ap.add_argument("--lengths", type=int, nargs="*", default=None,
                    help="tokens of conversation (default 100 10000)")
    ap.add_argument("--pythia", default=None,
                    help="reference Pythia preset (default pythia-70m; quick: tiny-pythia)")
    args = ap.parse_args(argv)
    args.out = results_folder(args.out, args.quick)  # a quick run never replaces results
    checkpoint = "tiny-infini" if args.quick and args.checkpoint is None else args.checkpoint
    lengths = args.lengths or ([100, 1000] if args.quick else [100, 10000])
    reference = args.pythia or ("tiny-pythia" if args.quick else "pythia-70m")
    repeat = 3 if args.quick else 10
    model, tok = load_checkpoint(checkpoint)
    same = pythia_of_shape(model.config)
    ref_cfg = ModelConfig.from_name(reference)
    torch.manual_seed(0)
    pythia_models = {"same_shape": TransformerLM(same).eval(),
                     "reference": TransformerLM(ref_cfg).eval()}
    library, served, pythia = [], [], []
    states = {}
    for n in lengths:
        row, states[n] = library_row(model, tok.sha256, conversation(tok, n,
                                                                     model.config.vocab_size),
                                     repeat)
        library.append(row)
        pythia.append({"tokens": n,
                       "same_shape_kv_bytes": state_bytes(same, n),
                       "same_shape_rerun_ms": rerun_ms(pythia_models["same_shape"], n,
                                                       1 if args.quick else 3),
                       "reference_kv_bytes": state_bytes(ref_cfg, n),
                       "reference_rerun_ms": rerun_ms(pythia_models["reference"], n,
                                                      1 if args.quick else 3)})
        print(f"library {n:6d} tokens: {row['file_bytes']:>10,} bytes, save "
              f"{row['save_ms']:.2f} ms, load {row['load_ms']:.2f} ms; pythia KV "
              f"{pythia[-1]['same_shape_kv_bytes']:,} bytes (same shape), "
              f"{pythia[-1]['reference_kv_bytes']:,} ({reference})", flush=True)
    with running_servers(checkpoint, {"transfer": 1}) as servers:
        with servers["transfer"].client() as c:
            for n in lengths:
                served.append(server_row(c, f"conv-{n}", conversation(
                    tok, n, model.config.vocab_size), model, tok.sha256, states[n], repeat))
                r = served[-1]
                print(f"server  {n:6d} tokens: {r['file_bytes']:>10,} bytes, export "
                      f"{r['export_ms']:.1f} ms, import {r['import_ms']:.1f} ms", flush=True)
    headline = {}
    for lib, srv, py in zip(library, served, pythia, strict=True):
        headline[str(lib["tokens"])] = {
            "file_vs_same_shape_kv": srv["file_bytes"] / py["same_shape_kv_bytes"],
            "file_vs_reference_kv": srv["file_bytes"] / py["reference_kv_bytes"],
            "server_move_ms": srv["export_ms"] + srv["import_ms"],
            "same_shape_rerun_ms": py["same_shape_rerun_ms"],
        }
    problems = [f"library round trip not exact at {r['tokens']}" for r in library
                if not r["round_trip_exact"]]
    problems += [f"server session at {r['tokens']} holds {r['tokens_seen']} tokens"
                 for r in served if r["tokens_seen"] != r["tokens"]
                 or r["imported_tokens_seen"] != r["tokens"]]
    problems += [f"server state at {r['tokens']} differs from the library's by "
                 f"{r['max_abs_diff_vs_library_state']}" for r in served
                 if r["max_abs_diff_vs_library_state"] is None
                 or r["max_abs_diff_vs_library_state"] > DIFF_TOLERANCE]
    results = {"library": library, "server": served, "pythia": pythia, "headline": headline}
    settings = {"quick": args.quick, "checkpoint": checkpoint or "default",
                "model": model.config.name, "layers": list(model.config.layers),
                "fingerprint": model.fingerprint(), "lengths": lengths, "repeat": repeat,
                "dtype": str(model.dtype).removeprefix("torch."),
                "pythia_same_shape": same.to_dict(), "pythia_reference": reference}
    path = write_result("transfer", settings, results, args.out)
    fig, ax = new_figure(f"Moving a session ({model.config.name}) vs a Pythia KV cache",
                         "tokens of conversation", "bytes", logy=True)
    ax.plot(lengths, [r["file_bytes"] for r in served], marker="o",
            label=f"{model.config.name} memory file")
    ax.plot(lengths, [r["same_shape_kv_bytes"] for r in pythia], marker="s",
            label=f"Pythia KV, {model.config.name} shape")
    ax.plot(lengths, [r["reference_kv_bytes"] for r in pythia], marker="^",
            label=f"{reference} KV")
    ax.legend(loc="upper left", fontsize="small")
    ms = ax.twinx()
    ms.set_yscale("log")
    ms.set_ylabel("ms (dashed)")
    ms.plot(lengths, [r["export_ms"] + r["import_ms"] for r in served], "o--", color="C0",
            label="server export + import, ms")
    ms.plot(lengths, [r["same_shape_rerun_ms"] for r in pythia], "s--", color="C1",
            label="Pythia re-runs the prompt, ms")
    ms.legend(loc="lower right", fontsize="small")
    save_figure(fig, plot_path("transfer", args.out))
    print(f"wrote {path}")
    for n, h in headline.items():
        print(f"  {n:>6} tokens: file = {h['file_vs_same_shape_kv']:.1%} of a same-shape Pythia "
              f"KV cache; export+import {h['server_move_ms']:.1f} ms vs re-running the prompt "
              f"{h['same_shape_rerun_ms']:.1f} ms")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
