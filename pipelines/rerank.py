"""The reranking stage: candidates -> candidate docs with their pairs -> batched reranker actors -> fusion
+ selection -> results.

Reads ``<run>/candidates`` (from ``mmrerank search``), writes ``<run>/scored`` (every scored pair),
``<run>/rejects/rerank-*``, ``<run>/results`` (the results contract) and ``rerank_stats.json``.

Candidate content comes from the corpus shards by the ``(shard, row)`` recorded at embedding time:
candidates are regrouped by corpus shard (small Ray tasks), then each corpus shard is read once (only
its row groups with wanted rows) by a Ray Data source that streams one row per distinct candidate doc,
its content once and its pairs with it, to the reranker actors; images are decoded once per doc (in CPU
tasks on GPU clusters). The clip backend is a bi-encoder: its scores are dot products of vectors from the
same per-shard embedding cache as ``mmrerank embed`` (whole shards, computed once per corpus version, so a
night over an unchanged corpus encodes no image). Scored pairs are bucketed by query so selection needs
no shuffle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from operators import layout as L
from operators.contracts import (
    CANDIDATE_ROWS,
    CORPUS,
    ERR_MSG,
    ERR_TYPE,
    CacheEntry,
    CorpusShard,
    ShardPairs,
    check_shard_schema,
)
from operators.embedding_cache import part_uris, read_vectors
from operators.faiss_shards import IndexMismatchError
from operators.pair_source import PairsSource
from operators.parts import make_datasink
from operators.rerank_ops import (
    DecodeDocs,
    RerankPairs,
    ScoredSink,
    bucket_candidates,
    row_group_starts,
    select_bucket,
)
from operators.rerankers.base import REGISTRY, RerankerSpec
from operators.shard_source import ShardSource
from operators.shards import list_shards, plan_shards, read_source
from operators.storage import Storage, join
from operators.watchdog import watch
from pipelines.config import Config, RerankConfig
from pipelines.context import reranker_label, reranker_spec
from pipelines.embed import EmbedResult, embed_kind
from pipelines.ray_env import actor_pool, ensure_ray
from pipelines.stage import StageResult

log = logging.getLogger(__name__)


@dataclass
class RerankResult(StageResult):
    run_id: str
    out: str
    reranker: str
    pairs_in: int
    pairs_scored: int
    pairs_rejected: int
    queries_in: int
    queries_with_results: int
    results: int
    reject_types: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    rerank_s: float = 0.0
    docs_in: int = 0  # distinct candidate docs
    docs_decoded: int = 0  # image decodes done by the stage (at most one per doc)
    clip_images_embedded: int = 0  # clip backend: corpus rows its embedding cache encoded in this run
    # clip backend: per corpus shard key, the (cache dir, entry key) its vectors came from (the live path's too)
    clip_vectors: dict[str, list[str]] = field(default_factory=dict)

    @property
    def queries_without_results(self) -> int:
        """Queries whose every candidate was dropped (threshold selection) or rejected."""
        return self.queries_in - self.queries_with_results

    def counts(self) -> tuple[int, int, int]:
        return self.pairs_in, self.pairs_scored, self.pairs_rejected

    def note(self) -> str:
        return f"{self.reranker}; {self.results} results, {self.queries_without_results} queries empty"

    def extra(self) -> dict[str, Any]:
        return {"queries_with_results": self.queries_with_results,
                "queries_without_results": self.queries_without_results, "results": self.results,
                "reject_types": self.reject_types, "clip_vectors": self.clip_vectors}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["queries_without_results"] = self.queries_without_results
        d["pairs_per_s"] = self.pairs_in / self.rerank_s if self.rerank_s else None
        return d


def _corpus_shards(storage: Storage, corpus: EmbedResult) -> dict[str, CorpusShard]:
    """Per corpus shard key: its uri, payload column and row-group starts (from the footer)."""
    out = {}
    for s in corpus.shards:
        pf = storage.parquet_file(s.source)
        out[s.key] = CorpusShard(s.source, check_shard_schema(pf.schema_arrow, CORPUS, s.source), row_group_starts(pf))
    return out


def run_rerank(cfg: Config, run_id: str, storage: Storage | None = None,
               corpus: EmbedResult | None = None, spec: RerankerSpec | None = None) -> RerankResult:
    """Rerank the candidates of ``run_id`` and write its results."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    t0 = time.perf_counter()
    storage = storage or Storage(cfg.storage.options())
    opts = cfg.storage.options()
    rc = cfg.rerank
    out = L.run_dir(cfg.root, run_id)
    spec = spec or reranker_spec(rc, cfg, opts)  # resolves the clip model: a bad spec fails before any work
    cand_uris = storage.ls(L.stage_dir(out, L.CANDIDATES), "*.parquet")
    if not cand_uris:
        raise FileNotFoundError(f"{out}/candidates: no candidates; run `mmrerank search` first")
    for sub in (L.SCORED, L.RESULTS, L.PAIRS):
        storage.rm(L.stage_dir(out, sub), recursive=True)  # a re-run of this stage replaces, never appends
    for old in storage.ls(L.stage_dir(out, L.REJECTS), "rerank-*.parquet"):
        storage.rm(old)

    res = ensure_ray(cfg.ray)
    t1 = time.perf_counter()
    buckets = rc.select_buckets
    clip_embedded = 0
    vectors: dict[str, CacheEntry] = {}  # clip: per corpus shard key, its entry in the reranker's cache
    if rc.backend == "none":
        plans = plan_shards(cand_uris, CANDIDATE_ROWS, storage)
        pairs_in = sum(p.num_rows for p in plans)
        scored = read_source(
            ShardSource([(p, p.key()) for p in plans], "query_id", opts, 4096, CANDIDATE_ROWS.extra_columns),
            num_cpus=0.25).map_batches(_retrieval_only, batch_format="numpy", num_cpus=0.25)
    else:
        corpus = corpus or embed_kind(cfg, "corpus", storage=storage)
        query_uris = list_shards(cfg.queries, storage) if cfg.queries else []
        pairs_dir = L.stage_dir(out, L.PAIRS)
        corpus_map = _corpus_shards(storage, corpus)
        query_vectors = None
        if rc.backend == "clip":
            vectors, query_vectors, clip_embedded = _clip_vectors(cfg, spec, storage, corpus)
        starts = ray.put({k: v.row_group_starts for k, v in corpus_map.items()})
        task = ray.remote(bucket_candidates).options(num_cpus=0.25)
        counts = ray.get([task.remote(u, _stem(u), pairs_dir, query_uris, opts, starts) for u in cand_uris])
        per_shard: dict[str, np.ndarray] = {}  # pairs per corpus row group
        for c in counts:
            for k, n in c.items():
                per_shard[k] = per_shard[k] + n if k in per_shard else n
        pairs_in = int(sum(n.sum() for n in per_shard.values()))
        unknown = sorted(set(per_shard) - set(corpus_map))
        if unknown:
            raise IndexMismatchError(f"{out}: candidates point into corpus shards {unknown[:3]} that the current "
                                     "corpus does not have (was the corpus changed after search?)")
        sources = {k: ShardPairs(corpus_map[k].uri, corpus_map[k].payload, storage.ls(join(pairs_dir, k), "*.parquet"),
                                 corpus_map[k].row_group_starts, n, vectors.get(k)) for k, n in per_shard.items()}
        # Two one-thread actors on CPU, as for embed (a 2-thread actor loses time at OpenMP barriers when
        # Ray's processes preempt it), holding at most half the node's CPUs: with 1.5 or 1.25 of 2, Ray
        # Data started the final write 1.6 s after the last batch; with 1.0, 0.07 s (bench_rerank).
        # clip scores cached vectors: a CPU actor, no GPU held for dot products.
        pool_cfg = rc.model_copy(update={"device": "cpu"}) if query_vectors is not None else rc
        device, n_actors, actor_res, threads = actor_pool(pool_cfg, res, "rerank", max(0.5, rc.decode_num_cpus),
                                                          auto_cpu_actors=2, auto_pool_share=0.5)
        # Several actors: read tasks of about an eighth of an actor's share each, so they all get work and
        # finish close together.
        task_rows = -(-pairs_in // (8 * n_actors * rc.batch_size)) * rc.batch_size if n_actors > 1 else None
        scored = read_source(PairsSource(sources, opts, rc.batch_size * 4, task_rows), num_cpus=0.5)
        backend_cls = REGISTRY[rc.backend]
        if query_vectors is None and backend_cls.needs_image and not _decode_in_actor(rc, device):
            # GPU actors only run the model: each doc's image is decoded once in parallel CPU tasks.
            scored = scored.map_batches(DecodeDocs(True, **cfg.embed.decode_limits._asdict(), storage_options=opts),
                                        batch_format="pyarrow", batch_size=None, num_cpus=rc.decode_num_cpus)
        scored = scored.map_batches(
            RerankPairs,
            fn_constructor_kwargs={"spec": spec, "device": device, "precision": rc.precision,
                                   "torch_threads": threads, **cfg.embed.decode_limits._asdict(), "storage_options": opts,
                                   "batch_size": rc.batch_size, "query_vectors": query_vectors},
            # Two calls in flight: the next block is assembled while the model scores this one.
            # Several actors take one task at a time (Ray Data's default queues 4 on the first actor ready).
            compute=ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=2,
                                      max_tasks_in_flight_per_actor=1 if n_actors > 1 else 2),
            # One call per block of whole docs (>= 4 model batches of pairs); the actor cuts model batches.
            batch_size=None,
            batch_format="pyarrow", **actor_res)
    sink = make_datasink(ScoredSink(out, buckets, opts), 4096, "WriteScored")
    with watch("rerank", cfg.ray.stall_timeout_s):
        scored.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    records = sink.results
    storage.rm(L.stage_dir(out, L.PAIRS), recursive=True)
    rerank_s = time.perf_counter() - t1

    scored_n = sum(r["rows_ok"] for r in records)
    rejected = sum(r["rows_rejected"] for r in records)
    if scored_n + rejected != pairs_in:
        raise RuntimeError(f"{out}: {pairs_in} candidate pairs in, {scored_n} scored + {rejected} rejected out")
    # What was reported must also be what is on storage (a part overwritten by another would not be).
    scored_dir = L.stage_dir(out, L.SCORED)
    stored = sum(storage.parquet_file(join(L.scored_bucket(scored_dir, r["shard"].split("~")[0]), r["part"]))
                 .metadata.num_rows for r in records if r["part"])
    if stored != scored_n:
        raise RuntimeError(f"{out}: {scored_n} scored pairs written but {stored} on storage (a part was overwritten)")
    docs_in = sum(r.get("docs", 0) for r in records)
    docs_decoded = sum(r.get("docs_decoded", 0) for r in records)
    types: dict[str, int] = {}
    for r in records:
        for t, c in r["reject_types"].items():
            types[t] = types.get(t, 0) + c

    # Per query: fuse and select, one Ray task per hash bucket (only scores travel, not content).
    label = reranker_label(rc)
    sel = ray.remote(select_bucket).options(num_cpus=0.25)
    counts2 = ray.get([sel.remote(b, scored_dir, out, rc.fusion.model_dump(), rc.selection.model_dump(),
                                  label, run_id, opts) for b in range(buckets)])
    queries_in = len({q for u in cand_uris for q in storage.read_table(u, ["query_id"]).column(0).to_pylist()})
    result = RerankResult(run_id, out, label, pairs_in, scored_n, rejected, queries_in,
                          sum(c["queries"] for c in counts2), sum(c["rows"] for c in counts2), types, 0.0, rerank_s,
                          docs_in, docs_decoded, clip_embedded, {k: list(v) for k, v in vectors.items()})
    result.wall_s = time.perf_counter() - t0
    storage.write_json(L.stage_stats(out, "rerank"), result.to_json())
    log.info("rerank (%s): %d pairs over %d docs (%d decoded) -> %d scored, %d rejected; %d/%d queries kept "
             "results (%d rows) in %.1fs", label, pairs_in, docs_in, docs_decoded, scored_n, rejected,
             result.queries_with_results, queries_in, result.results, rerank_s)
    return result


def _decode_in_actor(rc: RerankConfig, device: str) -> bool:
    return rc.decode_in_actor is True or (rc.decode_in_actor == "auto" and device == "cpu")


def _clip_vectors(cfg: Config, spec: RerankerSpec, storage: Storage,
                  corpus: EmbedResult) -> tuple[dict[str, CacheEntry], Any, int]:
    """The clip reranker's vectors through the embedding cache: per retrieval shard key, the (cache dir, key)
    of the reranker model's entry for the same corpus shard; the query vectors in the object store; and how
    many corpus rows were encoded now (0 on a night over an unchanged corpus).

    Whole shards, not only the candidate rows: a shard's entry is then reused by every later night whatever
    its queries retrieve (the candidate set changes nightly, the corpus rarely), and it is the embed stage
    itself (its CPU decode feed, GPU actors, resume, integrity checks). float32 vectors, the reranker's
    device and precision: the scores equal the model's own cosine (``ClipReranker.score``).
    """
    import ray

    rc = cfg.rerank
    ecfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={
        "model": rc.clip_model, "dtype": "float32", "device": rc.device, "precision": rc.precision})})
    docs = embed_kind(ecfg, "corpus", spec.clip_model, storage)
    by_source = {s.source: s.key for s in docs.shards}
    vectors = {s.key: CacheEntry(docs.cache, by_source[s.source]) for s in corpus.shards if s.source in by_source}
    ids: list[str] = []
    vecs = np.zeros((0, spec.clip_model.embed_dim), np.float32)
    if cfg.queries:
        queries = embed_kind(ecfg, "queries", spec.clip_model, storage)
        uris = [u for s in queries.shards for u in part_uris(storage, queries.cache, s.key)]
        ids, _, vecs = read_vectors(storage, uris)
    log.info("rerank clip: %s vectors for %d corpus shards (%d rows encoded now), %d queries",
             spec.clip_model.describe(), len(vectors), docs.rows_embedded_now, len(ids))
    return vectors, ray.put((ids, vecs)), docs.rows_embedded_now


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].removesuffix(".parquet")


def _retrieval_only(batch: dict[str, Any]) -> dict[str, Any]:
    """``backend: none``: the retrieval score is the rerank score (a baseline run, no model)."""
    out = dict(batch)
    out["rerank_score"] = batch["retrieval_score"]
    out[ERR_TYPE], out[ERR_MSG] = batch[ERR_TYPE], batch[ERR_MSG]
    return out
