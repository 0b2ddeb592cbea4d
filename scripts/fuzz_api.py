"""API fuzzing: hypothesis-generated requests against a running newllm server.

Every request is a `Call` (method, path, auth, body) drawn by `calls(model)`: request bodies for
``/v1/chat/completions`` and ``/v1/completions`` (mostly plausible fields with wrong types,
huge numbers, NaN, unicode, missing and unknown fields mixed in; or a JSON value that is not an
object; or bytes that are not JSON), the session and memory routes with odd session ids and junk
uploads, and the other routes; with the right key, none, a wrong one or a malformed header.
`problems(call, response, key)` lists what is wrong with an answer: any 5xx, an error that is
not ``{"error": {"message": ..., "code": ...}}`` JSON, a request without the key that was not
refused with 401, a 200 that is not a completion, a stream that does not end properly.

    python scripts/fuzz_api.py --url http://127.0.0.1:8000 --key KEY --cases 2000 --seed 1

The server should serve a tiny model with a small ``--max-tokens-limit`` (e.g. 8), so valid
requests are quick. The run ends with a health check and prints a tally by route and status.
``tests/test_hardening_server.py`` runs a bounded number of these cases.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

# session ids that try to leave the session dir, or are just odd; never "fz-victim"
ODD_IDS = ["", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "..\\x", "a/b", "a\0b",
           "x" * 129, "x" * 5000, ".hidden", "-lead", "a b", "ü", "🙂", "nul", "CON",
           "fz-1", "fz-2", "fz.3_ok", "A" * 128, "%2e%2e", "a\nb", "\ud800"]
AUTH = ["key"] * 6 + ["x-api-key", "none", "wrong", "empty", "basic", "prefix"]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    auth: str  # one of AUTH
    body: bytes | None = None
    json_body: Any = None  # what body encodes, when it is JSON (for reporting)
    stream: bool = False

    def headers(self, key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"} if self.body is not None else {}
        if key is None or self.auth == "none":
            return h
        token = {"key": key, "wrong": key[::-1] + "x", "empty": "", "prefix": key[:-1],
                 "basic": key, "x-api-key": key}[self.auth]
        if self.auth == "x-api-key":
            h["X-API-Key"] = token
        elif self.auth == "basic":
            h["Authorization"] = f"Basic {token}"
        else:
            h["Authorization"] = f"Bearer {token}".rstrip()
        return h

    def authorised(self) -> bool:
        return self.auth in ("key", "x-api-key")


# strategies --------------------------------------------------------------------------------
_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80)
            | st.floats() | st.text(max_size=40))
json_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=10)
session_ids = st.sampled_from(ODD_IDS) | st.text(max_size=30)


def _either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes any JSON value."""
    return st.one_of(valid, valid, valid, json_values)


_text = st.text(max_size=60)
_metadata = st.dictionaries(
    st.sampled_from(["session_id", "session_id", "reset_session", "session_input"])
    | st.text(max_size=10),
    st.one_of(session_ids, st.sampled_from(["true", "false", "TRUE", "auto", "new", "full",
                                            "x"]), json_values), max_size=4)
_common = {
    "max_tokens": _either(st.integers(-2, 10) | st.integers(0, 2**70)),
    "temperature": _either(st.floats(-1, 3) | st.just(math.nan) | st.just(math.inf)),
    "top_p": _either(st.floats(-0.5, 1.5)),
    "top_k": _either(st.integers(-1, 600) | st.integers(0, 2**66)),
    "n": _either(st.integers(-1, 20)),
    "stream": _either(st.booleans()),
    "stream_options": _either(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": _either(_text | st.lists(st.text(max_size=6), max_size=20)),
    "seed": _either(st.integers() | st.integers(-2**70, 2**70)),
    "metadata": _either(_metadata),
    "user": _either(_text),
    "presence_penalty": _either(st.floats(-2, 2)),
    "logit_bias": _either(st.dictionaries(st.text(max_size=4), st.floats(-5, 5), max_size=2)),
}
_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": _text})
_message = st.fixed_dictionaries(
    {"role": _either(st.sampled_from(["system", "developer", "user", "assistant", "tool",
                                      "robot"]))},
    optional={"content": _either(_text | st.lists(_part, max_size=3) | st.none()),
              "name": _either(_text), "tool_calls": json_values})


_valid_common = {
    "max_tokens": st.integers(0, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
    "seed": st.integers(-2**63, 2**63 - 1), "stream": st.booleans(),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "n": st.integers(1, 3),
    "metadata": st.fixed_dictionaries(
        {"session_id": st.sampled_from(["fz-1", "fz-2", "fz.3_ok", "A" * 128])},
        optional={"reset_session": st.sampled_from(["true", "false"]),
                  "session_input": st.sampled_from(["auto", "new", "full"])}),
}


def _body(required: dict[str, Any], valid_required: dict[str, Any], extra: dict[str, Any],
          valid_extra: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A valid body, a valid body with one field broken or dropped, or anything at all."""
    valid = st.fixed_dictionaries(valid_required, optional={**_valid_common, **valid_extra})
    names = sorted({*required, *_common, *extra} - {"model_"})

    @st.composite
    def one_bad(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(draw(valid))
        name = draw(st.sampled_from(names) | st.text(max_size=12))
        if name in body and draw(st.booleans()):
            del body[name]
        else:
            body[name] = draw(json_values)
        return body

    anything = st.fixed_dictionaries({}, optional={**required, **_common, **extra})
    anything = st.tuples(anything, st.dictionaries(st.text(max_size=12), json_values,
                                                   max_size=2)).map(lambda t: {**t[1], **t[0]})
    return st.one_of(valid, valid, valid, one_bad(), one_bad(), anything, json_values)


def chat_bodies(model: str) -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                     "content": st.text(max_size=40)})
    return _body({"model": _either(st.just(model)), "model_": st.just(model),
                  "messages": _either(st.lists(_message, max_size=3))},
                 {"model": st.just(model), "messages": st.lists(message, min_size=1,
                                                                max_size=3)},
                 {"logprobs": _either(st.booleans()), "top_logprobs": _either(st.integers(-1, 30)),
                  "max_completion_tokens": _either(st.integers(-1, 10)),
                  "response_format": _either(st.fixed_dictionaries({"type": _text})),
                  "tools": json_values, "tool_choice": json_values},
                 {"logprobs": st.just(True), "top_logprobs": st.integers(0, 3)})


def completion_bodies(model: str) -> st.SearchStrategy[Any]:
    prompts = (_text | st.lists(_text, max_size=3) | st.lists(st.integers(-3, 600), max_size=8)
               | st.lists(st.lists(st.integers(-1, 600), max_size=5), max_size=3))
    valid_prompts = (st.text(max_size=40) | st.lists(st.integers(0, 256), min_size=1,
                                                     max_size=8))
    return _body({"model": _either(st.just(model)), "prompt": _either(prompts)},
                 {"model": st.just(model), "prompt": valid_prompts},
                 {"logprobs": _either(st.integers(-1, 8)), "echo": _either(st.booleans()),
                  "best_of": _either(st.integers(0, 3)), "suffix": json_values},
                 {"logprobs": st.integers(0, 3), "echo": st.booleans()})


def _encode(body: Any) -> bytes:
    if isinstance(body, dict):  # "model_" stands for "model" when "model" is drawn missing
        body = {("model" if k == "model_" and "model" not in body else k): v
                for k, v in body.items()}
    return json.dumps(body).encode()  # NaN / Infinity kept: Python's loads accepts them


def _path_id(sid: str) -> str:
    return quote(sid.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def calls(draw: st.DrawFn, model: str) -> Call:
    auth = draw(st.sampled_from(AUTH))
    route = draw(st.sampled_from(["chat"] * 8 + ["completions"] * 7 + ["put", "get", "delete",
                                                                      "list", "other", "raw"]))
    if route in ("chat", "completions"):
        body = draw(chat_bodies(model) if route == "chat" else completion_bodies(model))
        data = _encode(body)
        path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        stream = isinstance(body, dict) and body.get("stream") is True
        return Call("POST", path, auth, data, body, stream)
    if route == "raw":  # bytes that are not a JSON document
        data = draw(st.binary(max_size=64) | st.just(b'{"model": ') | st.just(b"\xff\xfe{}"))
        return Call("POST", draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"])),
                    auth, data)
    sid = _path_id(draw(session_ids))
    if route == "put":
        data = draw(st.binary(max_size=256) | st.just(b"") | st.builds(_encode, json_values))
        return Call("PUT", f"/v1/sessions/{sid}/memory", auth, data)
    if route == "get":
        return Call("GET", f"/v1/sessions/{sid}/memory", auth)
    if route == "delete":
        return Call("DELETE", f"/v1/sessions/{sid}", auth)
    if route == "list":
        return Call("GET", "/v1/sessions", auth)
    method, path = draw(st.sampled_from([
        ("GET", "/v1/models"), ("GET", f"/v1/models/{_path_id(model)}"),
        ("GET", "/v1/models/" + sid), ("GET", "/metrics"), ("GET", "/info"), ("GET", "/"),
        ("GET", "/health"), ("POST", "/v1/models"), ("PATCH", "/v1/sessions"),
        ("GET", "/v1/embeddings"), ("POST", "/shutdown"), ("GET", "/openapi.json")]))
    return Call(method, path, auth)


# checks ------------------------------------------------------------------------------------
def _error_ok(status: int, text: str) -> str | None:
    try:
        error = json.loads(text)["error"]
        if not (isinstance(error["message"], str) and error["message"]
                and isinstance(error["code"], str)):
            return "error without message/code"
    except (ValueError, KeyError, TypeError):
        return f"{status} without a JSON error body"
    return None


def problems(call: Call, status: int, content_type: str, text: str,
             key: str | None) -> list[str]:
    """What is wrong with the answer ``status``/``text`` to ``call`` (empty: nothing)."""
    out = []
    if status >= 500:
        out.append(f"{status} server error")
    if key is not None and not call.authorised() and call.path != "/health" and status != 401:
        out.append(f"{status} without a valid key (expected 401)")
    if status >= 400:
        why = _error_ok(status, text)
        if why:
            out.append(why)
    elif call.path in ("/v1/chat/completions", "/v1/completions"):
        if call.stream:
            if not content_type.startswith("text/event-stream"):
                out.append("a stream that is not text/event-stream")
            events = [e for e in text.split("\n\n") if e.strip()]
            if not events or not (events[-1] == "data: [DONE]" or '"error"' in events[-1]):
                out.append("a stream that does not end with [DONE] or an error event")
        else:
            try:
                choices = json.loads(text)["choices"]
                assert isinstance(choices, list) and choices
            except (ValueError, KeyError, TypeError, AssertionError):
                out.append("a 2xx completion without choices")
    return out


def describe(call: Call) -> str:
    body = call.body if call.body is None or len(call.body) < 300 else call.body[:300] + b"..."
    return f"{call.method} {call.path[:120]} auth={call.auth} body={body!r}"


def run(url: str, key: str | None, cases: int, seed: int, model: str) -> int:
    """Send ``cases`` generated calls; print failures and a tally; returns the failure count."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    tally: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    client = httpx.Client(base_url=url, timeout=120, trust_env=False)

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(calls(model))
    def one(call: Call) -> None:
        r = client.request(call.method, call.path, content=call.body,
                           headers=call.headers(key))
        tally[(call.path.split("/")[2] if call.path.startswith("/v1/") else call.path,
               r.status_code)] += 1
        for p in problems(call, r.status_code, r.headers.get("content-type", ""), r.text, key):
            failures.append(f"{p}: {describe(call)} -> {r.text[:300]}")

    one()
    healthy = client.get("/health").status_code == 200
    for f in failures:
        print("FAIL", f)
    for (route, status), count in sorted(tally.items()):
        print(f"{route:20s} {status} {count}")
    print(f"{sum(tally.values())} requests, {len(failures)} failures, "
          f"healthy at the end: {healthy}")
    return len(failures) + (not healthy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", help="the server's API key (omit if it has none)")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny-infini", help="the served model's id")
    args = parser.parse_args(argv)
    return 1 if run(args.url, args.key, args.cases, args.seed, args.model) else 0


if __name__ == "__main__":
    sys.exit(main())
