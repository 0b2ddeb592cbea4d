"""The chat page (`server.web`, ``server/static/``) in a real headless Chromium, plus HTTP checks.

Three ``python -m server`` processes on loopback are started once for the module (see
`benchmarks.live`):

- ``a``: tiny-infini, no API key;
- ``b``: tiny-infini (the same weights), with an API key and ``--cors-origin`` of ``a``'s page:
  the key prompt, uploads and moves land here;
- ``x``: tiny-infini weights crafted so that every step emits one token whose text is HTML
  (``<img onerror>`` and ``<script>``): model output must stay text. It never ends a reply
  early, so it also serves the stop test.

One Chromium (Selenium with Debian's chromedriver; skipped where it is missing, failed in CI)
serves the module's browser tests. The plain HTTP tests at the end need no browser.
"""

from __future__ import annotations

import base64
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import AddedToken

from benchmarks.live import LiveServer, free_port, start_server, stop_server, wait_ready
from newllm.checkpoint import save_pretrained
from newllm.config import ModelConfig
from newllm.sizes import kv_cache_bytes_per_token
from newllm.tokenizer import Tokenizer
from server.settings import ServerSettings
from server.web import CSP
from tests.conftest import make_tiny_model, need_program

KEY = "web-test-key-1"
MODEL = "tiny-infini"
HOSTILE = "<img src=x onerror=\"document.title='xss'\"><script>document.title='xss'</script>"
CANDIDATES = ["Go on.", "And then?", "What happened next?", "Why?", "Tell me more."]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
WAIT_S = 60.0


def hostile_checkpoint(folder: Path) -> Path:
    """tiny-infini whose every next token is token 257, which decodes to `HOSTILE`: the final
    LayerNorm outputs a constant (weight 0) aligned with that token's output row."""
    tokenizer = Tokenizer.byte_level()
    tokenizer.backend.add_tokens([AddedToken(HOSTILE, special=False, normalized=False)])
    tokenizer = Tokenizer(tokenizer.backend, eos_token_id=0)
    model = make_tiny_model(MODEL)
    with torch.no_grad():
        direction = torch.zeros(model.config.layer_hidden)
        direction[0] = 8.0
        model.final_layer_norm.weight.zero_()
        model.final_layer_norm.bias.copy_(direction)
        model.embed_out.weight[257] = direction
    return save_pretrained(model, folder, tokenizer)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    folder = tmp_path_factory.mktemp("web")
    checkpoint = str(hostile_checkpoint(folder / "hostile"))
    a_port = free_port()
    started: dict[str, LiveServer] = {}
    try:
        started["a"] = start_server(MODEL, folder, "a", port=a_port)
        started["b"] = start_server(MODEL, folder, "b", api_key=KEY,
                                    extra=["--cors-origin", f"http://127.0.0.1:{a_port}"])
        started["x"] = start_server(checkpoint, folder, "x")
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            server.process.terminate()  # all at once, then wait for each
        for server in started.values():
            stop_server(server)


def http(server: LiveServer, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key or server.api_key}"} if (key or server.api_key) \
        else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60, trust_env=False)


def listing(server: LiveServer) -> dict[str, dict[str, Any]]:
    with http(server) as c:
        return {s["id"]: s for s in c.get("/v1/sessions").json()["data"]}


# the browser ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = need_program("chromium", "chromium")
    driver_path = need_program("chromedriver", "chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must download nothing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, what: Callable[[], Any], message: str, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: what(), message)


def el(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def els(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def console_errors(driver: Any, *, network: bool = True) -> list[dict[str, Any]]:
    """SEVERE browser log entries since the last call (``network=False``: not the failed
    requests Chromium logs for every 4xx answer, which some tests cause on purpose)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and (network or e.get("source") != "network")]


def open_page(driver: Any, server: LiveServer, ready: bool = True) -> None:
    driver.get(server.url + "/")
    if ready:
        wait(driver, lambda: MODEL in el(driver, "#model-line").text, "the model line")
        wait(driver, lambda: el(driver, "#metric-requests").get_attribute("data-value"),
             "the metrics panel")


def set_field(driver: Any, css: str, value: str) -> None:
    field = el(driver, css)
    field.clear()
    field.send_keys(value)


def sampling(driver: Any, max_tokens: int, temperature: float) -> None:
    if not el(driver, "#sampling").get_attribute("open"):
        el(driver, "#sampling summary").click()
    set_field(driver, "#max-tokens", str(max_tokens))
    set_field(driver, "#temperature", str(temperature))


def new_session(driver: Any, sid: str) -> None:
    set_field(driver, "#new-session-id", sid)
    el(driver, "#new-session-form button").click()
    wait(driver, lambda: sid in el(driver, "#current-session").text, f"session {sid} picked")


def assistant_texts(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#transcript li.assistant')]"
        ".map(li => li.firstChild ? li.firstChild.data : '')")


def turn(driver: Any, text: str) -> str:
    """Send ``text`` with Enter, wait for the turn to end; the reply's text as shown."""
    before = len(els(driver, "#transcript li.assistant"))
    box = el(driver, "#prompt")
    box.send_keys(text)
    box.send_keys("\n")
    wait(driver, lambda: len(els(driver, "#transcript li.assistant")) == before + 1
         and el(driver, "#send").is_enabled(), f"the turn {text!r}")
    return assistant_texts(driver)[-1]


def figures(driver: Any) -> dict[str, str]:
    return {name: el(driver, f"#mem-{name}").get_attribute("data-value")
            for name in ("tokens", "bytes", "kv")}


def drop_file(driver: Any, data: bytes, name: str) -> None:
    """Drag-and-drop a file onto the page's drop zone (as a browser delivers a drop)."""
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[1]));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragover', 'drop']) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true,
                                                  cancelable: true}));
        }""", base64.b64encode(data).decode(), name)


def upload_status(driver: Any, previous: str = "") -> str:
    el(driver, "#upload").click()
    return wait(driver, lambda: (t := el(driver, "#transfer-status").text) != previous
                and "Uploading" not in t and t, "the upload's answer")


# browser tests --------------------------------------------------------------------------------
def test_page_loads_without_console_errors(servers: dict[str, LiveServer], browser: Any) -> None:
    open_page(browser, servers["a"])
    assert browser.title == "newllm chat"
    assert "1.00 KiB per token" in el(browser, "#model-line").text  # the card's KV figure
    header = browser.execute_script(
        "return getComputedStyle(document.querySelector('header')).backgroundColor")
    assert header == "rgb(31, 78, 121)"  # the stylesheet loaded under the CSP
    assert el(browser, "#key-panel").is_displayed() is False
    assert console_errors(browser) == []


def test_controls_are_labelled_reachable_by_keyboard_and_fit_a_phone(
        servers: dict[str, LiveServer], browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, servers["a"])
    unnamed = browser.execute_script("""
        return [...document.querySelectorAll('input, textarea, button')].filter((e) =>
          !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
          && !e.textContent.trim()).map((e) => e.outerHTML)""")
    assert unnamed == []
    el(browser, "body").click()
    seen = []
    for _ in range(30):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        seen.append(browser.switch_to.active_element.get_attribute("id"))
    assert {"new-session-id", "prompt", "send", "upload-file", "upload-id",
            "upload"} <= set(seen), seen
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        assert browser.execute_script("return window.innerWidth") == 390
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        columns = browser.execute_script(
            "return getComputedStyle(document.querySelector('main')).gridTemplateColumns")
        assert len(columns.split()) == 1, columns  # the panels stack
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_turn_streams_in_and_the_memory_panel_follows_each_turn(
        servers: dict[str, LiveServer], browser: Any) -> None:
    a = servers["a"]
    open_page(browser, a)
    new_session(browser, "web-chat")
    sampling(browser, 12, 0)
    for i, message in enumerate(["Tell me a story.", "Go on.", "And then?"], start=1):
        reply = turn(browser, message)
        if i == 1:  # (an untrained model may end a later reply at once; streaming: see the
            assert len(reply) > 3  # stop test)
        wait(browser, lambda i=i: len(els(browser, "#chart circle.pt-mem")) == i,
             f"a point per turn ({i})")
        served = listing(a)["web-chat"]
        assert served["turns"] == i
        assert figures(browser) == {"tokens": str(served["tokens_seen"]),
                                    "bytes": str(served["bytes"]),
                                    "kv": str(served["tokens_seen"] * 1024)}
        assert len(els(browser, "#chart circle.pt-kv")) == i
        item = el(browser, '#session-list li[data-session="web-chat"]')
        assert f"{served['tokens_seen']} tokens" in item.text
    assert [m.text for m in els(browser, "#transcript li.user")] == [
        "Tell me a story.", "Go on.", "And then?"]
    # the KV line climbs from point to point while the memory line stays put
    ys = browser.execute_script("return [...document.querySelectorAll('#chart circle.pt-kv')]"
                                ".map(c => +c.getAttribute('cy'))")
    assert ys == sorted(ys, reverse=True) and ys[0] > ys[-1]
    # the metrics panel: tokens/s from the completion-token counter's change between polls
    wait(browser, lambda: float(el(browser, "#metric-rate").get_attribute("data-value")
                                or 0) > 0, "a tokens/s figure", timeout=10)
    assert int(el(browser, "#metric-requests").get_attribute("data-value")) >= 3
    assert el(browser, "#metric-sessions").get_attribute("data-value") == str(len(listing(a)))
    assert console_errors(browser) == []


def test_stop_cancels_the_turn_and_the_session_stays_as_it_was(
        servers: dict[str, LiveServer], browser: Any) -> None:
    x = servers["x"]
    open_page(browser, x)
    new_session(browser, "stopped")
    sampling(browser, 2, 0)
    turn(browser, "hello")
    kept = listing(x)["stopped"]
    sampling(browser, 4096, 0)
    el(browser, "#prompt").send_keys("a long one\n")
    # text shows up while the turn still runs: it streams
    wait(browser, lambda: len(assistant_texts(browser)) == 2 and assistant_texts(browser)[-1],
         "the first tokens")
    assert el(browser, "#stop").is_enabled()
    el(browser, "#stop").click()
    wait(browser, lambda: el(browser, "#send").is_enabled(), "the stopped turn")
    shown = assistant_texts(browser)[-1]
    assert 0 < len(shown) < 4096 * len(HOSTILE)
    # the tag comes once the page has re-read the session list (after Send is enabled again)
    tagged = "#transcript li.assistant:last-child .tag"
    wait(browser, lambda: els(browser, tagged) != [], "the stopped turn's tag")
    tag = el(browser, tagged).text
    assert "not in the session's memory" in tag
    assert listing(x)["stopped"] == kept
    sampling(browser, 2, 0)
    # the session goes on from where it was; this turn waits for the session's lock, so the
    # stopped turn has ended by now, and had it been saved, turns would be 2 more
    turn(browser, "still there?")
    after = listing(x)["stopped"]
    assert after["turns"] == kept["turns"] + 1 and after["tokens_seen"] > kept["tokens_seen"]
    delete = el(browser, '#session-list li[data-session="stopped"] .danger')
    delete.click()  # the first press asks, the second deletes
    assert delete.text == "Delete?" and "stopped" in listing(x)
    delete.click()
    wait(browser, lambda: "stopped" not in listing(x), "the delete")
    wait(browser, lambda: els(browser, '#session-list li[data-session="stopped"]') == [],
         "the list without it")
    assert "Pick a session" in el(browser, "#transcript").text
    assert console_errors(browser) == []


def test_model_output_is_shown_as_text(servers: dict[str, LiveServer], browser: Any) -> None:
    open_page(browser, servers["x"])
    new_session(browser, "hostile")
    sampling(browser, 2, 0)
    reply = turn(browser, "echo this: " + HOSTILE)
    assert reply == HOSTILE * 2  # the model's output, exactly, as text
    shown = el(browser, "#transcript").text
    assert shown.count("<img src=x onerror=") == 3 and shown.count("<script>") == 3
    assert els(browser, "#transcript img, #transcript script") == []
    assert browser.title == "newllm chat"
    browser.refresh()  # the kept transcript is rendered as text too
    wait(browser, lambda: len(assistant_texts(browser)) == 1, "the kept transcript")
    assert assistant_texts(browser) == [HOSTILE * 2]
    assert els(browser, "#transcript img, #transcript script") == []
    assert browser.title == "newllm chat"
    assert console_errors(browser) == []  # a CSP violation would be logged here


def test_download_then_upload_into_another_server_continues_the_conversation(
        servers: dict[str, LiveServer], browser: Any) -> None:
    a, b = servers["a"], servers["b"]
    open_page(browser, a)
    new_session(browser, "travel")
    sampling(browser, 12, 0)
    turn(browser, "Tell me a story.")
    el(browser, "#download").click()
    path = browser.downloads / "travel.safetensors"
    wait(browser, lambda: path.is_file() and "Downloaded" in el(browser, "#transfer-status").text,
         "the download")
    data = path.read_bytes()
    with http(a) as ca:
        assert data == ca.get("/v1/sessions/travel/memory").content
        # the reference: the same next turn on a copy of the session, on the first server
        assert ca.put("/v1/sessions/travel-ref/memory", content=data).status_code == 201
        for message in CANDIDATES:
            ref = ca.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": message}],
                "max_tokens": 16, "temperature": 0,
                "metadata": {"session_id": "travel-ref", "session_input": "new"}}).json()
            if ref["usage"]["completion_tokens"] >= 3:
                break
            ca.put("/v1/sessions/travel-ref/memory", content=data)
        else:
            pytest.fail(f"none of {CANDIDATES} made the model generate 3 tokens")

    open_page(browser, b, ready=False)  # b needs a key: the page asks for it
    wait(browser, lambda: el(browser, "#key-panel").is_displayed(), "the key prompt")
    assert "API key" in el(browser, "#key-message").text
    set_field(browser, "#key-input", "not-the-key-0")
    el(browser, "#key-form button").click()
    wait(browser, lambda: "refused the key" in el(browser, "#key-message").text, "the 401")
    assert "HTTP 401 invalid_api_key" in el(browser, "#key-message").text
    assert el(browser, "#key-panel").is_displayed()
    assert console_errors(browser, network=False) == []  # only the failed requests
    set_field(browser, "#key-input", KEY)
    el(browser, "#key-form button").click()
    wait(browser, lambda: MODEL in el(browser, "#model-line").text, "the page with the key")
    assert not el(browser, "#key-panel").is_displayed()

    el(browser, "#upload-file").send_keys(str(path))  # the file picker
    assert el(browser, "#upload-id").get_attribute("value") == "travel"  # from the file name
    assert "Created session travel" in upload_status(browser)
    wait(browser, lambda: "travel" in el(browser, "#current-session").text, "the upload picked")
    assert figures(browser)["tokens"] == str(listing(a)["travel"]["tokens_seen"])
    sampling(browser, 16, 0)
    assert turn(browser, message) == ref["choices"][0]["message"]["content"]
    assert listing(b)["travel"]["tokens_seen"] == ref["session"]["tokens_seen"]
    # replacing it with the same file (confirmed) takes it back to before that turn
    el(browser, "#upload-file").send_keys(str(path))
    el(browser, "#upload").click()
    wait(browser, lambda: el(browser, "#upload").text == "Replace travel", "the question")
    assert "Replaced session travel" in upload_status(browser,
                                                      el(browser, "#transfer-status").text)
    assert listing(b)["travel"]["tokens_seen"] == listing(a)["travel"]["tokens_seen"]
    assert turn(browser, message) == ref["choices"][0]["message"]["content"]
    assert console_errors(browser, network=False) == []


def test_hostile_uploads_show_the_error_and_change_nothing(
        servers: dict[str, LiveServer], browser: Any) -> None:
    a, x = servers["a"], servers["x"]
    with http(a) as ca:
        ca.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "metadata": {"session_id": "victim"}}).raise_for_status()
        good = ca.get("/v1/sessions/victim/memory").content
    with http(x) as cx:
        cx.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "metadata": {"session_id": "foreign"}}).raise_for_status()
        foreign = cx.get("/v1/sessions/foreign/memory").content
    before = listing(a)
    open_page(browser, a)
    el(browser, '#session-list li[data-session="victim"] .open').click()
    transcript = el(browser, "#transcript").text
    shown_before = figures(browser)
    set_field(browser, "#upload-id", "victim")
    status, codes = "", []
    for how, data in [("drop", good[:len(good) // 2]), ("picker", foreign)]:
        with http(a) as ca:  # what the server says to the same bytes
            expected = ca.put("/v1/sessions/victim/memory", content=data)
        assert expected.status_code == 400
        error = expected.json()["error"]
        codes.append(error["code"])
        if how == "drop":
            drop_file(browser, data, "cut.safetensors")
        else:
            path = Path(tempfile.mkdtemp()) / "foreign.safetensors"
            path.write_bytes(data)
            el(browser, "#upload-file").send_keys(str(path))
        assert el(browser, "#upload-id").get_attribute("value") == "victim"
        el(browser, "#upload").click()  # victim exists: the first press asks to confirm
        wait(browser, lambda: el(browser, "#upload").text == "Replace victim", "the question")
        assert "victim exists" in el(browser, "#transfer-status").text
        status = upload_status(browser, el(browser, "#transfer-status").text)
        assert status == f"Upload refused: HTTP 400 {error['code']}: {error['message']}"
        with http(a) as ca:
            assert ca.get("/v1/sessions/victim/memory").content == good
    assert codes == ["truncated", "model_mismatch"]
    assert listing(a) == before
    assert el(browser, "#transcript").text == transcript and figures(browser) == shown_before
    assert console_errors(browser, network=False) == []


def test_move_to_another_server_with_its_key(servers: dict[str, LiveServer],
                                             browser: Any) -> None:
    a, b = servers["a"], servers["b"]
    open_page(browser, a)
    new_session(browser, "mover")
    sampling(browser, 6, 0)
    turn(browser, "Pack your bags.")
    moving = listing(a)["mover"]
    el(browser, "#move summary").click()
    set_field(browser, "#move-url", b.url)
    set_field(browser, "#move-key", "not-the-key-0")
    el(browser, "#move-button").click()
    status = wait(browser, lambda: "failed" in (t := el(browser, "#transfer-status").text) and t,
                  "the refused move")
    assert "HTTP 401 invalid_api_key" in status
    assert listing(a)["mover"] == moving and "mover" not in listing(b)
    set_field(browser, "#move-key", KEY)
    el(browser, "#move-button").click()
    status = wait(browser, lambda: "Moved" in (t := el(browser, "#transfer-status").text) and t,
                  "the move")
    assert status == f"Moved mover ({moving['tokens_seen']} tokens) to {b.url}."
    assert "mover" not in listing(a)
    assert listing(b)["mover"]["tokens_seen"] == moving["tokens_seen"]
    assert els(browser, '#session-list li[data-session="mover"]') == []
    assert console_errors(browser, network=False) == []


# plain HTTP ---------------------------------------------------------------------------------
STATIC = {"/": "text/html; charset=utf-8", "/static/app.js": "text/javascript; charset=utf-8",
          "/static/style.css": "text/css; charset=utf-8", "/static/icon.svg": "image/svg+xml"}


def raw_get(url: str, target: bytes) -> tuple[int, bytes]:
    """One GET with the target sent byte for byte (httpx would remove dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def test_page_and_static_files_need_no_key_and_carry_the_csp(
        servers: dict[str, LiveServer]) -> None:
    b = servers["b"]
    with httpx.Client(base_url=b.url, trust_env=False, timeout=30) as anon:
        for path, media_type in STATIC.items():
            r = anon.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == media_type
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert anon.head(path).status_code == 200
        page = anon.get("/").text
        assert "<script src=\"/static/app.js\"" in page and "<style" not in page
        assert "onclick" not in page and "<script>" not in page  # nothing inline
    assert "script-src 'self';" in CSP and "'unsafe-inline'" not in CSP


def test_the_api_still_needs_the_key(servers: dict[str, LiveServer]) -> None:
    b = servers["b"]
    with httpx.Client(base_url=b.url, trust_env=False, timeout=30) as anon:
        for path in ["/v1/models", "/v1/sessions", "/metrics", "/v1/sessions/s/memory",
                     "/staticx", "/static", "/info", "/favicon.ico"]:
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        missing = anon.get("/static/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).is_success
    for target in [b"/static/../v1/sessions", b"/static/%2e%2e%2fv1%2fsessions",
                   b"/static/..%2f..%2fweb.py", b"/static/app.js/../../v1/models"]:
        status, body = raw_get(b.url, target)
        assert status == 404, target  # public, but no such file
        assert b'"data"' not in body and b"import" not in body
    for target in [b"//health", b"//", b"//static/app.js", b"/./v1/sessions"]:
        assert raw_get(b.url, target)[0] == 401, target


def test_cors_is_opt_in_and_covers_the_move(servers: dict[str, LiveServer]) -> None:
    a, b = servers["a"], servers["b"]
    with httpx.Client(trust_env=False, timeout=30) as c:
        pre = c.options(b.url + "/v1/sessions/s/memory", headers={
            "Origin": a.url, "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == a.url
        assert "PUT" in pre.headers["access-control-allow-methods"]
        assert "Authorization" in pre.headers["access-control-allow-headers"]
        refused = c.get(b.url + "/v1/sessions", headers={"Origin": a.url})
        assert refused.status_code == 401  # the key is still needed; the page can read why
        assert refused.headers["access-control-allow-origin"] == a.url
        assert "X-Newllm-Payload-Sha256" in refused.headers["access-control-expose-headers"]
        other = c.options(b.url + "/v1/sessions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert other.status_code == 401 and "access-control-allow-origin" not in other.headers
        plain = c.get(a.url + "/v1/sessions", headers={"Origin": b.url})  # a has no CORS
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_model_card_gives_a_same_shape_kv_cache_per_token(
        servers: dict[str, LiveServer]) -> None:
    with http(servers["a"]) as c:
        card = c.get(f"/v1/models/{MODEL}").json()
    config = ModelConfig.from_name(MODEL)
    assert card["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(config, 4)
    assert card["kv_cache_bytes_per_token"] == 2 * config.num_layers * config.hidden_size * 4
    assert kv_cache_bytes_per_token(ModelConfig.from_name("pythia-70m")) == 24576  # NOTES.md


def test_half_weights_settings_are_checked() -> None:
    assert ServerSettings(half_weights=True).device == "cpu"  # never auto-picked CUDA
    for bad in [{"dtype": "bfloat16"}, {"device": "cuda"}]:
        with pytest.raises(ValueError, match="--half-weights"):
            ServerSettings(half_weights=True, **bad).check()
    ServerSettings(half_weights=True, dtype="float32").check()
    # left to the default: decided at start from the weights; a dtype asked for turns it off
    assert ServerSettings().half_weights is None and ServerSettings().device == "auto"
    assert ServerSettings(dtype="float16").half_weights is False
    from server.cli import build_parser

    for argv, want in (([], None), (["--half-weights"], True), (["--no-half-weights"], False)):
        assert build_parser().parse_args(argv).half_weights is want


def test_stream_interval_setting_is_checked() -> None:
    for bad in (-1.0, 1001.0):
        with pytest.raises(ValueError, match="--stream-interval-ms"):
            ServerSettings(stream_interval_ms=bad).check()
    ServerSettings(stream_interval_ms=0).check()


def test_cors_origin_setting_is_checked() -> None:
    settings = ServerSettings(cors_origin="http://10.0.0.5:8000, https://Chat.Example")
    assert settings.cors_origins() == ("http://10.0.0.5:8000", "https://chat.example")
    assert ServerSettings().cors_origins() == ()
    for bad in ["http://a:8000/", "10.0.0.5:8000", "ftp://a", "http://a:8000/path"]:
        with pytest.raises(ValueError, match="--cors-origin"):
            ServerSettings(cors_origin=bad).check()


def test_install_replaces_litserve_index_and_survives_missing_files(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server import web
    from server.http import install_error_handlers

    def app_with(folder: Path) -> TestClient:
        app = FastAPI()
        app.get("/")(lambda: "litserve running")  # as LitServe registers it
        install_error_handlers(app)
        web.install(app, folder)
        return TestClient(app)

    served = app_with(web.STATIC).get("/")
    assert served.status_code == 200 and served.text.startswith("<!doctype html>")
    (tmp_path / "app.js").write_text("x")
    (tmp_path / "notes.txt").write_text("not served")
    bare = app_with(tmp_path)
    missing = bare.get("/")
    assert missing.status_code == 404 and "not installed" in missing.json()["error"]["message"]
    assert bare.get("/static/app.js").text == "x"
    assert bare.get("/static/notes.txt").status_code == 404  # only the known file types
    assert app_with(tmp_path / "absent").get("/static/app.js").status_code == 404
