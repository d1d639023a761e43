"""The explorer's ingress side: run facts, query suggestions, one query's before/after view, thumbnail cache.

Everything here reads the published run's own files (the manifest lists them) and is built per run, on
first use, off the event loop (the ingress calls it through ``asyncio.to_thread``). A query's retrieval
top-k and scored pairs are read from ``candidates/`` and its hash bucket of ``scored/`` with a
``query_id`` filter (row-group statistics prune what they can), not held in memory: a run keeps ~100
candidates per query, the kept list is what the app already holds.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators import layout as L
from operators.fusion import fuse
from operators.runs import read_manifest, read_run_json, run_files
from operators.storage import Storage, strip_scheme

log = logging.getLogger(__name__)

THUMB_CACHE_BYTES = 32 << 20  # encoded thumbnails kept by the ingress replica (LRU)
VIEW_CACHE_ENTRIES = 256  # query views kept per run (LRU)
MAX_SUGGESTIONS = 50
SUBSTRING_SCAN_MAX = 200_000  # query ids scanned for substring suggestions (prefix matches are a bisect)
MAX_ID_CHARS = 1000
MAX_DOCS_PER_CALL = 200


DocId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class DocsRequest(BaseModel):
    """``POST /v1/docs``: metadata of several docs at once (one grid's captions in one call)."""

    model_config = ConfigDict(extra="forbid")

    doc_ids: list[DocId] = Field(min_length=1, max_length=MAX_DOCS_PER_CALL)


class LikeRequest(BaseModel):
    """``POST /v1/explore/like``: live search by the doc's own embedding, reranked against its caption."""

    model_config = ConfigDict(extra="forbid")

    doc_id: DocId
    top_k: int = Field(default=100, gt=0)
    top_n: int | None = Field(default=None, gt=0)
    rerank: bool = True


class ByteLRU:
    """An LRU of byte strings bounded by their total size (entries over the bound are not kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            self.bytes += len(value) - (len(old) if old is not None else 0)
            self._d[key] = value
            while self.bytes > self.max_bytes:
                _, v = self._d.popitem(last=False)
                self.bytes -= len(v)

    def __len__(self) -> int:
        return len(self._d)


def _read_query(storage: Storage, uri: str, query_id: str, columns: list[str]) -> pa.Table:
    """One query's rows of a run part file (the row groups whose statistics rule it out are skipped)."""
    with storage.fs(uri).open(strip_scheme(uri), "rb") as f:
        return pq.read_table(f, columns=columns, filters=[("query_id", "==", query_id)])


class RunView:
    """What the page shows of one published run (``store`` is the app's ``ResultsStore``)."""

    def __init__(self, storage: Storage, store: Any) -> None:
        self.storage, self.store = storage, store
        self.manifest = read_manifest(storage, store.run_dir)  # verified when the store loaded the run
        self.stats = read_run_json(storage, store.run_dir, self.manifest, L.STATS)
        self.ids = sorted(store.offsets)
        self._texts: dict[str, str] | None = None
        self._qrels: dict[str, dict[str, int]] | None = None
        self._views: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def config(self) -> dict[str, Any]:
        return self.store.config

    def facts(self) -> dict[str, Any]:
        c = self.config
        rr = c.get("rerank", {})
        stages = {name: {k: s.get(k) for k in ("rows_in", "rows_ok", "rows_rejected")}
                  for name, s in self.stats.get("stages", {}).items()}
        emb = c.get("embed", {}).get("model", {})
        return {"run_id": self.store.run_id, "created": self.store.created, "reranker": self.store.reranker,
                "embed_model": emb.get("name"), "index_factory": c.get("index", {}).get("factory"),
                "search_k": c.get("search", {}).get("k"), "fusion": rr.get("fusion"),
                "selection": rr.get("selection"), "queries": len(self.store.offsets), "result_rows": self.store.rows,
                "stages": stages, "has_qrels": bool(c.get("qrels"))}

    def suggest(self, prefix: str, limit: int) -> list[str]:
        """Query ids starting with ``prefix`` (sorted ids, one bisect), then ids containing it (small runs)."""
        i = bisect.bisect_left(self.ids, prefix)
        out = []
        while i < len(self.ids) and len(out) < limit and self.ids[i].startswith(prefix):
            out.append(self.ids[i])
            i += 1
        if prefix and len(out) < limit and len(self.ids) <= SUBSTRING_SCAN_MAX:
            seen = set(out)
            out += [q for q in self.ids if prefix in q and q not in seen][: limit - len(out)]
        return out

    def _text(self, query_id: str) -> str | None:
        if self._texts is None:
            from operators.shards import list_shards

            texts: dict[str, str] = {}
            uri = self.config.get("queries")
            if uri:
                for u in list_shards(uri, self.storage):
                    t = self.storage.read_table(u, columns=["query_id", "text"])
                    texts.update(zip(t.column("query_id").to_pylist(), t.column("text").to_pylist(), strict=True))
            self._texts = texts
        return self._texts.get(query_id)

    def _judged(self, query_id: str) -> dict[str, int] | None:
        uri = self.config.get("qrels")
        if not uri:
            return None
        if self._qrels is None:
            from pipelines.evaluate import load_qrels

            self._qrels = load_qrels(uri, self.storage)
        return self._qrels.get(query_id, {})

    def _files(self, prefix: str) -> list[str]:
        return run_files(self.store.run_dir, self.manifest, prefix)

    def query(self, query_id: str) -> dict[str, Any] | None:
        """Retrieval's top-k (every candidate, with its rerank and final score and whether it was kept)
        beside the kept list; None for a query id the run does not have."""
        with self._lock:
            if query_id in self._views:
                self._views.move_to_end(query_id)
                return self._views[query_id]
        kept = self.store.lookup(query_id, None) or []  # a query can keep nothing (threshold selection)
        parts = [_read_query(self.storage, u, query_id, ["rank", "doc_id", "retrieval_score"])
                 for u in self._files(L.prefix(L.CANDIDATES))]
        cand = pa.concat_tables(parts).sort_by("rank") if parts else None
        if cand is None or cand.num_rows == 0:
            return None
        from operators.rerank_ops import bucket_of

        rr = self.config.get("rerank", {})
        bucket = bucket_of(query_id, int(rr.get("select_buckets", 1)))
        scored = [_read_query(self.storage, u, query_id, ["doc_id", "retrieval_score", "rerank_score"])
                  for u in self._files(L.prefix(L.SCORED, L.bucket_name(bucket)))]
        sc = pa.concat_tables(scored) if scored else None
        score_of: dict[str, tuple[float, float]] = {}
        if sc is not None and sc.num_rows:
            # The final score of every scored pair, by the batch job's own fusion (kept ones equal results).
            docs = sc.column("doc_id").to_pylist()
            final = fuse(sc.column("retrieval_score").to_numpy(), sc.column("rerank_score").to_numpy(), docs,
                         **rr.get("fusion", {"method": "none"}))
            score_of = {d: (float(r), float(np.float32(f)))
                        for d, r, f in zip(docs, sc.column("rerank_score").to_pylist(), final, strict=True)}
        kept_rank = {r["doc_id"]: r["rank"] for r in kept}
        retrieval = []
        for row in cand.to_pylist():
            s = score_of.get(row["doc_id"])
            retrieval.append({"rank": int(row["rank"]), "doc_id": row["doc_id"],
                              "retrieval_score": float(row["retrieval_score"]),
                              "rerank_score": s[0] if s else None, "final_score": s[1] if s else None,
                              "kept_rank": kept_rank.get(row["doc_id"]), "scored": s is not None})
        ret_rank = {r["doc_id"]: r["rank"] for r in retrieval}
        reranked = [{**r, "retrieval_rank": ret_rank.get(r["doc_id"])} for r in kept]
        view: dict[str, Any] = {"query_id": query_id, "text": self._text(query_id), "run_id": self.store.run_id,
                                "reranker": self.store.reranker, "retrieval": retrieval, "reranked": reranked,
                                "relevance": None, "metrics": None}
        judged = self._judged(query_id)
        if judged is not None:
            view["relevance"] = {d: int(g) for d, g in judged.items()}
            view["metrics"] = _metrics(judged, [r["doc_id"] for r in retrieval], [r["doc_id"] for r in kept],
                                       sorted(score_of, key=lambda d: (-score_of[d][0], d)), _top_n(rr, kept))
        with self._lock:
            self._views[query_id] = view
            while len(self._views) > VIEW_CACHE_ENTRIES:
                self._views.popitem(last=False)
        return view


def _top_n(rr: dict[str, Any], kept: list[dict[str, Any]]) -> int:
    sel = rr.get("selection", {})
    if sel.get("mode") == "top_n":
        return int(sel["top_n"])
    if sel.get("mode") == "top_k_above_threshold":
        return int(sel["k"])
    return max(len(kept), 1)


def _metrics(judged: dict[str, int], retrieval: list[str], kept: list[str], by_rerank: list[str],
             top_n: int) -> dict[str, Any] | None:
    """This query's retrieval vs rerank metrics, by ``mmrerank eval``'s definitions (pipelines.evaluate):
    rerank ranking = the kept list, then the other scored pairs by rerank score."""
    from operators.metrics import stage_scores
    from pipelines.evaluate import CUTOFFS

    rel = {d: max(g, 0) for d, g in judged.items()}
    if not any(rel.values()):
        return None
    q = "q"
    seen = set(kept)
    rerank = kept + [d for d in by_rerank if d not in seen]
    cutoffs = sorted(set(CUTOFFS) | {len(retrieval) or 1})
    ret = stage_scores({q: rel}, {q: retrieval}, {q: retrieval[:top_n]}, cutoffs)[q]
    rer = stage_scores({q: rel}, {q: rerank}, {q: kept}, cutoffs)[q]
    return {"retrieval": ret, "rerank": rer, "relevant": sum(1 for g in rel.values() if g > 0)}


class Explorer:
    """The ingress replica's explorer state: one :class:`RunView` (the served run's) and the thumbnail cache."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.thumbs = ByteLRU(THUMB_CACHE_BYTES)
        self._view: RunView | None = None
        self._lock = threading.Lock()

    def view(self, store: Any) -> RunView:
        with self._lock:
            if self._view is None or self._view.store is not store:
                self._view = RunView(self.storage, store)
            return self._view
