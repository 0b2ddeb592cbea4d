"""The server end to end, on loopback, queried by the official openai client and httpx.

One server (tiny-infini, 2 workers, batching on, API key) serves this module; each server is a
real ``python -m server`` subprocess on a free port in its own process group. `ServerProcess`
is also used by test_server_sessions.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from benchmarks.live import descendants, free_port
from newllm.checkpoint import load_checkpoint
from newllm.memory_file import load_memory, payload_sha256, save_memory
from server.store import FolderStore

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
MODEL = "tiny-infini"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    """``python -m server`` on a free loopback port; `stop` sends SIGTERM to the main process."""

    def __init__(self, session_dir: Path, *args: str, api_key: str = KEY) -> None:
        self.port = free_port()
        self.api_key, self.session_dir = api_key, session_dir
        self.log = session_dir.parent / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "--checkpoint", MODEL, "--port", str(self.port),
                 "--session-dir", str(session_dir), "--api-key", api_key,
                 "--log-level", "warning", *args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, trust_env=False,
                            headers={"Authorization": f"Bearer {key or self.api_key}"})

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0,
                             timeout=60)

    def stop(self) -> set[int]:
        """SIGTERM the main process; returns the processes it had (all must be gone)."""
        family = descendants(self.proc.pid) | {self.proc.pid}
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        return family

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("server") / "sessions"
    srv = ServerProcess(folder, "--workers", "2", "--max-batch-size", "4",
                        "--max-request-bytes", "1MiB", "--max-memory-bytes", "2MiB",
                        "--max-tokens-limit", "512")
    try:
        yield srv.wait_ready()
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def local() -> Any:
    """The same model and tokenizer, in this process."""
    model, tokenizer = load_checkpoint(MODEL)
    return model.eval(), tokenizer


def chat(client: openai.OpenAI, content: str, session: str | None = None, **kw: Any) -> Any:
    meta = dict(kw.pop("metadata", {}))
    if session is not None:
        meta["session_id"] = session
    return client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": content}], metadata=meta or None, **kw)


# generation --------------------------------------------------------------------------------
def test_health_and_models(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health", trust_env=False).status_code == 200
    models = server.openai().models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_stream_and_non_stream_agree(server: ServerProcess) -> None:
    client = server.openai()
    full = chat(client, "hello", temperature=0, max_tokens=6)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(b"User: hello\nAssistant:")
    assert full.usage.completion_tokens == 6
    assert full.usage.total_tokens == full.usage.prompt_tokens + 6
    pieces, finish, usage = [], None, None
    for chunk in chat(client, "hello", temperature=0, max_tokens=6, stream=True,
                      stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == 6


def test_stream_ends_with_done(server: ServerProcess) -> None:
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2,
                                               "stream": True, "seed": 1})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and len(events) >= 3


def test_seed_gives_the_same_output(server: ServerProcess) -> None:
    client = server.openai()
    a, b, c = (chat(client, "tell me", temperature=1.0, seed=s, max_tokens=16).choices[0]
               .message.content for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_stop_strings(server: ServerProcess) -> None:
    client = server.openai()
    text = client.completions.create(model=MODEL, prompt="abc", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())
    got = client.completions.create(model=MODEL, prompt="abc", max_tokens=24, temperature=0,
                                    stop=[stop, "\x00never"]).choices[0]
    assert got.finish_reason == "stop"
    assert got.text == text[:text.index(stop)]


def test_echo_and_logprobs_match_the_model(server: ServerProcess, local: Any) -> None:
    model, tokenizer = local
    prompt = "The quick brown fox"
    got = server.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                             temperature=0, echo=True, logprobs=2).choices[0]
    ids = tokenizer.encode(prompt)
    lp = got.logprobs
    n = len(ids)
    assert got.text.startswith(prompt) and lp.token_logprobs[0] is None
    assert len(lp.tokens) == n + 3 and got.finish_reason == "length"
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))  # (1, T, V)
    expected = torch.log_softmax(logits[0].float(), -1)  # (T, V)
    for t in range(1, n):
        assert lp.token_logprobs[t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
        best = max(lp.top_logprobs[t].values())
        assert best == pytest.approx(float(expected[t - 1].max()), abs=1e-4)
    # greedy: every generated token is the most likely one, with the model's log-prob
    assert lp.token_logprobs[n] == pytest.approx(float(expected[n - 1].max()), abs=1e-4)
    for t in range(n, n + 3):
        assert lp.token_logprobs[t] == pytest.approx(max(lp.top_logprobs[t].values()))
    scored = server.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=0,
                                                echo=True, logprobs=0).choices[0]
    assert scored.text == prompt and scored.logprobs.token_logprobs == lp.token_logprobs[:n]


def test_lm_eval_shaped_requests_score_like_the_library(server: ServerProcess,
                                                       local: Any) -> None:
    """What lm-eval's ``local-completions`` sends: a batch of token lists that start with the
    EOS id as prefix token, ``echo``, ``logprobs``, ``max_tokens`` 0 (scoring) or 1; and the 400
    naming the element when a tokenizer without EOS left a null there."""
    model, tokenizer = local
    eos = model.config.eos_token_id
    contexts = [[eos, *tokenizer.encode(t)] for t in ("The cat sat", "A dog ran far away")]
    with server.http() as http:
        for max_tokens in (0, 1):
            r = http.post("/v1/completions", json={
                "model": MODEL, "prompt": contexts, "max_tokens": max_tokens, "echo": True,
                "logprobs": 1, "temperature": 0, "seed": 1234})
            assert r.status_code == 200, r.text
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            for ids, choice in zip(contexts, choices, strict=True):
                with torch.no_grad():
                    logits, _ = model(torch.tensor([ids]))
                expected = torch.log_softmax(logits[0].float(), -1)
                got = choice["logprobs"]["token_logprobs"]
                assert got[0] is None and len(got) == len(ids) + max_tokens
                for t in range(1, len(ids)):
                    assert got[t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
                if max_tokens:  # greedy: the most likely next token the tokenizer knows
                    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
                    best = float(expected[-1, :vocab].max())
                    assert got[-1] == pytest.approx(best, abs=1e-4)
        bad = http.post("/v1/completions", json={"model": MODEL, "prompt": [None, 498],
                                                 "max_tokens": 0, "echo": True, "logprobs": 1})
    assert bad.status_code == 400
    assert "prompt[0] is null" in bad.json()["error"]["message"]


def test_n_choices_and_token_prompts(server: ServerProcess, local: Any) -> None:
    _, tokenizer = local
    r = server.openai().completions.create(model=MODEL, prompt=tokenizer.encode("xy"), n=3,
                                           max_tokens=4, seed=1, temperature=1.0, logprobs=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.usage.prompt_tokens == 2
    assert len({c.text for c in r.choices}) > 1  # seed + i per choice, not one sample thrice


# sessions ----------------------------------------------------------------------------------
def session_info(server: ServerProcess, sid: str) -> dict[str, Any] | None:
    with server.http() as http:
        rows = http.get("/v1/sessions").json()["data"]
    return next((r for r in rows if r["id"] == sid), None)


def test_chat_session_resend_append_diverge_reset(server: ServerProcess) -> None:
    client, sid = server.openai(), "resend"
    r1 = chat(client, "hi", sid, temperature=0, max_tokens=5)
    a1 = r1.choices[0].message.content
    assert r1.model_extra["session"]["tokens_seen"] == r1.usage.total_tokens
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1},
               {"role": "user", "content": "again"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, temperature=0,
                                        max_tokens=5, metadata={"session_id": sid})
    assert r2.usage.prompt_tokens == len(b"\nUser: again\nAssistant:")  # only the new message
    r3 = chat(client, "third", sid, temperature=0, max_tokens=5)  # only the new message sent
    assert r3.usage.prompt_tokens == len(b"\nUser: third\nAssistant:")
    seen = r3.model_extra["session"]["tokens_seen"]
    assert seen == sum(r.usage.total_tokens for r in (r1, r2, r3))
    edited = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1 + "!"},
              {"role": "user", "content": "again"}]
    with pytest.raises(openai.ConflictError, match="differs"):
        client.chat.completions.create(model=MODEL, messages=edited, max_tokens=2,
                                       metadata={"session_id": sid})
    assert session_info(server, sid)["tokens_seen"] == seen  # the refusal changed nothing
    r4 = client.chat.completions.create(model=MODEL, messages=edited, max_tokens=2,
                                        metadata={"session_id": sid, "reset_session": "true"})
    assert r4.model_extra["session"]["tokens_seen"] == r4.usage.total_tokens
    with pytest.raises(openai.ConflictError):  # a chat session is not a completions session
        server.openai().completions.create(model=MODEL, prompt="x", max_tokens=1,
                                           extra_body={"metadata": {"session_id": sid}})


def test_completion_session_resends_transcript(server: ServerProcess) -> None:
    client, meta = server.openai(), {"metadata": {"session_id": "text-1"}}
    r1 = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0,
                                   extra_body=meta)
    transcript = "Once" + r1.choices[0].text
    r2 = client.completions.create(model=MODEL, prompt=transcript + " more", max_tokens=4,
                                   temperature=0, extra_body=meta)
    assert r2.usage.prompt_tokens == len(b" more")
    assert r2.model_extra["session"]["tokens_seen"] == r1.usage.total_tokens + \
        r2.usage.total_tokens


def test_list_export_delete(server: ServerProcess) -> None:
    chat(server.openai(), "keep me", "to-delete", max_tokens=3)
    with server.http() as http:
        info = session_info(server, "to-delete")
        assert info["tokens_seen"] > 0 and info["bytes"] > 0 and info["kind"] == "chat"
        r = http.get("/v1/sessions/to-delete/memory")
        assert r.headers["content-type"] == "application/octet-stream"
        assert int(r.headers["x-newllm-tokens-seen"]) == info["tokens_seen"]
        assert http.delete("/v1/sessions/to-delete").json()["deleted"] is True
        assert http.get("/v1/sessions/to-delete/memory").status_code == 404
        assert http.delete("/v1/sessions/to-delete").status_code == 404


def test_sixteen_concurrent_turns_on_one_session(server: ServerProcess, local: Any) -> None:
    model, tokenizer = local
    client, sid = server.openai(), "busy"
    downloads: list[bytes] = []

    def turn(i: int) -> Any:
        return chat(client, f"turn {i}", sid, max_tokens=4, seed=i,
                    metadata={"session_input": "new"})

    def poll() -> None:
        with server.http() as http:
            for _ in range(20):
                r = http.get(f"/v1/sessions/{sid}/memory")
                if r.status_code == 200:
                    downloads.append(r.content)
                time.sleep(0.02)

    with ThreadPoolExecutor(17) as pool:
        poller = pool.submit(poll)
        results = list(pool.map(turn, range(16)))
        poller.result()
    sessions = sorted((r.model_extra["session"] for r in results),
                      key=lambda s: s["tokens_seen"])
    totals = {r.model_extra["session"]["tokens_seen"]: r.usage.total_tokens for r in results}
    previous = 0
    for s in sessions:  # the turns form one chain: each applied once, on top of the previous
        assert s["tokens_seen"] == previous + totals[s["tokens_seen"]]
        previous = s["tokens_seen"]
    assert sorted(s["turns"] for s in sessions) == list(range(1, 17))
    assert session_info(server, sid)["tokens_seen"] == previous
    assert downloads, "no memory file was read while the turns ran"
    for data in downloads:  # every file a reader saw was whole and valid
        assert load_memory(data, model, tokenizer_hash=tokenizer.sha256).position > 0


def test_a_stream_closed_mid_turn_saves_nothing(server: ServerProcess) -> None:
    """A client that goes away mid-stream cancels its turn: the session stays as it was."""
    sid = "walked-away"
    chat(server.openai(), "c", sid, temperature=0, max_tokens=4)
    before = session_info(server, sid)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "c"}], "temperature": 0,
            "max_tokens": 400, "stream": True,  # a long reply (greedy: no EOS for 400 tokens)
            "metadata": {"session_id": sid, "reset_session": "true"}}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 4:
                break  # leaving the block closes the connection mid-stream
    assert not any('"finish_reason":"' in e.replace(" ", "") for e in events)
    locks = FolderStore(server.session_dir).locks()
    deadline = time.monotonic() + 60
    while not locks.try_acquire(sid):  # free once the turn was dropped (or saved)
        assert time.monotonic() < deadline, "the turn never ended"
        time.sleep(0.02)
    locks.release(sid)
    assert session_info(server, sid) == before


def test_delete_of_a_busy_session_cancels_its_turn(server: ServerProcess) -> None:
    """DELETE while a 500-token turn streams: the turn is cancelled (its stream ends with a
    session_deleted error, long before 500 tokens), the session is gone, DELETE answers 200."""
    sid = "busy-delete"
    chat(server.openai(), "c", sid, temperature=0, max_tokens=4)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "c"}], "temperature": 0,
            "max_tokens": 500, "stream": True,
            "metadata": {"session_id": sid, "reset_session": "true"}}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events: list[str] = []
        deleted = None
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3 and deleted is None:
                with server.http() as other:
                    deleted = other.delete(f"/v1/sessions/{sid}")
    assert deleted is not None and deleted.status_code == 200, deleted.text if deleted else None
    assert deleted.json()["deleted"] is True
    assert any("session_deleted" in e for e in events), events[-3:]
    assert len(events) < 400  # cut off, not run to the end
    with server.http() as http:
        assert http.get(f"/v1/sessions/{sid}/memory").status_code == 404


def _metric_values(server: ServerProcess) -> dict[str, float]:
    with server.http() as http:
        text = http.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_sixteen_sessions_in_parallel(server: ServerProcess) -> None:
    client = server.openai()
    before = _metric_values(server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: chat(client, f"hello {i}", f"par-{i}", max_tokens=8,
                                               temperature=0), range(16)))
    after = _metric_values(server)
    mismatches = 0
    for i, r in enumerate(results):
        assert r.model_extra["session"]["id"] == f"par-{i}"
        assert r.model_extra["session"]["tokens_seen"] == r.usage.total_tokens
        # decoded in batches with other sessions, yet what a lone request gives; batched
        # matrix products may differ by ~1e-7, which can flip a near-tie of greedy decoding in
        # one reply at most, while rows mixed up between sessions would change nearly all
        alone = chat(client, f"hello {i}", max_tokens=8, temperature=0)
        mismatches += r.choices[0].message.content != alone.choices[0].message.content
    assert mismatches <= 1
    steps = after["newllm_decode_batch_size_count"] - before["newllm_decode_batch_size_count"]
    single = (after['newllm_decode_batch_size_bucket{le="1.0"}']
              - before['newllm_decode_batch_size_bucket{le="1.0"}'])
    assert single < steps  # some steps decoded several sessions together


# refusals ----------------------------------------------------------------------------------
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/sessions"), ("GET", "/v1/sessions/x/memory"),
          ("PUT", "/v1/sessions/x/memory"), ("DELETE", "/v1/sessions/x"), ("GET", "/metrics")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_api_key_on_every_route(server: ServerProcess, method: str, path: str) -> None:
    for key in (None, "wrong-key-000"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.request(method, server.url + path, headers=headers, trust_env=False,
                          content=b"{}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_hostile_inputs_get_4xx_and_change_nothing(server: ServerProcess, local: Any) -> None:
    model, tokenizer = local
    folder = server.session_dir
    chat(server.openai(), "precious", "victim", max_tokens=3)
    with server.http() as http:
        good = http.get("/v1/sessions/victim/memory").content
    state = load_memory(good, model)
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from newllm.memory_file import read_memory_metadata
    meta = read_memory_metadata(good)
    tensors = st_load(good)
    wrong_shape = dict(tensors)
    name = next(iter(wrong_shape))
    wrong_shape[name] = torch.zeros(*[d + 1 for d in wrong_shape[name].shape])
    nan = {k: v.clone() for k, v in tensors.items()}
    nan[name].fill_(float("nan"))
    other_model, _ = load_checkpoint("tiny-pythia")
    with torch.no_grad():
        _, two = model(torch.randint(1, 257, (2, 5)))  # a batch of two sequences
    bad_files = {  # what is sent -> the error code that must name the problem
        "truncated": (good[:len(good) // 2], "truncated"),
        "random": (os.urandom(4096), "not_safetensors"),
        "wrong shapes": (st_save(wrong_shape, metadata={
            **meta, "payload_sha256": payload_sha256(wrong_shape)}), "tensor_mismatch"),
        "another model": (save_memory(other_model.init_state(1), other_model),
                          "model_mismatch"),
        "nan": (st_save(nan, metadata={**meta, "payload_sha256": payload_sha256(nan)}),
                "non_finite"),
        "empty": (b"", "not_safetensors"),
        "batch of two": (save_memory(two, model, tokenizer_hash=tokenizer.sha256),
                         "tensor_mismatch"),
    }
    before = _files(folder)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "metadata": {"session_id": "victim"}}
    with server.http() as http:
        for what, (data, code) in bad_files.items():
            for sid in ("victim", "fresh"):
                r = http.put(f"/v1/sessions/{sid}/memory", content=data)
                assert r.status_code == 400, (what, r.status_code, r.text)
                assert r.json()["error"]["code"] == code, (what, r.text)
        requests = [
            ("oversize", dict(content=b"{" + b" " * (2 << 20) + b"}")),
            ("malformed json", dict(content=b'{"model": ')),
            ("wrong type", dict(json={**body, "max_tokens": "3"})),
            ("missing field", dict(json={"model": MODEL})),
            ("negative max_tokens", dict(json={**body, "max_tokens": -1})),
            ("huge max_tokens", dict(json={**body, "max_tokens": 10**9})),
            ("unknown model", dict(json={**body, "model": "gpt-5"})),
            ("bad session id", dict(json={**body, "metadata": {"session_id": "../x"}})),
            ("long session id", dict(json={**body, "metadata": {"session_id": "a" * 300}})),
            ("empty session id", dict(json={**body, "metadata": {"session_id": ""}})),
            ("unknown field", dict(json={**body, "max_tokenz": 3})),
        ]
        for what, kwargs in requests:
            r = http.post("/v1/chat/completions", **kwargs)
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
            assert r.json()["error"]["message"], what
        for path in ("/v1/sessions/..%2Fx/memory", "/v1/sessions/%2E%2E/memory",
                     "/v1/sessions/" + "a" * 300 + "/memory", "/v1/sessions//memory"):
            r = http.put(path, content=good)
            assert 400 <= r.status_code < 500, (path, r.status_code)
        # uploads have their own limit (2 MiB here), above --max-request-bytes (1 MiB)
        r = http.put("/v1/sessions/victim/memory", content=good + b"x" * (3 << 19))
        assert r.status_code == 400, r.text  # over 1 MiB is fine: read, then refused as junk
        r = http.put("/v1/sessions/victim/memory", content=good + b"x" * (2 << 20))
        assert r.status_code == 413 and "--max-memory-bytes" in r.json()["error"]["message"]
    assert _files(folder) == before
    assert not (folder / "fresh.safetensors").exists()
    assert load_memory(before["victim.safetensors"], model).position == state.position


def test_metrics_aggregate_processes(server: ServerProcess) -> None:
    chat(server.openai(), "count me", "metrics-s", max_tokens=2)  # a session: counted
    with server.http("wrong-key-000") as http:
        assert http.post("/v1/chat/completions", json={}).status_code == 401
    with server.http() as http:
        assert http.put("/v1/sessions/m/memory", content=b"junk-junk").status_code == 400
    lines = _metric_values(server)
    assert lines['newllm_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert lines['newllm_requests_total{route="/v1/chat/completions",status="401"}'] >= 1
    assert lines['newllm_time_to_first_token_seconds_count{route="/v1/chat/completions"}'] >= 1
    assert lines['newllm_tokens_total{kind="completion"}'] >= 2
    assert lines['newllm_memory_transfers_total{op="import",result="refused"}'] >= 1
    assert lines["newllm_sessions"] >= 1 and lines["newllm_session_memory_bytes"] > 0
    # each worker reports its decode step (the tests turn compiling off: eager)
    workers = {k.split('"')[1]: v for k, v in lines.items()
               if k.startswith("newllm_decode_workers{")}
    assert workers == {"eager": 2, "compiling": 0, "compiled": 0}  # --workers 2


def test_idempotency_key_answers_a_retry_without_applying_it(server: ServerProcess) -> None:
    """The same request with the same Idempotency-Key (a client retry after a timeout): the
    same completion, streamed or not, and the session has one turn, not two."""
    client = server.openai()
    key = {"Idempotency-Key": "retry-test-1"}
    first = chat(client, "Once upon a time", "idem-live", temperature=0, max_tokens=8,
                 extra_headers=key)
    again = chat(client, "Once upon a time", "idem-live", temperature=0, max_tokens=8,
                 extra_headers=key)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert first.model_extra["session"]["turns"] == again.model_extra["session"]["turns"] == 1
    assert again.model_extra["session"]["replayed"] is True
    assert again.usage.completion_tokens == first.usage.completion_tokens
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Once upon a time"}], temperature=0,
        max_tokens=8, stream=True, metadata={"session_id": "idem-live"}, extra_headers=key)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        first.choices[0].message.content
    assert session_info(server, "idem-live")["turns"] == 1
    with server.http() as http:
        bad = http.post("/v1/chat/completions", headers={"Idempotency-Key": "no spaces!"},
                        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "metadata": {"session_id": "idem-live"}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_idempotency_key"
