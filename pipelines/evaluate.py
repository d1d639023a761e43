"""``mmrerank eval`` / ``export-trec``: retrieval vs rerank quality of a published run against qrels.

Metrics come from ``pytrec_eval`` (the ``pytrec-eval-terrier`` wheel): it wraps the reference trec_eval C
code in one binary wheel needing only numpy/scipy and answers at once, whereas ``ranx`` pulls numba, llvmlite,
ir-datasets, seaborn, ... (a 700 MB venv here) and spent 55 s JIT-compiling its first call on this machine.

What is measured (mean over the *judged* queries: those in the qrels with at least one doc of relevance > 0;
a judged query missing from the run, e.g. rejected at search, counts as 0 for every metric; run queries
without judgements are ignored; relevance <= 0 means not relevant, and negative grades count as 0 gain):

- ranking metrics, Recall@1/5/10/k, MRR@10, nDCG@10 (graded gain = relevance, log2 discount):
  *retrieval* ranks the candidates by their ``rank``; *rerank* ranks every scored pair: first the kept
  list (``results``, in its final-score order), then the scored pairs that were not kept, by
  ``rerank_score`` descending, ties by ``doc_id`` (the final score of non-kept pairs is not stored). With
  the default fusion (``none``) and ``top_n`` selection this is exactly the final ranking of all
  candidates. Pairs the reranker rejected are absent from the rerank list (they count as not found).
  Ranks are passed to trec_eval as strictly decreasing scores, so its own tie-breaking never reorders.
- set metrics (the RagVL protocol, for threshold selection): per query P = |kept & rel| / |kept|,
  R = |kept & rel| / |rel|, F1 = 2PR / (P + R); a judged query whose kept list is empty scores P = R =
  F1 = 0 (it kept nothing it should have) and is counted in ``queries.rerank_empty``. The retrieval
  column uses the retrieval top-n, n = the run's selection size (``top_n``, or ``k`` for
  ``top_k_above_threshold``; for ``threshold`` mode or without the run config, the longest kept list).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from operators import layout as L
from operators.metrics import Qrels, Ranking, stage_scores
from operators.runs import read_stage, resolve_run, run_config
from operators.storage import Storage, join

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

METRICS_FILE = L.METRICS  # written beside the run, after publishing (not in its manifest)
CUTOFFS = (1, 5, 10)
SET_METRICS = ("set_precision", "set_recall", "set_f1")


class QrelsError(ValueError):
    """A qrels file does not follow the contract (names the file and the line or row)."""


# --- run and qrels loading ----------------------------------------------------------------------------


def _parse_trec_qrels(text: str, uri: str) -> list[tuple[str, str, int, str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        f = s.split()
        if len(f) != 4:
            raise QrelsError(f"{uri}:{n}: expected 4 fields 'qid 0 docid relevance', got {len(f)}: {s[:80]!r}")
        try:
            rel = int(f[3])
        except ValueError:
            raise QrelsError(f"{uri}:{n}: relevance must be an integer, got {f[3][:40]!r}") from None
        rows.append((f[0], f[2], rel, f"{uri}:{n}"))
    return rows


def _parquet_qrels(data: bytes, uri: str) -> list[tuple[str, str, int, str]]:
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - a corrupt file is a user error, said in one line
        raise QrelsError(f"{uri}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for col, ok in (("query_id", pa.types.is_string), ("doc_id", pa.types.is_string),
                    ("relevance", pa.types.is_integer)):
        if col not in t.column_names:
            raise QrelsError(f"{uri}: required column '{col}' is missing (has {t.column_names})")
        typ = t.schema.field(col).type
        if not (ok(typ) or (col != "relevance" and pa.types.is_large_string(typ))):
            raise QrelsError(f"{uri}: column '{col}' has type {typ}, the qrels contract says "
                             f"{'int32' if col == 'relevance' else 'string'}")
        if t.column(col).null_count:
            row = next(i for i, v in enumerate(t.column(col).is_null().to_pylist()) if v)
            raise QrelsError(f"{uri}: row {row}: column '{col}' is null")
    q, d, r = (t.column(c).to_pylist() for c in ("query_id", "doc_id", "relevance"))
    return [(a, b, c, f"{uri}: row {i}") for i, (a, b, c) in enumerate(zip(q, d, r, strict=True))]


def load_qrels(uri: str, storage: Storage | None = None) -> Qrels:
    """Qrels from Parquet (the QRELS contract) or TREC text (``qid 0 docid rel``), detected by content."""
    storage = storage or Storage()
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: qrels file not found") from None
    if data[:4] == b"PAR1" or uri.endswith(".parquet"):
        rows = _parquet_qrels(data, uri)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise QrelsError(f"{uri}: neither Parquet nor UTF-8 TREC qrels text") from None
        rows = _parse_trec_qrels(text, uri)
    out: Qrels = {}
    for q, d, rel, where in rows:
        if not q or not d:
            raise QrelsError(f"{where}: empty query_id or doc_id")
        judged = out.setdefault(q, {})
        if d in judged and judged[d] != rel:
            raise QrelsError(f"{where}: ({q}, {d}) is judged again with a different relevance "
                             f"({judged[d]}, now {rel})")
        judged[d] = int(rel)
    if not out:
        raise QrelsError(f"{uri}: no judgements")
    return out


def _rankings(storage: Storage, run_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Both stages of a run as per-query doc lists (plus the scores export_trec needs)."""
    cand = read_stage(storage, run_dir, manifest, L.prefix(L.CANDIDATES), {
        "query_id": pa.string(), "rank": pa.int64(), "doc_id": pa.string(), "retrieval_score": pa.float32()})
    scored = read_stage(storage, run_dir, manifest, L.prefix(L.SCORED), {
        "query_id": pa.string(), "doc_id": pa.string(), "rerank_score": pa.float32()})
    res = read_stage(storage, run_dir, manifest, L.prefix(L.RESULTS), {
        "query_id": pa.string(), "rank": pa.int64(), "doc_id": pa.string(), "rerank_score": pa.float32(),
        "final_score": pa.float32(), "reranker": pa.string()}, optional=("final_score", "reranker"))
    if not cand.num_rows:
        raise ValueError(f"{run_dir}: the run has no candidates")

    retrieval = _group(cand.sort_by([("query_id", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")]))
    kept = _group(res.sort_by([("query_id", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")]))
    by_rerank = _group(scored.sort_by([("query_id", "ascending"), ("rerank_score", "descending"),
                                       ("doc_id", "ascending")]))
    rerank: Ranking = {}
    for q in sorted(set(by_rerank) | set(kept)):
        head = kept.get(q, [])
        seen = set(head)
        rerank[q] = head + [d for d in by_rerank.get(q, []) if d not in seen]
    return {"cand": cand, "res": res, "retrieval": retrieval, "kept": kept, "rerank": rerank,
            "k": int(max(len(v) for v in retrieval.values()))}


def _group(t: pa.Table) -> Ranking:
    """Sorted rows -> query_id -> doc_ids in order (a doc repeated within a query keeps its first place)."""
    out: Ranking = {}
    seen: dict[str, set[str]] = {}
    for q, d in zip(t.column("query_id").to_pylist(), t.column("doc_id").to_pylist(), strict=True):
        s = seen.setdefault(q, set())
        if d not in s:
            s.add(d)
            out.setdefault(q, []).append(d)
    return out


def _selection_size(storage: Storage, run_dir: str, manifest: dict[str, Any], kept: Ranking) -> tuple[int, str]:
    """n for the retrieval top-n set: the run config's selection cap, else the longest kept list."""
    longest = max((len(v) for v in kept.values()), default=0)
    try:
        sel = run_config(storage, run_dir, manifest)["rerank"]["selection"]
        if sel.get("mode") == "top_n":
            return int(sel["top_n"]), "rerank.selection.top_n"
        if sel.get("mode") == "top_k_above_threshold":
            return int(sel["k"]), "rerank.selection.k"
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        pass
    return max(longest, 1), "longest kept list"


def _compute(run: str, qrels: str, k: int | None, storage: Storage | None) -> dict[str, Any]:
    storage = storage or Storage()
    run_dir, manifest = resolve_run(run, storage)
    all_qrels = load_qrels(qrels, storage)
    judged: Qrels = {q: {d: max(r, 0) for d, r in docs.items()}
                     for q, docs in all_qrels.items() if any(r > 0 for r in docs.values())}
    if not judged:
        raise QrelsError(f"{qrels}: no query has a relevant doc (relevance > 0)")
    r = _rankings(storage, run_dir, manifest)
    k_run = r["k"]
    kk = int(k) if k is not None else k_run
    if kk <= 0:
        raise ValueError(f"k must be positive, got {kk}")
    cutoffs = sorted(set(CUTOFFS) | {kk})
    n, n_source = _selection_size(storage, run_dir, manifest, r["kept"])
    top_n = {q: docs[:n] for q, docs in r["retrieval"].items()}
    ret = stage_scores(judged, r["retrieval"], top_n, cutoffs)
    rer = stage_scores(judged, r["rerank"], r["kept"], cutoffs)
    in_run = set(r["retrieval"]) | set(r["rerank"])
    missing = sorted(q for q in judged if q not in in_run)
    if len(missing) == len(judged):
        log.warning("none of the %d judged queries of %s is in run %s: every metric is 0", len(judged), qrels,
                    run_dir)
    elif missing:
        log.warning("%d judged queries are missing from the run and count as 0 (e.g. %s)", len(missing),
                    missing[:3])
    return {
        "run_dir": run_dir, "manifest": manifest, "qrels": qrels, "k": kk, "k_run": k_run, "cutoffs": cutoffs,
        "top_n": n, "top_n_source": n_source, "judged": judged, "missing": missing, "in_run": in_run,
        "kept": r["kept"], "retrieval": ret, "rerank": rer, "rankings": r,
    }


def _metric_names(cutoffs: list[int]) -> list[str]:
    return [f"recall@{c}" for c in cutoffs] + ["mrr@10", "ndcg@10", *SET_METRICS]


def evaluate(run: str, qrels: str, k: int | None = None, storage: Storage | None = None) -> dict[str, Any]:
    """Retrieval vs rerank metrics of a verified run (dir or root); writes ``<run_dir>/metrics.json``."""
    c = _compute(run, qrels, k, storage)
    storage = storage or Storage()
    names = _metric_names(c["cutoffs"])
    judged = sorted(c["judged"])
    nq = len(judged)
    stages = {s: {m: sum(c[s][q][m] for q in judged) / nq for m in names} for s in ("retrieval", "rerank")}
    empty = sum(1 for q in judged if q in c["in_run"] and not c["kept"].get(q))
    metrics: dict[str, Any] = {
        "run_id": c["manifest"]["run_id"], "run_dir": c["run_dir"], "qrels": qrels,
        "k": c["k"], "k_run": c["k_run"], "top_n": c["top_n"], "top_n_source": c["top_n_source"],
        "metrics": names,
        "queries": {"judged": nq, "evaluated_in_run": nq - len(c["missing"]),
                    "missing_from_run": len(c["missing"]), "unjudged_in_run": len(c["in_run"] - set(judged)),
                    "rerank_empty": empty},
        "retrieval": stages["retrieval"], "rerank": stages["rerank"],
        "delta": {m: stages["rerank"][m] - stages["retrieval"][m] for m in names},
        "library": _library(),
        "notes": ("mean over judged queries (>= 1 doc with relevance > 0); missing queries count as 0; "
                  "rerank ranking = kept list (results order) then non-kept scored pairs by rerank_score desc, "
                  "doc_id asc; set metrics: retrieval top_n vs the kept list, empty kept list -> P=R=F1=0"),
    }
    storage.write_json(join(c["run_dir"], METRICS_FILE), metrics)
    log.info("metrics of run %s over %d judged queries written to %s", metrics["run_id"], nq,
             join(c["run_dir"], METRICS_FILE))
    return metrics


def _library() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pytrec-eval-terrier", "pytrec_eval"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "pytrec_eval"  # pragma: no cover


def per_query(run: str, qrels: str, k: int | None = None, storage: Storage | None = None) -> pd.DataFrame:
    """One row per judged query: ``<metric>_retrieval``, ``<metric>_rerank``, ``<metric>_delta`` (no writes)."""
    import pandas as pd

    c = _compute(run, qrels, k, storage)
    rows = []
    for q in sorted(c["judged"]):
        row: dict[str, Any] = {"query_id": q, "in_run": q in c["in_run"],
                               "relevant": sum(1 for r in c["judged"][q].values() if r > 0),
                               "kept": len(c["kept"].get(q, []))}
        for m in _metric_names(c["cutoffs"]):
            a, b = c["retrieval"][q][m], c["rerank"][q][m]
            row[f"{m}_retrieval"], row[f"{m}_rerank"], row[f"{m}_delta"] = a, b, b - a
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(metrics: dict[str, Any]) -> list[str]:
    """Printable lines: one row per metric, columns retrieval / rerank / delta, then the query counts."""
    q = metrics["queries"]
    lines = [f"run {metrics['run_id']}: {q['judged']} judged queries ({q['missing_from_run']} missing from the "
             f"run, scored 0), k={metrics['k']}, set metrics at retrieval top-{metrics['top_n']} vs kept",
             f"{'metric':<16} {'retrieval':>10} {'rerank':>10} {'delta':>10}"]
    for m in metrics["metrics"]:
        a, b = metrics["retrieval"][m], metrics["rerank"][m]
        lines.append(f"{m:<16} {a:>10.4f} {b:>10.4f} {b - a:>+10.4f}")
    lines.append(f"queries with an empty kept list: {q['rerank_empty']}; unjudged queries in the run (ignored): "
                 f"{q['unjudged_in_run']}")
    return lines


# --- TREC run export ----------------------------------------------------------------------------------


def _tag(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._+-]", "_", name)).strip("_") or "rerank"


def _score(x: float | None) -> str:
    import numpy as np

    if x is None:
        return "nan"
    return str(np.float32(x))  # the shortest text that reads back as the same float32


def export_trec(run: str, out: str | None = None, storage: Storage | None = None) -> list[str]:
    """``retrieval.run`` (candidates) and ``rerank.run`` (kept results, score = final_score) as TREC run files
    (``qid Q0 docid rank score tag``), sorted by query_id then rank; in ``out`` or ``<run_dir>/trec``.

    trec_eval re-sorts by score and breaks exact ties by docno descending; our ranks break ties by doc_id
    ascending, so on exactly tied scores its order can differ from the rank column.
    """
    storage = storage or Storage()
    run_dir, manifest = resolve_run(run, storage)
    r = _rankings(storage, run_dir, manifest)
    out_dir = (out or L.stage_dir(run_dir, L.TREC)).rstrip("/")
    res = r["res"]
    labels = sorted({x for x in res.column("reranker").to_pylist() if x})
    if len(labels) > 1:
        log.warning("run %s has results from several rerankers %s: tagging with the first", run_dir, labels)
    tag = "mmrerank-" + _tag(labels[0] if labels else "rerank")
    final = res.column("final_score")
    if final.null_count == len(res) and len(res):
        log.warning("%s: results have no final_score: exporting rerank_score", run_dir)
        final = res.column("rerank_score")
    stages = [
        ("retrieval.run", r["cand"], r["cand"].column("retrieval_score"), "mmrerank-retrieval"),
        ("rerank.run", res, final, tag),
    ]
    written = []
    for name, t, scores, label in stages:
        t = t.select(["query_id", "rank", "doc_id"]).append_column("score", scores)
        t = t.sort_by([("query_id", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")])
        lines = [f"{q} Q0 {d} {rank} {_score(s)} {label}\n" for q, rank, d, s in zip(
            *(t.column(c).to_pylist() for c in ("query_id", "rank", "doc_id", "score")), strict=True)]
        bad = next((ln for ln in lines if len(ln.split()) != 6), None)
        if bad is not None:
            raise ValueError(f"{run_dir}: an id contains whitespace, cannot write a TREC run line: {bad!r}")
        uri = join(out_dir, name)
        storage.write_bytes(uri, "".join(lines).encode())
        log.info("wrote %s (%d lines, tag %s)", uri, len(lines), label)
        written.append(uri)
    return written
