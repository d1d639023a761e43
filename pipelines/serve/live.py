"""The live path of the served run: the batch job's own operators, on one request's query.

query text -> :class:`operators.embedders.TextEmbedder` (the embed stage's encoder) ->
:class:`operators.search_ops.SearchRouter` over the run's index shards (the search stage's merge) -> candidate
docs read by :func:`operators.rerank_ops.shard_docs` or :class:`operators.rerank_ops.ShardVectors` (the rerank
source's readers) -> :class:`operators.rerank_ops.RerankPairs` (the rerank actor's UDF) ->
:func:`operators.rerank_ops.select_per_query` (the selection task's UDF). Nothing is re-implemented here, so a
live answer is the batch job's answer for the same text (``tests/test_live_batch.py``).

:class:`LiveModels` is the Serve deployment holding one :class:`Live` per loaded run; it batches concurrent
requests' query texts and candidate docs into one model call each (``@serve.batch``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray import serve

from operators import faiss_shards as F
from operators.storage import Storage

LIVE_SHARD = "live"  # the shard key of a request's pairs (the batch job's is a candidates part)


class Live:
    """What the live path needs from one run: text embedder, index shards, corpus readers, reranker."""

    def __init__(self, config: dict[str, Any], index_uri: str, device: str,
                 clip_vectors: dict[str, list[str]] | None = None) -> None:
        import torch

        from operators.embedders import TextEmbedder
        from operators.rerank_ops import RerankPairs
        from operators.rerankers.base import create
        from operators.search_ops import ShardSearcher
        from pipelines.config import parse_config
        from pipelines.context import RunContext

        ctx = RunContext(parse_config(config))
        self.cfg = cfg = ctx.cfg
        self.storage, opts = ctx.storage, ctx.storage_options
        self.device = device
        threads = torch.get_num_threads()  # the replica's; the batch actors' own setting would change it
        # The batch job embeds queries with these settings (embed.dtype included: the search sees the same vector).
        self.embedder = TextEmbedder(ctx.embed_model, device, cfg.embed.precision, threads, cfg.embed.dtype, opts)
        manifest = F.read_manifest(self.storage, index_uri)
        self.dim = int(manifest["dim"])
        params = F.SearchParams(k=cfg.search.k, nprobe=cfg.search.nprobe, ef_search=cfg.search.ef_search)
        self.searchers = [ShardSearcher(index_uri, e, params, device, threads, opts) for e in manifest["shards"]]
        for s in self.searchers:
            s.ntotal()  # raises IndexIntegrityError for a corrupt shard
        self.ntotal = sum(s.ntotal() for s in self.searchers)
        rc = cfg.rerank
        self.spec, self.label = ctx.reranker, ctx.reranker_label
        self.clip_vectors = clip_vectors or {}
        self.scorer: RerankPairs | None = None
        self.query_encoder: TextEmbedder | None = None  # clip: the reranker model's text side
        self.backend: Any = None  # scores /v1/rerank's own documents
        if rc.backend == "clip":
            # As the batch job: cached doc vectors (the run's entries, ``clip_vectors``) . query vectors.
            self.scorer = RerankPairs(self.spec, device, rc.precision, threads, **cfg.embed.decode_limits._asdict(),
                                      storage_options=opts, batch_size=rc.batch_size,
                                      query_vectors=([], np.zeros((0, self.spec.clip_model.embed_dim), np.float32)))
            self.query_encoder = TextEmbedder(self.spec.clip_model, device, rc.precision, threads, "float32", opts)
            self.backend = create(self.spec, device, self.query_encoder.precision)
        elif rc.backend != "none":
            self.scorer = RerankPairs(self.spec, device, rc.precision, threads, **cfg.embed.decode_limits._asdict(),
                                      storage_options=opts, batch_size=rc.batch_size)
            self.backend = self.scorer.backend
        self.corpus = _corpus_sources(self.storage, cfg.root, manifest["model_fingerprint"],
                                      [k for e in manifest["shards"] for k in e["corpus_shards"]])
        self._files: dict[str, tuple[Any, list[int]]] = {}  # corpus uri -> (ParquetFile, row group starts)
        self._vectors: dict[str, Any] = {}  # corpus shard key -> ShardVectors (clip), loaded on first use

    # -- embed and search: the embed stage's encoder, the search stage's router --------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.encode(texts), np.float32)

    def hits(self, q: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Merged top-k of each query vector's first row: doc id, corpus shard and row, retrieval score, best
        first (``SearchRouter``: the batch search's own fan-out and merge, over in-process shards)."""
        from operators.contracts import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE
        from operators.search_ops import SearchRouter

        n = len(q)
        empty = pa.array([""] * n, pa.string())
        batch = pa.table({ID: pa.array([str(i) for i in range(n)], pa.string()), ROW: pa.array(np.arange(n)),
                          SHARD: empty, SOURCE: empty, ERR_TYPE: empty, ERR_MSG: empty,
                          "embedding": pa.FixedSizeListArray.from_arrays(
                              pa.array(np.asarray(q, np.float32).reshape(-1)), q.shape[1])})
        out = SearchRouter(self.searchers, k, self.dim)(batch)
        bad = [e for e in out.column(ERR_TYPE).to_pylist() if e]
        if bad:
            raise ValueError(f"the query vector was rejected: {bad[0]}")
        out = out.filter(pc.equal(out.column(ID), "0"))
        return [{"doc_id": d, "doc_shard": s, "doc_row": int(r), "retrieval_score": float(sc)}
                for d, s, r, sc in zip(*(out.column(c).to_pylist() for c in
                                         ("doc_id", "doc_shard", "doc_row", "retrieval_score")), strict=True)]

    # -- rerank: the rerank source's readers, the actor's UDF, the selection's UDF -----------------------
    def candidate_docs(self, query_id: str, text: str, hits: list[dict[str, Any]]) -> pa.Table:
        """One request's (query, candidate) pairs as the rerank stage's doc blocks: each candidate doc once,
        with its content (or, clip, its cached vector) and its pair."""
        from operators.contracts import PAIR_KEY, PAIR_ROW
        from operators.rerank_ops import ShardVectors, pair_docs, shard_docs

        n = len(hits)
        pairs = pa.table({
            "query_id": pa.array([query_id] * n, pa.string()), "query_text": pa.array([text] * n, pa.string()),
            "doc_id": pa.array([h["doc_id"] for h in hits], pa.string()),
            "rank": pa.array(np.arange(1, n + 1), pa.int32()),
            "retrieval_score": pa.array([h["retrieval_score"] for h in hits], pa.float32()),
            "doc_shard": pa.array([h["doc_shard"] for h in hits], pa.string()),
            "doc_row": pa.array([h["doc_row"] for h in hits], pa.int64()),
            PAIR_KEY: pa.array([LIVE_SHARD] * n, pa.string()), PAIR_ROW: pa.array(np.arange(n, dtype=np.int64))})
        tables = []
        shard = pairs.column("doc_shard").to_pylist()
        for key in sorted(set(shard)):
            cands = pairs.filter(pa.array([s == key for s in shard])).sort_by("doc_row")
            if self.scorer is None:  # backend none: scores need no content (as the batch job reads none)
                tables.append(pair_docs(cands))
            elif self.cfg.rerank.backend == "clip":
                if key not in self._vectors:
                    if key not in self.clip_vectors:
                        raise LookupError(f"the served run has no clip reranker vectors for corpus shard {key}")
                    self._vectors[key] = ShardVectors.load(self.storage, *self.clip_vectors[key])
                tables.append(self._vectors[key].docs(cands))
            else:
                pf, starts = self._file(key)
                tables.extend(shard_docs(pf, self.corpus[key][1], cands, starts))
        return pa.concat_tables(tables)

    def query_vectors(self, ids: list[str], texts: list[str]) -> tuple[list[str], np.ndarray] | None:
        """clip: the reranker model's vectors of the queries, as the batch job computes them."""
        if self.query_encoder is None:
            return None
        return ids, np.asarray(self.query_encoder.encode(texts), np.float32)

    def score(self, docs: pa.Table, query_vectors: tuple[list[str], np.ndarray] | None) -> dict[str, np.ndarray]:
        """The rerank actor's UDF on these doc blocks: every pair scored, or a reject with its reason."""
        from operators.rerank_ops import explode

        if self.scorer is None:  # backend none: the retrieval score is the rerank score, as in the batch job
            out = explode(docs)
            out["rerank_score"] = np.asarray(out["retrieval_score"], np.float32)
            return out
        return self.scorer(docs, query_vectors)

    def select(self, scored: dict[str, np.ndarray], top_n: int | None) -> tuple[list[dict[str, Any]], int]:
        """Fuse and select one request's scored pairs (the batch selection's UDF); returns the kept results and
        how many pairs were rejected (not decodable, no caption...: dropped, as in the batch job)."""
        from operators.contracts import ERR_TYPE, ID
        from operators.rerank_ops import select_per_query

        ok = np.array([not e for e in scored[ERR_TYPE]], dtype=bool)
        group = pa.table({"query_id": pa.array(np.asarray(scored[ID])[ok].tolist(), pa.string()),
                          "doc_id": pa.array(np.asarray(scored["doc_id"])[ok].tolist(), pa.string()),
                          "retrieval_score": pa.array(np.asarray(scored["retrieval_score"])[ok], pa.float32()),
                          "rerank_score": pa.array(np.asarray(scored["rerank_score"])[ok], pa.float32())})
        rc = self.cfg.rerank
        sel = rc.selection.model_dump()
        if top_n is not None:
            sel = {**sel, "top_n": top_n, "k": top_n}
        kept = select_per_query(group, rc.fusion.model_dump(), sel, self.label, "")
        rows = kept.select(["rank", "doc_id", "retrieval_score", "rerank_score", "final_score"]).to_pylist()
        return rows, int((~ok).sum())

    # -- content by (shard, row): the explorer's doc side -------------------------------------------------
    def contents(self, locs: list[tuple[str, int]]) -> list[tuple[bytes | None, str | None, str | None]]:
        """(image bytes, image uri, caption) of each ``(corpus shard, row)``, with
        :func:`operators.rerank_ops.read_rows`: one read per parquet row group holding any of them."""
        from operators.rerank_ops import read_rows

        out: list[tuple[bytes | None, str | None, str | None]] = [(None, None, None)] * len(locs)
        by_shard: dict[str, list[int]] = {}
        for pos, (shard, _) in enumerate(locs):
            by_shard.setdefault(shard, []).append(pos)
        for shard, positions in by_shard.items():
            rows = np.unique(np.array([locs[p][1] for p in positions], np.int64))
            pf, starts = self._file(shard)
            found: dict[int, dict[str, Any]] = {}
            for lo, hi, t in read_rows(pf, self.corpus[shard][1], rows, starts):
                for r, rec in zip(rows[lo:hi].tolist(), t.to_pylist(), strict=True):
                    found[r] = rec
            for p in positions:
                rec = found.get(int(locs[p][1]), {})
                out[p] = (rec.get("image"), rec.get("image_uri"), rec.get("text"))
        return out

    def _file(self, shard: str) -> tuple[Any, list[int]]:
        """The shard's open parquet file and the first row of each of its row groups (opened once)."""
        from operators.rerank_ops import row_group_starts

        uri, _ = self.corpus[shard]
        if uri not in self._files:
            pf = self.storage.parquet_file(uri)
            self._files[uri] = (pf, row_group_starts(pf))
        return self._files[uri]


def _corpus_sources(storage: Storage, root: str, model_fp: str, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Per corpus shard key of the index: its source uri and payload column (from the embeddings cache)."""
    from operators.contracts import CORPUS, check_shard_schema
    from operators.embedding_cache import shard_marker
    from operators.layout import cache_dir

    cache = cache_dir(root, model_fp, "corpus")
    out = {}
    for k in keys:
        src = shard_marker(storage, cache, k)["source"]
        out[k] = (src, check_shard_schema(storage.parquet_file(src).schema_arrow, CORPUS, src))
    return out


@serve.deployment(max_ongoing_requests=64, logging_config={"enable_access_log": False})
class LiveModels:
    """Text embedder + index shards (loaded once per replica) + reranker, with dynamic batching."""

    def __init__(self, device: str = "auto") -> None:
        from operators.models import resolve_device

        self.device = resolve_device(device)
        self.live: Live | None = None
        self.key: tuple[str, str] | None = None
        self._docs: Any = None  # the explorer's doc lookups of self.live, built on first use

    def load(self, run_id: str, config: dict[str, Any], index_uri: str,
             clip_vectors: dict[str, list[str]] | None = None) -> str:
        if self.key != (run_id, index_uri):
            live = Live(config, index_uri, self.device, clip_vectors)  # built fully before the swap
            self.live, self.key = live, (run_id, index_uri)
        return run_id

    def _need(self) -> Live:
        if self.live is None:
            raise RuntimeError("no run loaded")
        return self.live

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        return list(self._need().embed(texts))

    async def search(self, text: str, k: int) -> dict[str, Any]:
        live = self._need()
        t0 = time.perf_counter()
        q = await self.embed(text)
        t1 = time.perf_counter()
        hits = live.hits(np.asarray(q, np.float32)[None, :], k)
        t2 = time.perf_counter()
        return {"hits": hits, "timing": {"embed_ms": 1000 * (t1 - t0), "search_ms": 1000 * (t2 - t1)}}

    # -- the explorer's doc side (pipelines/explorer/docs.py) -----------------------------------------
    def _explorer_docs(self) -> Any:
        from pipelines.explorer.docs import Docs

        live = self._need()
        if self._docs is None or self._docs.live is not live:
            self._docs = Docs(live, self.key[1] if self.key else "")
        return self._docs

    async def docs_meta(self, doc_ids: list[str]) -> list[dict[str, Any] | None]:
        docs = await asyncio.to_thread(self._explorer_docs)  # the first call builds the id map
        return docs.meta(doc_ids)  # on the loop: Live's Parquet handles are read from one thread only

    async def thumbnail(self, doc_id: str, size: int) -> dict[str, Any]:
        """``{"data": JPEG bytes or None (unknown id)}``, or ``{"error": reject type}``. The row is read on the
        event loop (as every Live read), the decode and encode in a thread: a large image never stalls the
        replica's batching."""
        from operators.contracts import RejectError

        docs = await asyncio.to_thread(self._explorer_docs)
        stored = docs.stored(doc_id)
        if stored is None:
            return {"data": None}
        try:
            return {"data": await asyncio.to_thread(docs.thumbnail, stored, size)}
        except RejectError as e:
            return {"error": e.error_type}

    async def like(self, doc_id: str, k: int) -> dict[str, Any] | None:
        """"More like this": the doc's own embedding through the live search; None for an unknown doc."""
        t0 = time.perf_counter()
        docs = await asyncio.to_thread(self._explorer_docs)
        v = await asyncio.to_thread(docs.vector, doc_id)  # embeddings cache files: new handles, thread-safe
        if v is None:
            return None
        (meta,) = docs.meta([doc_id])
        t1 = time.perf_counter()
        hits = self._need().hits(np.asarray(v, np.float32)[None, :], k)
        return {"hits": hits, "caption": meta["caption"] if meta else None,
                "timing": {"embed_ms": 1000 * (t1 - t0), "search_ms": 1000 * (time.perf_counter() - t1)}}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _score(self, pairs: list[tuple[str, Any, str | None]]) -> list[float]:
        """/v1/rerank's own documents: the served backend on (query, image, caption) pairs."""
        live = self._need()
        assert live.backend is not None
        caps = [c if live.spec.use_caption else None for _, _, c in pairs]
        s = live.backend.score([q for q, _, _ in pairs], [im for _, im, _ in pairs], caps)
        return [float(x) for x in s]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_docs(self, reqs: list[tuple[str, str, pa.Table]]) -> list[dict[str, np.ndarray]]:
        """Concurrent requests' candidate docs scored in one call of the rerank UDF, then split back."""
        live = self._need()
        docs = pa.concat_tables([d for _, _, d in reqs])
        scored = await asyncio.to_thread(
            live.score, docs, live.query_vectors([q for q, _, _ in reqs], [t for _, t, _ in reqs]))
        from operators.rerank_ops import pair_counts

        bounds = np.cumsum([0] + [int(pair_counts(d).sum()) for _, _, d in reqs])
        return [{c: v[a:b] for c, v in scored.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    async def rerank_hits(self, text: str, hits: list[dict[str, Any]], top_n: int | None) -> dict[str, Any]:
        live = self._need()
        if not hits:
            return {"results": [], "reranker": live.label, "rejected": 0, "timing": {"fetch_ms": 0.0, "rerank_ms": 0.0}}
        t0 = time.perf_counter()
        qid = uuid.uuid4().hex  # a request's own query id: concurrent requests' pairs share one scoring call
        docs = live.candidate_docs(qid, text, hits)  # on the loop: Live's Parquet handles, one thread only
        t1 = time.perf_counter()
        scored = await self._score_docs((qid, text, docs))
        t2 = time.perf_counter()
        results, rejected = live.select(scored, top_n)
        return {"results": results, "reranker": live.label, "rejected": rejected,
                "timing": {"fetch_ms": 1000 * (t1 - t0), "rerank_ms": 1000 * (t2 - t1)}}

    async def rerank_docs(self, query: str, docs: list[tuple[Any, str | None]]) -> list[float]:
        live = self._need()
        if live.backend is None:
            raise ValueError("the served run has rerank.backend: none")
        return list(await asyncio.gather(*[self._score((query, im, cap)) for im, cap in docs]))

    def needs(self) -> dict[str, Any]:
        """What a rerank call's documents must carry, and the run's image limits (as in its batch job)."""
        live = self._need()
        b = live.backend
        return {"scores": b is not None, "image": bool(b and b.needs_image), "caption": bool(b and b.needs_caption),
                "decode": tuple(live.cfg.embed.decode_limits)}
