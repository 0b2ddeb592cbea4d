"""The client against two live servers on loopback: library -> HTTP -> store -> model.

Two ``python -m server`` processes (tiny-infini, the bundled fallback checkpoint, on free
ports, each with its own temporary session folder; B requires an API key) are started once for
this module and always terminated. The key check: a chat on server A, moved to server B with
`move_session`, continues on B with exactly the greedy tokens A gives for the same session.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import AsyncClient, AuthError, Client, cli, memory, move_session

ROOT = Path(__file__).resolve().parents[1]
KEY = "live-test-key-1"
START_TIMEOUT_S = 120.0
GREEDY = {"temperature": 0}
FIRST = "Tell me a story."
CANDIDATES = ["Go on.", "And then?", "What happened next?", "Why?", "Tell me more."]


@dataclass
class LiveServer:
    url: str
    api_key: str | None
    process: subprocess.Popen
    log: Path

    def client(self) -> Client:
        return Client(self.url, self.api_key, timeout=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, name: str, api_key: str | None) -> LiveServer:
    port = free_port()
    log = tmp / f"{name}.log"
    argv = [sys.executable, "-m", "server", "--checkpoint", "tiny-infini", "--host", "127.0.0.1",
            "--port", str(port), "--session-dir", str(tmp / f"sessions-{name}"),
            "--log-level", "warning"]
    if api_key:
        argv += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEWLLM_API_KEY", "PROMETHEUS_MULTIPROC_DIR")}
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return LiveServer(f"http://127.0.0.1:{port}", api_key, process, log)


def stop(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()  # the server turns SIGTERM into a clean shutdown
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything of its process group still alive (workers) goes too
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait(5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    tmp = tmp_path_factory.mktemp("live")
    started: list[LiveServer] = []
    try:
        started = [start(tmp, "a", None), start(tmp, "b", KEY)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in started:
            with server.client() as c:
                while True:
                    if server.process.poll() is not None:
                        pytest.fail(f"server {server.url} exited with {server.process.returncode}"
                                    f":\n{server.log.read_text()[-3000:]}")
                    try:
                        if c.health():
                            break
                    except Exception:  # noqa: BLE001 - not listening yet
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(f"server {server.url} not ready in {START_TIMEOUT_S} s:\n"
                                    f"{server.log.read_text()[-3000:]}")
                    time.sleep(0.2)
        yield started[0], started[1]
    finally:
        for server in started:
            stop(server)


def test_moved_session_continues_with_the_same_greedy_tokens(
        servers: tuple[LiveServer, LiveServer]) -> None:
    a, b = servers
    with a.client() as ca, b.client() as cb:
        first = ca.chat(FIRST, session="moving", max_tokens=12, **GREEDY)
        assert first.session is not None and first.session.created
        # the reference: the same first turn in another session on A, then a second turn that
        # generates a few tokens (an untrained model may end at once; try a few messages)
        for i, message in enumerate(CANDIDATES):
            ref_first = ca.chat(FIRST, session=f"ref{i}", max_tokens=12, **GREEDY)
            assert ref_first.text == first.text  # greedy decoding is deterministic
            reference = ca.chat(message, session=f"ref{i}", max_tokens=16, logprobs=True,
                                **GREEDY)
            if reference.usage is not None and reference.usage.completion_tokens >= 3:
                break
        else:
            pytest.fail(f"no second message of {CANDIDATES} made the model generate 3 tokens")

        result = move_session("moving", ca, cb)
        assert result.source_deleted and result.created
        assert result.tokens_seen == first.session.tokens_seen
        assert ca.memory_headers("moving") is None  # gone from A
        assert [s.id for s in cb.sessions()] == ["moving"]

        moved = cb.chat(message, session="moving", max_tokens=16, logprobs=True, **GREEDY)
        assert moved.text == reference.text
        assert moved.finish_reason == reference.finish_reason
        assert moved.usage == reference.usage
        assert moved.session is not None and reference.session is not None
        assert moved.session.tokens_seen == reference.session.tokens_seen
        assert moved.logprobs is not None and reference.logprobs is not None
        got = [t.logprob for t in moved.logprobs.content]
        want = [t.logprob for t in reference.logprobs.content]
        assert got == pytest.approx(want, abs=1e-4)

        # a third turn, streamed: sync client on A, async client on B
        stream_a = ca.stream_chat("Continue.", session=f"ref{i}", max_tokens=8, **GREEDY)
        text_a = "".join(stream_a)

        async def on_b() -> tuple[str, object]:
            async with AsyncClient(b.url, b.api_key, timeout=60.0) as ab:
                stream = ab.stream_chat("Continue.", session="moving", max_tokens=8, **GREEDY)
                return "".join([p async for p in stream]), stream.session

        text_b, session_b = asyncio.run(on_b())
        assert text_b == text_a
        assert session_b is not None and stream_a.session is not None
        assert session_b["tokens_seen"] == stream_a.session["tokens_seen"]


def test_wrong_key_is_an_auth_error(servers: tuple[LiveServer, LiveServer]) -> None:
    _, b = servers
    with Client(b.url, "not-the-key", max_retries=0) as c:
        with pytest.raises(AuthError, match="API key") as info:
            c.sessions()
        assert info.value.status == 401
        assert c.health()  # /health needs no key


def _split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (parsed header, tensor bytes)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_cli_export_import_round_trip_live(servers: tuple[LiveServer, LiveServer],
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a, b = servers
    with a.client() as ca:
        ca.complete("Once upon a time", session="trip", max_tokens=6, **GREEDY)
    first, again = tmp_path / "trip.safetensors", tmp_path / "again.safetensors"
    assert cli.main(["--url", a.url, "export", "trip", "-o", str(first)]) == 0
    assert cli.main(["--url", b.url, "--api-key", KEY, "import", "trip2", str(first),
                     "--json"]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["created"] and imported["tokens_seen"] == memory.inspect(
        first.read_bytes()).tokens_seen
    assert cli.main(["--url", b.url, "--api-key", KEY, "export", "trip2", "-o",
                     str(again)]) == 0
    # the server re-serialises an upload; safetensors writes metadata keys in no fixed order,
    # so compare the parsed header and every tensor byte
    header_1, tensors_1 = _split(first.read_bytes())
    header_2, tensors_2 = _split(again.read_bytes())
    assert header_1 == header_2
    assert tensors_1 == tensors_2
    assert len(first.read_bytes()) == len(again.read_bytes())


def test_cli_refused_import_live(servers: tuple[LiveServer, LiveServer], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = servers
    with a.client() as ca:
        ca.chat("Hello", session="whole", max_tokens=4, **GREEDY)
        data = ca.export_memory("whole")
    assert isinstance(data, bytes)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    code = cli.main(["--url", a.url, "import", "refused", str(cut)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED
    assert "memory file refused" in err and "HTTP 400" in err and "code truncated" in err
    with a.client() as ca:
        assert ca.memory_headers("refused") is None  # nothing was installed
