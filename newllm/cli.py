"""The ``newllm`` command: generate text, inspect checkpoints, and hand off to the other tools.

    newllm generate --prompt "Once upon a time" --max-tokens 40 --temperature 0.8 --stream
    newllm generate --prompt "My name is Ada." --memory-out ada.safetensors
    newllm generate --prompt " What is my name?" --memory-in ada.safetensors
    newllm info --checkpoint tiny-infini
    newllm train ... | eval ... | runs compare ... | serve ... | bench ...

``generate`` and ``info`` live here; ``train``/``eval``/``runs``, ``serve`` and ``bench`` are
handed their arguments untouched by `training.cli`, `server.cli` and `benchmarks.cli`, imported
only when asked for, so a missing optional part only matters when it is used. Exit codes:
0 success, 1 runtime error (missing file, bad memory file, missing module), 2 usage error
(argparse's), 130 interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from newllm.generation import SamplingParams
from newllm.sizes import worst_position

PROG = "newllm"
# subcommand -> (module, function, help); the function takes the remaining argv
DISPATCH: dict[str, tuple[str, str, str]] = {
    "train": ("training.cli", "train_main", "train a model (see `newllm train --help`)"),
    "eval": ("training.cli", "eval_main", "evaluate a model: perplexity, reversal, passkey"),
    "runs": ("training.cli", "runs_main",
             "training runs side by side: `newllm runs compare RUN...` (table and PNG)"),
    "serve": ("server.cli", "main", "serve a checkpoint with the OpenAI-compatible API"),
    "bench": ("benchmarks.cli", "main", "run the benchmarks"),
    "client": ("clients.cli", "main",
               "talk to a running server: chat, sessions, memory export/import/move"),
}
INFO_POSITIONS = (1_000, 8_000, 64_000)  # context lengths `info` reports state sizes at


class CommandError(Exception):
    """A runtime failure to report as one line on stderr with exit code 1."""


# parser ----------------------------------------------------------------------------------------
def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="SPEC", default=None,
                   help="checkpoint folder, preset name (tiny-infini, ...) or hub id; "
                        "default: the bundled checkpoint")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as "
                                                 "stored)")


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingParams()
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compressed-memory language models: generate, inspect, train, "
                               "serve, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate a continuation of a prompt (from --prompt or "
                                     "stdin), optionally continuing and saving a session memory.")
    _add_checkpoint(gen)
    gen.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=defaults.temperature,
                     help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop string (repeatable); it is never printed")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--memory-in", metavar="FILE", default=None,
                     help="continue from this session memory file")
    gen.add_argument("--memory-out", metavar="FILE", default=None,
                     help="save the session memory (prompt + generated text) to this file")
    gen.add_argument("--half-weights", action=argparse.BooleanOptionalAction, default=None,
                     help="keep the linear weights in float16 and compute in float32 (CPU, "
                          "x86-64 with AVX2: half the bytes a decode step reads; a kernel is "
                          "built on first use). Default: on where it rounds nothing (a "
                          "checkpoint stored in float16, as the bundled one, on the CPU "
                          "without --dtype); -v says what was chosen")
    gen.add_argument("-v", "--verbose", action="store_true",
                     help="report token counts, finish reason and state size on stderr")
    gen.set_defaults(func=cmd_generate, parser=gen)

    info = sub.add_parser("info", help="show a checkpoint's config, size and state bytes",
                          description="Show a checkpoint's config, parameter count, fingerprint "
                                      "and session-state bytes at several context lengths.")
    _add_checkpoint(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--parameters", action="store_true",
                      help="also list every parameter's name and shape (the names "
                           "`newllm train --train-only` matches)")
    info.set_defaults(func=cmd_info, parser=info)

    for name, (module, _, text) in DISPATCH.items():
        sub.add_parser(name, help=f"{text} [{module}]", add_help=False)
    return parser


# commands --------------------------------------------------------------------------------------
def use_half_weights(model: Any) -> None:
    """`TransformerLM.use_half_weights`, its refusals as one-line command errors."""
    from newllm.half_weights import HalfWeightsUnavailable

    try:
        model.use_half_weights()
    except (ValueError, HalfWeightsUnavailable) as e:
        raise CommandError(f"--half-weights: {e}") from e


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from newllm.checkpoint import load_checkpoint
    from newllm.config import PRESETS

    if args.checkpoint in PRESETS:  # a preset is an architecture, not a trained model
        print(f"note: {args.checkpoint!r} is a preset with random (untrained) weights: its text "
              "is noise. Leave out --checkpoint for the bundled trained model, or pass a "
              "trained checkpoint folder.", file=sys.stderr)
    return load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> int:
    from newllm.generation import generate

    try:
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop=args.stop)
    except ValueError as e:
        args.parser.error(str(e).replace("max_new_tokens", "--max-tokens"))
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.half_weights:
        from newllm.half_weights import dtype_problem

        if (problem := dtype_problem(args.dtype)) is not None:
            args.parser.error(problem)
        args.dtype = "float32"
    if args.half_weights is None and args.dtype is not None:
        args.half_weights = False  # a dtype asked for is computed as asked
    model, tokenizer = _load(args)
    if args.half_weights:
        use_half_weights(model)
    elif args.half_weights is None:
        from newllm.half_weights import auto

        model, chosen = auto(model)
        if args.verbose:
            print(f"[{chosen}]", file=sys.stderr)
    model.use_input_major_weights()  # the server's layout: its memory files continue exactly
    state = None
    if args.memory_in is not None:
        from newllm.memory_file import load_memory

        state = load_memory(args.memory_in, model, tokenizer_hash=tokenizer.sha256)
    ids = tokenizer.encode(text)
    if not ids:
        if state is not None:
            raise CommandError("the prompt is empty; a memory stores no logits, so continuing "
                               "one needs at least one new token of prompt")
        ids = [model.config.eos_token_id]  # nothing to continue: start a text, as in training
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    stream = generate(model, ids, state, params, decode=tokenizer.decode, vocab_size=vocab)
    if args.stream:
        for token in stream:
            if token.text:
                sys.stdout.write(token.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(stream.collect().text)
    sys.stdout.flush()
    if args.memory_out is not None:
        from newllm.memory_file import save_memory

        save_memory(stream.state, model, args.memory_out, tokenizer_hash=tokenizer.sha256)
    if args.verbose:
        print(f"[{stream.prompt_tokens} prompt + {stream.completion_tokens} generated tokens, "
              f"finish_reason={stream.finish_reason}, state: {stream.state.position} tokens, "
              f"{stream.state.nbytes():,} bytes]", file=sys.stderr)
    return 0


def state_bytes(model: Any, position: int) -> int:
    """Bytes of one session's state after ``position`` tokens (from the model's state shapes
    and dtypes: memory tensors are float32 whatever the model's dtype)."""
    dtypes = model.state_dtypes()
    return sum(math.prod(shape) * dtypes[name].itemsize
               for name, shape in model.state_shapes(1, position).items())


def state_growth_per_1k(model: Any) -> float:
    """How many bytes the state grows per 1,000 tokens of context, in the long run.

    Measured between two positions that are whole multiples of every period the state has
    (segment length, chunk size), so an open segment or chunk does not blur the slope.
    """
    period = math.lcm(model.config.segment_len, model.config.chunk_size)
    p1 = period * -(-8_000 // period)
    p2 = p1 + period * -(-64_000 // period)
    return (state_bytes(model, p2) - state_bytes(model, p1)) * 1000 / (p2 - p1)


def cmd_info(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    report = {
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "fingerprint": model.fingerprint(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id,
                      "sha256": tokenizer.sha256},
        "state_bytes": {str(p): state_bytes(model, p) for p in INFO_POSITIONS},
        # the largest state in the same segment (open segment full): sizes swing within one
        "state_bytes_worst_in_segment": {
            str(p): state_bytes(model, worst_position(model.config, p)) for p in INFO_POSITIONS},
        "state_bytes_per_1k_tokens": state_growth_per_1k(model),
    }
    if args.parameters:
        report["parameter_shapes"] = {name: list(p.shape)
                                      for name, p in model.named_parameters()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"config: {model.config.name}")
    for key, value in report["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: {report['parameters']:,}")
    print(f"fingerprint: {report['fingerprint']}")
    print(f"tokenizer: vocab {tokenizer.vocab_size}, eos {tokenizer.eos_token_id}, "
          f"sha256 {tokenizer.sha256}")
    print(f"session state ({report['dtype']}):")
    for p in INFO_POSITIONS:
        print(f"  after {p:>6,} tokens: {report['state_bytes'][str(p)]:>12,} bytes "
              f"(at most {report['state_bytes_worst_in_segment'][str(p)]:,} within its "
              f"segment, the open segment full)")
    growth = report["state_bytes_per_1k_tokens"]
    print(f"  growth: {growth:,.0f} bytes per 1k tokens"
          + (" (fixed-size memory)" if growth == 0 else ""))
    if args.parameters:
        print("parameters by name:")
        for name, shape in report["parameter_shapes"].items():
            print(f"  {name}: {tuple(shape)} ({math.prod(shape):,})")
    return 0


# entry point -----------------------------------------------------------------------------------
def _exit_code(code: object) -> int:
    """SystemExit.code -> int (argparse: 0 for --help, 2 for usage errors)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _missing_module(command: str, e: ModuleNotFoundError) -> int:
    name = e.name or str(e)
    print(f"{PROG} {command}: error: this needs the module {name!r}, which is not installed "
          f"(install newllm with the optional parts it needs, or run from the repository root)",
          file=sys.stderr)
    return 1


def _dispatch(command: str, argv: list[str]) -> int:
    module_name, func_name, _ = DISPATCH[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        return _missing_module(command, e)
    func: Callable[[list[str]], int | None] | None = getattr(module, func_name, None)
    if func is None:
        print(f"{PROG} {command}: error: {module_name} has no {func_name}(argv); this "
              f"installation is incomplete", file=sys.stderr)
        return 1
    try:
        return int(func(argv) or 0)
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``newllm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        return _dispatch(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return _exit_code(e.code)
    try:
        return int(args.func(args))
    except SystemExit as e:  # parser.error() from a command: a usage error
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        return _missing_module(args.command, e)
    except (CommandError, OSError, ValueError) as e:
        message = str(e)
        if isinstance(e, OSError) and e.strerror and e.filename:
            message = f"{e.strerror}: {e.filename}"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
