"""Several server replicas sharing one real redis-server: every turn applied exactly once, a
replica killed mid-turn, Redis restarted and stopped, and moves between stores.

Started once for the module (in parallel): redis-server with AOF, three ``python -m server``
replicas of tiny-infini on it (``--session-lease 2``, one slot each so greedy replies repeat
exactly) and one folder-backed server ("solo") as the single-server reference. The replica
killed with SIGKILL goes last."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import need_program

from benchmarks.live import (
    ROOT,
    LiveServer,
    RedisProcess,
    free_port,
    running_servers,
    start_redis,
    stop_redis,
)
from clients import Client, move_session
from clients.errors import Conflict

LEASE_S = 2.0
GREEDY = {"temperature": 0, "max_tokens": 4}
SESSIONS, CLIENTS_PER_SESSION, TURNS = 4, 3, 10


@pytest.fixture(scope="module")
def cluster(redis_server: RedisProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    shared = ["--session-store", redis_server.url, "--session-lease", str(LEASE_S)]
    names = {"r0": 1, "r1": 1, "r2": 1, "solo": 1}
    with running_servers("tiny-infini", names, folder=tmp_path_factory.mktemp("replicas"),
                         extra={n: shared for n in names if n != "solo"}) as servers:
        yield servers


def clients(cluster: dict[str, LiveServer], retries: int = 3) -> list[Client]:
    return [cluster[f"r{i}"].client(timeout=120.0, max_retries=retries) for i in range(3)]


def same_memory(a: Client, b: Client, sid: str) -> tuple[dict[str, str], dict[str, str]]:
    """Both servers hold session ``sid`` with the same memory payload; their export headers."""
    ours, reference = a.memory_headers(sid), b.memory_headers(sid)
    assert ours is not None and reference is not None
    assert ours["x-newllm-payload-sha256"] == reference["x-newllm-payload-sha256"]
    return ours, reference


def test_concurrent_turns_over_three_replicas_apply_once_and_match_one_server(
        cluster: dict[str, LiveServer]) -> None:
    """12 clients, 10 turns each, round-robin over the replicas, 3 clients per session at once:
    each session ends with exactly its 30 turns (numbered 1..30 once each), the tokens they
    read and wrote, and the memory a single server reaches with the same turns in that order."""
    done: dict[str, list[tuple[int, str, str, int]]] = {f"s{i}": [] for i in range(SESSIONS)}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_run(c: int) -> None:
        sid = f"s{c % SESSIONS}"
        replicas = clients(cluster)
        try:
            for t in range(TURNS):
                prompt = f" c{c} t{t}."
                answer = replicas[(c + t) % 3].complete(prompt, session=sid, **GREEDY)
                assert answer.session is not None and answer.usage is not None
                with lock:
                    done[sid].append((answer.session.turns, prompt, answer.text,
                                      answer.usage.total_tokens))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            for r in replicas:
                r.close()

    threads = [threading.Thread(target=client_run, args=(c,))
               for c in range(SESSIONS * CLIENTS_PER_SESSION)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors[:3]

    turns_per_session = CLIENTS_PER_SESSION * TURNS
    with cluster["r0"].client() as any_replica, cluster["solo"].client() as solo:
        listed = {s.id: s for s in any_replica.sessions()}
        assert set(listed) == set(done)
        for sid, applied in done.items():
            assert sorted(n for n, *_ in applied) == list(range(1, turns_per_session + 1))
            assert listed[sid].turns == turns_per_session
            assert listed[sid].tokens_seen == sum(total for *_, total in applied)
            # the same turns in the order they were applied, on one folder-backed server
            for _, prompt, text, _ in sorted(applied):
                again = solo.complete(prompt, session=sid, **GREEDY)
                assert again.text == text
            ours, reference = same_memory(any_replica, solo, sid)
            assert ours["x-newllm-tokens-seen"] == reference["x-newllm-tokens-seen"]


def test_a_session_moves_between_a_folder_store_and_redis_byte_for_byte(
        cluster: dict[str, LiveServer]) -> None:
    with cluster["solo"].client() as solo, cluster["r1"].client() as replica:
        solo.complete(" Once upon a time", session="roaming", **GREEDY)
        exported = solo.export_memory("roaming")
        replica.import_memory("roaming", exported)
        assert replica.export_memory("roaming") == exported  # the same canonical file
        here = solo.complete(" and then", session="roaming", **GREEDY)
        there = replica.complete(" and then", session="roaming", **GREEDY)
        assert there.text == here.text
        same_memory(replica, solo, "roaming")  # (each turn's idempotency key differs)


def test_moving_between_replicas_of_one_store_is_refused_and_loses_nothing(
        cluster: dict[str, LiveServer]) -> None:
    with cluster["r0"].client() as a, cluster["r2"].client() as b:
        a.complete(" carol", session="carol", **GREEDY)
        before = a.export_memory("carol")
        assert a.store_id() == b.store_id() != cluster["solo"].client().store_id()
        with pytest.raises(Conflict, match="share one session store"):
            move_session("carol", a, b, overwrite=True)
        assert b.export_memory("carol") == before
        assert [s.id for s in b.sessions()].count("carol") == 1


def test_redis_restart_keeps_every_session_and_redis_down_is_a_503(
        cluster: dict[str, LiveServer], redis_server: RedisProcess) -> None:
    with cluster["r0"].client() as r0:
        for sid in ("kept1", "kept2"):
            r0.complete(" Remember this.", session=sid, **GREEDY)
        ids = [s.id for s in r0.sessions()]
        files = {sid: r0.export_memory(sid) for sid in ids}
    assert {"kept1", "kept2"} <= set(files)
    stop_redis(redis_server)
    try:
        url = cluster["r1"].url
        t0 = time.monotonic()
        for method, path, body in [("GET", "/v1/sessions", None),
                                   ("GET", f"/v1/sessions/{ids[0]}/memory", None),
                                   ("POST", "/v1/completions",
                                    {"model": "tiny-infini", "prompt": "hi", "max_tokens": 2,
                                     "metadata": {"session_id": ids[0]}})]:
            r = httpx.request(method, url + path, json=body, timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "session_store_unavailable"
        assert time.monotonic() - t0 < 30  # answered, not hung
        scrape = httpx.get(url + "/metrics", timeout=30)
        assert scrape.status_code == 200 and "newllm_session_store_up 0.0" in scrape.text
        assert 'newllm_store_errors_total{op="list"}' in scrape.text
    finally:
        fresh = start_redis(redis_server.folder, port=redis_server.port)
        redis_server.process = fresh.process
    with cluster["r1"].client(max_retries=3) as r1:  # the same replica, no restart
        assert sorted(s.id for s in r1.sessions()) == sorted(ids)
        assert {sid: r1.export_memory(sid) for sid in ids} == files
        r1.complete(" back", session=ids[0], **GREEDY)
        assert "newllm_session_store_up 1.0" in httpx.get(cluster["r1"].url + "/metrics").text


def test_the_documented_nginx_recipe_keeps_sessions_sticky_and_streams(
        cluster: dict[str, LiveServer], tmp_path: Path) -> None:
    """docs/nginx-replicas.conf, with two of the replicas as its upstreams, run by a real
    nginx: every request of a session goes to one replica (X-Session-Id), turns and streams
    pass through, and the sessions are in the shared store."""
    nginx = need_program("nginx", "nginx")
    port = free_port()
    site = (ROOT / "docs" / "nginx-replicas.conf").read_text()
    upstreams = "".join(f"    server 127.0.0.1:{cluster[n].url.rsplit(':', 1)[1]};\n"
                        for n in ("r0", "r1"))
    site = re.sub(r"(?m)^    server 10\.0\.0\.\d+:8000[^\n]*\n", "", site)
    site = site.replace("    keepalive 32;", upstreams + "    keepalive 32;")
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (tmp_path / "site.conf").write_text(site)
    temp = " ".join(f"{k}_temp_path {tmp_path / k};"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        "events {}\n"
        "http { log_format up '$http_x_session_id $upstream_addr';\n"
        f"access_log {tmp_path}/access.log up; {temp}\n"
        f"include {tmp_path}/site.conf; }}\n")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with Client(f"http://127.0.0.1:{port}", timeout=60.0, max_retries=5) as front:
            deadline = time.monotonic() + 20
            while not _answers(front):
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not answer"
                time.sleep(0.1)
            names = [f"sticky{i}" for i in range(8)]
            for _ in range(2):
                for sid in names:
                    front.complete(" Hello", session=sid, **GREEDY)
            streamed = list(front.stream_complete(" Go on", session=names[0],
                                                  max_tokens=6, temperature=0, logprobs=0))
            assert len(streamed) >= 2  # pieces arrive one by one, not buffered into one
            exported = front.export_memory(names[0])
        with cluster["r2"].client() as other:  # a replica nginx does not use: same store
            assert {s.id for s in other.sessions()} >= set(names)
            assert other.export_memory(names[0]) == exported
    finally:
        proc.terminate()
        proc.wait(10)
    served: dict[str, set[str]] = {}
    for line in (tmp_path / "access.log").read_text().splitlines():
        sid, upstream = line.split(" ", 1)
        if sid != "-":
            served.setdefault(sid, set()).add(upstream)
    assert set(served) >= set(names)
    assert all(len(ups) == 1 for ups in served.values()), served  # sticky


def _answers(client: Client) -> bool:
    try:
        return bool(client.health())
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def test_a_replica_killed_mid_turn_leaves_the_session_as_it_was(
        cluster: dict[str, LiveServer], redis_server: RedisProcess) -> None:
    """SIGKILL of a replica while its turn runs: the turn fails, the session keeps its memory
    from before, the dead replica's lease expires, and the next turn on another replica works."""
    victim = cluster["r2"]
    redis = redis_server.client()
    with cluster["r0"].client() as r0:
        r0.complete(" Before the crash", session="crash", **GREEDY)
        before = r0.export_memory("crash")
        turns_before = json.loads(r0.memory_headers("crash")["x-newllm-session-turns"])

    outcome: dict[str, Any] = {}

    def long_turn() -> None:
        body = {"model": "tiny-infini", "prompt": list(range(1, 256)) * 60, "max_tokens": 4096,
                "temperature": 0, "metadata": {"session_id": "crash"}}
        try:
            r = httpx.post(victim.url + "/v1/completions", json=body, timeout=120)
            outcome["status"] = r.status_code
        except httpx.HTTPError as e:
            outcome["error"] = e

    caller = threading.Thread(target=long_turn)
    caller.start()
    deadline = time.monotonic() + 60
    while redis.get("newllm:running:crash") is None:  # the victim's worker runs the turn
        assert time.monotonic() < deadline, "the long turn never started"
        time.sleep(0.005)
    os.killpg(victim.process.pid, signal.SIGKILL)
    caller.join(60)
    assert "error" in outcome, outcome  # the turn failed: the connection was cut
    assert redis.pttl("newllm:lease:crash") > 0  # the dead replica's lease, expiring

    with cluster["r0"].client(max_retries=3) as r0:
        assert r0.export_memory("crash") == before  # nothing of the failed turn
        t0 = time.monotonic()
        after = r0.complete(" After the crash", session="crash", **GREEDY)
        assert time.monotonic() - t0 < LEASE_S + 10  # waited for the lease, no longer
        assert after.session is not None and after.session.turns == turns_before + 1
