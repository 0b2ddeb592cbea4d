"""`newllm bench NAME [--quick] [...]`: run one benchmark (or `all`) by name."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("state_size", "decode", "latency", "engine", "pointer", "prefill", "transfer",
              "server", "chat", "quality", "move", "store")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: newllm bench NAME [--quick] [options]\n"
              f"benchmarks: {', '.join(BENCHMARKS)}, all")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        return max(importlib.import_module(f"benchmarks.{n}").main(rest) for n in BENCHMARKS)
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}, all",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(f"benchmarks.{name}").main(rest))


if __name__ == "__main__":
    raise SystemExit(main())
