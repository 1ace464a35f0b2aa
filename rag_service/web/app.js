// The web interface's logic (vanilla JS, no build step). It calls the same REST API as every
// other client: GET/POST/DELETE /v1/documents, GET /v1/packs, POST /v1/ask with stream=true
// (server-sent events: progress, token, citations, error), GET /v1/documents/{id}/text for the
// text around a citation. Served by rag_service/serve/routes/ui.py; tested by tests/service/test_ui.py.
//
// Safety: document names, answers and document text are user data; they only ever reach the
// page through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("dsa-rag-key") || "",  // per tab: a shared machine forgets it on close
  config: { auth: false, max_upload_bytes: Infinity },
  docs: [],
  packs: new Map(),      // pack id -> PackStatus (GET /v1/packs)
  asking: null,          // AbortController of the running question
  warming: new Set(),    // packs uploaded with "read right away", until they are ready
  pollTimer: null,
};

// Upload failures in words; the server's message follows (it names the file and what to do).
const UPLOAD_ERRORS = {
  encrypted_document: "Encrypted PDF",
  no_text_layer: "Scanned pages without a text layer",
  document_too_large: "Too large",
  unsupported_document: "Not a PDF, text or Markdown file",
  corrupt_document: "Damaged file",
  empty_document: "No text in the file",
  undecodable_text: "Text in an unknown encoding",
  parse_timeout: "Took too long to read",
};
const CACHE_WORDS = {
  memory: "ready (in memory)",
  store: "ready (stored cache)",
  cold: "not read yet: the first question reads it",
};

// ------------------------------------------------------------------ helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}
const fmt = (n) => Number(n).toLocaleString("en-US");
function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}
function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}
function apiError(status, body) {
  const e = (body && body.error) || {};
  const err = new Error(e.message || `the server answered HTTP ${status}`);
  err.status = status;
  err.code = e.code;
  return err;
}
async function api(path, opts = {}) {
  const r = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: the status says enough */ }
  if (!r.ok) {
    const err = apiError(r.status, body);
    if (r.status === 401) needKey(err.message);
    throw err;
  }
  return body;
}

// ------------------------------------------------------------------ API key
function needKey(message) {
  $("key-form").hidden = false;
  $("library-empty").hidden = false;
  $("library-empty").textContent = "Enter your API key above to see your documents.";
  $("docs").replaceChildren();
  $("key-status").textContent = state.key ? `Key refused: ${message}` : "Enter your API key to use the service.";
  $("key-status").className = "warn";
  $("api-key").focus();
}
$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("dsa-rag-key", state.key);
  $("key-status").textContent = "Checking…";
  $("key-status").className = "muted";
  try {
    await refreshLibrary();
    $("key-status").textContent = "Key accepted.";
    $("key-status").className = "ok";
  } catch (_) { /* needKey said why */ }
});

// ------------------------------------------------------------------ library
async function refreshLibrary() {
  const [docs, packs] = await Promise.all([api("/v1/documents"), api("/v1/packs")]);
  state.docs = docs.data;
  state.packs = new Map(packs.data.map((p) => [p.id, p]));
  $("library-empty").textContent = "No documents yet.";
  renderLibrary();
  schedulePoll();
}

function packWords(p) {
  if (!p) return "unknown";
  if (p.state === "prefilling") {
    const eta = p.eta_s !== null && p.eta_s !== undefined ? `, about ${seconds(p.eta_s)} left` : "";
    return `reading now: ${p.percent}%${eta}`;
  }
  return CACHE_WORDS[p.state] || p.state;
}

function renderLibrary() {
  const list = $("docs");
  list.replaceChildren();
  $("library-empty").hidden = state.docs.length > 0;
  for (const d of state.docs) {
    const kind = { pdf: "PDF", text: "Text", markdown: "Markdown" }[d.media_type] || d.media_type;
    const pages = d.pages ? `${d.pages} page${d.pages === 1 ? "" : "s"} · ` : "";
    const packs = d.packs.map((id) => state.packs.get(id));
    const cache = el("ul", { class: "packs", "aria-label": `Cache state of ${d.name}` },
      packs.map((p, i) => el("li", { class: `pack ${p ? p.state : ""}`, "data-pack": d.packs[i] },
        d.packs.length > 1 ? `Part ${i + 1}: ` : "", packWords(p))));
    const del = el("button", { type: "button", class: "delete", "aria-label": `Delete ${d.name}` }, "Delete");
    del.addEventListener("click", () => confirmDelete(del, d));
    list.append(el("li", { class: "doc", "data-id": d.id },
      el("div", { class: "doc-head" }, el("span", { class: "doc-name", title: d.name }, d.name), del),
      el("div", { class: "doc-meta muted" }, `${kind} · ${pages}${fmt(d.tokens)} tokens · ${bytes(d.size_bytes)}`),
      cache));
  }
}

function confirmDelete(button, doc) {
  // Two presses, so a stray Enter never deletes; the second within 4 s confirms.
  if (button.dataset.armed) {
    button.disabled = true;
    button.textContent = "Deleting…";
    api(`/v1/documents/${encodeURIComponent(doc.id)}`, { method: "DELETE" })
      .then(refreshLibrary)
      .catch((e) => { button.disabled = false; button.textContent = "Delete"; alertIn($("ask-status"), e.message); });
    return;
  }
  button.dataset.armed = "1";
  button.textContent = "Confirm delete";
  button.classList.add("armed");
  setTimeout(() => {
    if (!button.isConnected || button.disabled) return;
    delete button.dataset.armed;
    button.textContent = "Delete";
    button.classList.remove("armed");
  }, 4000);
}

function schedulePoll() {
  // Poll the cache state only while something changes it: a pack being read, or a question.
  clearTimeout(state.pollTimer);
  for (const id of state.warming) {
    const p = state.packs.get(id);
    if (!p || p.state === "memory" || p.state === "store") state.warming.delete(id);
  }
  // a warm upload's pack may not have started yet ("cold" for a moment): keep looking until it is ready
  const busy = [...state.packs.values()].some((p) => p.state === "prefilling") || state.asking || state.warming.size;
  if (busy) state.pollTimer = setTimeout(() => refreshLibrary().catch(() => {}), 1500);
}

// ------------------------------------------------------------------ upload
function uploadRow(file) {
  const bar = el("span");
  const status = el("span", { class: "upload-status muted" }, "waiting");
  const row = el("li", { class: "upload" },
    el("div", { class: "upload-head" }, el("span", { class: "doc-name", title: file.name }, file.name),
      el("span", { class: "muted" }, bytes(file.size))),
    el("div", { class: "bar small", role: "progressbar", "aria-label": `Upload of ${file.name}`,
                "aria-valuemin": "0", "aria-valuemax": "100" }, bar),
    status);
  $("uploads").append(row);
  return {
    row,
    progress(pct) { bar.style.width = `${pct}%`; row.querySelector(".bar").setAttribute("aria-valuenow", pct); },
    done(text) {
      row.classList.add("ok"); status.className = "upload-status ok"; status.textContent = text;
      row.querySelector(".bar").remove();
    },
    fail(title, message) {
      row.classList.add("failed");
      row.querySelector(".bar").remove();  // a full bar beside an error read as "it worked"
      status.className = "upload-status error";
      status.replaceChildren(el("strong", {}, `${title}. `), message || "");
      row.append(el("button", { type: "button", class: "link", onclick: () => row.remove() }, "Dismiss"));
    },
  };
}

function uploadOne(file, ui) {
  // XMLHttpRequest, not fetch: only it reports upload progress.
  return new Promise((resolve) => {
    if (file.size > state.config.max_upload_bytes) {
      ui.fail("Too large", `${file.name} is ${bytes(file.size)}; this server takes up to ${bytes(state.config.max_upload_bytes)}.`);
      return resolve(false);
    }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/documents${$("warm").checked ? "?prefill=true" : ""}`);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    ui.row.querySelector(".upload-status").textContent = "uploading";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) ui.progress(Math.round((100 * e.loaded) / e.total)); };
    xhr.upload.onload = () => { ui.progress(100); ui.row.querySelector(".upload-status").textContent = "reading the file"; };
    xhr.onerror = () => { ui.fail("Upload failed", "the server could not be reached."); resolve(false); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* handled below */ }
      const result = body && body.data && body.data[0];
      if (xhr.status === 200 && result && result.ok) {
        const d = result.document;
        if ($("warm").checked) d.packs.forEach((id) => state.warming.add(id));
        ui.done(`Added: ${d.pages ? `${d.pages} pages, ` : ""}${fmt(d.tokens)} tokens`);
        // the row goes once the library lists the file: two lines for one file looked like a duplicate
        refreshLibrary().catch(() => {}).finally(() => setTimeout(() => ui.row.remove(), 800));
        return resolve(true);
      }
      if (xhr.status === 401) needKey((body && body.error && body.error.message) || "");
      const code = (result && result.error) || (body && body.error && body.error.code);
      const message = (result && result.message) || (body && body.error && body.error.message) || `HTTP ${xhr.status}`;
      ui.fail(UPLOAD_ERRORS[code] || "Not added", message);
      resolve(false);
    };
    const form = new FormData();
    form.append("files", file, file.name);
    xhr.send(form);
  });
}

async function uploadFiles(files) {
  const queue = [...files].map((f) => [f, uploadRow(f)]);
  const worker = async () => {
    while (queue.length) {
      const [file, ui] = queue.shift();
      if (!(await uploadOne(file, ui))) refreshLibrary().catch(() => {});
    }
  };
  await Promise.all([worker(), worker()]);  // two at a time: parsing is the slow part
}

$("file-input").addEventListener("change", (e) => {
  uploadFiles(e.target.files);
  e.target.value = "";  // choosing the same file again uploads it again
});
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => { e.preventDefault(); uploadFiles(e.dataTransfer.files); });

// ------------------------------------------------------------------ ask
function alertIn(node, message) {
  node.className = "error";
  node.textContent = message;
}

function showProgress(ev, packs) {
  const n = packs.indexOf(ev.pack_id);
  const which = packs.length > 1 ? ` (part ${n + 1} of ${packs.length})` : "";
  const eta = ev.eta_s !== null && ev.eta_s !== undefined ? ` · about ${seconds(ev.eta_s)} left` : "";
  $("progress").hidden = false;
  $("progress-label").textContent =
    `Reading the documents once${which}: ${fmt(ev.done_tokens)} of ${fmt(ev.total_tokens)} tokens (${ev.percent}%)${eta}. ` +
    "Later questions reuse this and answer in about a second.";
  $("progress-fill").style.width = `${ev.percent}%`;
  $("progress-bar").setAttribute("aria-valuenow", String(ev.percent));
  const p = state.packs.get(ev.pack_id);
  if (p) { Object.assign(p, { state: "prefilling", percent: ev.percent, eta_s: ev.eta_s }); renderLibrary(); }
}

function showStats(final, ttftClient) {
  const stats = $("stats");
  const caches = [...new Set(final.packs.map((p) => p.cache))];
  const cacheWords = { memory: "in memory", store: "from the stored cache", prefill: "read now (first question)" };
  const rows = [
    ["Time to first token", seconds(final.timings.first_token_s ?? ttftClient)],
    ["Total time", seconds(final.timings.total_s)],
    ["Documents' tokens reused", `${fmt(final.usage.cached_tokens)} of ${fmt(final.usage.prompt_tokens)}`],
    ["Cache", caches.map((c) => cacheWords[c] || c).join(", ")],
  ];
  stats.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  stats.hidden = false;
}

async function citationContext(c, body) {
  // The cited span inside the text of its page (or ~400 characters around it when unpaginated).
  const from = Math.max(0, c.char_start - 400);
  const to = c.char_end + 400;
  const w = await api(`/v1/documents/${encodeURIComponent(c.document_id)}/text?start=${from}&end=${to}`);
  let lo = w.start;
  let hi = w.end;
  const page = w.pages.find((p) => p.page === c.page);
  if (page) { lo = Math.max(lo, page.char_start); hi = Math.min(hi, page.char_end); }
  const cut = (a, b) => w.text.slice(a - w.start, b - w.start);
  body.replaceChildren(
    lo > 0 ? "… " : "", cut(lo, c.char_start),
    el("mark", {}, cut(c.char_start, c.char_end)),
    cut(c.char_end, hi), hi < w.chars ? " …" : "");
}

function renderCitations(citations) {
  const list = $("citations");
  list.replaceChildren();
  $("cites-empty").hidden = citations.length > 0;
  if (!citations.length) $("cites-empty").textContent = "The answer came with no citation.";
  citations.forEach((c, i) => {
    const body = el("blockquote", { class: "context" }, el("mark", {}, c.snippet));
    const where = c.page ? `page ${c.page}` : "";  // offsets are for programs: a tooltip only
    list.append(el("li", { class: "citation", "data-document": c.document_id, "data-page": c.page ?? "" },
      el("div", { class: "cite-head", title: `characters ${fmt(c.char_start)}–${fmt(c.char_end)} of the extracted text` },
        el("span", { class: "cite-n" }, `${i + 1}`), el("span", { class: "doc-name" }, c.name),
        where ? el("span", { class: "page-tag" }, where) : null),
      body));
    citationContext(c, body).catch(() => { /* the snippet alone stays: it is the cited span */ });
  });
}

async function ask(question) {
  const ctrl = new AbortController();
  state.asking = ctrl;
  $("ask-btn").disabled = true;
  $("stop-btn").hidden = false;
  $("answer").hidden = true;  // shown with the first token: an empty box while reading looked broken
  $("answer").classList.remove("empty");
  $("answer").textContent = "";
  $("stats").hidden = true;
  $("progress").hidden = true;
  $("citations").replaceChildren();
  $("cites-empty").hidden = false;
  $("cites-empty").textContent = "Waiting for the answer…";
  const status = $("ask-status");
  status.className = "muted";
  status.textContent = "Choosing the documents to read…";
  const t0 = performance.now();
  let ttft = null;
  let packs = [];
  let text = "";
  schedulePoll();
  try {
    const r = await fetch("/v1/ask", {
      method: "POST", signal: ctrl.signal,
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ question, stream: true }),  // max_tokens: the server's default
    });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (_) { /* no JSON body */ }
      if (r.status === 401) needKey((body && body.error && body.error.message) || "");
      throw apiError(r.status, body);
    }
    status.textContent = "Answering…";
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data || data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.type === "progress") {
          if (!packs.includes(ev.pack_id)) packs.push(ev.pack_id);
          status.textContent = "Reading the documents…";
          showProgress(ev, packs);
        } else if (ev.type === "token") {
          if (ttft === null) { ttft = (performance.now() - t0) / 1000; $("progress").hidden = true; $("answer").hidden = false; }
          text += ev.text;
          $("answer").textContent = text;
        } else if (ev.type === "citations") {
          $("answer").hidden = false;
          $("answer").textContent = ev.answer || "(the model gave an empty answer)";
          $("answer").classList.toggle("empty", !ev.answer || ev.abstained === true);  // "Not in the documents."
          $("progress").hidden = true;
          renderCitations(ev.citations);
          showStats(ev, ttft);
          status.textContent = "";
        } else if (ev.type === "error") {
          throw apiError(500, ev);
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") status.textContent = "Stopped.";
    else alertIn(status, e.message);
    if (!text) $("answer").hidden = true;
    $("progress").hidden = true;
    $("cites-empty").textContent = "No citations.";
  } finally {
    state.asking = null;
    $("ask-btn").disabled = false;
    $("stop-btn").hidden = true;
    refreshLibrary().catch(() => {});
  }
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (q && !state.asking) ask(q);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("ask-form").requestSubmit();
  }
});
$("stop-btn").addEventListener("click", () => state.asking && state.asking.abort());
document.querySelector(".skip").addEventListener("click", (e) => { e.preventDefault(); $("question").focus(); });

// ------------------------------------------------------------------ start
(async function start() {
  try {
    const cfg = await (await fetch("/ui/config.json")).json();
    state.config = Object.assign(state.config, cfg);
    $("model-name").textContent = cfg.model;
    $("warm").checked = !!cfg.warm_on_upload;
    if (cfg.auth) { $("key-form").hidden = false; $("api-key").value = state.key; }
  } catch (_) { /* defaults: no auth */ }
  if (state.config.auth && !state.key) return needKey("");
  refreshLibrary().catch((e) => { if (e.status !== 401) alertIn($("ask-status"), e.message); });
})();
