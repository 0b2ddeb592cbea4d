"""Sessions across server processes: move a session between two servers, survive a restart,
and SIGTERM leaves no process behind. Greedy decoding, so continuations must match exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from test_server import MODEL, ServerProcess, alive

from server.store import FolderStore


def turn(srv: ServerProcess, sid: str, content: str) -> Any:
    r = srv.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=12, metadata={"session_id": sid, "session_input": "new"})
    return r.choices[0].message.content, r.model_extra["session"]["tokens_seen"]


def test_move_session_and_survive_restart(tmp_path: Path) -> None:
    a = ServerProcess(tmp_path / "a")
    b = ServerProcess(tmp_path / "b", "--max-sessions", "1")
    restarted = None
    try:
        a.wait_ready()
        b.wait_ready()
        for line in ("My name is Ada.", "I live by the sea."):  # a conversation on A
            turn(a, "trip", line)
        with a.http() as http:
            exported = http.get("/v1/sessions/trip/memory")
        assert exported.status_code == 200
        with b.http() as http:
            put = http.put("/v1/sessions/trip/memory", content=exported.content)
        assert put.status_code == 201, put.text
        assert put.json()["tokens_seen"] == int(exported.headers["x-newllm-tokens-seen"])

        on_a = turn(a, "trip", "What is my name?")
        on_b = turn(b, "trip", "What is my name?")
        assert on_b == on_a  # same text, same number of tokens seen

        family = a.stop()
        assert a.proc.returncode == 0
        assert len(family) >= 3 and not [p for p in family if alive(p)]  # no orphans
        restarted = ServerProcess(tmp_path / "a").wait_ready()
        assert turn(restarted, "trip", "Where do I live?") == turn(b, "trip", "Where do I live?")

        # the session moved once more, back from B to a fresh id on A, still continues alike
        with b.http() as http:
            data = http.get("/v1/sessions/trip/memory").content
        with restarted.http() as http:
            assert http.put("/v1/sessions/back/memory", content=data).status_code == 201
        assert turn(restarted, "back", "Bye.") == turn(b, "trip", "Bye.")

        # B holds its limit of one session; while "trip" is busy (its lock held here, as a turn
        # in another worker would), a new session is refused before anything is generated
        # (503, streaming or not), and nothing changes on disk
        before = (tmp_path / "b" / "trip.safetensors").read_bytes()
        locks = FolderStore(tmp_path / "b").locks()
        assert locks.try_acquire("trip")
        for stream in (True, False):
            with pytest.raises(openai.APIStatusError, match="maximum of 1 sessions") as e:
                b.openai().chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                    stream=stream, metadata={"session_id": "extra"})
            assert e.value.status_code == 503
        assert not (tmp_path / "b" / "extra.safetensors").exists()
        assert (tmp_path / "b" / "trip.safetensors").read_bytes() == before
        locks.release("trip")
        turn(b, "extra", "hi")  # now the idle "trip" is evicted to make room
        with b.http() as http:
            assert [s["id"] for s in http.get("/v1/sessions").json()["data"]] == ["extra"]
    finally:
        for srv in (a, b, restarted):
            if srv is not None:
                srv.kill()


def test_moves_across_precision_are_converted_unless_strict(tmp_path: Path) -> None:
    """One checkpoint served in float32, bfloat16 and float16 (and float32 with --strict-moves):
    bf16 -> fp32, fp32 -> bf16 and fp16 -> fp32 moves through the client library are accepted,
    reported as converted, and the next turn works; the strict server refuses, naming both
    dtypes, and keeps nothing."""
    from clients import Client, move_session
    from clients.errors import MemoryRefused

    servers = {name: ServerProcess(tmp_path / name, *args) for name, args in {
        "fp32": (), "bf16": ("--dtype", "bfloat16"), "fp16": ("--dtype", "float16"),
        "strict": ("--strict-moves",)}.items()}
    try:
        for srv in servers.values():
            srv.wait_ready()
        for src, dst in (("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "fp32")):
            sid = f"{src}-to-{dst}"
            turn(servers[src], sid, "My name is Ada.")
            a = Client(servers[src].url, api_key=servers[src].api_key)
            b = Client(servers[dst].url, api_key=servers[dst].api_key)
            moved = move_session(sid, a, b)
            want = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
            assert moved.converted == {"from": {"dtype": want[src], "device": "cpu"},
                                       "to": {"dtype": want[dst], "device": "cpu"}}
            assert moved.source_deleted
            text, seen = turn(servers[dst], sid, "What is my name?")
            assert seen > moved.tokens_seen
            with servers[dst].http() as http:  # stored at the server's own precision
                sessions = http.get("/v1/sessions").json()["data"]
            assert sid in [s["id"] for s in sessions]
        turn(servers["bf16"], "s", "Hello.")
        data = Client(servers["bf16"].url, api_key=servers["bf16"].api_key).export_memory("s")
        with pytest.raises(MemoryRefused) as refused:
            Client(servers["strict"].url,
                   api_key=servers["strict"].api_key).import_memory("s", data)
        assert refused.value.code == "conversion_refused"
        assert "bfloat16" in str(refused.value) and "float32" in str(refused.value)
        assert not (tmp_path / "strict" / "s.safetensors").exists()
    finally:
        for srv in servers.values():
            srv.kill()


def test_a_move_between_servers_sharing_a_folder_loses_nothing(tmp_path: Path) -> None:
    """Two servers on one session folder (the same store id): moving a session from one to
    the other would move it onto itself; it is refused and the session stays on both. A copy
    under a new id still works. Servers on different folders have different store ids."""
    from clients import Client, move_session
    from clients.errors import Conflict

    a = ServerProcess(tmp_path / "shared")
    b = ServerProcess(tmp_path / "shared")
    c = ServerProcess(tmp_path / "other")
    try:
        for srv in (a, b, c):
            srv.wait_ready()
        ca, cb, cc = (Client(s.url, api_key=s.api_key) for s in (a, b, c))
        assert ca.store_id() == cb.store_id() != cc.store_id()
        turn(a, "carol", "My name is Carol.")
        before = ca.export_memory("carol")
        for overwrite in (False, True):
            with pytest.raises(Conflict, match="share one session store") as e:
                move_session("carol", ca, cb, overwrite=overwrite)
            assert e.value.code == "same_store"
        assert ca.export_memory("carol") == before == cb.export_memory("carol")
        copied = move_session("carol", ca, cb, "carol-2")  # a rename within the store
        assert copied.source_deleted and cb.export_memory("carol-2")
        moved = move_session("carol-2", cb, cc)  # another store: a real move
        assert moved.source_deleted and cc.export_memory("carol-2")
    finally:
        for srv in (a, b, c):
            srv.kill()


def test_a_float16_checkpoint_is_served_with_half_weights_by_default(
        tmp_path: Path, byte_tokenizer: Any) -> None:
    """Left to the default, a checkpoint stored in float16 is served with its weights kept in
    float16 (nothing is rounded), logged at start; its memory files say so, and the session
    continues after going out and back in without a conversion."""
    import torch
    from conftest import make_tiny_model, need_half_kernel

    from clients import Client
    from newllm import memory_file as mf
    from newllm.checkpoint import save_pretrained

    need_half_kernel()
    folder = save_pretrained(make_tiny_model("tiny-infini", init_std=0.1), tmp_path / "ck",
                             byte_tokenizer, dtype=torch.float16)
    srv = ServerProcess(tmp_path / "s", "--checkpoint", str(folder), "--log-level", "info")
    try:
        srv.wait_ready()
        turn(srv, "s", "My name is Ada.")
        c = Client(srv.url, api_key=srv.api_key)
        exported = c.export_memory("s")
        meta = mf.read_memory_metadata(exported)
        assert (meta["dtype"], meta["weights_dtype"]) == ("float32", "float16")
        assert not c.import_memory("copy", exported).converted
        assert turn(srv, "copy", "What is my name?") == turn(srv, "s", "What is my name?")
    finally:
        srv.kill()
    assert "kept in float16, computed in float32: they are float16 values" in (
        srv.log.read_text())


def test_half_weight_servers_move_sessions_and_check_their_own_files(tmp_path: Path) -> None:
    """A server with --half-weights: its own exported memory goes back in without a conversion
    (the HTTP process checks uploads with the workers' fingerprint), and a move to a float32
    server is accepted and reported as from float16 weights; the next turn works there."""
    from conftest import need_half_kernel

    from clients import Client, move_session
    from clients.types import ImportResult

    need_half_kernel()
    half = ServerProcess(tmp_path / "half", "--half-weights")
    full = ServerProcess(tmp_path / "full")
    try:
        half.wait_ready()
        full.wait_ready()
        turn(half, "s", "My name is Ada.")
        a = Client(half.url, api_key=half.api_key)
        b = Client(full.url, api_key=full.api_key)
        again = a.import_memory("copy", a.export_memory("s"))
        assert not again.converted
        text, seen = turn(half, "copy", "What is my name?")
        assert (text, seen) == turn(half, "s", "What is my name?")  # the copy continues alike
        moved = move_session("s", a, b)
        assert moved.converted == {
            "from": {"dtype": "float32", "device": "cpu", "weights_dtype": "float16"},
            "to": {"dtype": "float32", "device": "cpu"}}
        said = ImportResult(id="s", converted=moved.converted).conversion_text()
        assert said == "converted from float32 with float16 weights (cpu) to float32 (cpu)"
        _, after = turn(full, "s", "Hello again.")
        assert after > seen
    finally:
        half.kill()
        full.kill()
