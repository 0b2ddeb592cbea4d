"""`newllm serve`: serve a checkpoint with the OpenAI-compatible API (see `server.app`).

    newllm serve                                   # bundled default model on 127.0.0.1:8000
    newllm serve --checkpoint tiny-infini --port 8080 --session-dir ./sessions --workers 2
    NEWLLM_API_KEY=... newllm serve --host 0.0.0.0 --max-batch-size 8

On start it logs the model, its fingerprint, the session folder and the URL, and logs "ready"
once every worker has loaded the model (``/health`` answers 200 from then on).

Shutdown: SIGTERM and Ctrl-C (SIGINT) both set LitServe's shutdown event, so LitServe's
graceful path stops the HTTP processes and the workers (a worker killed mid-turn leaves its
session file as it was: files are replaced atomically). LitServe 0.2.19 alone dies on SIGTERM
and orphans its workers. A second signal interrupts at once; anything still running at exit is
terminated, so no process outlives the server. A worker that dies while the server runs is
restarted (see `server.app`); LitServe 0.2.19 alone would shut the whole server down. An HTTP
process or LitServe's manager that dies stops the server with exit status 1 (LitServe restarts
neither; a server without its HTTP process would keep its port open and hang every request).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

from server.settings import MiB, ServerSettings

log = logging.getLogger("newllm.server")
HTTP_CHECK_S = 1.0  # how often the main process checks that its HTTP processes live


def parse_bytes(text: str) -> int:
    """``1048576``, ``64KiB``, ``32MiB``, ``1GiB`` (also KB/MB/GB, read as powers of 1024)."""
    units = {"gib": 1 << 30, "gb": 1 << 30, "mib": MiB, "mb": MiB, "kib": 1024, "kb": 1024,
             "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix) and lowered[:-len(suffix)].strip().isdigit():
            return int(lowered[:-len(suffix)]) * factor
    if lowered.isdigit():
        return int(lowered)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 64KiB or 32MiB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="newllm serve",
        description="Serve a newllm checkpoint with an OpenAI-compatible API, sessions whose "
                    "memory persists, and memory export/import.")
    defaults = ServerSettings.__dataclass_fields__
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # a switch
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        if f.type == "bool | None":  # on, off, or left to the default (None)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"])
            continue
        kind: Any = {"int": int, "float": float}.get(str(f.type), str)
        if f.name in ("max_request_bytes", "max_memory_bytes", "prefix_cache_bytes"):
            kind = parse_bytes
        parser.add_argument(flag, type=kind, default=defaults[f.name].default,
                            help=f.metadata["help"] + (f" (default: {f.default})"
                                                       if f.default not in (None, "") else ""))
    return parser


METRICS_PREFIX = "newllm-metrics-"


def _metrics_dir() -> str | None:
    """Give prometheus_client's multiprocess mode a fresh folder (returns it to clean up).

    The folder is named after this process (``newllm-metrics-<pid>-...``); folders left by
    servers that were killed (kill -9 runs no cleanup) are removed here when their process is
    gone."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    sweep_metrics_dirs(Path(tempfile.gettempdir()))
    folder = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def sweep_metrics_dirs(tmp: Path) -> list[Path]:
    """Remove metrics folders of servers that no longer run; returns what was removed."""
    removed = []
    for folder in tmp.glob(f"{METRICS_PREFIX}*"):
        pid = folder.name[len(METRICS_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not folder.is_dir():
            continue  # older unnamed folders (pid unknown) and live servers' are left alone
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _announce(host: str, port: int, keyed: bool) -> None:
    """Log "ready" once /health answers 200 (polled on loopback, bypassing any proxy)."""
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(3000):
        try:
            with opener.open(f"http://{local}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    log.info("ready: http://%s:%d/v1 (%s)", local, port,
                             "API key required" if keyed else "no API key")
                    return
        except OSError:
            pass
        time.sleep(0.2)


def _install_signals(server: Any) -> None:
    main_pid, signals_seen = os.getpid(), []

    def on_signal(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child that inherited this handler (the manager)
            if os.getppid() == main_pid:
                return  # the main process stops its children itself, in order
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signals_seen.append(signum)
        event = getattr(server, "_shutdown_event", None)
        if event is None or len(signals_seen) > 1:
            raise KeyboardInterrupt
        log.info("%s received: shutting down", signal.Signals(signum).name)
        # a manager proxy must not be used re-entrantly from a signal handler: use a thread
        threading.Thread(target=_set_quietly, args=(event,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _set_quietly(event: Any) -> None:
    try:
        event.set()
    except (OSError, EOFError):  # the manager is already gone: shutdown is under way
        pass


def _watch_http(server: Any, failures: list[str]) -> None:
    """Stop the server when one of its HTTP processes dies (killed, crashed).

    LitServe 0.2.19 neither notices nor restarts them: the listening socket stays open in the
    main process and every connection would hang. Stopping (exit status 1) lets a supervisor
    restart the server; sessions are on disk."""
    watched: dict[int, Any] = {}
    while True:
        time.sleep(HTTP_CHECK_S)
        event = getattr(server, "_shutdown_event", None)
        if event is None:  # not started yet
            continue
        try:
            if event.is_set():
                return
        except (OSError, EOFError):  # the manager is gone: the main thread stops everything
            return
        for child in multiprocessing.active_children():
            if child.name.startswith("LitServer-"):
                watched[child.pid] = child
        dead = [child for child in watched.values() if child.exitcode is not None]
        if dead:
            try:
                if event.is_set():  # a shutdown stopped it
                    return
            except (OSError, EOFError):
                return
            failures.append(f"HTTP process {dead[0].pid} died (exit code {dead[0].exitcode})")
            log.error("%s: stopping the server (exit status 1) so that it can be restarted",
                      failures[-1])
            _set_quietly(event)
            return


def _stop_children() -> None:
    children = multiprocessing.active_children()
    for p in children:
        p.terminate()
    for p in children:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(1)


def serve(settings: ServerSettings) -> int:
    import torch

    torch.set_num_threads(1)  # the main and HTTP processes only validate uploads
    from newllm.checkpoint import load_checkpoint
    from server.app import build_server

    try:
        model, tokenizer = load_checkpoint(settings.checkpoint, dtype=settings.load_dtype())
    except (OSError, ValueError, RuntimeError) as e:
        log.error("cannot load checkpoint %r: %s", settings.checkpoint, e)
        return 1
    model.eval()
    chosen: str | None = None  # what the default chose, when it was left to it
    if settings.half_weights is None:  # the default: on where it rounds nothing
        from newllm.half_weights import auto

        if settings.device == "cuda" or (settings.device == "auto"
                                         and torch.cuda.is_available()):
            chosen = "weights as loaded, not kept in float16: the workers decode on cuda"
        else:
            model, chosen = auto(model)  # this process loads on the CPU, as the workers will
        settings.half_weights = model.half_weights  # the workers do as this process did
        if settings.half_weights and settings.device == "auto":
            settings.device = "cpu"
        log.info("%s", chosen)
    elif settings.half_weights:  # as the workers will: one fingerprint for checks and files
        try:
            model.use_half_weights()  # builds the kernel once, before the workers look for it
        except (ValueError, RuntimeError) as e:
            log.error("cannot use --half-weights: %s", e)
            return 1
    try:
        server = build_server(settings, model, tokenizer)
    except RuntimeError as e:  # the session store cannot be reached
        log.error("cannot start: %s", e)
        return 1
    info = server.lit_api.spec.info
    log.info("model %s (%s, %.2fM parameters, layers %s, %s) from %s", info.name,
             info.fingerprint[:16], info.parameters / 1e6, ",".join(info.layers), info.dtype,
             settings.checkpoint or "the bundled default checkpoint")
    log.info("fingerprint %s", info.fingerprint)
    if settings.half_weights and chosen is None:
        log.info("linear weights kept in float16, computed in float32 (--half-weights)")
    log.info("sessions in %s (at most %d)", server.lit_api.spec.store.describe(),
             settings.max_sessions)
    log.info("listening on http://%s:%d (%d worker%s, %d slots each, %s)", settings.host,
             settings.port, settings.workers, "" if settings.workers == 1 else "s",
             settings.max_batch_size,
             "API key required" if settings.api_key else "no API key")
    _install_signals(server)
    threading.Thread(target=_announce, args=(settings.host, settings.port,
                                             bool(settings.api_key)), daemon=True).start()
    failures: list[str] = []  # why the server stopped on its own
    threading.Thread(target=_watch_http, args=(server, failures), daemon=True).start()
    try:
        server.run(host=settings.host, port=settings.port,
                   num_api_servers=settings.api_servers, log_level=settings.log_level,
                   generate_client_file=False)
    except KeyboardInterrupt:
        pass
    except (EOFError, OSError) as e:  # LitServe's manager process went away (e.g. killed)
        log.error("shutting down after losing LitServe's manager process: %r", e)
        failures.append("LitServe's manager process died")
    except SystemExit as e:  # uvicorn exits when it cannot bind the port
        log.error("the server could not start (exit %s); is port %d free?", e.code,
                  settings.port)
        return 1
    finally:
        # LitServe restarts dead workers until its shutdown event is set: set it (if the
        # manager still runs) before stopping the workers
        if getattr(server, "_shutdown_event", None) is not None:
            _set_quietly(server._shutdown_event)
        _stop_children()
    if failures:
        log.error("stopped: %s", "; ".join(failures))
        return 1
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = ServerSettings(**vars(args))
    try:
        settings.check()
    except ValueError as e:
        print(f"newllm serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_metrics = _metrics_dir()
    try:
        return serve(settings)
    finally:
        if own_metrics:
            shutil.rmtree(own_metrics, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
