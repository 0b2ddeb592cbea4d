"""A bounded soak (scripts/soak.py for ~30 s): many sessions, mixed requests, one live server.

tiny-infini, 2 workers, batching on, 6 client threads, 24 session ids: chats (streamed or
not), completions, resets, stateless requests, exports, imports of exported files into other
sessions, deletes and listings. At the end every request succeeded, every session file loads
and holds the turns the clients sent, the server's memory did not grow past a bound after the
warm-up, and no file descriptors leaked. Longer runs: ``python scripts/soak.py --duration 600``.
"""

from __future__ import annotations

from test_hardening_memory import load_script

soak = load_script("soak")
MiB = 1 << 20


def test_soak_keeps_every_session_and_leaks_nothing() -> None:
    summary = soak.run(25, warmup=5, clients=6, sessions=24, max_tokens=12, seed=7,
                       workers=2, max_batch_size=4, sample_every=0.5)
    requests = summary["requests"]
    assert summary["errors"]["count"] == 0, summary["errors"]["first"]
    assert summary["problems"] == [], (summary["problems"], summary["server_log_tail"])
    # the mix really ran: every kind of request, and writes of every sort
    assert set(requests["by_kind"]) == set(soak.OPS), requests["by_kind"]
    for kind in ("chat", "completion", "export", "import", "delete"):
        assert requests["by_kind"][kind] >= 3, requests["by_kind"]
    sessions = summary["sessions"]
    assert sessions["loaded"] == sessions["expected"] == sessions["on_disk"] >= 5, sessions
    assert sessions["turns_total"] >= sessions["expected"]
    # memory and file descriptors after the warm-up (no client connected at either end)
    rss = summary["rss_mib"]
    assert rss["end"] - rss["start"] <= 0.05 * rss["start"] + 32, rss
    # files (sessions, locks, temp files) tightly; sockets loosely: a thread's first call
    # through a manager proxy opens a connection to LitServe's manager, an fd at each end; a
    # per-request leak would be hundreds
    fds = summary["fds"]
    assert fds["files_end"] <= fds["files_start"] + 2, fds
    assert fds["end"] <= fds["start"] + 16, fds
    assert summary["processes"]["end"] == summary["processes"]["start"]
