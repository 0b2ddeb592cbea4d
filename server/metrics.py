"""Prometheus metrics, aggregated over every process of the server.

LitServe has no Prometheus integration and runs several processes (HTTP servers, workers), so
the metrics use prometheus_client's multiprocess mode: `server.cli` sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh folder *before* anything imports prometheus_client, each
process writes its values to memory-mapped files there, and ``GET /metrics`` merges them with a
`MultiProcessCollector`. Without that variable (e.g. an app built in a test process) the
metrics fall back to the default single-process registry.

Counted in the HTTP processes (they see every request, status and latency):
``newllm_requests_total{route,status}``, ``newllm_request_seconds{route}``,
``newllm_time_to_first_token_seconds{route}``, ``newllm_tokens_total{kind=prompt|completion}``,
``newllm_memory_transfers_total{op=export|import,result=ok|refused}``,
``newllm_errors_total{code}``. Counted where the session store is used (HTTP processes and
workers): ``newllm_store_seconds{op}`` (time of each store operation: read, write, lease...)
and ``newllm_store_errors_total{op}`` (operations the store failed: Redis down). Counted in the
workers: ``newllm_decode_batch_size``
(choices decoded together per step) and ``newllm_decode_workers{step}``: how many live
workers decode with the ``eager`` step, decode eagerly while their step is ``compiling`` in
the background, or decode with the ``compiled`` step. Read from the session store at scrape time:
``newllm_sessions``, ``newllm_session_memory_bytes`` and ``newllm_session_store_up`` (0 while
the store does not answer: the other metrics are still served).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter("newllm_requests", "HTTP requests by route and status", ["route", "status"])
LATENCY = Histogram("newllm_request_seconds", "time from request to last byte", ["route"],
                    buckets=LATENCY_BUCKETS)
TTFT = Histogram("newllm_time_to_first_token_seconds", "time from request to the first token",
                 ["route"], buckets=TTFT_BUCKETS)
TOKENS = Counter("newllm_tokens", "tokens read (prompt) and generated (completion)", ["kind"])
TRANSFERS = Counter("newllm_memory_transfers", "memory exports and imports", ["op", "result"])
ERRORS = Counter("newllm_errors", "error responses by error code", ["code"])
BATCH = Histogram("newllm_decode_batch_size", "choices decoded together per step (workers)",
                  buckets=(1, 2, 4, 8, 16, 32, 64))

PREFIX_TOKENS = Counter("newllm_prefix_cache_tokens", "prompt tokens of requests without a "
                        "session: cached (not read again) and read", ["kind"])
STORE_SECONDS = Histogram("newllm_store_seconds", "time of session store operations", ["op"],
                          buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                   0.05, 0.1, 0.25, 1, 5))
STORE_ERRORS = Counter("newllm_store_errors", "session store operations that failed", ["op"])
DECODE_WORKERS = Gauge("newllm_decode_workers", "live workers by decode step: eager, compiling "
                       "(eager meanwhile) or compiled", ["step"], multiprocess_mode="livesum")
STEPS = ("eager", "compiling", "compiled")

CONTENT_TYPE = CONTENT_TYPE_LATEST


def safely(update: Callable[[], Any]) -> None:
    """Record a metric without ever failing the request: in multiprocess mode a new label value
    grows a memory-mapped file, which a full disk or a file-size limit refuses (OSError)."""
    try:
        update()
    except OSError:
        pass


def decode_step(step: str) -> None:
    """This worker now decodes with ``step`` (one of `STEPS`)."""
    for name in STEPS:
        DECODE_WORKERS.labels(name).set(1 if name == step else 0)


def prepare_labels() -> None:
    """Create the label values a process will use, so their file entries exist before any
    storage fault (see `safely`)."""
    for kind in ("cached", "read"):
        PREFIX_TOKENS.labels(kind)
    for op in ("read", "write"):
        STORE_SECONDS.labels(op)
        STORE_ERRORS.labels(op)


class SessionCollector:
    """Gauges read from the session store when /metrics is scraped."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Any:
        try:
            count, size = self.store.total_bytes()
        except Exception:  # noqa: BLE001 - the store is down (Redis): say so, scrape the rest
            yield GaugeMetricFamily("newllm_session_store_up",
                                    "1 when the session store answered this scrape", value=0)
            return
        yield GaugeMetricFamily("newllm_session_store_up",
                                "1 when the session store answered this scrape", value=1)
        yield GaugeMetricFamily("newllm_sessions", "sessions in the session store",
                                value=count)
        yield GaugeMetricFamily("newllm_session_memory_bytes",
                                "bytes of all session memory files", value=size)


def render(store: Any) -> bytes:
    """The text exposition of every metric, merged over processes."""
    sessions = CollectorRegistry()
    sessions.register(SessionCollector(store))
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY) + generate_latest(sessions)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry) + generate_latest(sessions)
