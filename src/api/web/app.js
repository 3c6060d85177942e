// The search page: results as page thumbnails, a status panel fed by server-sent events.
// No framework, no build step, nothing fetched from elsewhere.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);

// Every request carries the token when the page was opened with one (off loopback).
function url(path, params = {}) {
  const u = new URL(path, location.href);
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
  if (TOKEN) u.searchParams.set("token", TOKEN);
  return u.pathname + u.search;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

const baseName = (p) => (p || "").split(/[\\/]/).pop();

function fileUrl(path, page) {
  const u = "file://" + encodeURI(path).replace(/#/g, "%23").replace(/\?/g, "%3F");
  return page ? `${u}#page=${page}` : u;
}

// ---- search -------------------------------------------------------------------------------

let searching = 0;

async function search(ev) {
  ev.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  const mode = document.querySelector("input[name=mode]:checked").value;
  const mine = ++searching;
  const msg = $("message");
  msg.className = "muted";
  msg.textContent = "Searching…";
  try {
    const r = await fetch(url("/api/search", { q, mode, limit: 24 }));
    const body = await r.json();
    if (mine !== searching) return;
    if (!r.ok) throw new Error(body.error || r.statusText);
    show(body);
  } catch (e) {
    if (mine !== searching) return;
    msg.className = "error";
    msg.textContent = "Search failed: " + e.message;
  }
}

function show(report) {
  const hits = report.results.hits;
  const msg = $("message");
  const secs = (report.results.times.total_ms + report.query_embedding_ms) / 1000;
  msg.textContent = hits.length
    ? `${hits.length} result${hits.length === 1 ? "" : "s"} for “${report.query}” in ${secs.toFixed(2)} s`
    : `No results for “${report.query}”.`;
  const grid = $("results");
  grid.replaceChildren(...hits.map(card));
  const first = grid.querySelector(".card");
  if (first) first.focus();
}

function card(hit) {
  const docId = hit.metadata.doc_id;
  const page = hit.page || 1;
  const thumb = el("div", { class: "thumb" });
  if (docId) {
    const img = el("img", {
      src: url(`/api/thumbnail/${docId}/${page}`),
      alt: `Page ${page} of ${hit.filename || ""}`,
      loading: "lazy",
    });
    img.addEventListener("error", () => thumb.replaceChildren(el("div", { class: "none", text: "no page image" })));
    thumb.append(img);
  }
  const reveal = el("button", { type: "button", text: "Reveal in folder", title: "Show it in its folder (Shift+Enter)" });
  reveal.addEventListener("click", (e) => { e.stopPropagation(); openOnDesktop(docId, true); });
  const link = el("a", { href: fileUrl(hit.source_path, page), text: "file://", title: "The file's own address (copy it into the address bar)" });
  link.addEventListener("click", (e) => e.stopPropagation());
  const c = el("article", { class: "card", tabindex: "0", "data-doc": docId || "", "data-page": page },
    thumb,
    el("div", { class: "meta" },
      el("div", { class: "name", text: hit.filename || hit.id, title: hit.source_path || "" }),
      el("div", { class: "line" },
        el("span", { text: `page ${page}` }),
        el("span", { class: "kind", text: hit.kind }),
        el("span", { class: "score", text: hit.score.toFixed(2) })),
      // PDFium marks a hyphen at a line's end with U+FFFE: the word goes on on the next line.
      hit.snippet ? el("p", { class: "snippet", text: hit.snippet.replace(/\uFFFE\s*/g, "") }) : null,
      el("div", { class: "actions" }, reveal, link)));
  c.addEventListener("click", () => openDocument(docId, page));
  c.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); e.shiftKey ? openOnDesktop(docId, true) : openDocument(docId, page); }
  });
  return c;
}

// The agent serves the indexed file itself: a browser does not let a web page open file://
// addresses, and its PDF viewer honours #page=N.
function openDocument(docId, page) {
  if (!docId) return;
  window.open(url(`/api/document/${docId}`) + `#page=${page}`, "_blank", "noopener");
}

async function openOnDesktop(docId, reveal) {
  if (!docId) return;
  const msg = $("message");
  try {
    const r = await fetch(url("/api/open"), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ doc_id: docId, reveal }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
  } catch (e) {
    msg.className = "error";
    msg.textContent = "Could not open it: " + e.message;
  }
}

// Arrow keys move between cards, row by row as the grid lays them out.
function move(e) {
  if (!["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(e.key)) return;
  const cards = [...$("results").querySelectorAll(".card")];
  const i = cards.indexOf(document.activeElement);
  if (i < 0) {
    if (e.key === "ArrowDown" && document.activeElement === $("q") && cards.length) { e.preventDefault(); cards[0].focus(); }
    return;
  }
  e.preventDefault();
  const top = (c) => c.getBoundingClientRect().top;
  const perRow = Math.max(1, cards.filter((c) => Math.abs(top(c) - top(cards[0])) < 2).length);
  const next = { ArrowLeft: i - 1, ArrowRight: i + 1, ArrowUp: i - perRow, ArrowDown: i + perRow }[e.key];
  if (next < 0 && e.key === "ArrowUp") $("q").focus();
  else if (cards[next]) cards[next].focus();
}

// ---- status -------------------------------------------------------------------------------

const fmt = (n) => (n == null ? "–" : Number(n).toLocaleString());

function setList(id, items, empty) {
  const ul = $(id);
  ul.replaceChildren(...(items.length ? items : [el("li", { class: "muted", text: empty })]));
}

function render(s) {
  $("st-files").textContent = fmt(s.indexed.files);
  $("st-pages").textContent = fmt(s.indexed.pages);
  $("st-chunks").textContent = fmt(s.indexed.chunks);
  $("st-queued").textContent = fmt(s.queue.queued);
  $("st-working").textContent = fmt(s.queue.in_progress);
  $("st-failed").textContent = fmt(s.queue.failed);
  setList("st-progress", (s.in_progress || []).map((d) => el("li", {
    text: `${baseName(d.path)} — ${d.stage}` + (d.num_pages ? ` (${d.pages_embedded}/${d.num_pages} pages)` : ""),
    title: d.path,
  })), "nothing");
  setList("st-failures", (s.failures || []).slice(0, 8).map((f) => el("li", {},
    el("strong", { text: baseName(f.path) }), ": ", el("span", { class: "bad", text: f.reason }))), "none");
  const m = s.model || {};
  const where = m.device ? ` on ${m.device}${m.dtype ? " (" + m.dtype + ")" : ""}` : "";
  const model = $("st-model");
  model.className = m.state === "failed" || m.fell_back_to_cpu ? "bad" : "";
  model.textContent = `${baseName(m.name)}: ${(m.state || "").replace("_", " ")}${where}` +
    (m.fell_back_to_cpu ? " — fell back to the CPU" : "") + (m.error ? ` — ${m.error}` : "");
  const c = s.chroma || {};
  const chroma = $("st-chroma");
  chroma.replaceChildren(
    el("span", { class: c.reachable === false ? "bad" : c.reachable ? "ok" : "muted",
      text: c.reachable === false ? "✘ unreachable" : c.reachable ? "✔ reachable" : "not checked yet" }),
    ` ${c.url || ""}`, c.error ? ` — ${c.error}` : "");
  const warnings = [
    ...(s.missing_folders || []).map((f) => `watched folder missing: ${f}`),
    ...(s.task_failures || []).map((t) => `${t.task} stopped: ${t.reason}`),
    ...(s.sync_waiting ? [s.sync_waiting] : []),
  ];
  const w = $("st-warnings");
  w.hidden = !warnings.length;
  w.textContent = warnings.join("; ");
}

function listen() {
  const live = $("live");
  const events = new EventSource(url("/api/events"));
  events.addEventListener("status", (e) => {
    live.textContent = "live";
    live.className = "pill live";
    render(JSON.parse(e.data));
  });
  // EventSource reconnects by itself.
  events.addEventListener("error", () => {
    live.textContent = "reconnecting…";
    live.className = "pill down";
  });
}

$("search").addEventListener("submit", search);
document.addEventListener("keydown", move);
listen();
