"""The OpenAPI document (`server.openapi`): every route in it with its methods, security, body
and errors; 405s carry ``Allow``; and schemathesis, run against a live tiny server with the
API key, finds no server error, undocumented status, wrong content type or body.

The live server answers at most 16 tokens per request (``--max-tokens-limit``) so that the
generation routes can be fuzzed like every other route in well under a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.live import LiveServer, running_servers
from newllm.checkpoint import load_checkpoint
from server.app import build_server
from server.openapi import OPERATIONS, document
from server.protocol import ChatRequest
from server.settings import ServerSettings

MODEL = "tiny-infini"
KEY = "openapi-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,unsupported_method,"
          "allow_header_conformance,missing_required_header,ignored_auth,use_after_free,"
          "ensure_resource_availability,negative_data_rejection")
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The FastAPI app of a server built in this process (nothing started)."""
    model, tokenizer = load_checkpoint(MODEL)
    settings = ServerSettings(checkpoint=MODEL, api_key=KEY,
                              session_dir=str(tmp_path_factory.mktemp("sessions")))
    return build_server(settings, model.eval(), tokenizer).app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(MODEL, {"s": 1}, folder=tmp_path_factory.mktemp("openapi"),
                         api_keys={"s": KEY},
                         extra={"s": ["--max-tokens-limit", "16",
                                      "--max-prompt-tokens", "512"]}) as s:
        yield s["s"]


def _routes(app: Any) -> set[tuple[str, str]]:
    """(METHOD, path as the document spells it) of every route the app serves in its schema."""
    out = set()
    for route in app.routes:
        if getattr(route, "include_in_schema", False) and hasattr(route, "methods"):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            out |= {(m, path) for m in route.methods}
    return out


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_route_is_documented_with_security_body_and_errors(app: Any) -> None:
    doc = document(app, MODEL)
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item
                  if m in HTTP_METHODS}
    served = _routes(app)
    assert served == documented == set(OPERATIONS), (served ^ set(OPERATIONS))
    assert len(served) >= 25
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for (method, path), op in OPERATIONS.items():
        operation = doc["paths"][path][method.lower()]
        where = f"{method} {path}"
        if path in ("/health", "/", "/static/{name}"):  # served without the key
            assert operation["security"] == [], where
            continue
        assert operation["security"] == [{"bearer": []}], where
        responses = operation["responses"]
        errors = {int(s) for s in responses if int(s) >= 400}
        assert 401 in errors and errors == set(op.errors), where
        for status in errors:
            assert _resolve(doc, responses[str(status)]["content"]["application/json"]["schema"]
                            )["required"] == ["error"], (where, status)
        assert any(200 <= int(s) < 300 for s in responses), where
        for p in re.findall(r"\{(\w+)\}", path):
            assert any(x["name"] == p and x["in"] == "path" and x["required"]
                       for x in operation["parameters"]), (where, p)
        if method in ("POST", "PUT"):
            assert "requestBody" in operation, where
            for media in operation["requestBody"]["content"].values():
                assert _resolve(doc, media["schema"]), where
        else:
            assert "requestBody" not in operation, where
    # the request bodies are the models the handlers parse with
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    schema = _resolve(doc, chat["requestBody"]["content"]["application/json"]["schema"])
    assert schema["required"] == ChatRequest.model_json_schema()["required"]
    assert schema["additionalProperties"] is False
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["requestBody"]["content"]["application/json"]["examples"]["chat"]["value"][
        "model"] == MODEL
    memory = "/v1/sessions/{session_id}/memory"
    assert set(doc["paths"][memory]["put"]["requestBody"]["content"]) == {
        "application/octet-stream"}
    assert set(doc["paths"][memory]["get"]["responses"]["200"]["content"]) == {
        "application/octet-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    health = doc["paths"]["/health"]["get"]["responses"]
    assert set(health) == {"200", "503"} and set(health["503"]["content"]) == {"text/plain"}
    assert set(doc["paths"]["/"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    for status in ("400", "401", "404", "409", "413", "422", "503"):
        assert status in chat["responses"], status
    # every $ref points at a schema the document has
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"])


def test_the_document_needs_the_key_and_405s_say_allow(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        doc = http.get("/openapi.json", headers=AUTH)
        assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.")
        assert doc.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path in ("/openapi.json", "/docs"):  # like the API it describes
            assert http.get(path).status_code == 401, path
        health = http.get("/health")
        assert health.status_code == 200 and health.headers["content-type"].startswith(
            "text/plain")
        for method, path, allow in [("PATCH", "/v1/sessions/abc/memory", "GET, HEAD, PUT"),
                                    ("POST", "/v1/models", "GET, HEAD"),
                                    ("GET", "/v1/chat/completions", "POST"),
                                    ("PUT", "/v1/conversations/conv_1", "DELETE, GET, HEAD, POST")]:
            r = http.request(method, path, headers=AUTH)
            assert r.status_code == 405, (method, path)
            assert r.headers["allow"] == allow, (method, path)
            assert r.json()["error"]["code"] == "method_not_allowed"
        assert http.request("PATCH", "/v1/sessions/abc/memory").status_code == 401  # key first
        assert http.head("/v1/models", headers=AUTH).status_code == 200  # HEAD is in Allow


def test_fixes_schemathesis_asked_for(server: LiveServer) -> None:
    hello = [{"role": "user", "content": "Hello"}]
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        # JSON makes no difference between 2 and 2.0
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": hello,
                                                    "n": 2.0, "max_tokens": 4.0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert r.json()["usage"]["completion_tokens"] <= 8
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": hello,
                                                    "n": 1.5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        # a malformed Idempotency-Key is refused with or without a session
        r = http.post("/v1/completions", headers={"Idempotency-Key": "no spaces!"},
                      json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
        # the Responses API names its own fields
        r = http.post("/v1/responses", json={"model": MODEL, "input": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                             "max_output_tokens": 10**6})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "max_output_tokens"
        assert "max_output_tokens" in error["message"]


def test_schemathesis_finds_nothing(server: LiveServer, tmp_path: Path) -> None:
    """Every phase (examples, coverage, fuzzing, stateful via the document's links) with the
    conformance checks; the generation routes included (16 tokens at most per request)."""
    program = shutil.which("schemathesis")
    if program is None:
        if os.environ.get("NEWLLM_REQUIRE_SERVICES") == "1":
            pytest.fail("schemathesis is not installed (the dev extra)", pytrace=False)
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    argv = [program, "run", f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
            "--checks", CHECKS, "--max-examples", "8", "--seed", "0", "--workers", "1",
            "--request-timeout", "30", "--max-failures", "20", "--no-color"]
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "NO_COLOR": "1"})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    assert re.search(r"Tested:\s+25\b", out), out[-3000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases and int(cases[1]) == int(cases[2]) > 500, out[-3000:]
