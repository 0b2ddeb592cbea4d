"""Run settings of `newllm serve`: one dataclass whose field help strings become CLI flags."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY_ENV = "NEWLLM_API_KEY"
MiB = 1 << 20
# an origin as browsers send it in the Origin header (lower case, no path)
ORIGIN = re.compile(r"https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def default_session_dir() -> str:
    """``$XDG_DATA_HOME/newllm/sessions`` (``~/.local/share/newllm/sessions``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "newllm" / "sessions")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServerSettings:
    """How to serve a model; validated by `check`."""

    checkpoint: str | None = _f(None, "checkpoint folder, preset name, GPT-NeoX folder or hub id "
                                   "(default: the bundled checkpoint)")
    host: str = _f("127.0.0.1", "127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface)")
    port: int = _f(8000, "TCP port (1024-65535)")
    workers: int = _f(1, "inference worker processes (each loads the model)")
    threads: int = _f(1, "torch threads per worker (0: CPU cores / workers); 1 is fastest for "
                         "small models and on busy machines")
    api_servers: int = _f(1, "HTTP server processes")
    session_dir: str = _f("", "folder of session memory files "
                              "(default: ~/.local/share/newllm/sessions)")
    session_store: str = _f("folder", "where sessions live: folder (--session-dir, this "
                                      "machine) or redis://[:PASSWORD@]HOST:PORT/DB (also "
                                      "rediss://; password also from $NEWLLM_REDIS_PASSWORD), "
                                      "shared by every replica")
    session_ttl: float = _f(0.0, "seconds a session may stay unwritten before it is deleted "
                                 "(0: kept until evicted by --max-sessions or deleted)")
    session_lease: float = _f(30.0, "seconds a Redis lease on a session outlives the replica "
                                    "holding it (renewed while a turn runs; a crashed "
                                    "replica's sessions are free again after this)")
    api_key: str | None = _f(None, "Bearer key required on every route but /health "
                                   "(default: $NEWLLM_API_KEY)")
    max_batch_size: int = _f(32, "slots per worker: sessions decoded together in one forward "
                                 "(1 = no batching; replies then repeat exactly under load)")
    max_sessions: int = _f(1000, "sessions kept; the least recently used idle one is evicted")
    max_request_bytes: int = _f(32 * MiB, "largest request body (memory uploads excepted)")
    max_memory_bytes: int = _f(512 * MiB, "largest memory file PUT /v1/sessions/{id}/memory "
                                          "accepts (checked before the body is read whole)")
    max_uploads: int = _f(2, "memory uploads one HTTP process receives at once (each is "
                             "streamed to a temp file, then checked); more get 429 with "
                             "Retry-After, so memory use stays bounded")
    max_tokens_limit: int = _f(4096, "largest max_tokens a request may ask for")
    max_prompt_tokens: int = _f(16384, "largest prompt (new tokens of one request)")
    prefix_cache_bytes: int = _f(256 * MiB, "memory snapshots each worker keeps for requests "
                                           "without a session (resent histories read only what "
                                           "is new); 0 turns the cache off")
    dtype: str | None = _f(None, "float32, bfloat16 or float16 (default: the checkpoint's)")
    strict_moves: bool = _f(False, "refuse memory files of this checkpoint written at another "
                                   "precision (default: convert them and say so)")
    device: str = _f("auto", "auto (cuda if available), cpu or cuda")
    half_weights: bool | None = _f(None, "keep the linear weights in float16 and compute in "
                                         "float32 (CPU, x86-64 with AVX2: half the bytes each "
                                         "decode step reads; a small kernel is built at start, "
                                         "then cached; implies --device cpu). Default: on "
                                         "where it rounds nothing (a checkpoint stored in "
                                         "float16, as the bundled one, served on the CPU "
                                         "without --dtype), logged at start")
    stream_interval_ms: float = _f(25.0, "a worker sends each reply's tokens to the HTTP "
                                         "process at most every this many ms: tokens decoded "
                                         "meanwhile travel in one message; a reply's first "
                                         "token and its end never wait. Fewer messages leave "
                                         "more of the CPU to decoding; 0 sends every token at "
                                         "once")
    no_compile: bool = _f(False, "decode eagerly: no torch.compile of the decode step (it "
                                 "compiles in the background at worker start, seconds to a "
                                 "minute, eager meanwhile, logged; also NEWLLM_COMPILE=0)")
    model_name: str | None = _f(None, "the id /v1/models lists (default: the model's config name)")
    cors_origin: str | None = _f(None, "comma-separated origins (http://host:port) whose pages "
                                       "may call this API from a browser, e.g. another "
                                       "server's chat page moving a session here; * for any "
                                       "(default: none, same origin only)")
    log_level: str = _f("info", "debug, info, warning or error")

    def __post_init__(self) -> None:
        if not self.session_dir:
            self.session_dir = default_session_dir()
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.host == "localhost":
            self.host = "127.0.0.1"
        if self.half_weights and self.device == "auto":
            self.device = "cpu"  # auto would pick a GPU where there is one
        if self.half_weights is None and self.dtype is not None:
            self.half_weights = False  # a dtype asked for is served as asked

    def check(self) -> None:
        if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise ValueError(f"--host must be 127.0.0.1, 0.0.0.0 or :: (LitServe binds only "
                             f"these), got {self.host!r}")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1024 and 65535, got {self.port}")
        if self.session_store != "folder":
            from server.redis_store import check_url

            check_url(self.session_store)
        if self.session_ttl < 0:
            raise ValueError(f"--session-ttl must be >= 0, got {self.session_ttl}")
        if self.session_lease <= 0:
            raise ValueError(f"--session-lease must be > 0, got {self.session_lease}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"--prefix-cache-bytes must be >= 0, got {self.prefix_cache_bytes}")
        for name in ("workers", "api_servers", "max_batch_size", "max_sessions",
                     "max_request_bytes", "max_memory_bytes", "max_tokens_limit",
                     "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"--stream-interval-ms must be between 0 and 1000, got "
                             f"{self.stream_interval_ms}")
        if self.half_weights:
            from newllm.half_weights import dtype_problem

            if (problem := dtype_problem(self.dtype)) is not None:
                raise ValueError(problem)
        if self.half_weights and self.device == "cuda":
            raise ValueError("--half-weights is for decoding on the CPU; drop it with "
                             "--device cuda")
        self.cors_origins()  # raises on a malformed origin
        if self.api_key is not None and (len(self.api_key) < 8 or not self.api_key.isprintable()
                                         or " " in self.api_key):
            raise ValueError("the API key must be at least 8 printable characters without "
                             "spaces")

    def load_dtype(self) -> str | None:
        """The dtype to load the checkpoint in: float32 under ``--half-weights`` (resolved by
        `server.cli.serve` before the workers start when it was left to the default)."""
        return "float32" if self.half_weights else self.dtype

    def cors_origins(self) -> tuple[str, ...]:
        """The ``--cors-origin`` list, checked: each is ``*`` or ``scheme://host[:port]``."""
        origins = tuple(o.strip().lower() for o in (self.cors_origin or "").split(",")
                        if o.strip())
        for origin in origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"--cors-origin {origin!r} is not an origin; give "
                                 "scheme://host[:port] with no path, e.g. http://10.0.0.5:8000")
        return origins
