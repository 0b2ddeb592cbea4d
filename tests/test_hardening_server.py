"""Hardening against one live server (tiny-infini on a free loopback port, API key, small
limits): hostile memory uploads, hypothesis-generated requests on every route with and without
the key, session ids that try to leave the session dir, oversized bodies refused before they are
read, and the loopback default bind. Longer runs: scripts/fuzz_api.py, scripts/fuzz_memory.py.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from test_hardening_memory import KNOWN_BUGS, load_script
from test_server import KEY, MODEL, ServerProcess

from newllm.checkpoint import load_checkpoint
from server.cli import build_parser
from server.settings import ServerSettings

fuzz_api = load_script("fuzz_api")
fuzz_memory = load_script("fuzz_memory")
MEMORY_LIMIT = 256 << 10  # --max-memory-bytes of the server below
REQUEST_LIMIT = 64 << 10  # --max-request-bytes
API_CASES = 200
MEMORY_CASES = 30
SERVER_KNOWN_BUGS: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("hardening")
    srv = ServerProcess(root / "sessions", "--max-tokens-limit", "8",
                        "--max-request-bytes", "64KiB", "--max-memory-bytes", "256KiB")
    try:
        yield srv.wait_ready()
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Any:
    with server.http() as client:
        yield client


def make_session(http: httpx.Client, sid: str) -> bytes:
    """A session with a few turns; returns its memory file."""
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "remember me"}],
        "max_tokens": 4, "metadata": {"session_id": sid}})
    assert r.status_code == 200, r.text
    return http.get(f"/v1/sessions/{sid}/memory").content


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but server logs, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".log")}


def assert_json_error(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["code"]
    return error


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# memory uploads ----------------------------------------------------------------------------
def test_hostile_memory_uploads_get_4xx_and_change_nothing(server: ServerProcess,
                                                           http: httpx.Client) -> None:
    model, tokenizer = load_checkpoint(MODEL)
    model.eval()
    good = make_session(http, "victim-mem")
    reference = fuzz_memory.load_memory(good, model)
    cases = [c for c in fuzz_memory.hostile_files(
        good, others=fuzz_memory.foreign_files(model.fingerprint())[::4], seed=1, flips=24)
        if not c.may_load and c.name not in KNOWN_BUGS]
    cases += [c for c in fuzz_memory.hostile_session_metadata(good)
              if c.name not in SERVER_KNOWN_BUGS]
    chosen = fuzz_memory.sample(cases, MEMORY_CASES, seed=1)
    assert len({c.category for c in chosen}) >= 12
    before = files(server.session_dir.parent)
    for case in chosen:
        if case.category == "session-meta":
            expected = "bad_metadata"  # load_memory accepts the tensors; the transcript is bad
        else:
            local = fuzz_memory.run_case(case, model, reference, tokenizer_hash=tokenizer.sha256,
                                         max_bytes=MEMORY_LIMIT)
            assert local.result == "refused", (case.name, local.detail)
            expected = local.detail
        for sid in ("victim-mem", "fresh-mem"):
            r = http.put(f"/v1/sessions/{sid}/memory", content=case.data)
            error = assert_json_error(r, 400, 413)
            if len(case.data) > MEMORY_LIMIT:
                assert r.status_code == 413, case.name
            else:
                assert error["code"] == expected, (case.name, error)
    assert files(server.session_dir.parent) == before  # victim byte-identical, nothing new
    assert http.get("/health").status_code == 200


# API fuzzing -------------------------------------------------------------------------------
def test_generated_requests_get_no_5xx_and_json_errors(server: ServerProcess,
                                                       http: httpx.Client) -> None:
    victim = make_session(http, "victim-api")
    seen: dict[int, int] = {}
    bare = httpx.Client(base_url=server.url, timeout=60, trust_env=False)  # no default key

    @seed(20261125)
    @settings(max_examples=API_CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_api.calls(MODEL))
    def one(call: Any) -> None:
        r = bare.request(call.method, call.path, content=call.body, headers=call.headers(KEY))
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        found = fuzz_api.problems(call, r.status_code, r.headers.get("content-type", ""),
                                  r.text, KEY)
        assert not found, f"{found}: {fuzz_api.describe(call)} -> {r.text[:300]}"

    with bare:
        one()
    assert sum(seen.values()) >= API_CASES
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= 20 and seen.get(401, 0) >= 20, seen
    assert http.get("/health").status_code == 200
    assert (server.session_dir / "victim-api.safetensors").read_bytes() == victim
    # greedy: sampled, the tiny model ends with EOS after one token about once in 250 runs
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "still here",
                                           "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# access ------------------------------------------------------------------------------------
# the chat page, "/" and "/static/*", needs no key; it and "//health" (which httpx sends as
# "/") are checked in tests/test_web.py
ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", f"/v1/models/{MODEL}"), ("GET", "/v1/sessions"),
          ("GET", "/v1/sessions/victim-key/memory"), ("PUT", "/v1/sessions/nobody/memory"),
          ("DELETE", "/v1/sessions/nobody"), ("GET", "/metrics"), ("GET", "/info"),
          ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/shutdown"),
          ("GET", "/no/such/route"), ("OPTIONS", "/v1/chat/completions"),
          ("HEAD", "/v1/sessions"), ("GET", "/health/")]
BAD_AUTH = [{}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": "Bearer"},
            {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
            {"X-API-Key": "wrong-key-000"}, {"Authorization": f"Bearer{KEY}"}]


def test_every_route_but_health_needs_the_key(server: ServerProcess,
                                              http: httpx.Client) -> None:
    victim = make_session(http, "victim-key")
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as anon:
        for method, path in ROUTES:
            for headers in BAD_AUTH:
                for url in (path, path + f"?api_key={KEY}"):  # a key in the query is no key
                    r = anon.request(method, url, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, url, headers, r.status_code)
                    assert r.headers.get("www-authenticate") == "Bearer"
                    if method != "HEAD":
                        assert r.json()["error"]["code"] == "invalid_api_key"
            with_key = anon.request(method, path, content=b"{}",
                                    headers={"Authorization": f"Bearer {KEY}"})
            assert with_key.status_code != 401, (method, path)  # the key was what was missing
        assert anon.get("/health").status_code == 200
        assert anon.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert (server.session_dir / "victim-key.safetensors").read_bytes() == victim


def raw_request(port: int, method: str, target: bytes, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (no client normalises it)."""
    head = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: 127.0.0.1",
            f"Authorization: Bearer {KEY}".encode(), b"Connection: close",
            f"Content-Length: {len(body)}".encode()]
    head += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_session_ids_cannot_escape_the_session_dir(server: ServerProcess,
                                                   http: httpx.Client) -> None:
    root = server.session_dir.parent
    good = make_session(http, "victim-escape")
    (root / "outside.safetensors").write_bytes(good)
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "x.safetensors").write_bytes(good)
    before = files(root)
    ids = ["../outside", "../../outside", "..", ".", "", "/" + str(root / "outside"),
           str(root / "abs"), "../sub/x", "..\\outside", "a\0b", "x" * 129, "x" * 5000,
           ".hidden", "sub/x", "%2e%2e/outside", "..%2Foutside", " victim-escape",
           "victim-escape ", "victim-escape\n", "\u2025/outside", "victim-escape/."]
    raw_only = [b"/v1/sessions/../outside/memory", b"/v1/sessions/%2e%2e/memory",
                b"/v1/sessions/%2E%2E%2Foutside/memory", b"/v1/sessions/..%2f..%2foutside/memory",
                b"/v1/sessions/a%00b/memory", b"/v1/sessions/%252e%252e/memory",
                b"/v1/sessions/a\x00b/memory", b"/v1/sessions/./memory",
                b"/v1/sessions/" + str(root / "abs").encode() + b"/memory"]
    targets = [b"/v1/sessions/" + quote(i, safe="").encode() + b"/memory" for i in ids]
    targets += [b"/v1/sessions/" + i.encode("utf-8", "replace") + b"/memory" for i in ids
                if "\0" not in i and "\n" not in i and " " not in i]
    for target in targets + raw_only:
        for method, body in (("PUT", good), ("GET", b""), ("DELETE", b"")):
            path = target.removesuffix(b"/memory") if method == "DELETE" else target
            status, _ = raw_request(server.port, method, path, body)
            assert 300 <= status < 500, (method, path, status)
    for sid in ids:
        for route, payload in (("/v1/chat/completions", {"messages": [
                {"role": "user", "content": "x"}]}), ("/v1/completions", {"prompt": "x"})):
            r = http.post(route, json={"model": MODEL, "max_tokens": 1, **payload,
                                       "metadata": {"session_id": sid}})
            assert assert_json_error(r, 400)["code"] == "invalid_session_id", (sid, r.text)
    assert files(root) == before


def read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (status line, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_huge_content_length_is_refused_before_the_body(server: ServerProcess) -> None:
    """A Content-Length of a terabyte with ten bytes sent: the answer comes at once (waiting
    for the body would hang until the socket timeout, and fail)."""
    for method, path, limit in (("PUT", b"/v1/sessions/big/memory", MEMORY_LIMIT),
                                ("POST", b"/v1/chat/completions", REQUEST_LIMIT)):
        head = (f"{method} ".encode() + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {10**12}\r\n\r\n".encode())
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(head + b"0123456789")
            data = read_response(s)
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_too_large" and str(limit) in error["message"]
    assert not (server.session_dir / "big.safetensors").exists()


def send_chunked_until_answered(port: int, method: str, path: str,
                                planned: int) -> tuple[int, bytes]:
    """Stream a chunked body of up to ``planned`` bytes, stopping as soon as the server
    answers (or stops reading); returns (bytes sent, what the server said, b"" if it reset)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    frame = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    sent, pending = 0, b""
    s.setblocking(False)
    try:
        while sent < planned:
            readable, writable, _ = select.select([s], [s], [], 10)
            if readable or not writable:
                break  # an answer, or the server neither reads nor answers for 10 s
            if not pending:
                pending, sent = frame, sent + 0x10000
            pending = pending[s.send(pending):]
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(30)
    try:
        answer = s.recv(65536)
    except (ConnectionResetError, TimeoutError):
        answer = b""  # the server closed with our unread body: the kernel sent a reset
    s.close()
    return sent, answer


@pytest.mark.parametrize("method,path,route,limit", [
    ("PUT", "/v1/sessions/big/memory", "/v1/sessions/{id}/memory", MEMORY_LIMIT),
    ("POST", "/v1/completions", "/v1/completions", REQUEST_LIMIT)])
def test_a_chunked_body_over_the_limit_is_cut_off(server: ServerProcess, http: httpx.Client,
                                                  method: str, path: str, route: str,
                                                  limit: int) -> None:
    name = f'newllm_requests_total{{route="{route}",status="413"}}'
    refused = metric(http, name)
    planned = 256 << 20
    sent, answer = send_chunked_until_answered(server.port, method, path, planned)
    assert sent < planned // 4, f"the server read {sent} bytes of a body over {limit}"
    if answer:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    deadline = time.monotonic() + 30
    while metric(http, name) < refused + 1:  # counted once the 413 was sent
        assert time.monotonic() < deadline, "no 413 was counted"
        time.sleep(0.1)
    assert not (server.session_dir / "big.safetensors").exists()
    assert not list(server.session_dir.glob(".upload.*.tmp"))  # the cut-off upload's temp file
    assert http.get("/health").status_code == 200


def test_the_server_binds_loopback_by_default(server: ServerProcess) -> None:
    assert ServerSettings().host == "127.0.0.1"
    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert "--host" not in server.proc.args  # the fixture's server runs with the default
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if int(port, 16) == server.port and state == "0A":  # LISTEN
                listening.append(address)
    assert listening and set(listening) == {"0100007F"}, listening  # 127.0.0.1 only


# once-found bugs ----------------------------------------------------------------------------------
def test_deeply_nested_metadata_uploads_get_400(server: ServerProcess,
                                                http: httpx.Client) -> None:
    good = make_session(http, "victim-deep")
    cases = [c for c in fuzz_memory.hostile_session_metadata(good)
             if c.name == "session-meta:lengths-deep"]
    cases += [c for c in fuzz_memory.hostile_files(good, flips=0)
              if c.name.startswith("meta:layer_kinds='[[[[")]
    assert len(cases) == 2
    statuses = []
    for case in cases:  # a fresh connection each: the server closes one after a 500
        with server.http() as client:
            statuses.append(client.put("/v1/sessions/victim-deep/memory",
                                       content=case.data).status_code)
    assert statuses == [400, 400], statuses


# round 2 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
    {"model": MODEL, "messages": [{"role": "system", "content": "a\udfffb"},
                                  {"role": "user", "content": "hi"}], "max_tokens": 2},
    {"model": MODEL, "messages": [{"role": "user",
                                   "content": [{"type": "text", "text": "\udc00"}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud801"]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
     "metadata": {"\ud800": "x"}},
])
def test_lone_surrogates_get_400_not_500(http: httpx.Client, body: dict[str, Any]) -> None:
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as a \\ud800 escape
    for path in ("/v1/chat/completions", "/v1/completions"):
        if path == "/v1/completions":
            raw = raw.replace('"messages"', '"prompt": "\\ud800", "ignored"')
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_text"


def test_deeply_nested_json_gets_400(http: httpx.Client) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = http.post(path, content=b"[" * 30_000 + b"]" * 30_000,  # under the 64 KiB limit
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_head_health_and_no_redirect_built_from_the_host_header(server: ServerProcess,
                                                                http: httpx.Client) -> None:
    r = httpx.head(server.url + "/health", trust_env=False)
    assert r.status_code == 200 and r.content == b""
    assert http.head("/v1/models").status_code == 200
    for path in ("/metrics/", "/v1/sessions/"):  # were 307 to http://evil.example/...
        r = http.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code in (404, 405) and "location" not in r.headers, (path, r.headers)
        assert r.json()["error"]["code"] in ("not_found", "method_not_allowed")


def test_an_upload_claiming_more_turns_than_it_has_is_refused(http: httpx.Client) -> None:
    from safetensors.torch import load as st_load

    from newllm.memory_file import metadata_sha256, serialize

    data = make_session(http, "turns-real")
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    meta["session.turns"] = "1000000"
    meta["metadata_sha256"] = metadata_sha256(meta)
    forged = serialize(st_load(data), meta)
    r = http.put("/v1/sessions/turns-forged/memory", content=forged)
    assert r.status_code == 400 and "turns" in r.json()["error"]["message"], r.text
    listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
    assert "turns-forged" not in listed and listed["turns-real"]["turns"] == 1


def _peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_parallel_uploads_keep_the_http_process_memory_bounded(tmp_path: Path) -> None:
    """8 parallel 100 MB uploads: at most --max-uploads (2) are received at once, each streamed
    to a temp file; the others get 429 with Retry-After. No server process's peak memory grows
    by more than 350 MiB (before: each upload was held whole, ~850 MiB of growth here)."""
    import threading

    from test_server import descendants

    srv = ServerProcess(tmp_path / "s", "--max-memory-bytes", "128MiB", "--max-uploads", "2")
    try:
        srv.wait_ready()
        family = descendants(srv.proc.pid) | {srv.proc.pid}
        before = {p: _peak_rss_mib(p) for p in family}
        body = b"\0" * (100 << 20)  # not a memory file: refused after it is received
        answers: list[httpx.Response] = []

        def upload(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=300, trust_env=False,
                              headers={"Authorization": f"Bearer {KEY}"}) as h:
                answers.append(h.put(f"/v1/sessions/u{i}/memory", content=body))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {400, 429} and 400 in codes and 429 in codes, codes
        busy = [r for r in answers if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and
                   r.json()["error"]["code"] == "too_many_uploads" for r in busy)
        growth = {p: _peak_rss_mib(p) - before[p] for p in family}
        assert max(growth.values()) < 350, growth
        assert not list((tmp_path / "s").glob(".*.tmp"))  # temp files removed
    finally:
        srv.kill()
