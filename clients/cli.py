"""``newllm-client`` (also ``newllm client``): talk to a running newllm server from a shell.

    newllm-client health
    newllm-client chat --session ada                      # interactive, streaming
    newllm-client chat --session ada -m "My name is Ada." --temperature 0
    newllm-client complete "Once upon a time" --max-tokens 40
    newllm-client sessions --json
    newllm-client export ada -o ada.safetensors
    newllm-client import ada2 ada.safetensors
    newllm-client move ada --from http://a:8000 --to http://b:8000

Server and key: ``--url`` (default ``$NEWLLM_URL`` or http://127.0.0.1:8000) and ``--api-key``
(default ``$NEWLLM_API_KEY``); options may come before or after the command. ``--json`` prints
one JSON object per result on stdout (chat: one per turn; errors too, as ``{"error": ...}``).
Human messages, progress and errors go to stderr. Transfers show progress on stderr when it is
a terminal and the file is over 1 MiB (``--progress always|never`` to choose).

Exit codes (stable, for scripts):

====  ======================================================================================
0     success (``health``: the server is ready)
1     any other failure: a server error (5xx), an unexpected answer, a local file error
2     usage error (bad arguments)
3     the server cannot be reached, is not ready, or timed out (worth retrying later)
4     authentication failed (401/403): pass --api-key or set NEWLLM_API_KEY
5     not found (404): no such session or model
6     refused (400/413/422): a bad request, or an uploaded memory file the server refused
7     conflict (409): the session is busy, its history differs, or the target session exists
8     integrity: a transferred memory file failed its checksum (nothing was changed)
130   interrupted (Ctrl-C)
====  ======================================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from clients import errors, memory
from clients._base import normalize_url
from clients.client import Client, move_session, write_file_atomic
from clients.types import ChatResult, CompletionResult, ImportResult

PROG = "newllm-client"
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "NEWLLM_URL", "NEWLLM_API_KEY"
PROGRESS_MIN_BYTES = 1 << 20  # "auto" progress only for transfers at least this large

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_CONFLICT, EXIT_INTEGRITY = 4, 5, 6, 7, 8
EXIT_INTERRUPTED = 130
EXIT_CODES: list[tuple[type[Exception], int]] = [  # first match wins
    (errors.ServerUnavailable, EXIT_UNAVAILABLE), (errors.AuthError, EXIT_AUTH),
    (errors.NotFound, EXIT_NOT_FOUND), (errors.BadRequest, EXIT_REFUSED),
    (errors.Conflict, EXIT_CONFLICT), (errors.IntegrityError, EXIT_INTEGRITY),
]


class UsageError(Exception):
    """Bad arguments found after parsing (exit 2)."""


def exit_code(error: Exception) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_ERROR


# progress ------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressPrinter:
    """Prints ``label: done / total (pct)`` on one stderr line, at most 10 times a second."""

    def __init__(self, label: str, mode: str, stream: Any = None) -> None:
        self.label, self.mode = label, mode
        self.stream = stream if stream is not None else sys.stderr
        self.stage: str | None = None
        self.last_print, self.shown = 0.0, False

    def _enabled(self, total: int | None) -> bool:
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        return self.stream.isatty() and (total is None or total >= PROGRESS_MIN_BYTES)

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        complete = total is not None and done >= total
        if not self._enabled(total) or (not complete and now - self.last_print < 0.1):
            return
        self.last_print = now
        of = f" / {_size(total)} ({100 * done / max(total, 1):.0f}%)" if total else ""
        label = f"{self.stage} {self.label}" if self.stage else self.label
        self.stream.write(f"\r{label}: {_size(done)}{of}   ")
        self.stream.flush()
        self.shown = True

    def staged(self, stage: str, done: int, total: int | None) -> None:
        """For transfers in stages (``move``: download, then upload): one line per stage."""
        if stage != self.stage:
            self.finish()
            self.stage, self.last_print = stage, 0.0
        self(done, total)

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


# output --------------------------------------------------------------------------------------
def emit(args: argparse.Namespace, obj: dict[str, Any], human: str | None) -> None:
    """``obj`` as one JSON line on stdout with --json, else ``human`` (if any) on stdout."""
    if args.json:
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    elif human is not None:
        print(human, flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _result_json(result: ChatResult | CompletionResult) -> dict[str, Any]:
    return {"text": result.text, "finish_reason": result.finish_reason,
            "usage": result.usage.model_dump() if result.usage else None,
            "session": result.session.model_dump() if result.session else None}


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
            "stop": args.stop or None}


# commands ------------------------------------------------------------------------------------
def _user_lines(args: argparse.Namespace) -> Iterator[str]:
    if args.message:
        yield from args.message
        return
    interactive = sys.stdin.isatty()
    if interactive:
        note(f"chatting with {args.url}" + (f", session {args.session!r}" if args.session
                                            else "") + "; /quit or Ctrl-D to end")
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip():
            yield line


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    first = True
    for line in _user_lines(args):
        history.append({"role": "user", "content": line})
        if args.session is None:
            messages = history  # no session: the server remembers nothing, send it all
        else:  # the session's memory holds the conversation: send only what is new
            messages = (history[:1] if first and args.system else []) + history[-1:]
        kwargs = dict(session=args.session, reset_session=args.reset and first,
                      session_input="new" if args.session else None, **_sampling(args))
        if args.json or args.no_stream:
            result = client.chat(messages, **kwargs)
            emit(args, _result_json(result), result.text)
        else:
            stream = client.stream_chat(messages, **kwargs)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            result = stream.result()
        history.append({"role": "assistant", "content": result.text})
        first = False
    return EXIT_OK


def cmd_complete(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    kwargs = dict(session=args.session, echo=args.echo, logprobs=args.logprobs,
                  reset_session=args.reset, **_sampling(args))
    if args.json or args.no_stream:
        result = client.complete(prompt, **kwargs)
        out = _result_json(result)
        if result.logprobs is not None:
            out["logprobs"] = result.logprobs.model_dump()
        emit(args, out, result.text)
        return EXIT_OK
    for piece in client.stream_complete(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    printer = ProgressPrinter(f"export {args.session}", args.progress)
    try:
        data = client.export_memory(args.session, progress=printer)
    finally:
        printer.finish()
    assert isinstance(data, bytes)
    info = memory.inspect(data)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_file_atomic(Path(args.output), data)
    summary = {"session": args.session, "file": args.output, **info.summary()}
    if args.json and args.output != "-":
        emit(args, summary, None)
    else:
        note(f"exported session {args.session!r}: {info.size:,} bytes, {info.tokens_seen} "
             f"tokens seen, payload sha256 {str(info.payload_sha256)[:16]}... -> {args.output}")
    return EXIT_OK


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    if not args.overwrite and client.memory_headers(args.session) is not None:
        raise errors.Conflict(f"{client.base_url} already has a session {args.session!r}; "
                              "pass --overwrite to replace it", code="session_exists")
    printer = ProgressPrinter(f"import {args.session}", args.progress)
    try:
        result = client.import_memory(args.session, data, progress=printer)
    finally:
        printer.finish()
    emit(args, result.model_dump(), None)
    if not args.json:
        converted = result.conversion_text()
        note(f"{'created' if result.created else 'replaced'} session {result.id!r}: "
             f"{result.tokens_seen} tokens seen, {result.bytes:,} bytes"
             + (f"; {converted}" if converted else ""))
    return EXIT_OK


def cmd_move(client: Client, args: argparse.Namespace) -> int:
    source_url = args.source or args.url
    printer = ProgressPrinter(f"session {args.session}", args.progress)
    source = _client(args, source_url, args.from_api_key or args.api_key)
    target = _client(args, args.target, args.to_api_key or args.api_key)
    try:
        result = move_session(args.session, source, target, args.new_id,
                              keep_source=args.keep_source, overwrite=args.overwrite,
                              progress=printer.staged)
    except errors.Conflict as e:  # the library's wording names its argument; say the flag
        if e.code != "session_exists":
            raise
        raise errors.Conflict(str(e).replace("overwrite=True", "--overwrite"),
                              code=e.code) from None
    finally:
        printer.finish()
        source.close()
        target.close()
    emit(args, result.model_dump(), None)
    if not args.json:
        verb = "moved" if result.source_deleted else "copied"
        converted = ImportResult(id=result.new_id, converted=result.converted).conversion_text()
        note(f"{verb} session {result.session!r} ({result.bytes:,} bytes, {result.tokens_seen} "
             f"tokens seen, payload sha256 verified) from {result.source} to {result.target} "
             f"as {result.new_id!r}" + (f"; {converted}" if converted else ""))
    return EXIT_OK


def cmd_sessions(client: Client, args: argparse.Namespace) -> int:
    infos = client.sessions()
    if args.json:
        emit(args, {"sessions": [i.model_dump() for i in infos]}, None)
        return EXIT_OK
    print(f"{'ID':<32} {'TOKENS':>8} {'BYTES':>10} {'TURNS':>5} {'KIND':<5} LAST USED")
    for i in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.last_used))
        print(f"{i.id:<32} {i.tokens_seen:>8} {i.bytes:>10} {i.turns:>5} {i.kind:<5} {when}")
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_session(args.session)
    emit(args, {"id": args.session, "deleted": True}, None)
    if not args.json:
        note(f"deleted session {args.session!r}")
    return EXIT_OK


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    cards = client.models()
    emit(args, {"models": [c.model_dump() for c in cards]}, "\n".join(c.id for c in cards))
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    ready = client.health()
    emit(args, {"url": client.base_url, "ready": ready}, "ok" if ready else "not ready")
    return EXIT_OK if ready else EXIT_UNAVAILABLE


# parser --------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """Options accepted before and after the command (after: SUPPRESS keeps the top value)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p.add_argument("--url", default=default(os.environ.get(URL_ENV) or DEFAULT_URL),
                   help=f"server URL (default: ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--api-key", default=default(os.environ.get(KEY_ENV)),
                   help=f"API key (default: ${KEY_ENV})")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="machine-readable JSON output on stdout")
    p.add_argument("--timeout", type=float, default=default(120.0),
                   help="seconds to wait for an answer (also between streamed pieces)")
    p.add_argument("--retries", type=int, default=default(3),
                   help="retries on connection failures and 503 (exponential backoff)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default=default("auto"),
                   help="progress on stderr for transfers (auto: a terminal and >= 1 MiB)")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument("--session", default=None, help="session id: the server keeps its memory")
    p.add_argument("--reset", action="store_true", help="start the session over")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")


def build_parser() -> argparse.ArgumentParser:
    prog = "newllm client" if Path(sys.argv[0]).name == "newllm" else PROG
    parser = argparse.ArgumentParser(prog=prog, description="Talk to a newllm server: chat, "
                                     "completions, sessions, memory export/import/move.",
                                     epilog="exit codes: 0 ok, 1 error, 2 usage, 3 unavailable, "
                                     "4 auth, 5 not found, 6 refused, 7 conflict, 8 integrity")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[Client, argparse.Namespace], int],
                help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p, top=False)
        p.set_defaults(func=func)
        return p

    p = command("chat", cmd_chat, "chat, streaming (interactive unless -m)")
    _add_sampling(p, None)
    p.add_argument("-m", "--message", action="append", default=[],
                   help="a user message (repeatable: one turn each); default: read stdin")
    p.add_argument("--system", default=None, help="a system message before the first turn")

    p = command("complete", cmd_complete, "complete a prompt")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt ('-' or none: stdin)")
    _add_sampling(p, None)
    p.add_argument("--echo", action="store_true", help="repeat the prompt before the answer")
    p.add_argument("--logprobs", type=int, default=None, help="top alternatives per token")

    p = command("export", cmd_export, "download a session's memory file")
    p.add_argument("session")
    p.add_argument("-o", "--output", required=True, help="file to write ('-': stdout)")

    p = command("import", cmd_import, "upload a memory file as a session")
    p.add_argument("session")
    p.add_argument("file", help="memory file ('-': stdin)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing session")

    p = command("move", cmd_move, "move a session to another server (verified, then deleted "
                                  "at the source)")
    p.add_argument("session")
    p.add_argument("--from", dest="source", default=None, help="source URL (default: --url)")
    p.add_argument("--to", dest="target", required=True, help="target URL")
    p.add_argument("--new-id", default=None, help="session id on the target (default: same)")
    p.add_argument("--keep-source", action="store_true", help="copy: keep the source session")
    p.add_argument("--overwrite", action="store_true", help="replace a target session")
    p.add_argument("--from-api-key", default=None, help="source key (default: --api-key)")
    p.add_argument("--to-api-key", default=None, help="target key (default: --api-key)")

    command("sessions", cmd_sessions, "list sessions")
    p = command("delete", cmd_delete, "delete a session")
    p.add_argument("session")
    command("models", cmd_models, "list served models")
    command("health", cmd_health, "check that the server is ready (exit 0) or not (exit 3)")
    return parser


_TRANSPORT: httpx.BaseTransport | None = None  # tests: route every client to a mock transport


def _client(args: argparse.Namespace, url: str, api_key: str | None) -> Client:
    return Client(url, api_key, timeout=args.timeout, transport=_TRANSPORT,
                  max_retries=args.retries)


def _check_url(url: str) -> None:
    try:
        normalize_url(url)
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    name = f"{parser.prog} {args.command}"
    try:
        if args.retries < 0 or args.timeout <= 0:
            raise UsageError("--retries must be >= 0 and --timeout > 0")
        for url in (args.url, getattr(args, "source", None), getattr(args, "target", None)):
            if url is not None:
                _check_url(url)
        with _client(args, args.url, args.api_key) as client:
            return args.func(client, args)
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except (errors.NewllmError, OSError, ValueError) as e:
        parts = []
        if isinstance(e, errors.APIError):
            parts = [f"HTTP {e.status}"] * bool(e.status) + [f"code {e.code}"] * bool(e.code)
        detail = f" ({', '.join(parts)})" if parts else ""
        print(f"{name}: error: {e}{detail}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"message": str(e), "type": type(e).__name__,
                                        "status": getattr(e, "status", None),
                                        "code": getattr(e, "code", None)}}), flush=True)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
