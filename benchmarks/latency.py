"""latency: one conversation's cost per token, eager against the compiled decode step.

Batch 1 is what one person chatting gets, and there a token's time is mostly per-op overhead,
not arithmetic. Measured with the bundled checkpoint (fp32, weights input-major as the server
runs them), in one child process per torch thread count (``--threads``, default 1 and 2), the
compiled code cached in a fresh inductor cache folder shared by the children (so the first
child's compile time is a cold one, a first start on a machine, and the next ones warm):

- **compile**: seconds of the first compiled steps (one row, then two: the row count becomes
  dynamic) and the resident memory (RSS) they added;
- **step**: one token at batch 1, ``--context`` tokens in: ``model(x, state, last_only=True)``
  (what `newllm.generate` runs eagerly), the eager `Slots` step, and the compiled one
  (`Slots` with ``compile``), medians of ``--repeat`` calls each, made in blocks of 25
  consecutive calls of one variant, the variants taking turns (`round_robin_blocks`: each
  runs with its weights warm in the caches, as a conversation's steps follow each other);
  beside them the **weights floor**: one-row products with each of the model's weight
  matrices once (MKL, as a step runs them), what a step costs with no other work at all.
  ``step_ms_alternating`` has the same calls one at a time in turn (`round_robin`), where each
  finds its weights partly evicted by the others';
- **half weights**: the same checkpoint under `TransformerLM.use_half_weights` (linear weights
  in float16, computed in float32): its compiled step and weights floor (the half-weight
  kernel) in the same rounds; on a machine where the kernel cannot run (not x86-64 with
  AVX2, no C++ compiler) every half-weight row is left out, the run says why and so does the
  JSON's ``settings.half_weights`` (``--no-half`` leaves them out anyway);
- **slots**: the slot step eager and compiled (and compiled with half weights) at
  ``--batch-sizes`` rows;
- **generate**: `newllm.generate`, greedy, ``--tokens`` new tokens, eager, compiled and
  compiled with half weights in turn;
- **pythia-70m vs transformers** (first child only; ``--no-pythia`` skips): decode at 1,024
  tokens of context, our eager step, our compiled step (float32 and half weights) and
  transformers' GPT-NeoX with the same weights (random, rounded to float16 as the released
  checkpoints are), one step of each in turn (as `benchmarks.decode` does; the greedy tokens
  must agree);
- **server** (``--no-server`` skips): `newllm serve` (one worker, one thread, the default 32
  slots: what a user runs; one slot hid a per-step cost of looking for new jobs) with the
  compiled step, without, and compiled with ``--half-weights``, one client streaming completions of
  ``--tokens`` tokens over loopback, turns in alternation with `newllm.generate` in this
  process with the same setting: tokens per second after the first token (the decode rate;
  the ratio is the median of the turns' ratios) and for whole requests; and the time to the
  first token of the first request, sent as soon as the server answers (the compiled server
  compiles in the background meanwhile).

    python -m benchmarks.latency [--quick] [--threads 1 2] [--no-server] [--no-pythia]
                                 [--no-half]

Ratios within one run are what to read: the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PROSE,
    new_figure,
    plot_path,
    results_folder,
    round_robin,
    round_robin_blocks,
    save_figure,
    write_result,
)

GOALS = {"step_ms": 1.2, "generate_tokens_per_s": 700, "server_vs_generate": 0.9,
         "pythia_vs_transformers": 1.7}


def rss_mib() -> float:
    """Resident memory of this process, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load(checkpoint: str | None) -> tuple[Any, Any]:
    from newllm import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    return model.eval().use_input_major_weights(), tok


def prompt_ids(tok: Any, n: int) -> list[int]:
    ids = tok.encode(PROSE * (1 + n // 100))
    return ids[:n]


# the child: everything measured under one thread count -----------------------------------------
def child(args: argparse.Namespace) -> dict[str, Any]:
    from newllm import SamplingParams, generate
    from newllm.slots import Slots

    torch.set_num_threads(args.child)
    model, tok = load(args.checkpoint)
    half = load_half(args.checkpoint) if args.half else None
    V = model.config.vocab_size
    ids = torch.tensor([prompt_ids(tok, args.context)])
    out: dict[str, Any] = {"threads": args.child}
    with torch.no_grad():
        _, state = model(ids, None)
        x = torch.tensor([[5]])
        for _ in range(3):  # eager warm-up before the memory baseline
            model(x, state, last_only=True)
        eager_slots = Slots(model, max(args.batch_sizes), compile=False)
        compiled_slots = Slots(model, max(args.batch_sizes), compile=True)
        rows_e = [eager_slots.add(state) for _ in range(max(args.batch_sizes))]
        rows_c = [compiled_slots.add(state) for _ in range(max(args.batch_sizes))]
        eager_slots.step(rows_e[:1], [5])
        rss0 = rss_mib()
        t0 = time.perf_counter()
        compiled_slots.step(rows_c[:1], [5])
        compiled_slots.step(rows_c[:1], [5])
        first = time.perf_counter() - t0
        compiled_slots.step(rows_c[:2], [5, 5])
        compiled_slots.step(rows_c[:2], [5, 5])
        compile_s = time.perf_counter() - t0
        if not compiled_slots.compiled:
            raise RuntimeError("compiling failed (see the log); nothing to compare")
        out["compile"] = {"one_row_s": first, "one_and_two_rows_s": compile_s,
                          "rss_added_mib": rss_mib() - rss0}

        def forward() -> None:
            model(x, state, last_only=True)

        steps = {"weights_floor": weights_floor(model), "forward_eager": forward,
                 "slots_eager": lambda: eager_slots.step(rows_e[:1], [5]),
                 "slots_compiled": lambda: compiled_slots.step(rows_c[:1], [5])}
        slot_sets = [eager_slots, compiled_slots]
        if half is not None:
            _, half_state = half(ids, None)
            half_slots = Slots(half, max(args.batch_sizes), compile=True)
            slot_sets.append(half_slots)
            rows_h = [half_slots.add(half_state) for _ in range(max(args.batch_sizes))]
            for rows in (rows_h[:1], rows_h[:1], rows_h[:2], rows_h[:2]):  # compiled, untimed
                half_slots.step(rows, [5] * len(rows))
            steps["weights_floor_half"] = weights_floor(half)
            steps["slots_compiled_half"] = lambda: half_slots.step(rows_h[:1], [5])
        out["step_ms"] = {k: 1000 * v for k, v in round_robin_blocks(steps, args.repeat).items()}
        out["step_ms_alternating"] = {k: 1000 * v
                                      for k, v in round_robin(steps, args.repeat).items()}
        out["weights_mib"] = sum(w.nbytes for w in model._matvec_weights()) / 2**20
        if half is not None:
            out["weights_mib_half"] = sum(w.nbytes for w in half._matvec_weights()) / 2**20
        ms = out["step_ms"]
        out["step_speedup"] = {"vs_forward": ms["forward_eager"] / ms["slots_compiled"],
                               "vs_slots_eager": ms["slots_eager"] / ms["slots_compiled"]}
        out["slots_ms"] = {}
        for b in args.batch_sizes:
            variants = {"eager": lambda b=b: eager_slots.step(rows_e[:b], [5] * b),
                        "compiled": lambda b=b: compiled_slots.step(rows_c[:b], [5] * b)}
            if half is not None:
                variants["compiled_half"] = lambda b=b: half_slots.step(rows_h[:b], [5] * b)
            t = round_robin(variants, max(5, args.repeat // 4))
            out["slots_ms"][str(b)] = {k: 1000 * v for k, v in t.items()}
        for s in slot_sets:
            for h in list(s._handles):
                s.discard(h)

    prompt = prompt_ids(tok, 32)
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, stop_token_ids=())
    runs = {"eager": (model, False), "compiled": (model, True)}
    if half is not None:
        runs["compiled_half"] = (half, True)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for m, compile in runs.values():  # untimed: one-slot buffers are a new compiled shape
        generate(m, prompt, None, params.replace(max_new_tokens=4), compile=compile).collect()
    for _ in range(args.generate_repeat):
        for name, (m, compile) in runs.items():
            t0 = time.perf_counter()
            n = len(generate(m, prompt, None, params, decode=tok.decode,
                             vocab_size=min(V, tok.vocab_size),
                             compile=compile).collect().token_ids)
            rates[name].append(n / (time.perf_counter() - t0))
    out["generate_tokens_per_s"] = {k: statistics.median(v) for k, v in rates.items()}
    if args.pythia:
        out["pythia_70m"] = pythia_vs_transformers(args)
    return out


def load_half(checkpoint: str | None) -> Any:
    """The same checkpoint with half weights (`TransformerLM.use_half_weights`)."""
    from newllm import load_checkpoint

    model, _ = load_checkpoint(checkpoint, dtype="float32")
    return model.eval().use_half_weights()


def weights_floor(model: Any) -> Callable[[], None]:
    """A call that reads each weight matrix of ``model`` once with a one-row product, as a
    decode step reads it, and nothing else (no attention, norms or Python around it): MKL's
    product for float32 weights (stored input-major), the half-weight kernel for float16."""
    weights = model._matvec_weights()  # (out, in)
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    product = torch.ops.newllm.matvec_f16 if model.half_weights else lambda x, w: x @ w.t()

    def floor() -> None:
        for w in weights:
            product(rows[w.shape[1]], w)

    return floor


def pythia_vs_transformers(args: argparse.Namespace) -> dict[str, Any]:
    """pythia-70m at 1,024 tokens of context: our eager and compiled steps and transformers'."""
    from benchmarks.decode import (
        hf_prefill,
        hf_step,
        hf_twin,
        interleaved_steps,
        ours_step,
        prefill,
    )
    from newllm import ModelConfig, TransformerLM

    torch.manual_seed(0)
    name = "tiny-pythia" if args.quick else "pythia-70m"
    context = 128 if args.quick else 1024
    model = TransformerLM(ModelConfig.from_name(name)).eval()
    with torch.no_grad():  # weights float16 can hold, as in the released checkpoints
        for w in model._matvec_weights():
            w.copy_(w.half().float())
    hf = hf_twin(model)  # same weights, its own layout
    half = copy.deepcopy(model).use_half_weights() if args.half else None
    model.use_input_major_weights()
    ids = torch.randint(0, model.config.vocab_size, (1, context),
                        generator=torch.Generator().manual_seed(0))
    from transformers import DynamicCache

    with torch.no_grad():
        logits, state = prefill(model, ids)
        cache = DynamicCache()
        hf_logits = hf_prefill(hf, ids, cache)
        compiled, compile_s = compiled_slot_step(model, state)
        steps = {"ours_eager": ours_step(model, state), "ours_compiled": compiled,
                 "transformers": hf_step(hf, cache)}
        first = {"ours_eager": logits, "ours_compiled": logits, "transformers": hf_logits}
        floors = {"weights_floor": weights_floor(model)}
        if half is not None:
            first["ours_compiled_half"], half_state = prefill(half, ids)
            steps["ours_compiled_half"], _ = compiled_slot_step(half, half_state)
            floors["weights_floor_half"] = weights_floor(half)

    out = interleaved_steps(steps, first, args.pythia_steps, warmup=2)
    ms = {k: 1000 * statistics.median(t) for k, (t, _) in out.items()}
    ms.update({k: 1000 * v for k, v in round_robin(floors, args.pythia_steps).items()})
    agree = out["ours_eager"][1] == out["ours_compiled"][1] == out["transformers"][1]
    result = {"model": name, "context": context, "ms_per_token": ms,
              "weights_mib": sum(w.nbytes for w in model._matvec_weights()) / 2**20,
              "speedup_vs_transformers": {
                  "eager": ms["transformers"] / ms["ours_eager"],
                  "compiled": ms["transformers"] / ms["ours_compiled"]},
              "compile_s": compile_s, "greedy_tokens_agree": agree,
              "steps": len(out["transformers"][0])}
    if half is not None:
        result["speedup_vs_transformers"]["compiled_half"] = (ms["transformers"]
                                                              / ms["ours_compiled_half"])
        result["greedy_tokens_agree_half"] = (out["ours_compiled_half"][1]
                                              == out["transformers"][1])
    return result


def compiled_slot_step(model: Any, state: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                        float]:
    """A one-slot compiled step continuing ``state`` (token (1, 1) -> logits (1, 1, V)), made
    and compiled on a copy of the state first, and the seconds that compile took."""
    from newllm.slots import Slots

    slots = Slots(model, 1, compile=True)
    handle = slots.add(state)
    t0 = time.perf_counter()
    slots.step([handle], [0])  # compile (a token the others do not see: a copy's state)
    seconds = time.perf_counter() - t0
    slots.discard(handle)
    handle = slots.add(state)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return slots.step([handle], tok.view(1))[:, None]

    return step, seconds


# the server ----------------------------------------------------------------------------------
def stream_turn(client: Any, url: str, body: dict[str, Any]) -> tuple[float, float, float]:
    """One streamed completion: (decode rate: tokens after the first / time from the first to
    the last, whole-request rate, seconds to the first token), tokens counted as the text
    pieces that arrive."""
    t0 = time.perf_counter()
    stamps = []
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"finish_reason": null' in line:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps) / (end - t0), stamps[0] - t0


def library_turn(model: Any, tok: Any, prompt: list[int], tokens: int,
                 compile: bool) -> tuple[float, float]:
    """`newllm.generate` measured as `stream_turn` measures the server (same prompt, EOS
    stops both)."""
    from newllm import SamplingParams, generate

    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    t0 = time.perf_counter()
    stamps = []
    for t in generate(model, prompt, None, params, decode=tok.decode,
                      vocab_size=min(model.config.vocab_size, tok.vocab_size), compile=compile):
        if t.text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps) / (end - t0)


def server_vs_library(args: argparse.Namespace) -> dict[str, Any]:
    """Each setting: a server, then turns of the server and of `generate` in alternation (a
    noisy moment of the machine falls on both), medians of each. Quick: the compiled server
    only."""
    torch.set_num_threads(1)
    model, tok = load(args.checkpoint)
    prompt = prompt_ids(tok, 32)
    out: dict[str, Any] = {}
    settings = {"compiled": True} if args.quick else {"compiled": True, "eager": False}
    if args.half and not args.quick:
        settings["compiled_half"] = True
        half = load_half(args.checkpoint).use_input_major_weights()  # as a server's worker
    saved = os.environ.get("NEWLLM_COMPILE")  # a server's setting goes by the environment
    try:
        with tempfile.TemporaryDirectory(prefix="newllm-latency-") as tmp:
            for name, compile in settings.items():
                os.environ["NEWLLM_COMPILE"] = "1" if compile else "0"
                m = half if name.endswith("_half") else model
                out[name] = one_server(args, m, tok, prompt, Path(tmp), name, compile)
    finally:  # as it was (tests run their servers with it set to 0)
        if saved is None:
            os.environ.pop("NEWLLM_COMPILE", None)
        else:
            os.environ["NEWLLM_COMPILE"] = saved
    return out


def one_server(args: argparse.Namespace, model: Any, tok: Any, prompt: list[int], tmp: Path,
               name: str, compile: bool) -> dict[str, Any]:
    """One server's turns against `generate`'s (see `server_vs_library`)."""
    import httpx

    from benchmarks.live import start_server, stop_server, wait_ready
    from server.settings import ServerSettings

    slots = ServerSettings().max_batch_size  # the default
    server = start_server(args.checkpoint, tmp, name, max_batch_size=slots,
                          extra=["--threads", "1", *(["--half-weights"] if model.half_weights
                                                     else [])])
    rates: dict[str, list[tuple[float, ...]]] = {"server": [], "generate": []}
    try:
        wait_ready(server, timeout=600, compiled=False)
        with httpx.Client(timeout=600) as c:
            body = {"model": c.get(f"{server.url}/v1/models").json()["data"][0]["id"],
                    "prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                    "stream": True}
            first_ttft = stream_turn(c, server.url, body)[2]  # compiling meanwhile
            wait_ready(server, timeout=600)  # the compiled step is in use
            for i in range(args.server_turns + 1):  # the first of each warms up
                served = stream_turn(c, server.url, body)
                lib = library_turn(model, tok, prompt, args.tokens, compile)
                if i:
                    rates["server"].append(served)
                    rates["generate"].append(lib)
    finally:
        stop_server(server)
    med = {k: {"decode_tokens_per_s": statistics.median(r[0] for r in v),
               "request_tokens_per_s": statistics.median(r[1] for r in v)}
           for k, v in rates.items()}
    ratios = [s[0] / g[0] for s, g in zip(rates["server"], rates["generate"], strict=True)]
    out = {**med, "ratio_decode": statistics.median(ratios),
           "ratio_request": med["server"]["request_tokens_per_s"]
           / med["generate"]["request_tokens_per_s"], "turns": len(ratios),
           "first_request_ttft_s": first_ttft}
    print(f"server {name}: {med['server']['decode_tokens_per_s']:.0f} tok/s vs generate "
          f"{med['generate']['decode_tokens_per_s']:.0f} ({out['ratio_decode']:.2f})",
          flush=True)
    return out


# main ----------------------------------------------------------------------------------------
def goals(children: list[dict[str, Any]], server: dict[str, Any] | None) -> dict[str, Any]:
    one = next((c for c in children if c["threads"] == 1), children[0])
    out: dict[str, Any] = {
        "step_ms": {"target": GOALS["step_ms"], "value": one["step_ms"]["slots_compiled"],
                    "weights_floor_ms": one["step_ms"]["weights_floor"]},
        "generate_tokens_per_s": {"target": GOALS["generate_tokens_per_s"],
                                  "value": one["generate_tokens_per_s"]["compiled"]},
    }
    if "slots_compiled_half" in one["step_ms"]:  # measured where the kernel runs
        out["step_ms_half_weights"] = {"target": GOALS["step_ms"],
                                       "value": one["step_ms"]["slots_compiled_half"],
                                       "weights_floor_ms": one["step_ms"]["weights_floor_half"]}
        out["generate_tokens_per_s_half_weights"] = {
            "target": GOALS["generate_tokens_per_s"],
            "value": one["generate_tokens_per_s"]["compiled_half"]}
    if server is not None:
        out["server_vs_generate"] = {"target": GOALS["server_vs_generate"],
                                     "value": server["compiled"]["ratio_decode"]}
        if "compiled_half" in server:
            out["server_vs_generate_half_weights"] = {
                "target": GOALS["server_vs_generate"],
                "value": server["compiled_half"]["ratio_decode"]}
    if one.get("pythia_70m", {}).get("model") == "pythia-70m":  # not quick mode's tiny one
        speedup = one["pythia_70m"]["speedup_vs_transformers"]
        out["pythia_vs_transformers"] = {"target": GOALS["pythia_vs_transformers"],
                                         "value": speedup["compiled"]}
        if "compiled_half" in speedup:
            out["pythia_vs_transformers_half_weights"] = {
                "target": GOALS["pythia_vs_transformers"], "value": speedup["compiled_half"]}
    for name, g in out.items():
        below = name.startswith("step_ms")
        g["met"] = g["value"] <= g["target"] if below else g["value"] >= g["target"]
    return out


def plot(children: list[dict[str, Any]], out_dir: Path) -> None:
    fig, ax = new_figure("Decode step, bundled model (fp32, CPU)", "rows (sessions) per step",
                         "ms per step (median)", logy=True)
    for c in children:
        sizes = [int(b) for b in c["slots_ms"]]
        for mode, style in (("eager", "--"), ("compiled", "-"), ("compiled_half", ":")):
            if mode not in c["slots_ms"][str(sizes[0])]:
                continue
            ax.plot(sizes, [c["slots_ms"][str(b)][mode] for b in sizes], style, marker="o",
                    label=f"slots {mode.replace('_half', ', half weights')}, "
                          f"{c['threads']} thread(s)")
        ax.scatter([1], [c["step_ms"]["forward_eager"]], marker="x", s=60,
                   label=f"model(x, state), {c['threads']} thread(s)")
        ax.scatter([1], [c["step_ms"]["weights_floor"]], marker="_", s=200,
                   label=f"weights floor (one-row products), {c['threads']} thread(s)")
        if "weights_floor_half" in c["step_ms"]:
            ax.scatter([1], [c["step_ms"]["weights_floor_half"]], marker="1", s=120,
                       label=f"weights floor, half weights, {c['threads']} thread(s)")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.legend(fontsize=8)
    save_figure(fig, plot_path("latency", out_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats, tiny pythia, 1 thread")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="default 1 2")
    ap.add_argument("--context", type=int, default=200, help="tokens read before the steps")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    ap.add_argument("--repeat", type=int, default=None, help="rounds of the step timing")
    ap.add_argument("--generate-repeat", type=int, default=None)
    ap.add_argument("--server-turns", type=int, default=None)
    ap.add_argument("--pythia-steps", type=int, default=None)
    ap.add_argument("--no-server", dest="server", action="store_false")
    ap.add_argument("--no-pythia", dest="pythia", action="store_false")
    ap.add_argument("--no-half", dest="half", action="store_false",
                    help="skip half weights (also skipped, saying why, where they cannot run)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (20 if args.quick else 200)
    args.generate_repeat = args.generate_repeat or (1 if args.quick else 5)
    args.server_turns = args.server_turns or (1 if args.quick else 8)
    args.pythia_steps = args.pythia_steps or (5 if args.quick else 40)
    if args.quick:
        args.tokens = min(args.tokens, 32)
    if args.child is not None:
        assert args.child_out is not None
        args.child_out.write_text(json.dumps(child(args)))
        return 0
    from newllm.half_weights import kernel_problem

    # the kernel is built here once, before the children look for it
    problem = kernel_problem() if args.half else "--no-half"
    if problem is not None and args.half:
        print(f"half weights are not measured: {problem}", flush=True)
    args.half = problem is None
    args.out = results_folder(args.out, args.quick)
    threads = args.threads or ([1] if args.quick else [1, 2])
    children = []
    with tempfile.TemporaryDirectory(prefix="newllm-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        env.pop("NEWLLM_COMPILE", None)
        for i, n in enumerate(threads):
            path = Path(cache) / f"child-{n}.json"
            cmd = [sys.executable, "-m", "benchmarks.latency", "--child", str(n),
                   "--child-out", str(path), "--context", str(args.context),
                   "--tokens", str(args.tokens), "--repeat", str(args.repeat),
                   "--generate-repeat", str(args.generate_repeat),
                   "--pythia-steps", str(args.pythia_steps),
                   "--batch-sizes", *map(str, args.batch_sizes)]
            cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
            cmd += ["--quick"] if args.quick else []
            cmd += [] if args.pythia and i == 0 else ["--no-pythia"]
            cmd += [] if args.half else ["--no-half"]
            subprocess.run(cmd, check=True, env=env)
            children.append(json.loads(path.read_text()))
            c = children[-1]
            ms, rate = c["step_ms"], c["generate_tokens_per_s"]
            half = (f" ({ms['slots_compiled_half']:.2f} with half weights, floor "
                    f"{ms['weights_floor_half']:.2f})" if args.half else "")
            print(f"{n} thread(s): step {ms['forward_eager']:.2f} ms eager, "
                  f"{ms['slots_compiled']:.2f} compiled{half}, {ms['weights_floor']:.2f} "
                  f"weights floor; generate {rate['eager']:.0f} -> {rate['compiled']:.0f}"
                  + (f" -> {rate['compiled_half']:.0f}" if args.half else "")
                  + f" tok/s; compile {c['compile']['one_and_two_rows_s']:.1f} s", flush=True)
    server = server_vs_library(args) if args.server else None
    results = {"threads": children, "server_single_stream": server,
               "goals": goals(children, server)}
    settings = {"quick": args.quick, "checkpoint": args.checkpoint or "default",
                "context": args.context, "batch_sizes": args.batch_sizes,
                "tokens": args.tokens, "repeat": args.repeat, "dtype": "float32",
                "layout": "input-major", "inductor_cache": "fresh: first child cold",
                "half_weights": "measured" if problem is None else f"not measured: {problem}"}
    path = write_result("latency", settings, results, args.out)
    plot(children, args.out)
    print(f"wrote {path}")
    print(json.dumps(results["goals"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
