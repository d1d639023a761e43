"""``mmrerank search``: stream query vectors through Ray Data, fan out to the index shards, merge top-k.

Writes ``<root>/runs/<run_id>/candidates/part-*.parquet`` (query_id, rank, doc_id, retrieval_score,
doc_shard, doc_row), ``rejects/search-*.parquet`` and ``search_stats.json``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from operators import faiss_shards as F
from operators import layout as L
from operators.contracts import CACHED_VECTORS, QUERY_VECTORS
from operators.embedding_cache import part_uris
from operators.faiss_shards import IndexMismatchError
from operators.models import ResolvedModel, resolve_model
from operators.parts import make_datasink
from operators.search_ops import CandidatesSink, SearchRouter, ShardSearcher
from operators.shard_source import ShardSource
from operators.shards import list_shards, plan_shards, read_source
from operators.storage import Storage, join
from operators.watchdog import watch
from pipelines.config import Config
from pipelines.embed import embed_kind
from pipelines.index import IndexResult, build_index
from pipelines.ray_env import ensure_ray
from pipelines.stage import StageResult

log = logging.getLogger(__name__)


@dataclass
class SearchResult(StageResult):
    run_id: str
    out: str
    index_uri: str
    k: int
    queries_in: int
    queries_rejected: int
    candidates: int
    reject_types: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    search_s: float = 0.0

    @property
    def queries_ok(self) -> int:
        return self.queries_in - self.queries_rejected

    def counts(self) -> tuple[int, int, int]:
        return self.queries_in, self.queries_ok, self.queries_rejected

    def note(self) -> str:
        return f"k={self.k}, {self.candidates} candidates"

    def extra(self) -> dict[str, Any]:
        return {"candidates": self.candidates}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["queries_ok"] = self.queries_ok
        d["queries_per_s"] = self.queries_in / self.search_s if self.search_s else None
        return d


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _threads(cfg: Config, res: dict[str, float], shards: int) -> int:
    if cfg.search.searcher_threads != "auto":
        return int(cfg.search.searcher_threads)
    import ray

    node_cpus = max(1, int(res.get("CPU", 1)) // max(1, len(ray.nodes())))
    return max(1, node_cpus // max(1, shards))


def start_searchers(cfg: Config, index: IndexResult, res: dict[str, float]) -> list[Any]:
    """One actor per index shard; returns once every shard is loaded and verified."""
    import ray

    sc = cfg.search
    device = sc.device if sc.device != "auto" else ("cuda" if res.get("GPU", 0) > 0 else "cpu")
    params = F.SearchParams(k=sc.k, nprobe=sc.nprobe, ef_search=sc.ef_search)
    # Searching is read-only, so a searcher lost with its node is restarted (it reloads its shard) and
    # its calls retried, like Ray Data's own actor pools.
    opts: dict[str, Any] = {"num_cpus": sc.searcher_num_cpus, "max_restarts": -1, "max_task_retries": -1}
    if device == "cuda":
        opts["num_gpus"] = sc.searcher_num_gpus
    shards = index.manifest["shards"]
    need = len(shards) * sc.searcher_num_cpus + 2 * sc.router_num_cpus
    if need > res.get("CPU", 0):
        # Searcher actors that cannot all be placed would leave the search pending forever.
        raise ValueError(f"search.searcher_num_cpus: {len(shards)} index shards x {sc.searcher_num_cpus} CPU plus "
                         f"the router need {need:g} CPUs, the cluster has {res.get('CPU', 0):g}; lower "
                         "search.searcher_num_cpus (searchers are idle between batches) or index.shards")
    threads = _threads(cfg, res, len(shards))
    actor = ray.remote(ShardSearcher).options(**opts)
    searchers = [actor.remote(index.uri, e, params, device, threads, cfg.storage.options()) for e in shards]
    try:
        ray.get([s.ntotal.remote() for s in searchers])
    except Exception as e:
        for s in searchers:
            ray.kill(s)
        cause = getattr(e, "cause", None)
        if isinstance(cause, F.IndexIntegrityError):
            raise F.IndexIntegrityError(f"{cause} (delete {index.uri} to rebuild the index)") from None
        raise
    return searchers


def run_search(cfg: Config, run_id: str | None = None, storage: Storage | None = None,
               index: IndexResult | None = None, rm: ResolvedModel | None = None) -> SearchResult:
    """Search every query against the (built or reused) index; write candidates and rejects."""
    import ray
    import ray.data

    t0 = time.perf_counter()
    storage = storage or Storage(cfg.storage.options())
    opts = cfg.storage.options()
    sc = cfg.search
    run_id = run_id or new_run_id()
    out = L.run_dir(cfg.root, run_id)
    rm = rm or resolve_model(cfg.embed.model, opts)
    if index is None:
        index = build_index(cfg, embed_kind(cfg, "corpus", rm, storage), storage)
    dim = int(index.manifest["dim"])

    if sc.query_embeddings:
        kind = QUERY_VECTORS
        uris = list_shards(sc.query_embeddings, storage)
    else:
        queries = embed_kind(cfg, "queries", rm, storage)
        if queries.model_fingerprint != index.manifest["model_fingerprint"] or queries.dim != dim:
            raise IndexMismatchError(
                f"queries embedded with model {queries.model_fingerprint[:12]} (dim {queries.dim}) cannot search "
                f"index {index.uri} built for model {index.manifest['model_fingerprint'][:12]} (dim {dim})")
        kind = CACHED_VECTORS
        uris = [u for s in queries.shards for u in part_uris(storage, queries.cache, s.key)]
    plans = plan_shards(uris, kind, storage) if uris else []
    keyed = [(p, p.key()) for p in plans]
    queries_in = sum(p.num_rows for p in plans)
    storage.rm(L.stage_dir(out, L.CANDIDATES), recursive=True)  # a re-run of this run_id replaces, never appends
    storage.rm(L.stage_dir(out, L.REJECTS), recursive=True)

    res = ensure_ray(cfg.ray)
    searchers = start_searchers(cfg, index, res)
    t1 = time.perf_counter()
    results: list[dict[str, Any]] = []
    try:
        if keyed:
            ds = read_source(ShardSource(keyed, kind.id_column, opts, sc.batch_size), num_cpus=sc.router_num_cpus)
            # The router is a task, not an actor: it fuses with the read (and the write), and several
            # batches are in flight at once, so the searchers never wait on one batch's merge and write.
            ds = ds.map_batches(SearchRouter(searchers, sc.k, dim), batch_size=sc.batch_size,
                                batch_format="pyarrow", num_cpus=sc.router_num_cpus)
            sink = make_datasink(CandidatesSink(out, "search", opts), sc.batch_size * sc.k, "WriteCandidates")
            with watch("search", cfg.ray.stall_timeout_s):
                ds.write_datasink(sink, ray_remote_args={"num_cpus": sc.router_num_cpus})
            results = sink.results
    finally:
        for s in searchers:
            ray.kill(s)
    search_s = time.perf_counter() - t1

    rejected = sum(r["rows_rejected"] for r in results)
    types: dict[str, int] = {}
    for r in results:
        for t, c in r["reject_types"].items():
            types[t] = types.get(t, 0) + c
    result = SearchResult(run_id, out, index.uri, sc.k, queries_in, rejected, sum(r["rows_ok"] for r in results),
                          types, 0.0, search_s)
    _check_complete(storage, out, result, results, index)
    result.wall_s = time.perf_counter() - t0
    storage.write_json(L.stage_stats(out, "search"), result.to_json())
    log.info("search: %d queries (%d rejected) -> %d candidates (k=%d) in %.1fs; output %s",
             queries_in, rejected, result.candidates, sc.k, search_s, out)
    return result


def _check_complete(storage: Storage, out: str, result: SearchResult, records: list[dict[str, Any]],
                    index: IndexResult) -> None:
    """No part was overwritten, and every searched query got min(k, ntotal) candidates (exact indexes) or
    at most that many (approximate ones may return fewer, e.g. IVF probing few lists)."""
    parts = [join(L.stage_dir(out, L.CANDIDATES), r["part"]) for r in records if r["part"]]
    rows = sum(storage.parquet_file(p).metadata.num_rows for p in parts)
    if rows != result.candidates:
        raise RuntimeError(f"{out}: {rows} candidate rows on storage, {result.candidates} written")
    expect = result.queries_ok * min(result.k, index.ntotal)
    exact = index.manifest["factory"].replace(" ", "") in ("Flat", "IDMap,Flat")
    if rows > expect or (exact and rows != expect):
        raise RuntimeError(f"{out}: {rows} candidate rows for {result.queries_ok} queries, expected "
                           f"{'' if exact else 'at most '}{expect}")
