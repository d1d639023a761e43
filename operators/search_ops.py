"""Sharded search operators: one searcher actor per index shard, a router that fans out and merges.

The router is a Ray Data batch UDF run as a task (several batches in flight, fused with the read and
the write): each batch of query vectors goes to every shard's searcher at once,
and the per-shard top-k lists are merged into the exact global top-k with faiss's own
``merge_knn_results``. Query rows with a wrong dimension or non-finite values become reject rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from operators import faiss_shards as F
from operators.parts import PartsSink
from operators.shards import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE
from operators.storage import Storage, StorageOptions, join
from operators.watchdog import beat, maybe_fail

log = logging.getLogger(__name__)

BAD_DIMENSION = "bad_dimension"
NON_FINITE = "non_finite_vector"

CANDIDATES = pa.schema([
    ("query_id", pa.string()),
    ("rank", pa.int32()),
    ("doc_id", pa.string()),
    ("retrieval_score", pa.float32()),
    ("doc_shard", pa.string()),  # embeddings-cache key of the corpus shard holding the doc
    ("doc_row", pa.int64()),  # row of the doc in that corpus shard: content is fetched from here
])


class ShardSearcher:
    """Holds one index shard (loaded and verified once) and answers top-k with global ids."""

    def __init__(self, index_uri: str, entry: dict[str, Any], params: F.SearchParams, device: str = "cpu",
                 threads: int = 1, storage_options: StorageOptions | None = None) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.error: F.IndexIntegrityError | None = None
        try:
            index, ids = F.load_shard(Storage(storage_options), index_uri, entry)
        except F.IndexIntegrityError as e:
            # Kept and re-raised from ntotal(): Ray does not carry a constructor's exception to callers.
            self.error = e
            return
        F.set_search_params(index, params)
        self.index = F.to_device(index, device)
        self.offset = int(entry["offset"])
        self.doc_ids = np.asarray(ids.column("doc_id").to_pylist(), dtype=object)
        self.doc_shards = np.asarray(ids.column("shard").to_pylist(), dtype=object)
        self.doc_rows = ids.column("row_index").to_numpy()

    def ntotal(self) -> int:
        if self.error is not None:
            raise self.error
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> dict[str, np.ndarray]:
        D, I = F.search(self.index, queries, k, self.offset)  # noqa: E741
        hit = I >= 0
        local = I[hit] - self.offset
        doc = np.full(I.shape, None, dtype=object)
        shard = np.full(I.shape, None, dtype=object)
        row = np.full(I.shape, -1, dtype=np.int64)
        doc[hit], shard[hit], row[hit] = self.doc_ids[local], self.doc_shards[local], self.doc_rows[local]
        return {"D": D, "I": I, "doc": doc, "shard": shard, "row": row}


def check_vectors(values: Any, dim: int, err_type: np.ndarray, err_msg: np.ndarray) -> np.ndarray:
    """(n, dim) float32 matrix of the rows still ok; marks wrong-dimension and non-finite rows."""
    n = len(err_type)
    q = np.zeros((n, dim), np.float32)
    for i in range(n):
        if err_type[i]:
            continue
        v = np.asarray(values[i], dtype=np.float32).reshape(-1)
        if v.shape[0] != dim:
            err_type[i], err_msg[i] = BAD_DIMENSION, f"vector has {v.shape[0]} values, the index has dim {dim}"
        elif not np.isfinite(v).all():
            err_type[i], err_msg[i] = NON_FINITE, "vector contains NaN or inf"
        else:
            q[i] = v
    return q


class SearchRouter:
    """Batch UDF: fan a batch of query vectors out to every shard searcher, merge the exact top-k."""

    def __init__(self, searchers: list[Any], k: int, dim: int) -> None:
        self.searchers, self.k, self.dim = searchers, k, dim

    def _search_all(self, q: np.ndarray) -> list[dict[str, np.ndarray]]:
        import ray

        return ray.get([s.search.remote(q, self.k) for s in self.searchers])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_fail("search_batch")
        err_type = np.asarray(batch[ERR_TYPE], dtype=object).copy()
        err_msg = np.asarray(batch[ERR_MSG], dtype=object).copy()
        q = check_vectors(batch["embedding"], self.dim, err_type, err_msg)
        ok = np.array([not e for e in err_type], dtype=bool)
        idx = np.nonzero(ok)[0]
        bad = np.nonzero(~ok)[0]
        # Candidate rows first (one per kept (query, doc)), then one row per rejected query.
        qi = np.zeros(0, np.int64)
        rank = np.zeros(0, np.int32)
        score = np.zeros(0, np.float32)
        doc = shard = np.zeros(0, dtype=object)
        row = np.zeros(0, np.int64)
        if len(idx):
            parts = self._search_all(q[idx])
            D, I = F.merge([(p["D"], p["I"]) for p in parts])  # noqa: E741
            # Global id -> (doc_id, corpus shard, row), from what the shards returned.
            keys = np.concatenate([p["I"].ravel() for p in parts])
            order = np.argsort(keys, kind="stable")
            skeys = keys[order]
            hit = I >= 0  # misses (k > corpus) sort last in every row
            pos = order[np.searchsorted(skeys, I[hit])]
            qi = np.repeat(idx, hit.sum(axis=1))
            rank = (np.cumsum(hit, axis=1)[hit]).astype(np.int32)
            score = D[hit].astype(np.float32)
            doc = np.concatenate([p["doc"].ravel() for p in parts])[pos]
            shard = np.concatenate([p["shard"].ravel() for p in parts])[pos]
            row = np.concatenate([p["row"].ravel() for p in parts])[pos].astype(np.int64)
        src = np.concatenate([qi, bad]).astype(np.int64)
        nb = len(bad)
        none = np.full(nb, None, dtype=object)
        beat("search")
        return {
            ID: np.asarray(batch[ID], dtype=object)[src],
            ROW: np.asarray(batch[ROW], dtype=np.int64)[src],
            SHARD: np.asarray(batch[SHARD], dtype=object)[src],
            SOURCE: np.asarray(batch[SOURCE], dtype=object)[src],
            ERR_TYPE: np.concatenate([np.full(len(qi), "", dtype=object), err_type[bad]]),
            ERR_MSG: np.concatenate([np.full(len(qi), "", dtype=object), err_msg[bad]]),
            "rank": np.concatenate([rank, np.zeros(nb, np.int32)]),
            "doc_id": np.concatenate([doc, none]),
            "retrieval_score": np.concatenate([score, np.full(nb, np.nan, np.float32)]),
            "doc_shard": np.concatenate([shard, none]),
            "doc_row": np.concatenate([row, np.full(nb, -1, np.int64)]),
        }


class CandidatesSink(PartsSink):
    """Search output: ``<out>/candidates/part-<shard>-<row>.parquet`` and ``<out>/rejects/search-...``."""

    def __init__(self, out: str, stage: str = "search", storage_options: StorageOptions | None = None) -> None:
        super().__init__(stage, storage_options)
        self.out = out

    def path(self, what: str, key: str, first_row: int) -> str:
        if what == "ok":
            return join(self.out, "candidates", f"part-{key}-{first_row:012d}.parquet")
        return join(self.out, "rejects", f"{self.stage}-{key}-{first_row:012d}.parquet")

    def ok_table(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
        return pa.table({
            "query_id": pa.array(batch[ID][mask].tolist(), pa.string()),
            "rank": pa.array(np.asarray(batch["rank"])[mask], pa.int32()),
            "doc_id": pa.array(batch["doc_id"][mask].tolist(), pa.string()),
            "retrieval_score": pa.array(np.asarray(batch["retrieval_score"])[mask], pa.float32()),
            "doc_shard": pa.array(batch["doc_shard"][mask].tolist(), pa.string()),
            "doc_row": pa.array(np.asarray(batch["doc_row"])[mask], pa.int64()),
        }, schema=CANDIDATES)

    def count_ok(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> int:
        return int(mask.sum())  # candidate rows; queries are counted from the input side
