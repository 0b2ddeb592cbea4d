// The newllm chat page: one more client of the server's public HTTP API (see server/web.py).
//
// Sessions: GET /v1/sessions, DELETE /v1/sessions/{id}; a session is created by its first
// turn or by an upload. Turns: POST /v1/chat/completions with stream: true, the session named
// in metadata.session_id, and only the new message (metadata.session_input "new": the server's
// memory holds the past). Stop aborts the fetch; the server then cancels the turn and leaves
// the session as it was. Memory: GET/PUT /v1/sessions/{id}/memory; a move follows the client
// library's move_session (clients/client.py). Figures: GET /v1/models (the card's
// kv_cache_bytes_per_token) and GET /metrics. The conversation's text is kept by this page in
// sessionStorage (the server keeps only hashes of it); model output is untrusted and only ever
// set as textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "newllm.apiKey";
  const CURRENT_STORE = "newllm.current";
  const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
  const METRICS_EVERY_MS = 3000;
  const PAYLOAD_HEADER = "X-Newllm-Payload-Sha256";
  const STORE_HEADER = "X-Newllm-Store-Id";

  const state = {
    model: null, // the served model's id
    kvPerToken: 0, // bytes a same-shape Pythia's KV cache grows by per token
    sessions: new Map(), // id -> the server's listing entry
    current: sessionStorage.getItem(CURRENT_STORE),
    turn: null, // AbortController of the turn being streamed
    needKey: false,
    lastMetrics: null, // {tokens, at} of the previous /metrics poll
    metricsTimer: null,
  };

  // HTTP -------------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || (status ? `HTTP ${status}` : "error"));
      this.status = status;
      this.code = error.code || null;
    }
  }

  function describe(e) {
    if (e instanceof HttpError) {
      const head = [e.status ? `HTTP ${e.status}` : "error", e.code].filter(Boolean).join(" ");
      return `${head}: ${e.message}`;
    }
    if (e instanceof TypeError) return `could not reach the server (${e.message})`;
    return String((e && e.message) || e);
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

  // fetch ``path`` on this server (or on ``base``, another server, with its own ``key``);
  // a non-2xx answer throws HttpError with the server's JSON error; a 401 from this server
  // brings the key prompt back
  async function call(path, { method = "GET", body = null, headers = {}, signal, base = "",
                              key = apiKey() } = {}) {
    const auth = key ? { Authorization: `Bearer ${key}` } : {};
    const res = await fetch(base + path, { method, body, signal, cache: "no-store",
                                           headers: { ...auth, ...headers } });
    if (!res.ok) {
      let parsed = null;
      try { parsed = JSON.parse(await res.text()); } catch { parsed = null; }
      const err = new HttpError(res.status, parsed);
      if (res.status === 401 && !base) askForKey(err);
      throw err;
    }
    return res;
  }
  const getJson = async (path, opts) => (await call(path, opts)).json();
  const sessionPath = (id, rest = "") => `/v1/sessions/${encodeURIComponent(id)}${rest}`;

  // the API key --------------------------------------------------------------------------------
  function askForKey(err) {
    state.needKey = true;
    const panel = $("key-panel");
    const wasHidden = panel.hidden;
    panel.hidden = false;
    $("key-message").textContent = (apiKey() ? "The server refused the key: "
                                             : "This server needs an API key: ") + describe(err);
    if (wasHidden) $("key-input").focus();
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    state.needKey = false;
    start();
  });

  // formatting ---------------------------------------------------------------------------------
  function fmtBytes(n) {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let v = n, u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
    return u === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
  }
  const fmtInt = (n) => Number(n).toLocaleString("en-US");

  function setStatus(el, text, kind = "") {
    el.textContent = text;
    el.className = `status ${kind}`.trim();
  }

  // what this page keeps per session: the conversation's text and one point per turn
  const store = {
    get(kind, id) {
      try { return JSON.parse(sessionStorage.getItem(`newllm.${kind}.${id}`)) || []; }
      catch { return []; }
    },
    set(kind, id, value) { // when the tab's storage is full, keep the newest half, or nothing
      for (let keep = value; ; keep = keep.slice(Math.ceil(keep.length / 2))) {
        try {
          sessionStorage.setItem(`newllm.${kind}.${id}`, JSON.stringify(keep));
          return;
        } catch {
          if (!keep.length) return;
        }
      }
    },
    drop(id) { for (const k of ["transcript", "history"]) sessionStorage.removeItem(`newllm.${k}.${id}`); },
  };

  // sessions -----------------------------------------------------------------------------------
  async function refreshSessions() {
    const data = await getJson("/v1/sessions");
    state.sessions = new Map(data.data.map((s) => [s.id, s]));
    renderSessions();
    renderCurrent();
  }

  function renderSessions() {
    const list = $("session-list");
    list.replaceChildren();
    const entries = [...state.sessions.values()].sort((a, b) => b.last_used - a.last_used);
    if (state.current && !state.sessions.has(state.current)) {
      entries.unshift({ id: state.current, pending: true });
    }
    for (const s of entries) {
      const li = document.createElement("li");
      li.dataset.session = s.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.setAttribute("aria-current", String(s.id === state.current));
      open.append(s.id);
      const small = document.createElement("small");
      small.textContent = s.pending ? "new: saved after its first turn"
                                    : `${fmtInt(s.tokens_seen)} tokens · ${fmtBytes(s.bytes)}`;
      open.append(small);
      open.addEventListener("click", () => pick(s.id));
      li.append(open);
      if (!s.pending) {
        const del = document.createElement("button");
        del.type = "button";
        del.className = "danger";
        del.textContent = "Delete";
        del.setAttribute("aria-label", `Delete session ${s.id}`);
        del.addEventListener("click", () => deleteSession(s.id, del));
        li.append(del);
      }
      list.append(li);
    }
    if (!entries.length) {
      const li = document.createElement("li");
      li.className = "hint";
      li.textContent = "No sessions yet: send a message or upload a memory file.";
      list.append(li);
    }
  }

  function pick(id) {
    state.current = id;
    sessionStorage.setItem(CURRENT_STORE, id);
    renderSessions();
    renderTranscript();
    renderCurrent();
  }

  function newSessionId() {
    const bytes = crypto.getRandomValues(new Uint8Array(4));
    return `chat-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  }

  $("new-session-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("new-session-id").value.trim() || newSessionId();
    if (!SESSION_ID.test(id)) {
      setStatus($("sessions-status"), "A session id is 1-128 characters of A-Z a-z 0-9 . _ -, "
                + "starting with a letter or digit.", "error");
      return;
    }
    setStatus($("sessions-status"), "");
    $("new-session-id").value = "";
    pick(id);
    $("prompt").focus();
  });

  async function deleteSession(id, button) {
    if (!button.classList.contains("armed")) { // a second click within 4 s deletes
      button.classList.add("armed");
      button.textContent = "Delete?";
      button.setAttribute("aria-label", `Confirm: delete session ${id}`);
      setTimeout(() => {
        button.classList.remove("armed");
        button.textContent = "Delete";
        button.setAttribute("aria-label", `Delete session ${id}`);
      }, 4000);
      return;
    }
    try {
      await call(sessionPath(id), { method: "DELETE" });
      store.drop(id);
      if (state.current === id) {
        state.current = null;
        sessionStorage.removeItem(CURRENT_STORE);
        renderTranscript();
      }
      setStatus($("sessions-status"), `Deleted ${id}.`, "ok");
      await refreshSessions();
    } catch (e) {
      setStatus($("sessions-status"), `Could not delete ${id}: ${describe(e)}`, "error");
    }
  }

  // transcript -----------------------------------------------------------------------------------
  function messageElement(m) {
    const li = document.createElement("li");
    li.className = `msg ${m.role}`;
    const text = document.createTextNode(m.text || "");
    li.append(text);
    if (m.tag) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = m.tag;
      li.append(tag);
    }
    return { li, text };
  }

  function renderTranscript() {
    const list = $("transcript");
    list.replaceChildren();
    $("current-session").textContent = state.current ? `· ${state.current}` : "";
    if (!state.current) {
      list.append(messageElement({ role: "note", text: "Pick a session or start a new one." }).li);
      return;
    }
    const messages = store.get("transcript", state.current);
    const info = state.sessions.get(state.current);
    if (!messages.length && info && info.tokens_seen > 0) {
      list.append(messageElement({ role: "note", text:
        `This session's earlier conversation (${fmtInt(info.tokens_seen)} tokens) is in its `
        + "memory, not in this page." }).li);
    }
    for (const m of messages) list.append(messageElement(m).li);
    list.scrollTop = list.scrollHeight;
  }

  function remember(id, message) {
    const messages = store.get("transcript", id);
    messages.push(message);
    store.set("transcript", id, messages);
  }

  // chat ---------------------------------------------------------------------------------------
  function readSettings() {
    const maxTokens = Number($("max-tokens").value);
    const temperature = Number($("temperature").value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > 4096) {
      throw new Error("Max tokens must be a whole number from 1 to 4096.");
    }
    if (!(temperature >= 0 && temperature <= 2)) {
      throw new Error("Temperature must be between 0 and 2.");
    }
    return { max_tokens: maxTokens, temperature };
  }

  // the server-sent events of a streaming response, parsed
  async function* events(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("transcript").setAttribute("aria-busy", String(busy));
  }

  async function sendTurn(text) {
    let settings;
    try {
      settings = readSettings();
    } catch (e) {
      $("sampling").open = true;
      addNote(e.message, true);
      return;
    }
    if (!state.current) pick(newSessionId());
    const sid = state.current;
    const before = state.sessions.get(sid);
    const user = { role: "user", text };
    remember(sid, user);
    $("transcript").append(messageElement(user).li);
    const { li, text: replyText } = messageElement({ role: "assistant", text: "" });
    $("transcript").append(li);
    const controller = new AbortController();
    state.turn = controller;
    setBusy(true);
    let reply = "", stopped = false, error = null;
    let pending = "", scheduled = false; // text not yet shown: drawn once per frame
    const flush = () => {
      scheduled = false;
      if (pending) replyText.appendData(pending); // text only, never markup
      pending = "";
      $("transcript").scrollTop = $("transcript").scrollHeight;
    };
    try {
      const res = await call("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          model: state.model, messages: [{ role: "user", content: text }], stream: true,
          stream_options: { include_usage: true }, ...settings,
          metadata: { session_id: sid, session_input: "new" },
        }),
      });
      for await (const chunk of events(res)) {
        if (chunk.error) throw new HttpError(null, chunk);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          reply += delta.content;
          pending += delta.content;
          if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else error = e;
    } finally {
      flush();
      state.turn = null;
      const stopFocused = document.activeElement === $("stop");
      setBusy(false);
      if (stopFocused || document.activeElement === document.body) $("prompt").focus();
    }
    try {
      await refreshSessions();
    } catch (e) {
      error = error || e;
    }
    const after = state.sessions.get(sid);
    const saved = after && (!before || after.turns !== before.turns
                            || after.tokens_seen !== before.tokens_seen);
    let tag = "";
    if (stopped) {
      tag = saved ? "stopped after the server had finished: the whole reply is in the memory"
                  : "stopped: this turn was cancelled and is not in the session's memory";
    } else if (error) {
      tag = `failed: ${describe(error)}`;
      li.classList.add("error");
    }
    if (tag) {
      const span = document.createElement("span");
      span.className = "tag";
      span.textContent = tag;
      li.append(span);
      if (error) li.setAttribute("role", "alert");
    }
    remember(sid, { role: "assistant", text: reply, tag });
    if (saved) {
      const history = store.get("history", sid);
      history.push({ tokens: after.tokens_seen, bytes: after.bytes });
      store.set("history", sid, history);
      renderCurrent();
    }
  }

  function addNote(text, isError = false) {
    const { li } = messageElement({ role: "note", text });
    if (isError) { li.classList.add("error"); li.setAttribute("role", "alert"); }
    $("transcript").append(li);
  }

  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.turn) return;
    $("prompt").value = "";
    sendTurn(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    } else if (ev.key === "Escape" && state.turn) {
      state.turn.abort();
    }
  });
  $("stop").addEventListener("click", () => { if (state.turn) state.turn.abort(); });

  // memory panel and chart ---------------------------------------------------------------------
  function figure(id, value, text) {
    $(id).dataset.value = value === null ? "" : String(value);
    $(id).textContent = text;
  }

  function renderCurrent() {
    const info = state.current ? state.sessions.get(state.current) : null;
    $("download").disabled = !info;
    $("move-button").disabled = !info;
    if (!info) {
      for (const id of ["mem-tokens", "mem-bytes", "mem-kv", "mem-ratio"]) figure(id, null, "–");
      drawChart([]);
      return;
    }
    const kv = info.tokens_seen * state.kvPerToken;
    figure("mem-tokens", info.tokens_seen, fmtInt(info.tokens_seen));
    figure("mem-bytes", info.bytes, fmtBytes(info.bytes));
    figure("mem-kv", kv, fmtBytes(kv));
    const ratio = kv ? info.bytes / kv : null;
    figure("mem-ratio", ratio, ratio === null ? "–"
      : ratio >= 1 ? `${ratio.toFixed(1)}× (KV grows past it at ${fmtInt(Math.ceil(info.bytes / state.kvPerToken))} tokens)`
        : `${(100 * ratio).toFixed(1)}%`);
    drawChart(store.get("history", state.current));
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  // the memory file's bytes (nearly flat) and a same-shape KV cache's (a line through 0), one
  // point per turn, against tokens seen
  function drawChart(history) {
    const chart = $("chart");
    for (const el of [...chart.children]) if (el.tagName !== "title") el.remove();
    const W = 360, H = 200, left = 58, right = 10, top = 10, bottom = 28;
    const points = history.map((h) => ({ x: h.tokens, mem: h.bytes, kv: h.tokens * state.kvPerToken }));
    const xMax = Math.max(1, ...points.map((p) => p.x));
    const yMax = Math.max(1, ...points.map((p) => Math.max(p.mem, p.kv))) * 1.1;
    const X = (x) => left + (x / xMax) * (W - left - right);
    const Y = (y) => H - bottom - (y / yMax) * (H - top - bottom);
    for (let i = 0; i <= 3; i += 1) {
      const y = (yMax / 1.1) * (i / 3);
      chart.append(svg("line", { class: "grid-line", x1: left, x2: W - right, y1: Y(y), y2: Y(y) }));
      chart.append(svg("text", { x: left - 4, y: Y(y) + 3, "text-anchor": "end" }, fmtBytes(Math.round(y))));
    }
    chart.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }));
    chart.append(svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }));
    chart.append(svg("text", { x: left, y: H - 8 }, "0"));
    chart.append(svg("text", { x: W - right, y: H - 8, "text-anchor": "end" },
                     `${fmtInt(xMax)} tokens seen`));
    if (!points.length) {
      chart.append(svg("text", { x: (W + left) / 2, y: H / 2, "text-anchor": "middle" },
                       "a point per turn appears here"));
      return;
    }
    const path = (key) => points.map((p) => `${X(p.x).toFixed(1)},${Y(p[key]).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: "line-kv", points: `${X(0)},${Y(0)} ${path("kv")}` }));
    chart.append(svg("polyline", { class: "line-mem", points: path("mem") }));
    for (const p of points) {
      const kv = svg("circle", { class: "pt-kv", cx: X(p.x), cy: Y(p.kv), r: 3.5 });
      kv.append(svg("title", {}, `${fmtInt(p.x)} tokens: KV cache ${fmtBytes(p.kv)}`));
      const mem = svg("circle", { class: "pt-mem", cx: X(p.x), cy: Y(p.mem), r: 3.5 });
      mem.append(svg("title", {}, `${fmtInt(p.x)} tokens: memory file ${fmtBytes(p.mem)}`));
      chart.append(kv, mem);
    }
  }

  // memory files -------------------------------------------------------------------------------
  // the __metadata__ of a safetensors file (8-byte little-endian header length, JSON header)
  function fileMetadata(buffer) {
    if (buffer.byteLength < 8) throw new Error("not a memory file: shorter than 8 bytes");
    const n = Number(new DataView(buffer).getBigUint64(0, true));
    if (n > (1 << 20) || 8 + n > buffer.byteLength) throw new Error("not a memory file: bad header length");
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, n)));
    return (header && header.__metadata__) || {};
  }

  $("download").addEventListener("click", async () => {
    const sid = state.current;
    const status = $("transfer-status");
    try {
      const res = await call(sessionPath(sid, "/memory"));
      const blob = await res.blob();
      const url = URL.createObjectURL(blob);
      const a = document.createElement("a");
      a.href = url;
      a.download = `${sid}.safetensors`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      setStatus(status, `Downloaded ${sid}.safetensors (${fmtBytes(blob.size)}, `
                + `${fmtInt(res.headers.get("X-Newllm-Tokens-Seen") || 0)} tokens).`, "ok");
    } catch (e) {
      setStatus(status, `Download failed: ${describe(e)}`, "error");
    }
  });

  // a chosen file names the session it goes to, unless one was typed (ada.safetensors -> ada)
  function fileChosen(file) {
    const stem = file.name.replace(/\.safetensors$/i, "");
    if (!$("upload-id").value.trim() && SESSION_ID.test(stem)) $("upload-id").value = stem;
    disarmUpload();
  }
  function disarmUpload() {
    delete $("upload-form").dataset.replace;
    $("upload").textContent = "Upload";
  }
  $("upload-file").addEventListener("change", () => {
    if ($("upload-file").files[0]) fileChosen($("upload-file").files[0]);
  });
  $("upload-id").addEventListener("input", disarmUpload);

  const drop = $("drop-zone");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer && ev.dataTransfer.files.length) {
      $("upload-file").files = ev.dataTransfer.files;
      fileChosen(ev.dataTransfer.files[0]);
      setStatus($("transfer-status"), `Selected ${ev.dataTransfer.files[0].name}; press Upload.`);
    }
  });

  $("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const status = $("transfer-status");
    const file = $("upload-file").files[0];
    const sid = $("upload-id").value.trim();
    if (!file) { setStatus(status, "Choose or drop a memory file first.", "error"); return; }
    if (!SESSION_ID.test(sid)) {
      setStatus(status, "A session id is 1-128 characters of A-Z a-z 0-9 . _ -.", "error");
      return;
    }
    const form = $("upload-form");
    if (state.sessions.has(sid) && form.dataset.replace !== sid) { // replacing takes a 2nd press
      form.dataset.replace = sid;
      $("upload").textContent = `Replace ${sid}`;
      setStatus(status, `Session ${sid} exists: press "Replace ${sid}" to replace its memory `
                + "with this file, or type another session id.");
      return;
    }
    disarmUpload();
    setStatus(status, `Uploading ${file.name}…`);
    try {
      const result = await getJson(sessionPath(sid, "/memory"), {
        method: "PUT", body: file, headers: { "Content-Type": "application/octet-stream" } });
      store.drop(sid);
      store.set("transcript", sid, [{ role: "note", text:
        `Memory uploaded from ${file.name}: ${fmtInt(result.tokens_seen)} tokens, `
        + `${result.turns} turns. The conversation continues from it.` }]);
      store.set("history", sid, [{ tokens: result.tokens_seen, bytes: result.bytes }]);
      setStatus(status, `${result.created ? "Created" : "Replaced"} session ${sid} from `
                + `${file.name} (${fmtInt(result.tokens_seen)} tokens).`, "ok");
      $("upload-file").value = "";
      $("upload-id").value = "";
      await refreshSessions();
      pick(sid);
    } catch (e) {
      setStatus(status, `Upload refused: ${describe(e)}`, "error");
    }
  });

  // move: export here, check, import there, check, delete here (clients/client.py move_session)
  function targetBase(text) {
    let url;
    try { url = new URL(text); } catch { throw new Error(`${text} is not a URL`); }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new Error("the server URL must start with http:// or https://");
    }
    if (url.origin === location.origin) throw new Error("that is this server");
    return url.origin;
  }

  async function moveSession(sid, base, key) {
    const status = $("transfer-status");
    const step = (text) => setStatus(status, text);
    const reach = (e) => (e instanceof TypeError
      ? new Error(`could not reach ${base}: it is down, or it does not allow this page `
                  + `(start it with --cors-origin ${location.origin})`) : e);
    step(`Moving ${sid}: exporting…`);
    const res = await call(sessionPath(sid, "/memory"));
    const data = await res.arrayBuffer();
    const payload = res.headers.get(PAYLOAD_HEADER);
    const meta = fileMetadata(data);
    if (!payload || meta.payload_sha256 !== payload) {
      throw new Error("the download's payload_sha256 differs from the export header's");
    }
    let targetStore;
    try { // reachable, allows this page, and takes the key (a 401 says why not)
      targetStore = (await call("/v1/models", { base, key })).headers.get(STORE_HEADER);
    } catch (e) {
      if (e instanceof HttpError && e.status === 401) {
        throw new Error(`${base} refused the key: ${describe(e)}`);
      }
      throw reach(e);
    }
    const sourceStore = res.headers.get(STORE_HEADER);
    if (sourceStore && sourceStore === targetStore) {
      throw new Error(`${base} shares this server's session store; moving ${sid} onto itself `
                      + "would delete it. Nothing was changed.");
    }
    const exists = await call(sessionPath(sid, "/memory"), { base, key, method: "HEAD" })
      .then(() => true, (e) => {
        if (e instanceof HttpError && e.status === 404) return false;
        throw reach(e);
      });
    if (exists) throw new Error(`${base} already has a session ${sid}; nothing was changed`);
    step(`Moving ${sid}: uploading ${fmtBytes(data.byteLength)}…`);
    const result = await getJson(sessionPath(sid, "/memory"), {
      base, key, method: "PUT", body: data,
      headers: { "Content-Type": "application/octet-stream" } }).catch((e) => { throw reach(e); });
    const landed = (await call(sessionPath(sid, "/memory"), { base, key, method: "HEAD" }))
      .headers.get(PAYLOAD_HEADER);
    const stored = result.converted ? result.payload_sha256 : payload;
    if (landed !== stored || (result.converted && result.received_payload_sha256 !== payload)
        || String(result.tokens_seen) !== String(meta.position)) {
      if (result.created) await call(sessionPath(sid), { base, key, method: "DELETE" }).catch(() => null);
      throw new Error(`${base} does not hold the exported memory; ${sid} was kept here`);
    }
    const now = await call(sessionPath(sid, "/memory"), { method: "HEAD" });
    if (now.headers.get(PAYLOAD_HEADER) !== payload) {
      throw new Error(`${sid} changed here during the move; it was kept, and ${base} holds `
                      + "the state from before the change");
    }
    await call(sessionPath(sid), { method: "DELETE" });
    return result;
  }

  $("move-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const status = $("transfer-status");
    const sid = state.current;
    try {
      if (!sid || !state.sessions.has(sid)) throw new Error("pick a saved session first");
      const base = targetBase($("move-url").value.trim());
      const result = await moveSession(sid, base, $("move-key").value);
      store.drop(sid);
      state.current = null;
      sessionStorage.removeItem(CURRENT_STORE);
      status.replaceChildren(`Moved ${sid} (${fmtInt(result.tokens_seen)} tokens) to `);
      const link = document.createElement("a");
      link.href = `${base}/`;
      link.textContent = base;
      status.append(link, ".");
      status.className = "status ok";
      renderTranscript();
      await refreshSessions();
    } catch (e) {
      setStatus(status, `Move failed: ${describe(e)}`, "error");
    }
  });

  // metrics ------------------------------------------------------------------------------------
  // Prometheus text: the sum of a metric's samples whose labels pass ``keep``
  function metricSum(text, name, keep = () => true) {
    let total = 0, found = false;
    for (const line of text.split("\n")) {
      const m = /^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
      if (m && m[1] === name && keep(m[2] || "")) { total += Number(m[3]); found = true; }
    }
    return found ? total : null;
  }

  async function pollMetrics() {
    if (state.needKey || document.hidden) return;
    try {
      const text = await (await call("/metrics")).text();
      const requests = metricSum(text, "newllm_requests_total", (l) => !l.includes('route="/metrics"'));
      const tokens = metricSum(text, "newllm_tokens_total", (l) => l.includes('kind="completion"')) || 0;
      const sessions = metricSum(text, "newllm_sessions");
      const at = performance.now();
      figure("metric-requests", requests, requests === null ? "0" : fmtInt(requests));
      figure("metric-sessions", sessions, sessions === null ? "–" : fmtInt(sessions));
      const last = state.lastMetrics;
      if (last && at > last.at) {
        const rate = Math.max(0, (tokens - last.tokens) / ((at - last.at) / 1000));
        figure("metric-rate", rate, rate.toFixed(1));
      }
      state.lastMetrics = { tokens, at };
    } catch (e) {
      figure("metric-rate", null, "–");
    }
  }

  // start --------------------------------------------------------------------------------------
  async function start() {
    try {
      const models = await getJson("/v1/models");
      const card = models.data[0];
      state.model = card.id;
      state.kvPerToken = card.kv_cache_bytes_per_token || 0;
      $("model-line").textContent = `${card.id} · ${card.layers.join(", ")} · ${card.dtype} · `
        + `a same-shape Pythia's KV cache: ${fmtBytes(state.kvPerToken)} per token`;
      await refreshSessions();
      renderTranscript();
      if (state.metricsTimer === null) {
        state.metricsTimer = setInterval(pollMetrics, METRICS_EVERY_MS);
      }
      await pollMetrics();
    } catch (e) {
      if (!(e instanceof HttpError && e.status === 401)) {
        $("model-line").textContent = `Cannot load: ${describe(e)}`;
      }
    }
  }

  $("move-origin").textContent = location.origin;
  setBusy(false);
  renderTranscript();
  drawChart([]);
  start();
})();
