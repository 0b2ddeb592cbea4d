"""The Redis session store against a real redis-server (started on a free loopback port in a
temp folder for this module; skipped with the reason where redis-server is not installed, and a
failure in CI, which installs it).

Leases, the compare-and-set write, eviction, expiry, cancel flags across store instances (as
across replicas), Redis going away and coming back, and the start-up warnings."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.live import RedisProcess, free_port, start_redis, stop_redis
from server.redis_store import RedisStore, check_url, shown_url
from server.store import FolderStore, StoreFull, StoreWriteError


def memory_file(position: int, turns: int = 1, payload: bytes = b"x") -> bytes:
    """A small safetensors file with the metadata keys the store reads."""
    import torch
    from safetensors.torch import save

    return save({"t": torch.tensor(list(payload), dtype=torch.uint8)},
                metadata={"position": str(position), "session.turns": str(turns),
                          "session.kind": "chat"})


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    if redis_server.process.poll() is not None:  # a test stopped it: start it again there
        fresh = start_redis(redis_server.folder, port=redis_server.port)
        redis_server.process = fresh.process
    redis_server.client().flushdb()
    return redis_server.url


def test_sessions_round_trip_and_list_like_the_folder_store(redis_url: str,
                                                           tmp_path: Path) -> None:
    redis, folder = RedisStore(redis_url), FolderStore(tmp_path / "f")
    folder.prepare()
    redis.prepare()
    data = {"a": memory_file(10, 1, b"aa"), "b": memory_file(25, 3, b"bbb")}
    for store in (redis, folder):
        locks = store.locks()
        for sid, blob in data.items():
            assert locks.try_acquire(sid)
            assert not store.exists(sid)
            assert store.write(sid, blob, locks) == []
            locks.release(sid)
            time.sleep(0.01)  # "b" is the most recently used
    for sid, blob in data.items():
        assert redis.read(sid) == folder.read(sid) == blob  # the same bytes in both kinds
        assert redis.metadata(sid) == folder.metadata(sid)
        assert redis.size(sid) == folder.size(sid) == len(blob)
    want = [(i.id, i.tokens_seen, i.bytes, i.kind, i.turns) for i in folder.list()]
    assert [(i.id, i.tokens_seen, i.bytes, i.kind, i.turns) for i in redis.list()] == want
    assert want[0][:2] == ("b", 25)
    assert redis.total_bytes() == folder.total_bytes() == (2, sum(map(len, data.values())))
    assert redis.read("nobody") is None and redis.metadata("nobody") is None
    # another instance (another replica) sees the same store, and the store id
    other = pickle.loads(pickle.dumps(redis))
    assert other.ids() == ["a", "b"] and other.store_id() == redis.store_id()
    assert redis.store_id() != folder.store_id()
    locks = other.locks()
    assert locks.try_acquire("a")
    assert other.delete("a", locks) and not other.delete("a", locks)
    locks.release("a")
    assert redis.ids() == ["b"]


def test_a_lease_is_exclusive_across_instances_and_a_stale_writer_is_refused(
        redis_url: str) -> None:
    one, two = RedisStore(redis_url, lease_s=0.3), RedisStore(redis_url, lease_s=0.3)
    a, b = one.locks(), two.locks()
    assert a.try_acquire("s")
    assert not a.try_acquire("s")  # not even the holder twice
    assert not b.try_acquire("s") and not b.acquire("s", timeout=0.1)
    one.write("s", memory_file(1), a)
    one.write("s", memory_file(2), a)  # a second write under the same lease
    a.release("s")
    assert b.try_acquire("s")
    b.release("s")

    # a holder that stalls past its lease: another takes the session and writes it
    assert a.try_acquire("s")
    time.sleep(0.4)
    assert a.renew() == ["s"]  # the lease was lost, and renewing says so
    assert b.try_acquire("s")
    two.write("s", memory_file(3), b)
    b.release("s")
    with pytest.raises(StoreWriteError) as lost:
        one.write("s", memory_file(99), a)
    assert (lost.value.status, lost.value.code) == (409, "session_lease_lost")
    assert one.metadata("s")["position"] == "3"  # the stale turn applied nothing

    # a valid lease, but someone wrote the session past the leases: compare-and-set refuses
    a.release("s")
    assert a.try_acquire("s")
    raw = one.client()
    raw.hset(one.key("s", "s"), "version", 10**9)
    with pytest.raises(StoreWriteError) as moved:
        one.write("s", memory_file(4), a)
    assert (moved.value.status, moved.value.code) == (409, "session_conflict")
    a.release("s")


def test_renewal_keeps_a_long_turns_lease(redis_url: str) -> None:
    store = RedisStore(redis_url, lease_s=0.3)
    locks, other = store.locks(), store.locks()
    assert locks.try_acquire("long")
    for _ in range(6):  # 0.6 s: twice the lease, renewed as the engine's loop does
        time.sleep(0.1)
        assert locks.renew() == []
    assert not other.try_acquire("long")
    store.write("long", memory_file(5), locks)
    locks.release("long")


def test_max_sessions_evicts_the_least_recently_used_idle_session(redis_url: str) -> None:
    store = RedisStore(redis_url, max_sessions=2)
    locks = store.locks()
    for sid in ("old", "mid"):
        assert locks.try_acquire(sid)
        store.write(sid, memory_file(1), locks)
        locks.release(sid)
        time.sleep(0.01)
    busy = store.locks()
    assert busy.try_acquire("old")  # "old" runs a turn elsewhere: not idle
    assert locks.try_acquire("new")
    assert store.write("new", memory_file(1), locks) == ["mid"]
    locks.release("new")
    assert sorted(store.ids()) == ["new", "old"]
    assert busy.try_acquire("new")  # both busy: a third is refused, nothing written
    assert locks.try_acquire("third")
    with pytest.raises(StoreFull):
        store.check_room("third", locks)
    with pytest.raises(StoreFull):
        store.write("third", memory_file(1), locks)
    assert sorted(store.ids()) == ["new", "old"]
    busy.release_all()
    locks.release_all()


def test_session_ttl_expires_idle_sessions(redis_url: str, tmp_path: Path) -> None:
    for store in (RedisStore(redis_url, ttl_s=0.3), FolderStore(tmp_path, ttl_s=0.3)):
        store.prepare()
        locks = store.locks()
        assert locks.try_acquire("brief")
        store.write("brief", memory_file(1), locks)
        locks.release("brief")
        assert [i.id for i in store.list()] == ["brief"]
        time.sleep(0.5)
        assert store.list() == []
        assert store.read("brief") is None


def test_cancel_flags_and_running_turns_are_seen_by_other_replicas(redis_url: str) -> None:
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    uid, other = "a" * 32, "b" * 32
    one.mark_running("s", uid)
    assert two.running("s") == uid
    two.cancel(uid, "deleted")
    assert one.cancelled(uid) and one.cancelled_many([uid, other]) == {uid}
    assert one.cancel_reason(uid) == "deleted"
    one.clear_cancel(uid)
    one.clear_running("s", other)  # not its turn: left alone
    assert two.running("s") == uid
    one.clear_running("s", uid)
    assert two.running("s") is None and not two.cancelled(uid)


def test_redis_down_is_a_503_at_once_and_the_store_recovers(
        redis_server: RedisProcess, redis_url: str) -> None:
    store = RedisStore(redis_url)
    locks = store.locks()
    assert locks.try_acquire("s")
    store.write("s", memory_file(7), locks)
    locks.release("s")
    stop_redis(redis_server)
    t0 = time.monotonic()
    for call in (lambda: store.read("s"), store.list, lambda: locks.try_acquire("s")):
        with pytest.raises(StoreWriteError) as down:
            call()
        assert (down.value.status, down.value.code) == (503, "session_store_unavailable")
    assert time.monotonic() - t0 < 10  # refused, not hung
    with pytest.raises(RuntimeError, match="unavailable"):
        RedisStore(redis_url).prepare()  # a server does not start on an unreachable store
    fresh = start_redis(redis_server.folder, port=redis_server.port)  # AOF: the data is back
    redis_server.process = fresh.process
    assert store.metadata("s")["position"] == "7"  # the same store object works again


def test_start_up_warns_about_settings_that_lose_sessions(
        redis_server: RedisProcess, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    client = redis_server.client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("appendonly", "no")
    try:
        with caplog.at_level(logging.WARNING, logger="newllm.server"):
            RedisStore(redis_url).prepare()
        text = caplog.text
        assert "maxmemory-policy is 'allkeys-lru'" in text
        assert "no persistence" in text
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("appendonly", "yes")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="newllm.server"):
        RedisStore(redis_url).prepare()
    assert caplog.text == ""


def test_urls_are_checked_and_passwords_never_shown() -> None:
    check_url("redis://127.0.0.1:6379/0")
    check_url("rediss://:pw@cache.internal:6380/2")
    for bad, why in [("http://x:1/0", "redis:// or rediss://"), ("redis:///0", "no host"),
                     ("redis://h:1/db", "must be a number"), ("redis://h:99999/0", "Port")]:
        with pytest.raises(ValueError, match=why):
            check_url(bad)
    assert shown_url("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"
    with pytest.raises(ValueError) as e:
        check_url("http://:secret@h:1/0")
    assert "secret" not in str(e.value)


def test_serve_refuses_a_bad_store_url_and_an_unreachable_redis() -> None:
    """``newllm serve`` names the problem: a URL it cannot use (exit 2, before loading
    anything) and a Redis that does not answer (exit 1, nothing served)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    base = [sys.executable, "-m", "server", "--checkpoint", "tiny-infini", "--port",
            str(free_port())]
    bad = subprocess.run([*base, "--session-store", "redis://h:1/db"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "the database must be a number" in bad.stderr
    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = subprocess.run([*base, "--session-store", closed], capture_output=True, text=True,
                          timeout=120, env=env)
    assert down.returncode == 1
    assert "cannot start" in down.stderr and "is unavailable" in down.stderr
    assert closed.removesuffix("/0") in down.stderr  # which Redis
