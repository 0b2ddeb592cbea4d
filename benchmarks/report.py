"""report: the README's "Performance" section, generated from ``benchmarks/results/*.json``.

`markdown(folder)` turns every result present into a subsection (tables, the machine it was
measured on, a link to its plot); missing results are left out. The README holds the generated
text between two markers, so the tables and the JSON cannot disagree (a test compares them)::

    <!-- perf:start -->
    ...generated...
    <!-- perf:end -->

    python -m benchmarks.report                          # print the section
    python -m benchmarks.report --write-readme README.md # replace the text between the markers
    python -m benchmarks.report --check README.md        # exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
PLOTS = "benchmarks/results"  # where the README links the PNGs (relative to the repository)
Doc = dict[str, Any]


# formatting ----------------------------------------------------------------------------------
def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _pct(x: float) -> str:
    digits = 0 if x == 0 or x >= 0.1 else 1 if x >= 0.01 else 2
    return f"{100 * x:.{digits}f}%"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _machine(doc: Doc) -> str:
    m = doc["machine"]
    v = m.get("versions", {})
    where = f"{m['cpu']}, {m['cores']} cores, {m.get('torch_threads')} torch threads"
    if m.get("gpu"):
        where += f", {m['gpu']}"
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers") if k in v)
    quick = " (quick mode)" if doc["settings"].get("quick") else ""
    return f"*Measured {doc['date'][:10]} on {where}; {libs}{quick}.*"


# one function per benchmark ------------------------------------------------------------------
def _state_size(doc: Doc) -> list[str]:
    rows, red = doc["results"]["rows"], doc["results"]["reduction_vs_pythia"]
    lengths = [r["tokens"] for r in rows["pythia"]]
    body = []
    for kind, rs in rows.items():
        cells = [f"`{kind}`"]
        for r in rs:
            cut = red[kind][str(r["tokens"])]
            cells.append(_bytes(r["fp32_bytes"]) + ("" if kind == "pythia"
                                                      else f" ({-100 * cut:+.1f}%)"))
        body.append(cells)
    out = (["Session state (fp32) per kind at the 70M presets, and its change against "
            "Pythia's KV cache:", ""]
           + _table(["kind"] + [f"{n:,} tokens" for n in lengths], body))
    if "worst_in_segment_fp32_bytes" in rows["pythia"][0]:
        worst = [[f"`{kind}`"] + [_bytes(r["worst_in_segment_fp32_bytes"]) for r in rs]
                 for kind, rs in rows.items()]
        out += ["", "These lengths are segment boundaries, where a memory layer's open segment "
                "is empty: the best case. The worst case: the state at the last token of the "
                "segment that follows (open segment full, S - 1 tokens later):", ""]
        out += _table(["kind"] + [f"~{n:,} tokens" for n in lengths], worst)
    return out


def _decode(doc: Doc) -> list[str]:
    res = doc["results"]
    rows = res["rows"]
    hf = "transformers_gpt_neox"
    kinds = [k for k in rows if k != hf]
    contexts = [r["context"] for r in rows[kinds[0]]]
    ms = {k: [r["ms_per_token"] for r in rs] for k, rs in rows.items()}
    body = []
    for i, n in enumerate(contexts):
        cells = [f"{n:,}"] + ([_ms(ms[hf][i])] if hf in ms else [])
        for k in kinds:
            relative = k != "pythia" and "pythia" in ms
            cells.append(_ms(ms[k][i])
                         + (f" ({ms['pythia'][i] / ms[k][i]:.2f}x)" if relative else ""))
        speedup = ms[hf][i] / ms["pythia"][i] if hf in ms and "pythia" in ms else None
        body.append(cells + [f"{speedup:.2f}x" if speedup else "-"])
    slow = [f"{ms[k][-1] / ms[k][0]:.2f}x" for k in ([hf] if hf in ms else []) + kinds]
    body.append([f"slowdown ({contexts[-1]:,} / {contexts[0]:,})", *slow, ""])
    head = (["context"] + ([f"`{hf}`"] if hf in ms else []) + [f"`{k}`" for k in kinds]
            + ["pythia speed-up"])
    out = ["Decode latency, ms per token (batch 1, fp32, median step; in brackets: speed "
           "relative to `pythia` at the same context); pythia speed-up = transformers / ours; "
           "last row: ms per token at the longest context / at the shortest:", ""]
    out += _table(head, body)
    out += _layout(doc["settings"])
    goals = res.get("goals", {})
    if "pythia_vs_transformers" in goals:
        g = goals["pythia_vs_transformers"]
        out += ["", f"Goal, our `pythia` at least {g['target']:g}x transformers at "
                f"{g['context']:,} tokens: {g['value']:.2f}x, {'met' if g['met'] else 'NOT met'}."]
    if "constant_state_kinds_flat" in goals:
        g = goals["constant_state_kinds_flat"]
        out += ["", "Goal, constant-state kinds (" + ", ".join(f"`{k}`" for k in g["kinds"])
                + f") flat in context (slowdown at most {g['target']:g}x): worst "
                f"{g['value']:.2f}x, {'met' if g['met'] else 'NOT met'}."]
    batch = res.get("batched_tokens_per_s", {})
    if batch and not isinstance(next(iter(batch.values())), dict):  # older results: one kind
        batch = {res.get("batched_kind", "pythia"): batch}
    if batch:
        sessions = list(next(iter(batch.values())))
        where = doc["settings"].get("batched_context")
        out += ["", "Batched decode (`decode_step`), aggregate tokens/s, sessions at different "
                "positions" + (f" (about {where:,} tokens)" if where else "") + ":", ""]
        out += _table(["kind"] + [f"{b} session{'' if b == '1' else 's'}" for b in sessions],
                      [[f"`{k}`"] + [_n(by[b]) for b in sessions] for k, by in batch.items()])
    same = res.get("greedy_tokens_equal_transformers")
    if same is None:  # measured without transformers
        return out
    return out + ["", f"Greedy tokens equal transformers': {'yes' if same else 'NO'}."]


def _layout(settings: dict[str, Any]) -> list[str]:
    """How the weights were stored, and how the pair was timed (results before these settings
    existed: nothing)."""
    ours = settings.get("our_weight_layout")
    if ours is None:
        return []
    line = (f"Our weights: {ours.split(' (')[0]}"
            + (" (`TransformerLM.use_input_major_weights`, as the server and `newllm generate` "
               "run them)" if ours.startswith("input-major") else "")
            + "; transformers' as it ships.")
    if settings.get("pythia_and_transformers"):
        line += f" Our `pythia` and transformers timed {settings['pythia_and_transformers']}."
    return ["", line]


def _prefill(doc: Doc) -> list[str]:
    res = doc["results"]
    rows = res["rows"]
    kinds = list(rows)
    lengths = [r["tokens"] for r in rows[kinds[0]]]
    body = []
    for i, n in enumerate(lengths):
        speedup = res["pythia_speedup_vs_transformers"].get(str(n))
        body.append([f"{n:,}"] + [_n(rows[k][i]["tokens_per_s"]) for k in kinds]
                    + [f"{speedup:.2f}x" if speedup else "-"])
    presets = doc["settings"]["presets"]
    out = ["Prefill throughput, tokens/s (one call, batch 1, fp32; presets "
           + ", ".join(f"`{p}`" for p in presets.values())
           + "); speed-up = ours / transformers (pythia):", ""]
    out += _table(["prompt"] + [f"`{k}`" for k in kinds] + ["speed-up"], body)
    out += _layout(doc["settings"])
    return out + ["", "Last-token logits equal transformers': "
                  f"{'yes' if res['last_logits_equal_transformers'] else 'NO'} (max difference "
                  f"{res['last_logits_max_abs_diff']:.1e})."]


def _transfer(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    body = []
    for lib, srv, py in zip(res["library"], res["server"], res["pythia"], strict=True):
        body.append([f"{lib['tokens']:,}", _bytes(srv["file_bytes"]),
                     f"{_ms(srv['export_ms'])} / {_ms(srv['import_ms'])}",
                     f"{_ms(lib['save_ms'])} / {_ms(lib['load_ms'])}",
                     _bytes(py["same_shape_kv_bytes"]), _ms(py["same_shape_rerun_ms"]),
                     _bytes(py["reference_kv_bytes"]), _ms(py["reference_rerun_ms"])])
    head = ["tokens", "memory file", "server export / import ms", "library save / load ms",
            "Pythia KV (same shape)", "re-run prompt ms (same shape)",
            f"`{s['pythia_reference']}` KV", f"`{s['pythia_reference']}` re-run ms"]
    return ([f"Moving a `{s['model']}` session (layers {', '.join(s['layers'])}) through a "
             "server on loopback and through the library, against what a Pythia session of "
             "the same length would cost to move (its KV cache) or to rebuild (re-running "
             "the prompt):", ""] + _table(head, body))


def _engine(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    rows, share = res["tokens_per_s"], res["slots_share_of_batched_state"]
    ways = [("batched_state", "one batched state (ceiling)"), ("slots", "slots (the engine)"),
            ("decode_step", "`decode_step` (before)")]
    body = [[label] + [_n(rows[n][w]) if w in rows[n] else "-" for n in rows]
            for w, label in ways]
    body.append(["slots / ceiling"] + [_pct(share[n]) for n in rows])
    out = [f"Batched decode of `{s['model']}` (fp32, {s['threads']} torch thread"
           f"{'s' if s['threads'] != 1 else ''}), aggregate tokens/s; the ceiling is one forward "
           f"over one batched state with every row at ~{s['context']:,} tokens, the slots hold "
           f"sessions at different positions ({s['context']:,} + {s['spacing']} i tokens):", ""]
    out += _table(["sessions"] + list(rows), body)
    g = res.get("goal")
    if g:
        diff = res["slots_max_abs_logit_diff"]
        out += ["", f"Goal, slots at least {_pct(g['target'])} of the ceiling at "
                f"{g['sessions']} sessions: {_pct(g['value'])}, "
                f"{'met' if g['met'] else 'NOT met'}. Slots' logits against one call per "
                f"session: within {diff:.1e}."]
    chunks = res["prefill_chunks"]
    out += ["", f"Reading a prompt in pieces ({s['prefill_tokens']:,} tokens after the context; "
            f"the scheduler reads {res['prefill_chunk_chosen']} per step):", ""]
    out += _table(["piece (tokens)", "tokens/s", "ms per piece"],
                  [[c, _n(r["tokens_per_s"]), _ms(r["ms_per_chunk"])] for c, r in chunks.items()])
    return out


def _pointer(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    dec, share = res["decode_tokens_per_s"], res["decode_share"]
    sb, fb, train = res["state_bytes"], res["memory_file_bytes"], res["training_step_s"]
    body = [[label] + [_n(dec[n][k]) for n in dec] for k, label in
            (("without", "without"), ("with_pointer", "with the pointer"))]
    body.append(["with / without"] + [_pct(share[n]) for n in dec])
    whose = ("its trained pointer cache" if s.get("pointer_trained")
             else "a new pointer cache (initial weights)")
    shape = "".join(f", `{k}` {s[k]}" for k, off in (("pointer_span", 1), ("pointer_delay", 0))
                    if s.get(k, off) != off)
    out = [f"`{s['model']}` without and with {whose} (`pointer_dim` "
           f"{s['pointer_dim']}{shape}, gate inputs {', '.join(s['pointer_gate_inputs'])}; fp32, "
           f"{s['threads']} torch thread{'s' if s['threads'] != 1 else ''}). State a session: "
           f"{_bytes(sb['without'])} against {_bytes(sb['with_pointer'])} "
           f"(x{res['state_ratio']:.1f}; memory files {_bytes(fb['without'])} and "
           f"{_bytes(fb['with_pointer'])}), the same at any length. Generated tokens/s of the "
           f"slots, sessions ~{s['context']:,} tokens in:", ""]
    out += _table(["sessions"] + list(dec), body)
    pre = res["prefill_tokens_per_s"]
    out += ["", f"Prefill ({s['prefill_tokens']:,} tokens in pieces of {s['prefill_chunk']}): "
            f"{_n(pre['without'])} against {_n(pre['with_pointer'])} tokens/s "
            f"({_pct(res['prefill_share'])}). A training step of the pointer alone (batch "
            f"{' x '.join(str(x) for x in s['training_batch'])} tokens): "
            f"{train['whole_mixture']:.2f} s with the loss from the whole mixture, "
            f"{train['targets_alone']:.2f} s from the targets alone "
            f"(x{res['training_speedup']:.1f}). Slot logits against one call per session: "
            f"within {res['slots_max_abs_logit_diff']:.1e}."]
    return out


def _server(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    flat = [(r["clients"], s["max_batch_size"][name], name, r)
            for name, rows in res["rows"].items() for r in rows]
    body = []
    for clients, batch, name, r in sorted(flat, key=lambda x: (x[0], x[1])):
        t, lat = r["ttft_ms"], r["latency_ms"]
        body.append([str(clients), f"{name.removeprefix('batching_')} ({batch})",
                     str(r["requests"]),
                     " / ".join(_ms(t[p]) for p in ("p50", "p95", "p99")),
                     " / ".join(_ms(lat[p]) for p in ("p50", "p95", "p99")),
                     _n(r["tokens_per_s"]), str(r["errors"])])
    files = res["memory_files"]
    valid = sum(f["valid"] for f in files.values())
    checked = sum(f["checked"] for f in files.values())
    speedup = res.get("batching_speedup", {})
    out = [f"`{s['model']}` served on loopback, each client its own session, "
           f"{s['duration_s']:g} s per level, {s['prompt_tokens']} new prompt tokens and "
           f"{s['max_tokens']} generated tokens (greedy) per request:", ""]
    out += _table(["clients", "batching (max batch)", "requests", "TTFT p50 / p95 / p99 ms",
                   "latency p50 / p95 / p99 ms", "tokens/s", "errors"], body)
    if speedup:
        out += ["", "Batching speed-up (tokens/s with / without): " + ", ".join(
            f"{c} client{'s' if c != '1' else ''} {v:.2f}x" for c, v in speedup.items()) + "."]
    return out + ["", f"Errors: {res['errors']}. Session memory files valid afterwards: "
                      f"{valid} / {checked}."]


def _chat(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    names = list(res["rows"])
    picks = sorted({1, 2, s["turns"] // 2, s["turns"]})
    body = []
    for mode in names:
        rows = res["rows"][mode]
        body.append([mode.replace("_", " "),
                     *(f"{_ms(rows[t - 1]['ms'])} ({_n(rows[t - 1]['read_tokens'])})"
                       for t in picks)])
    goals = res["goals"]
    out = [f"A {s['turns']}-turn chat with `{s['model']}` ({s['max_tokens']} greedy tokens per "
           "reply): latency in ms at some turns, and in brackets the prompt tokens the server "
           "read (a stateless client resends the whole history; the prefix cache, a Responses "
           "chain and a session read only what is new):", ""]
    out += _table(["client", *(f"turn {t}" for t in picks)], body)
    out += ["", "Goals: " + "; ".join(
        f"{k.replace('_', ' ')} {v['value']:.2f} (target {v['target']:g}, "
        f"{'met' if v['met'] else 'not met'})" for k, v in goals.items()) + "."]
    return out


def _store(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    turns = [[_n(r["tokens"]), _bytes(r["file_bytes"]), _ms(r["folder_ms"]), _ms(r["redis_ms"])]
             for r in res["per_turn"]]
    out = [f"The store work of one turn of a `{s['model']}` session (lock or lease, metadata, "
           f"read, write, release; median of {s['repeat']}), folder against Redis "
           f"({s['redis']}):", ""]
    out += _table(["tokens seen", "memory file", "folder ms / turn", "Redis ms / turn"], turns)
    names = list(res["rows"])
    body = []
    for i, n in enumerate(s["clients"]):
        body.append([str(n), *(_n(res["rows"][k][i]["tokens_per_s"]) for k in names)])
    out += ["", f"Server tokens/s, {s['duration_s']:g} s per level, {s['max_tokens']} generated "
                "tokens per streamed request, each client its own session (two replicas share "
                "this machine's cores: the store's overhead, not scaling):", ""]
    out += _table(["clients", *(k.replace("_", " ") for k in names)], body)
    return out + ["", f"Errors: {res['errors']}."]


def _quality(doc: Doc) -> list[str]:
    body = []
    for r in doc["results"]["rows"]:
        ppl = r.get("ppl", r.get("val_ppl"))
        passkey = r.get("passkey", r.get("train_passkey")) or {}
        body.append([
            r["name"], _n(r["parameters"]), _bytes(r["state_bytes_16384"]),
            _pct(r["state_vs_pythia_16384"]), _ms(r["decode_ms_per_token"]),
            f"{ppl:.2f}", f"{r['memory_ppl_ratio']:.3f}" if "memory_ppl_ratio" in r else "-",
            " ".join(f"{d}:{_pct(a)}" for d, a in passkey.items()) or "-",
            _n(r["tokens_seen"]) if "tokens_seen" in r else "-",
            _n(r["train_tokens_per_s"]) if "train_tokens_per_s" in r else "-"])
    context = doc["settings"]["decode_context"]
    kept = [f"{r['name']} ({str(r['kept_from'].get('date') or '?')[:10]})"
            for r in doc["results"]["rows"] if r.get("kept_from")]
    note = ([] if not kept else
            ["", "Kept from an earlier run of this benchmark, with that run's figures: "
                 + ", ".join(kept) + "."])
    return (["Size, speed and quality side by side (state at 16,384 tokens and its share of a "
             f"same-shape Pythia KV cache; decode at {context:,} tokens of context; perplexity; "
             "perplexity with memory carried / reset every segment; exact passkey recall by "
             "distance in segments; training tokens seen and tokens/s):", ""]
            + _table(["model", "parameters", "state", "vs Pythia", "decode ms/token",
                      "perplexity", "memory / reset", "passkey", "tokens seen",
                      "train tokens/s"], body) + note)


def _latency(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    body = []
    for c in res["threads"]:
        ms, gen, comp = c["step_ms"], c["generate_tokens_per_s"], c["compile"]
        half = "slots_compiled_half" in ms  # results before half weights lack it
        body.append([str(c["threads"]), _ms(ms["weights_floor"]), _ms(ms["forward_eager"]),
                     _ms(ms["slots_compiled"]),
                     f"{ms['slots_compiled'] / ms['weights_floor']:.2f}x",
                     f"{_ms(ms['slots_compiled_half'])} (floor {_ms(ms['weights_floor_half'])})"
                     if half else "-",
                     f"{_n(gen['eager'])} / {_n(gen['compiled'])}"
                     + (f" / {_n(gen['compiled_half'])}" if half else ""),
                     f"{comp['one_and_two_rows_s']:.0f} s, +{comp['rss_added_mib']:.0f} MiB"])
    out = [f"One conversation (batch 1, bundled model, fp32, {s['context']} tokens read): ms per "
           "token step, the weights floor (one-row products with each weight matrix once, "
           "nothing else), the compiled step with half weights (float16 weights computed in "
           "float32, `--half-weights`) and `newllm.generate` tokens/s eager / compiled / "
           "compiled with half weights:", ""]
    out += _table(["threads", "weights floor", "eager step", "compiled step",
                   "compiled / floor", "compiled, half weights", "generate tok/s",
                   "compile (cold), memory"], body)
    server = res.get("server_single_stream")
    if server:
        out += ["", "One streaming client of `newllm serve` against `newllm.generate` in the "
                "same process, decode rate: " + "; ".join(
                    f"{name} {_n(r['server']['decode_tokens_per_s'])} vs "
                    f"{_n(r['generate']['decode_tokens_per_s'])} tok/s "
                    f"({_pct(r['ratio_decode'])})" for name, r in server.items())
                + ". First request's time to first token right after the start: " + ", ".join(
                    f"{name} {r['first_request_ttft_s']:.2f} s" for name, r in server.items()
                    if "first_request_ttft_s" in r) + "."]
    one = res["threads"][0].get("pythia_70m")
    if one:
        ms = one["ms_per_token"]
        out += ["", f"`{one['model']}` at {one['context']:,} tokens: ours "
                f"{_ms(ms['ours_eager'])} eager, {_ms(ms['ours_compiled'])} compiled"
                + (f", {_ms(ms['ours_compiled_half'])} compiled with half weights"
                   f" ({one['speedup_vs_transformers']['compiled_half']:.2f}x)"
                   if "ours_compiled_half" in ms else "")
                + f", transformers {_ms(ms['transformers'])} ms per token "
                f"({one['speedup_vs_transformers']['compiled']:.2f}x compiled)"
                + (f"; its weights floor (one-row products with each of its "
                   f"{one['weights_mib']:.3g} MiB of weight matrices) {_ms(ms['weights_floor'])} ms"
                   if "weights_floor" in ms else "") + "."]
    met = [f"{k.replace('_', ' ')} {g['value']:.3g} (goal {g['target']:g}: "
           f"{'met' if g['met'] else 'not met'})" for k, g in res["goals"].items()]
    return out + ["", "Goals: " + "; ".join(met) + "."]


def _move(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    S = s["segment_len"]
    body = [[f"{d} ({int(d) * S:,} tokens)", _pct(r["moved"]), _pct(r["not_moved"]),
             _pct(r["reset"])] for d, r in res["by_distance"].items()]
    same = "yes" if res["answers_identical_after_move"] else "NO"
    return ([f"Pass-key recall with `{s['model']}` through two servers: the fact told on "
             "server A, prose added, the session moved to server B, the question asked there "
             f"(greedy; {res['trials_per_distance']} random keys per distance):", ""]
            + _table(["prose between fact and question (segments)", "after the move",
                      "without the move", "memory reset"], body)
            + ["", f"Answers after the move identical to those without it: {same}; "
                   f"memory file moved: {_bytes(res['moved_file_bytes_mean'])}."]
            + _precision(res.get("precision_moves"), s) + _move_chat(res.get("chat"), s))


def _move_chat(chat: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    if not chat:
        return []
    return ["", f"Chat ({chat['conversations']} conversations of {s['chat_turns']} user "
                f"messages of ~{s['chat_user_tokens']} tokens, a fact told in the first and "
                f"asked in the last, the session moved from A to B after message "
                f"{s['chat_move_at']}): the last reply names the fact in "
                f"{_pct(chat['moved'])} (the same conversation in the library, not moved: "
                f"{_pct(chat['library'])}; the question alone in a new session: "
                f"{_pct(chat['floor'])}); every reply the same as the library's in "
                f"{_pct(chat['replies_same_as_library'])} of conversations."]


def _precision(rows: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    if not rows:
        return []
    body = [[f"{pair.replace('->', ' -> ')}", _pct(r["greedy_identical_to_written"]),
             _pct(r["greedy_identical_to_reader_alone"]),
             " / ".join(f"{r[k]:.2f}" for k in ("ppl_written", "ppl_moved", "ppl_reader_alone"))]
            for pair, r in rows.items()]
    return (["", f"Moves across precision ({s['precision_prompts']} places in the filler; a "
             f"session reads {s['precision_prompt_tokens']} tokens at the writer's precision, "
             "its memory file is converted on load at the reader's): 32 greedy tokens "
             "identical to continuing where it was written, and to the reader reading the "
             f"prompt itself; perplexity of the next {s['precision_next_tokens']:,} tokens "
             "continuing where written / after the move / read by the reader alone:", ""]
            + _table(["move", "same as where written", "same as reader alone",
                      "perplexity written / moved / reader"], body))


SECTIONS: dict[str, tuple[str, Callable[[Doc], list[str]]]] = {
    "state_size": ("Session state vs context length", _state_size),
    "decode": ("Decode speed", _decode),
    "latency": ("One conversation: the compiled decode step", _latency),
    "engine": ("Batched decoding (slots)", _engine),
    "pointer": ("What a pointer cache costs", _pointer),
    "prefill": ("Prefill speed", _prefill),
    "transfer": ("Moving a session", _transfer),
    "server": ("Server under load", _server),
    "chat": ("A long chat: prefix cache, Responses chain, session", _chat),
    "store": ("Session store: folder and Redis", _store),
    "quality": ("Quality", _quality),
    "move": ("Remembers after a move", _move),
}


def load_results(folder: Path | None = None) -> dict[str, Doc]:
    folder = folder or RESULTS
    docs = {}
    for name in SECTIONS:
        path = folder / f"{name}.json"
        if path.is_file():
            docs[name] = json.loads(path.read_text())
    return docs


def markdown(folder: Path | None = None) -> str:
    """The Performance section's text for the results in ``folder`` (default: results/)."""
    docs = load_results(folder)
    if not docs:
        return "No benchmark results yet: run `newllm bench all`.\n"
    lines = ["Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; "
             "each benchmark runs with `newllm bench NAME` (`--quick` for a smoke run)."]
    for name, (title, render) in SECTIONS.items():
        if name in docs:
            doc = docs[name]
            lines += ["", f"### {title}", "", *render(doc), "",
                      f"![{name}]({PLOTS}/{name}.png)", "", _machine(doc)]
    return "\n".join(lines) + "\n"


def readme_section(text: str) -> str | None:
    """The text between the markers (None when the README has none)."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_section(text: str, section: str) -> str:
    if readme_section(text) is None:
        raise ValueError(f"the README has no {START} ... {END} markers; add them where the "
                         "Performance section should go")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{START}\n{section}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=None, help="results folder")
    ap.add_argument("--write-readme", type=Path, default=None,
                    help="replace the README's text between the perf markers")
    ap.add_argument("--check", type=Path, default=None,
                    help="exit 1 if this README's section differs from the results")
    args = ap.parse_args(argv)
    text = markdown(args.results)
    if args.check:
        current = readme_section(args.check.read_text())
        if current != text:
            print(f"{args.check}: the Performance section is out of date (or has no markers); "
                  "run python -m benchmarks.report --write-readme", file=sys.stderr)
            return 1
        return 0
    if args.write_readme:
        readme = args.write_readme
        readme.write_text(replace_section(readme.read_text(), text))
        print(f"updated {readme}")
        return 0
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
