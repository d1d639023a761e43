"""The published run, in memory: its results as sorted columns, loaded and verified off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from operators import layout as L
from operators.contracts import RESULTS
from operators.runs import read_run_json, read_stage, run_config
from operators.storage import Storage


@dataclass
class ResultsStore:
    """One run's results as sorted columns: ~(24 + len(doc_id)) bytes per row plus the id index."""

    run_id: str
    created: str
    run_dir: str
    config: dict[str, Any]
    index_uri: str | None
    offsets: dict[str, tuple[int, int]]
    doc_id: pa.Array
    rank: np.ndarray
    retrieval_score: np.ndarray
    rerank_score: np.ndarray
    final_score: np.ndarray
    reranker: str
    # The clip reranker's embedding-cache entry per corpus shard key ({key: [cache dir, entry key]}), as the
    # batch job scored them: the live path scores the same cached vectors.
    clip_vectors: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.rank)

    def lookup(self, query_id: str, top_n: int | None) -> list[dict[str, Any]] | None:
        span = self.offsets.get(query_id)
        if span is None:
            return None
        a, b = span
        if top_n is not None:
            b = min(b, a + top_n)
        docs = self.doc_id.slice(a, b - a).to_pylist()
        return [{"rank": int(self.rank[i]), "doc_id": docs[i - a], "retrieval_score": float(self.retrieval_score[i]),
                 "rerank_score": float(self.rerank_score[i]), "final_score": float(self.final_score[i])}
                for i in range(a, b)]


def load_store(storage: Storage, root: str) -> ResultsStore:
    """Load and verify the run ``LATEST`` names; raises if it is incomplete or corrupt."""
    from operators.runs import PublishError, latest_run

    found = latest_run(storage, root)
    if found is None:
        raise PublishError(f"{root}: nothing published yet (no LATEST)")
    run_dir, manifest = found
    t = read_stage(storage, run_dir, manifest, L.prefix(L.RESULTS),
                   {f.name: f.type for f in RESULTS if f.name != "run_id"})  # the store's columns
    stages = read_run_json(storage, run_dir, manifest, L.STATS)["stages"]
    return ResultsStore(
        run_id=manifest["run_id"], created=manifest["created"], run_dir=run_dir,
        config=run_config(storage, run_dir, manifest),
        index_uri=stages.get("index", {}).get("uri"), **sorted_columns(t),
        reranker=t.column("reranker")[0].as_py() if t.num_rows else "",
        clip_vectors=dict(stages.get("rerank", {}).get("clip_vectors") or {}))


def sorted_columns(t: pa.Table) -> dict[str, Any]:
    """A results table as the store holds it: sorted by (query_id, rank), the query id -> row span index, doc ids
    dictionary-encoded, rank int32 and the scores float32 (``benchmarks/bench_store_memory.py`` measures it)."""
    t = t.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    q = t.column("query_id").to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.r_[True, q[1:] != q[:-1], True]) if len(q) else np.array([0])
    return {
        "offsets": {str(q[a]): (int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)},
        "doc_id": t.column("doc_id").combine_chunks().dictionary_encode(),
        "rank": t.column("rank").to_numpy().astype(np.int32),
        **{c: t.column(c).to_numpy().astype(np.float32) for c in ("retrieval_score", "rerank_score", "final_score")},
    }
