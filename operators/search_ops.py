"""Sharded search operators: one searcher actor per index shard, a router that fans out and merges.

The router is a Ray Data batch UDF run as a task (several batches in flight, fused with the read and
the write): each batch of query vectors goes to every shard's searcher at once,
and the per-shard top-k lists are merged into the exact global top-k with faiss's own
``merge_knn_results``. Query rows with a wrong dimension or non-finite values become reject rows.

Candidates stay Arrow from the searchers to the parquet files (k rows per query): the doc ids a searcher
returns are an Arrow ``take`` of its id table, and the router and the sink only ``take``/``filter`` them.
Python object arrays there cost more CPU than the faiss scan of a Flat shard (measured: ~0.8 CPU-s per
1024 queries x k=100, for ~1.2 s of faiss).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import faiss_shards as F
from operators import layout as L
from operators.contracts import (
    BAD_DIMENSION,
    CANDIDATES,
    ERR_MSG,
    ERR_TYPE,
    ID,
    NON_FINITE,
    ROW,
    SHARD,
    SOURCE,
)
from operators.parts import PartsSink, cached_storage
from operators.storage import Storage, StorageOptions
from operators.watchdog import beat, maybe_fail

log = logging.getLogger(__name__)

NON_FINITE_MSG = "vector contains NaN or inf"

# What a searcher returns per (query, rank), nulls where the shard had fewer than k vectors.
DOCS = pa.schema([("doc_id", pa.string()), ("doc_shard", pa.string()), ("doc_row", pa.int64())])


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
        self.docs = pa.Table.from_arrays(
            [ids.column("doc_id").cast(pa.string()), ids.column("shard").cast(pa.string()),
             ids.column("row_index").cast(pa.int64())], schema=DOCS).combine_chunks()

    def ntotal(self) -> int:
        if self.error is not None:
            raise self.error
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> dict[str, Any]:
        """``D``, ``I`` (global ids, -1 = none) and ``docs``: one :data:`DOCS` row per entry of ``I.ravel()``."""
        D, I = F.search(self.index, queries, k, self.offset)  # noqa: E741
        flat = I.ravel()
        miss = flat < 0
        local = pa.array(np.where(miss, 0, flat - self.offset), pa.int64(), mask=miss)
        return {"D": D, "I": I, "docs": self.docs.take(local)}


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
            err_type[i], err_msg[i] = NON_FINITE, NON_FINITE_MSG
        else:
            q[i] = v
    return q


def query_vectors(col: pa.ChunkedArray | pa.Array, dim: int, err_type: np.ndarray, err_msg: np.ndarray) -> np.ndarray:
    """:func:`check_vectors` for an Arrow column; fixed-size lists of ``dim`` floats are checked in bulk."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if not (pa.types.is_fixed_size_list(t) and t.list_size == dim and arr.null_count == 0
            and pa.types.is_floating(t.value_type)):
        return check_vectors(arr.to_numpy(zero_copy_only=False), dim, err_type, err_msg)
    q = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), dim)
    for i in np.nonzero(~np.isfinite(q).all(axis=1))[0]:
        if not err_type[i]:
            err_type[i], err_msg[i] = NON_FINITE, NON_FINITE_MSG
    return q


class SearchRouter:
    """Batch UDF (Arrow in, Arrow out): fan a batch of query vectors out to every shard searcher, merge
    the exact top-k. Output: one row per kept (query, doc), then one row per rejected query."""

    def __init__(self, searchers: list[Any], k: int, dim: int) -> None:
        self.searchers, self.k, self.dim = searchers, k, dim

    def _search_all(self, q: np.ndarray) -> list[dict[str, np.ndarray]]:
        if all(isinstance(s, ShardSearcher) for s in self.searchers):  # in-process shards (the live path)
            return [s.search(q, self.k) for s in self.searchers]
        import ray

        return ray.get([s.search.remote(q, self.k) for s in self.searchers])

    def __call__(self, batch: pa.Table) -> pa.Table:
        maybe_fail("search_batch")
        err_type = np.asarray(batch.column(ERR_TYPE).to_pylist(), dtype=object)
        err_msg = np.asarray(batch.column(ERR_MSG).to_pylist(), dtype=object)
        q = query_vectors(batch.column("embedding"), self.dim, err_type, err_msg)
        ok = np.array([not e for e in err_type], dtype=bool)
        idx = np.nonzero(ok)[0]
        bad = np.nonzero(~ok)[0]
        qi = np.zeros(0, np.int64)
        rank = np.zeros(0, np.int32)
        score = np.zeros(0, np.float32)
        docs = DOCS.empty_table()
        if len(idx):
            parts = self._search_all(q[idx])
            D, I = F.merge([(p["D"], p["I"]) for p in parts])  # noqa: E741
            # Global id -> its row in the concatenated ``docs`` the shards returned.
            keys = np.concatenate([p["I"].ravel() for p in parts])
            order = np.argsort(keys, kind="stable")
            hit = I >= 0  # misses (k > corpus) sort last in every row
            pos = order[np.searchsorted(keys[order], I[hit])]
            qi = np.repeat(idx, hit.sum(axis=1))
            rank = (np.cumsum(hit, axis=1)[hit]).astype(np.int32)
            score = D[hit].astype(np.float32)
            docs = pa.concat_tables([p["docs"] for p in parts]).take(pa.array(pos, pa.int64()))
        nc, nb = len(qi), len(bad)
        src = pa.array(np.concatenate([qi, bad]), pa.int64())
        beat("search")

        def errors(values: np.ndarray) -> pa.Array:
            return pa.concat_arrays([pa.repeat(pa.scalar("", pa.string()), nc), pa.array(values[bad].tolist(), pa.string())])

        def docs_col(name: str, missing: pa.Array) -> pa.Array:
            return pa.concat_arrays([docs.column(name).combine_chunks(), missing])

        return pa.table({
            ID: batch.column(ID).take(src),
            ROW: batch.column(ROW).take(src),
            SHARD: batch.column(SHARD).take(src),
            SOURCE: batch.column(SOURCE).take(src),
            ERR_TYPE: errors(err_type),
            ERR_MSG: errors(err_msg),
            "rank": pa.array(np.concatenate([rank, np.zeros(nb, np.int32)]), pa.int32()),
            "doc_id": docs_col("doc_id", pa.nulls(nb, pa.string())),
            "retrieval_score": pa.array(np.concatenate([score, np.full(nb, np.nan, np.float32)]), pa.float32()),
            "doc_shard": docs_col("doc_shard", pa.nulls(nb, pa.string())),
            "doc_row": docs_col("doc_row", pa.array(np.full(nb, -1, np.int64))),
        })


class CandidatesSink(PartsSink):
    """Search output: ``<out>/candidates/part-<shard>-<row>.parquet`` and ``<out>/rejects/search-...``."""

    def __init__(self, out: str, stage: str = "search", storage_options: StorageOptions | None = None) -> None:
        super().__init__(stage, storage_options)
        self.out = out

    def path(self, what: str, key: str, first_row: int) -> str:
        if what == "ok":
            return L.candidates_part(self.out, key, first_row)
        return L.stage_reject(self.out, self.stage, key, first_row)

    def ok_table(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
        return self._candidates(pa.table({c: pa.array(np.asarray(batch[c])[mask].tolist())
                                          for c in (ID, "rank", "doc_id", "retrieval_score", "doc_shard", "doc_row")}))

    def write_arrow(self, table: pa.Table) -> list[dict[str, Any]]:
        """The router's Arrow output: candidate parts per query shard without a trip through Python objects;
        the few reject rows go through :meth:`PartsSink.write_batch`."""
        bad = pc.not_equal(table.column(ERR_TYPE), "")
        rejects = table.filter(bad)
        out = self.write_batch({c: rejects.column(c).to_numpy(zero_copy_only=False) for c in rejects.column_names}) \
            if rejects.num_rows else []
        ok = table.filter(pc.invert(bad))
        shards = ok.column(SHARD)
        for key in sorted(pc.unique(shards).to_pylist()):
            part = ok.filter(pc.equal(shards, key))
            first = int(pc.min(part.column(ROW)).as_py())
            uri = self.path("ok", key, first)
            cached_storage(self.storage_options).write_table(uri, self._candidates(part))
            out.append({"shard": key, "first_row": first, "rows_ok": part.num_rows, "rows_rejected": 0,
                        "part": uri.rsplit("/", 1)[-1], "rejects": None, "reject_types": {}})
        return out

    @staticmethod
    def _candidates(t: pa.Table) -> pa.Table:
        return pa.Table.from_arrays(
            [t.column(ID), t.column("rank"), t.column("doc_id"), t.column("retrieval_score"), t.column("doc_shard"),
             t.column("doc_row")], names=CANDIDATES.names).cast(CANDIDATES)

    def count_ok(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> int:
        return int(mask.sum())  # candidate rows; queries are counted from the input side
