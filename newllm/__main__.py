"""``python -m newllm ...``: the same as the ``newllm`` command (see `newllm.cli`)."""

from newllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
