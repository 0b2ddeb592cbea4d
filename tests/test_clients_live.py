"""The client against two live servers on loopback: library -> HTTP -> store -> model.

Two ``python -m server`` processes (tiny-infini, started by `benchmarks.live`, on free
ports, each with its own temporary session folder; B requires an API key) are started once for
this module and always terminated. The key check: a chat on server A, moved to server B with
`move_session`, continues on B with exactly the greedy tokens A gives for the same session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.live import LiveServer, running_servers
from clients import AsyncClient, AuthError, Client, cli, memory, move_session

KEY = "live-test-key-1"
GREEDY = {"temperature": 0}
FIRST = "Tell me a story."
CANDIDATES = ["Go on.", "And then?", "What happened next?", "Why?", "Tell me more."]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    with running_servers("tiny-infini", {"a": 1, "b": 1}, folder=tmp_path_factory.mktemp("live"),
                         api_keys={"b": KEY}) as started:
        yield started["a"], started["b"]


def test_moved_session_continues_with_the_same_greedy_tokens(
        servers: tuple[LiveServer, LiveServer]) -> None:
    a, b = servers
    with a.client(timeout=60.0, max_retries=3) as ca, b.client(timeout=60.0, max_retries=3) as cb:
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
    with a.client(timeout=60.0, max_retries=3) as ca:
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
    with a.client(timeout=60.0, max_retries=3) as ca:
        ca.chat("Hello", session="whole", max_tokens=4, **GREEDY)
        data = ca.export_memory("whole")
    assert isinstance(data, bytes)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    code = cli.main(["--url", a.url, "import", "refused", str(cut)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED
    assert "memory file refused" in err and "HTTP 400" in err and "code truncated" in err
    with a.client(timeout=60.0, max_retries=3) as ca:
        assert ca.memory_headers("refused") is None  # nothing was installed
