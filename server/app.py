"""The LitServe app: routes, workers, auth, limits and metrics, put together by `build_server`.

Processes (LitServe 0.2.19): the main process loads the model once (to log its fingerprint and
to validate uploaded memory files), forks the HTTP server processes (uvicorn; they inherit that
model) and spawns the inference workers (each loads its own copy in `NewllmAPI.setup`). HTTP
handlers put jobs on LitServe's shared request queue; whichever worker takes a job serves it
with `server.engine.Engine` under `SessionLoop`, and its events come back through LitServe's
response queues.

Routes (all declared by `SessionSpec`, a custom `LitSpec`, so generation feeds the workers):

=========================================  ==================================================
``POST /v1/chat/completions``              chat, streaming or not (worker)
``POST /v1/completions``                   completions with echo and logprobs (worker)
``GET /v1/models``, ``/v1/models/{id}``    the served model
``GET /v1/sessions``                       sessions: id, tokens seen, bytes, last used
``GET /v1/sessions/{id}/memory``           the session's memory file (safetensors) + headers
``PUT /v1/sessions/{id}/memory``           validate a memory file and install it atomically
``DELETE /v1/sessions/{id}``               forget a session
``GET /metrics``                           Prometheus text format, merged over processes
``GET /health``                            LitServe's: 200 once every worker loaded the model
``GET /openapi.json``, ``/docs``           the OpenAPI document (`server.openapi`)
``GET /``, ``/static/{name}``              the chat page (`server.web`; no key needed)
=========================================  ==================================================

Worker faults: a worker that dies (SIGKILL, OOM killer, crash) is restarted by LitServe
(``restart_workers``; /health answers 503 from when LitServe notices, within ~2 s, until the
new worker has loaded the model). Jobs still in the queue wait for a worker; a job the dead
worker had taken (running, prefilling or parked) gets 503 ``worker_died`` within
``OWNER_CHECK_S``: each worker announces the jobs it takes (`AnnouncingQueue`: its pid), and the
HTTP side checks that pid while it waits. The session keeps its last saved file: files are
replaced atomically and a turn saves only at its end (a kill during the save leaves a temp file,
removed by `SessionStore.sweep_temp` when the worker restarts; a kill after the rename leaves
the turn saved although its client got 503).

Memory routes run in the HTTP processes (file I/O and validation only) under the session's lock.
`server.http.Guard` checks the API key on every route except ``/health`` and the chat page
(``/``, ``/static/*``), limits request bodies and counts requests; every error is JSON in
OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.base import LitLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from newllm.memory_file import (
    MemoryFileError,
    load_memory_report,
    payload_sha256,
    save_memory,
)
from newllm.sizes import kv_cache_bytes_per_token
from server import metrics, openapi, replies, web
from server.http import Guard, install_error_handlers, plain_text_health, read_json
from server.protocol import ApiError, ChatRequest, CompletionRequest, chat_job, completion_job
from server.protocol import parse as parse_request
from server.responses import DONE, Builder, ChatBuilder, CompletionBuilder, sse
from server.settings import ServerSettings
from server.stateful import StatefulRoutes
from server.store import (
    SessionIdError,
    SessionStore,
    StoreFull,
    StoreWriteError,
    check_session_id,
    open_store,
    write_error,
)
from server.transcript import Transcript

log = logging.getLogger("newllm.server")

LOCK_WAIT_S = 30.0  # how long a memory route waits for a session's running turn
OWNER_CHECK_S = 1.0  # how often a waiting request checks that the worker serving it lives
EXPORT_HEADERS = {  # memory file metadata key -> response header of GET .../memory
    "position": "X-Newllm-Tokens-Seen", "model_fingerprint": "X-Newllm-Model-Fingerprint",
    "tokenizer_hash": "X-Newllm-Tokenizer-Hash", "payload_sha256": "X-Newllm-Payload-Sha256",
    "format_version": "X-Newllm-Format-Version", "dtype": "X-Newllm-Dtype",
    "session.kind": "X-Newllm-Session-Kind", "session.turns": "X-Newllm-Session-Turns",
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    created: int
    parameters: int
    layers: tuple[str, ...]
    dtype: str
    vocab_size: int
    kv_cache_bytes_per_token: int  # a same-shape Pythia's KV cache, at the served precision

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "newllm", "fingerprint": self.fingerprint,
                "parameters": self.parameters, "layers": list(self.layers), "dtype": self.dtype,
                "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token}


# worker side -----------------------------------------------------------------------------------
def process_identity(pid: int) -> str | None:
    """``"{pid}:{start time}"`` of a live process (pid reuse gives another), None if it is gone
    or a zombie; from /proc (Linux), else the pid alone while it can be signalled."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)
    return None if fields[0] in ("Z", "X", "x") else f"{pid}:{fields[19]}"


class AnnouncingQueue:
    """LitServe's request queue as a worker sees it: every job taken is announced to the HTTP
    process that sent it (``{"t": "taken", "worker": process_identity}``, see module doc)."""

    def __init__(self, queue: Any, send: Any) -> None:
        self.queue, self.send = queue, send
        self.identity = process_identity(os.getpid()) or str(os.getpid())

    def _announce(self, item: Any) -> Any:
        if isinstance(item, tuple) and len(item) == 4 and item[1] is not None:
            self.send(item[0], item[1], {"t": "taken", "worker": self.identity})
        return item

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._announce(self.queue.get(block, timeout))

    def get_nowait(self) -> Any:
        return self._announce(self.queue.get_nowait())


class SessionLoop(LitLoop):
    """Replaces LitServe's request loops: the worker runs `Engine.serve` until shutdown."""

    def __call__(self, lit_api: Any, device: Any, worker_id: int, request_queue: Any,
                 transport: Any, workers_setup_status: Any, callback_runner: Any) -> None:
        def send(rqid: int, uid: str, data: Any) -> None:
            status = LitAPIStatus.OK if data is not None else LitAPIStatus.FINISH_STREAMING
            self.put_response(transport, rqid, uid, "" if data is None else data, status,
                              LoopResponseType.STREAMING)

        try:
            lit_api.engine.serve(AnnouncingQueue(request_queue, send), send,
                                 lit_api.max_batch_size)
        except (KeyboardInterrupt, EOFError, BrokenPipeError, ConnectionError):
            pass  # the server is shutting down


class NewllmAPI(ls.LitAPI):
    """Loads the model in each worker; `SessionLoop` drives its `Engine` (predict is unused)."""

    def __init__(self, settings: ServerSettings, spec: SessionSpec) -> None:
        super().__init__(max_batch_size=settings.max_batch_size, spec=spec, loop=SessionLoop())
        self.settings = settings

    def setup(self, device: Any) -> None:
        import torch

        from newllm.checkpoint import load_checkpoint
        from server.engine import Engine, worker_threads

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops workers
        torch.set_num_threads(worker_threads(self.settings.threads, self.settings.workers))
        s = self.settings
        model, tokenizer = load_checkpoint(s.checkpoint, device=device, dtype=s.load_dtype())
        if s.half_weights:  # the main process did too (its fingerprint checks uploads)
            model.use_half_weights()
        model.eval().use_input_major_weights()  # faster one-token steps; same as `generate`
        store = open_store(s)
        store.sweep_temp()  # a restarted worker: its predecessor may have died mid-write
        self.engine = Engine(model, tokenizer, store, s.max_prompt_tokens,
                             prefix_cache_bytes=s.prefix_cache_bytes,
                             compile=False if s.no_compile else None,
                             stream_interval=s.stream_interval_ms / 1000)

    def predict(self, x: Any) -> Any:
        raise RuntimeError("SessionLoop drives the Engine; LitAPI.predict is never called")

    def authorize(self) -> None:
        """Auth is done by `Guard` for every route; this only stops LitServe adding its own."""


# HTTP side ---------------------------------------------------------------------------------------
def _idempotency_key(request: Request, job: dict[str, Any]) -> str | None:
    """The request's ``Idempotency-Key`` (`server.replies`): a malformed one is 400 on any
    request; a valid one is ignored without a session."""
    key = replies.check_key(request.headers.get("idempotency-key"))
    return key if job["session_id"] is not None else None


def _session_id(session_id: str) -> str:
    try:
        return check_session_id(session_id)
    except SessionIdError as e:
        raise ApiError(400, str(e), code="invalid_session_id", param="session_id") from None


class SessionSpec(StatefulRoutes, LitSpec):
    """Declares every route; generation routes feed LitServe's workers (see module doc)."""

    def __init__(self, settings: ServerSettings, info: ModelInfo, store: SessionStore) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.settings, self.info, self.store = settings, info, store
        self._validator: tuple[Any, str] | None = None  # (model, tokenizer sha) in HTTP processes
        self._uploading = 0  # memory uploads this process is receiving (see import_memory)
        for path, endpoint, methods in [
            ("/v1/chat/completions", self.chat_completions, ["POST"]),
            ("/v1/completions", self.completions, ["POST"]),
            ("/v1/models", self.models, ["GET"]),
            ("/v1/models/{model_id:path}", self.model_card, ["GET"]),
            ("/v1/sessions", self.sessions, ["GET"]),
            ("/v1/sessions/{session_id}/memory", self.export_memory, ["GET"]),
            ("/v1/sessions/{session_id}/memory", self.import_memory, ["PUT"]),
            ("/v1/sessions/{session_id}", self.delete_session, ["DELETE"]),
            ("/metrics", self.metrics, ["GET"]),
            *self.stateful_routes(),  # the Responses and Conversations APIs
        ]:
            self.add_endpoint(path, endpoint, methods)

    @property
    def stream(self) -> bool:
        return True  # every job answers with a stream of events

    def attach_validator(self, model: Any, tokenizer_sha: str) -> None:
        self._validator = (model, tokenizer_sha)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_validator"] = None  # workers load their own model
        return state

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    # generation ----------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        req = parse_request(ChatRequest, await read_json(request))
        self._check_model(req.model)
        job = chat_job(req, self.settings.max_tokens_limit)
        job["idempotency_key"] = _idempotency_key(request, job)
        builder = ChatBuilder(self.info.name, self._fp(), job["n"], logprobs=job["logprobs"],
                              include_usage=bool(req.stream_options and
                                                 req.stream_options.include_usage))
        return await self._respond(job, builder, bool(req.stream), "/v1/chat/completions", t0)

    async def completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        req = parse_request(CompletionRequest, await read_json(request))
        self._check_model(req.model)
        job = completion_job(req, self.settings.max_tokens_limit, self.info.vocab_size)
        job["idempotency_key"] = _idempotency_key(request, job)
        builder = CompletionBuilder(self.info.name, self._fp(), job["n"] * len(job["prompts"]),
                                    logprobs=job["logprobs"] is not None,
                                    include_usage=bool(req.stream_options and
                                                       req.stream_options.include_usage))
        return await self._respond(job, builder, bool(req.stream), "/v1/completions", t0)

    def _fp(self) -> str:
        return "fp_" + self.info.fingerprint[:12]

    def _check_model(self, name: str) -> None:
        if name != self.info.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.info.name!r} (GET /v1/models)", code="model_not_found",
                           param="model")

    async def _events(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Submit a job to the workers and yield its events until it finishes.

        Closed before the job ended (the client went away: the streaming response is
        cancelled, which closes this generator), it asks the worker to drop the turn unsaved
        (`SessionStore.cancel`). If the worker that took the job dies, the job ends with a
        503 ``worker_died`` error event (see the module docstring)."""
        uid = uuid.uuid4().hex
        queue: deque[Any] = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        ended = False  # the worker is done with the job (done, error or finished)
        owner: str | None = None  # process_identity of the worker that took the job
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
            while True:
                try:
                    await asyncio.wait_for(event.wait(), OWNER_CHECK_S)
                except TimeoutError:
                    if owner is None or process_identity(int(owner.split(":")[0])) == owner:
                        continue
                    ended = True  # nobody will serve it, nothing to cancel
                    log.error("request %s: the worker serving it (pid %s) died", uid,
                              owner.split(":")[0])
                    yield {"t": "error", "status": 503, **ApiError(
                        503, "the inference worker serving this request stopped (killed or "
                        "crashed); the session keeps its last saved turn. The server restarts "
                        "the worker: retry in a few seconds (GET /health is 200 again once it "
                        "is ready)", code="worker_died").body()}
                    return
                while queue:
                    data, status = queue.popleft()
                    if status == LitAPIStatus.FINISH_STREAMING:
                        ended = True
                        return
                    if status == LitAPIStatus.ERROR:
                        ended = True
                        log.error("a worker failed on request %s", uid)
                        yield {"t": "error", "status": 500, **ApiError(
                            500, "the inference worker failed", code="internal_error").body()}
                        return
                    if data["t"] == "taken":
                        owner = data["worker"]
                        continue
                    ended = data["t"] in ("done", "error")
                    yield data
                event.clear()
        finally:
            self.response_buffer.pop(uid, None)
            if not ended:
                self._cancel(uid)

    def _cancel(self, uid: str) -> None:
        try:
            self.store.cancel(uid)
        except (OSError, StoreWriteError) as e:
            log.warning("could not flag request %s as cancelled: %s", uid, e)
        else:
            log.info("request %s: the client went away; asked its worker to drop it", uid)

    async def _respond(self, job: dict[str, Any], builder: Builder, stream: bool, route: str,
                       t0: float) -> Response:
        events = self._events(job)
        first = await anext(events, None)
        if first is None or first["t"] == "error":
            await events.aclose()
            raise ApiError.from_body(first["status"] if first else 500, first or {})
        if stream:
            return StreamingResponse(self._stream(first, events, builder, route, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        builder.add(first)
        first_token = True
        async for ev in events:
            if ev["t"] == "error":
                raise ApiError.from_body(ev["status"], ev)
            if ev["t"] == "tok" and first_token:
                metrics.TTFT.labels(route).observe(time.monotonic() - t0)
                first_token = False
            builder.add(ev)
        self._count_tokens(builder)
        return JSONResponse(builder.response())

    async def _stream(self, first: dict[str, Any], events: AsyncIterator[dict[str, Any]],
                      builder: Builder, route: str, t0: float) -> AsyncIterator[str]:
        first_token = True
        try:
            for chunk in builder.add(first):
                yield builder.frame(chunk)
            async for ev in events:
                if ev["t"] == "error":
                    metrics.ERRORS.labels(ev["error"]["code"]).inc()
                    yield sse({"error": ev["error"]})
                    return
                if ev["t"] == "tok" and first_token:
                    metrics.TTFT.labels(route).observe(time.monotonic() - t0)
                    first_token = False
                for chunk in builder.add(ev):
                    yield builder.frame(chunk)
            self._count_tokens(builder)
            yield DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - becomes a well-formed error event
            log.exception("streaming failed")
            metrics.ERRORS.labels("internal_error").inc()
            yield sse(ApiError(500, f"streaming failed: {e}", code="internal_error").body())
        finally:
            await events.aclose()

    @staticmethod
    def _count_tokens(builder: Builder) -> None:
        if builder.usage:
            metrics.TOKENS.labels("prompt").inc(builder.usage["prompt_tokens"])
            metrics.TOKENS.labels("completion").inc(builder.usage["completion_tokens"])

    # models ------------------------------------------------------------------------------------
    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self.info.card()]})

    async def model_card(self, model_id: str) -> Response:
        self._check_model(model_id)
        return JSONResponse(self.info.card())

    # sessions ----------------------------------------------------------------------------------
    async def sessions(self) -> Response:
        infos = await asyncio.to_thread(self.store.list)
        return JSONResponse({"object": "list", "data": [i.to_json() for i in infos]})

    async def export_memory(self, session_id: str) -> Response:
        sid = _session_id(session_id)
        data = await asyncio.to_thread(self.store.read, sid)
        if data is None:
            metrics.TRANSFERS.labels("export", "refused").inc()
            raise ApiError(404, f"no session {sid!r}", code="session_not_found",
                           param="session_id")
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__", {})
        headers = {"Content-Disposition": f'attachment; filename="{sid}.safetensors"',
                   "X-Newllm-Session-Id": sid}
        for key, header in EXPORT_HEADERS.items():
            value = str(meta.get(key, ""))
            if value and value.isascii() and value.isprintable():
                headers[header] = value
        metrics.TRANSFERS.labels("export", "ok").inc()
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def import_memory(self, session_id: str, request: Request) -> Response:
        """Receive a memory file: streamed to a temp file in the store's folder (never whole
        in this process's memory while it arrives), then checked and installed. At most
        ``--max-uploads`` at once per HTTP process; more are drained and answered 429."""
        sid = _session_id(session_id)
        if self._uploading >= self.settings.max_uploads:
            async for _ in request.stream():  # read and drop it, so the client gets the answer
                pass
            metrics.TRANSFERS.labels("import", "refused").inc()
            raise ApiError(429, f"{self._uploading} memory uploads are being received by this "
                           f"server (--max-uploads {self.settings.max_uploads}); retry shortly",
                           code="too_many_uploads", retry_after=1)
        self._uploading += 1
        name = None
        try:
            name = await self._receive(sid, request)
            result = await asyncio.to_thread(self._install, sid, name)
        except (ApiError, StoreWriteError):
            metrics.TRANSFERS.labels("import", "refused").inc()
            raise
        finally:
            self._uploading -= 1
            if name is not None:
                Path(name).unlink(missing_ok=True)
        metrics.TRANSFERS.labels("import", "ok").inc()
        return JSONResponse(result, status_code=201 if result["created"] else 200)

    async def _receive(self, sid: str, request: Request) -> str:
        """Stream an upload into a temp file of the session folder; its path. A full or
        unwritable disk is that request's 507/503 (the rest of the body is read and dropped,
        so the client gets the answer)."""
        name = None
        try:
            fd, name = tempfile.mkstemp(dir=self.store.scratch, prefix=".upload.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():  # the Guard cuts it off past the limit
                    f.write(chunk)
            return name
        except BaseException as e:  # nothing of a failed upload stays in the folder
            if name is not None:
                Path(name).unlink(missing_ok=True)
            if not isinstance(e, OSError):  # e.g. 413 past the limit, a client gone
                raise
            try:
                async for _ in request.stream():
                    pass
            except Exception:  # noqa: BLE001 - the body was already consumed
                pass
            raise write_error(e, f"receiving the memory of session {sid!r}") from None

    def _install(self, sid: str, body: str | bytes) -> dict[str, Any]:
        if self._validator is None:
            raise ApiError(503, "this process cannot validate memory files", code="unavailable")
        model, tokenizer_sha = self._validator
        limit = self.settings.max_memory_bytes
        try:
            loaded = load_memory_report(body, model, tokenizer_hash=tokenizer_sha,
                                        max_bytes=limit, strict=self.settings.strict_moves)
            state = loaded.state
            transcript = Transcript.from_metadata(loaded.metadata)
        except MemoryFileError as e:
            raise ApiError(413 if e.code == "too_large" else 400, f"memory file refused: {e}",
                           code=e.code, param="body") from None
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"memory file refused: {e}", code="bad_metadata",
                           param="body") from None
        if state.batch_size != 1:
            raise ApiError(400, f"memory file refused: it holds {state.batch_size} sequences; "
                           "a session continues one (save the state of a batch of 1)",
                           code="tensor_mismatch", param="body")
        meta = transcript.to_metadata()
        answered = replies.load(loaded.metadata)  # the session's idempotent turns move with it
        if answered:
            meta.update(replies.remember_all(answered))
        data = save_memory(state, model, tokenizer_hash=tokenizer_sha, metadata=meta)
        locks = self.store.locks()
        if not locks.acquire(sid, LOCK_WAIT_S):
            raise ApiError(409, f"session {sid!r} stayed busy for {LOCK_WAIT_S:.0f} s; retry",
                           code="session_busy", param="session_id")
        try:
            created = not self.store.exists(sid)
            self.store.write(sid, data, locks)
        except StoreFull as e:
            raise ApiError(503, str(e), code="too_many_sessions") from None
        finally:
            locks.release(sid)
        conversion = loaded.conversion
        if conversion is not None:
            log.info("session %r: memory %s", sid, conversion)
        return {"id": sid, "object": "session", "created": created,
                "tokens_seen": state.position, "bytes": len(data), "kind": transcript.kind,
                "turns": transcript.turns, "payload_sha256": payload_sha256(state),
                "received_payload_sha256": loaded.metadata["payload_sha256"],
                "converted": None if conversion is None else conversion.as_dict()}

    async def delete_session(self, session_id: str) -> Response:
        sid = _session_id(session_id)

        def delete() -> bool:
            running = self.store.running(sid)
            if running is not None:  # a turn holds the session: cancel it rather than wait
                self.store.cancel(running, "deleted")
            locks = self.store.locks()
            if not locks.acquire(sid, LOCK_WAIT_S):
                raise ApiError(409, f"session {sid!r} stayed busy for {LOCK_WAIT_S:.0f} s; "
                               "retry", code="session_busy", param="session_id")
            try:
                return self.store.delete(sid, locks) or running is not None
            finally:
                locks.release(sid)

        if not await asyncio.to_thread(delete):
            raise ApiError(404, f"no session {sid!r}", code="session_not_found",
                           param="session_id")
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    async def metrics(self) -> Response:
        body = await asyncio.to_thread(metrics.render, self.store)
        return Response(body, media_type=metrics.CONTENT_TYPE)


# assembly --------------------------------------------------------------------------------------
def model_info(model: Any, name: str | None) -> ModelInfo:
    return ModelInfo(name=name or str(model.config.name), fingerprint=model.fingerprint(),
                     created=int(time.time()), parameters=model.num_parameters(),
                     layers=tuple(model.config.layers),
                     dtype=str(model.dtype).removeprefix("torch."),
                     vocab_size=int(model.config.vocab_size),
                     kv_cache_bytes_per_token=kv_cache_bytes_per_token(
                         model.config, model.dtype.itemsize))


def build_server(settings: ServerSettings, model: Any, tokenizer: Any) -> ls.LitServer:
    """The LitServer for ``settings``; ``model``/``tokenizer`` validate uploads in HTTP processes.

    Workers load their own copy of the checkpoint (``settings.checkpoint``), which must be the
    same model: the fingerprint written into every memory file is checked on every load.
    """
    settings.check()
    store = open_store(settings)
    store.prepare()  # RuntimeError when it cannot be reached (Redis down)
    info = model_info(model, settings.model_name)
    spec = SessionSpec(settings, info, store)
    spec.attach_validator(model, tokenizer.sha256)
    api = NewllmAPI(settings, spec)
    accelerator = "cpu"
    if settings.device != "cpu":
        import torch

        if torch.cuda.is_available():
            accelerator = "cuda"
        elif settings.device == "cuda":
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    middlewares: list[Any] = [(Guard, {"api_key": settings.api_key,
                                       "store_id": store.store_id(),
                                       "max_bytes": settings.max_request_bytes,
                                       "max_memory_bytes": settings.max_memory_bytes})]
    if settings.cors_origins():  # added last: outside the Guard, so 401s carry CORS headers
        middlewares.append((web.Cors, {"origins": settings.cors_origins()}))
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=settings.workers,
        timeout=False, model_metadata=info.card(), restart_workers=True,
        middlewares=middlewares,
    )
    server.uvicorn_graceful_timeout = 10
    # no redirects from "/path/" to "/path": they were built from the client's Host header
    server.app.router.redirect_slashes = False
    install_error_handlers(server.app)
    plain_text_health(server.app)
    web.install(server.app)
    openapi.install(server.app, info.name)
    return server
