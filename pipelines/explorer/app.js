// mmrerank results explorer: plain JS, no dependencies, no network beyond this app's own JSON endpoints.
// Every id, caption and query text is untrusted: it only ever reaches the DOM as a text node or an
// attribute value (textContent / setAttribute), never as markup.
"use strict";

const THUMB = 128;
const DOCS_PER_CALL = 200;
let facts = null;
let seq = 0; // the latest view; answers of older ones are dropped

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(4);
}

function setStatus(text, kind) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = "status" + (kind ? " " + kind : "");
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : "request failed");
    this.status = status;
  }
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const d = data && (typeof data.message === "string" ? data.message : data.detail);
    throw new ApiError(r.status, typeof d === "string" ? d : r.statusText);
  }
  return data;
}

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

// Wait for the app to hold a run: 503 / "loading" while it loads the published run.
async function waitForRun() {
  for (let i = 0; ; i++) {
    let h = null;
    try { h = await api("/healthz"); } catch (e) { h = null; }
    if (h && (h.status === "ok" || h.status === "degraded")) return h;
    const why = h ? (h.status === "loading" ? "loading the published run" : "no run to serve: " + (h.reload_error || h.status))
      : "the app is not answering";
    setStatus("Waiting: " + why + " (retrying)…", "wait");
    document.body.dataset.state = "waiting";
    await sleep(Math.min(5000, 500 * (i + 1)));
  }
}

function describe(obj) {
  if (!obj) return "–";
  return Object.entries(obj).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => k + "=" + v).join(", ");
}

function renderFacts(f, health) {
  const dl = document.getElementById("facts");
  dl.replaceChildren();
  const corpus = (f.stages && f.stages.embed_corpus) || {};
  const rows = [["run", f.run_id], ["created", f.created], ["reranker", f.reranker],
    ["embedder", f.embed_model], ["index", f.index_factory + ", k=" + f.search_k],
    ["fusion", describe(f.fusion)], ["selection", describe(f.selection)],
    ["corpus", (corpus.rows_ok ?? "?") + " docs indexed, " + (corpus.rows_rejected ?? "?") + " rejected"],
    ["queries", f.queries + " (" + f.result_rows + " kept rows)"], ["qrels", f.has_qrels ? "yes" : "none"]];
  for (const [k, v] of rows) dl.append(el("div", {}, el("dt", {}, k), el("dd", {}, v)));
  if (health.status === "degraded") {
    dl.append(el("div", {class: "degraded"}, el("dt", {}, "degraded"), el("dd", {}, health.reload_error || "")));
  }
}

// --- state in the URL ----------------------------------------------------------------------------------
function stateFromUrl() {
  const p = new URLSearchParams(location.search);
  for (const kind of ["q", "text", "like"]) {
    if (p.get(kind)) return {kind, value: p.get(kind)};
  }
  return null;
}

function go(kind, value) {
  const p = new URLSearchParams();
  p.set(kind, value);
  history.pushState(null, "", "?" + p.toString());
  render();
}

// --- views ---------------------------------------------------------------------------------------------
async function viewQuery(qid) {
  const v = await api("/v1/explore/queries/" + encodeURIComponent(qid));
  return {title: ["Query ", el("code", {}, v.query_id), v.text ? ": " : "", v.text ? el("q", {}, v.text) : ""],
    retrieval: v.retrieval, reranked: v.reranked, relevance: v.relevance, metrics: v.metrics,
    note: "precomputed by run " + v.run_id};
}

async function viewText(text) {
  const k = (facts && facts.search_k) || 100;
  const [ret, rr] = await Promise.all([
    api("/v1/search", {text, top_k: k, rerank: false}), api("/v1/search", {text, top_k: k, rerank: true})]);
  const kept = new Map(rr.results.map((r) => [r.doc_id, r.rank]));
  const retrieval = ret.results.map((r) => ({...r, rerank_score: null, final_score: null,
    kept_rank: kept.get(r.doc_id) ?? null, scored: null}));
  const retRank = new Map(ret.results.map((r) => [r.doc_id, r.rank]));
  const reranked = rr.results.map((r) => ({...r, retrieval_rank: retRank.get(r.doc_id) ?? null}));
  return {title: ["Live search: ", el("q", {}, text)], retrieval, reranked, relevance: null, metrics: null,
    note: "live: " + fmt(rr.timing.total_ms) + " ms with " + rr.reranker};
}

async function viewLike(docId) {
  const k = (facts && facts.search_k) || 100;
  const v = await api("/v1/explore/like", {doc_id: docId, top_k: k});
  const kept = new Map((v.reranked || []).map((r) => [r.doc_id, r.rank]));
  const retrieval = v.retrieval.map((r) => ({...r, rerank_score: null, final_score: null,
    kept_rank: v.reranked ? (kept.get(r.doc_id) ?? null) : null, scored: null, unranked: !v.reranked}));
  const retRank = new Map(v.retrieval.map((r) => [r.doc_id, r.rank]));
  const reranked = (v.reranked || []).map((r) => ({...r, retrieval_rank: retRank.get(r.doc_id) ?? null}));
  return {title: ["More like ", el("code", {}, docId)], retrieval, reranked, relevance: null, metrics: null,
    note: v.reranked ? "image query: the doc's embedding; reranked against its caption" :
      "image query: the doc's embedding (no caption to rerank against)"};
}

async function captions(ids) {
  const out = new Map();
  for (let i = 0; i < ids.length; i += DOCS_PER_CALL) {
    const r = await api("/v1/docs", {doc_ids: ids.slice(i, i + DOCS_PER_CALL)});
    for (const d of r.docs) out.set(d.doc_id, d);
  }
  return out;
}

function dropReason(r) {
  if (r.kept_rank !== null && r.kept_rank !== undefined) return null;
  if (r.scored === false) return "not scored (rerank reject)";
  const sel = (facts && facts.selection) || {};
  if (r.final_score !== null && r.final_score !== undefined && sel.threshold !== null && sel.threshold !== undefined
      && sel.mode !== "top_n" && r.final_score < sel.threshold) return "dropped: below threshold " + sel.threshold;
  if (sel.mode === "top_n" && r.scored !== null) return "dropped: past top_n=" + sel.top_n;
  if (sel.mode === "top_k_above_threshold" && r.scored !== null) return "dropped: past k=" + sel.k;
  return "dropped: not in the kept list";
}

function score(label, key, value) {
  return el("div", {}, el("dt", {}, label),
    el("dd", {"data-score": key, "data-value": value === null || value === undefined ? "" : String(value)}, fmt(value)));
}

function card(r, side, docs, relevance) {
  const d = docs.get(r.doc_id);
  const rel = relevance ? relevance[r.doc_id] : undefined;
  const cls = ["card", side === "retrieval" && r.kept_rank === null && r.scored !== null ? "dropped" : "",
    side === "retrieval" && r.kept_rank === null && r.scored === null && !r.unranked ? "notkept" : "",
    rel > 0 ? "relevant" : ""].filter(Boolean).join(" ");
  const li = el("li", {class: cls, "data-doc-id": r.doc_id, "data-rank": r.rank});
  li.append(el("img", {src: "/v1/docs/" + encodeURIComponent(r.doc_id) + "/thumbnail?size=" + THUMB,
    alt: "", width: THUMB, height: THUMB, loading: "lazy"}));
  li.append(el("p", {class: "rank"}, "#" + r.rank, rel > 0 ? el("span", {class: "badge rel"}, "relevant (" + rel + ")") : null));
  li.append(el("p", {class: "caption"}, d && d.caption !== null ? d.caption : "(no caption)"));
  li.append(el("p", {class: "docid"}, el("code", {}, r.doc_id)));
  const dl = el("dl", {class: "scores"});
  if (side === "retrieval") {
    dl.append(score("retrieval", "retrieval_score", r.retrieval_score));
    if (r.scored !== null) {
      dl.append(score("rerank", "rerank_score", r.rerank_score), score("final", "final_score", r.final_score));
    }
    const why = r.unranked ? null : dropReason(r);
    li.append(dl);
    if (!r.unranked) {
      li.append(why ? el("p", {class: "badge drop"}, why) : el("p", {class: "badge kept"}, "kept #" + r.kept_rank));
    }
  } else {
    dl.append(score("retrieval", "retrieval_score", r.retrieval_score), score("rerank", "rerank_score", r.rerank_score),
      score("final", "final_score", r.final_score));
    const from = r.retrieval_rank;
    const delta = from === null || from === undefined ? "new" : from - r.rank;
    const txt = delta === "new" ? "not in retrieval top-k" : delta > 0 ? "▲ " + delta + " (from #" + from + ")"
      : delta < 0 ? "▼ " + (-delta) + " (from #" + from + ")" : "= (#" + from + ")";
    li.append(dl, el("p", {class: "move " + (delta > 0 ? "up" : delta < 0 ? "down" : "same"), "data-move": String(delta)}, txt));
  }
  const more = el("button", {type: "button", class: "like", "aria-label": "More like this doc"}, "More like this");
  more.addEventListener("click", () => go("like", r.doc_id));
  li.append(more);
  return li;
}

function renderMetrics(m) {
  const box = document.getElementById("metrics");
  box.replaceChildren();
  if (!m) return;
  const names = Object.keys(m.retrieval);
  const head = el("tr", {}, el("th", {}, "stage"), ...names.map((n) => el("th", {scope: "col"}, n)));
  const row = (label, f) => el("tr", {}, el("th", {scope: "row"}, label), ...names.map((n) => el("td", {}, fmt(f(n)))));
  box.append(el("table", {},
    el("caption", {}, "This query's metrics (" + m.relevant + " relevant in the qrels; relevant docs are outlined)"),
    el("thead", {}, head),
    el("tbody", {}, row("retrieval", (n) => m.retrieval[n]), row("rerank", (n) => m.rerank[n]),
      row("Δ", (n) => m.rerank[n] - m.retrieval[n]))));
}

async function render() {
  const st = stateFromUrl();
  const my = ++seq;
  const grids = [document.getElementById("retrieval"), document.getElementById("reranked")];
  if (!st) {
    document.getElementById("query").replaceChildren(el("p", {}, "Look up a query id of the run, or type free text."));
    grids.forEach((g) => g.replaceChildren());
    renderMetrics(null);
    document.body.dataset.state = "ready";
    document.body.dataset.view = "";
    setStatus("Ready.", "");
    return;
  }
  document.body.dataset.state = "loading";
  setStatus("Loading…", "wait");
  if (st.kind === "q") document.getElementById("qid").value = st.value;
  if (st.kind === "text") document.getElementById("text").value = st.value;
  try {
    const v = st.kind === "q" ? await viewQuery(st.value) : st.kind === "text" ? await viewText(st.value)
      : await viewLike(st.value);
    const ids = [...new Set([...v.retrieval, ...v.reranked].map((r) => r.doc_id))];
    const docs = ids.length ? await captions(ids) : new Map();
    if (my !== seq) return;
    document.getElementById("query").replaceChildren(el("h2", {}, ...v.title), el("p", {class: "note"}, v.note));
    grids[0].replaceChildren(...v.retrieval.map((r) => card(r, "retrieval", docs, v.relevance)));
    grids[1].replaceChildren(...v.reranked.map((r) => card(r, "reranked", docs, v.relevance)));
    if (!v.reranked.length) grids[1].append(el("li", {class: "empty"}, "nothing kept"));
    renderMetrics(v.metrics);
    document.body.dataset.view = location.search;
    document.body.dataset.state = "ready";
    setStatus(v.retrieval.length + " retrieved, " + v.reranked.length + " kept.", "");
  } catch (e) {
    if (my !== seq) return;
    grids.forEach((g) => g.replaceChildren());
    renderMetrics(null);
    document.body.dataset.view = location.search;
    document.body.dataset.state = "error";
    const code = e instanceof ApiError ? e.status : 0;
    setStatus((code === 503 ? "The app is loading a run (503): " : code ? "Error " + code + ": " : "Error: ") + e.message, "error");
  }
}

let suggestTimer = null;
function suggest() {
  clearTimeout(suggestTimer);
  suggestTimer = setTimeout(async () => {
    const prefix = document.getElementById("qid").value;
    try {
      const r = await api("/v1/explore/queries?limit=20&prefix=" + encodeURIComponent(prefix));
      document.getElementById("qid-list").replaceChildren(...r.query_ids.map((q) => el("option", {value: q})));
    } catch (e) { /* suggestions are a convenience: the lookup itself reports errors */ }
  }, 150);
}

async function main() {
  document.getElementById("by-id").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = document.getElementById("qid").value.trim();
    if (v) go("q", v);
  });
  document.getElementById("by-text").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = document.getElementById("text").value.trim();
    if (v) go("text", v);
  });
  document.getElementById("qid").addEventListener("input", suggest);
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (ev.key === "/" && !(t instanceof HTMLInputElement)) { ev.preventDefault(); document.getElementById("text").focus(); }
  });
  window.addEventListener("popstate", render);
  const health = await waitForRun();
  for (;;) {
    try { facts = await api("/v1/explore/run"); break; } catch (e) {
      setStatus("Waiting for the run's facts: " + e.message, "wait");
      await sleep(1000);
    }
  }
  renderFacts(facts, health);
  suggest();
  await render();
}

main();
