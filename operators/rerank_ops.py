"""Reranking stage operators: candidate content, batched reranker actors, fusion + selection, writers.

* :func:`bucket_candidates` (Ray task per candidates part) regroups candidates by corpus shard, then
  :class:`operators.pair_source.PairsSource` (the Ray Data source, kept apart so that this module imports
  without Ray) reads each corpus shard once, only the row groups holding wanted rows, using the
  ``(shard, row)`` recorded at embedding time: no join against the corpus, memory bounded by a row group.
* :class:`RerankPairs` (actor UDF) decodes what its backend needs and scores pairs; a pair that fails
  is a reject row with a reason, the rest of the batch is scored.
* :class:`ScoredSink` writes scored pairs bucketed by hash(query_id); :func:`select_bucket` (Ray task per
  bucket) fuses scores and selects what each query keeps.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import decode as R
from operators.fusion import fuse, select
from operators.models import resolve_precision
from operators.parts import PartsSink, cached_storage
from operators.rerankers.base import RerankerSpec, create
from operators.shards import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE
from operators.storage import StorageOptions, join
from operators.watchdog import beat, maybe_fail, maybe_fail_queries

log = logging.getLogger(__name__)

CONTENT_MISSING = "doc_content_missing"
QUERY_MISSING = "query_text_missing"
RERANK_ERROR = "rerank_error"

SCORED = pa.schema([
    ("query_id", pa.string()), ("doc_id", pa.string()), ("retrieval_rank", pa.int32()),
    ("retrieval_score", pa.float32()), ("rerank_score", pa.float32()),
    ("doc_shard", pa.string()), ("doc_row", pa.int64()),
])

RESULTS = pa.schema([
    ("query_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
    ("retrieval_score", pa.float32()), ("rerank_score", pa.float32()), ("final_score", pa.float32()),
    ("reranker", pa.string()), ("run_id", pa.string()),
])


PAIR_KEY, PAIR_ROW = "_cand_key", "_cand_row"


def bucket_candidates(cand_uri: str, cand_key: str, out_dir: str, query_uris: list[str],
                      storage_options: StorageOptions | None = None,
                      row_group_starts: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """Ray task: split one candidates part by corpus shard, attaching each query's text.

    Writes ``<out_dir>/<doc_shard>/<cand_key>.parquet``; returns, per corpus shard, its pairs per corpus row
    group (``row_group_starts[shard]``: the shard's row-group first rows and its row count; a row outside the
    shard counts in the first or last group; a shard not listed: one count). This is the only regrouping of
    candidates: afterwards each corpus row group is read exactly once.
    """
    storage = cached_storage(storage_options)
    t = storage.read_table(cand_uri)
    t = t.append_column(PAIR_ROW, pa.array(np.arange(t.num_rows, dtype=np.int64)))
    # (candidates part, row) names a pair uniquely: scored part files are named from it.
    t = t.append_column(PAIR_KEY, pa.array([cand_key] * t.num_rows, pa.string()))
    ids = sorted(set(t.column("query_id").to_pylist()))
    texts: dict[str, str] = {}
    for q in query_uris:  # only the row groups whose statistics admit these ids are decoded
        with storage.fs(q).open(q.split("://", 1)[-1] if "://" in q else q, "rb") as f:
            qt = pq.read_table(f, columns=["query_id", "text"], filters=[("query_id", "in", ids)])
        texts.update(zip(qt.column("query_id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    t = t.append_column("query_text", pa.array([texts.get(q) for q in t.column("query_id").to_pylist()], pa.string()))
    counts: dict[str, np.ndarray] = {}
    shards = t.column("doc_shard").to_numpy(zero_copy_only=False)
    for key in sorted(set(shards.tolist())):
        sub = t.filter(pa.array(shards == key))
        storage.write_table(join(out_dir, key, f"{cand_key}.parquet"), sub)
        starts = (row_group_starts or {}).get(key)
        if starts is None or len(starts) < 2:
            counts[key] = np.array([sub.num_rows], dtype=np.int64)
        else:
            g = np.searchsorted(starts, sub.column("doc_row").to_numpy(), side="right") - 1
            counts[key] = np.bincount(np.clip(g, 0, len(starts) - 2), minlength=len(starts) - 1)
    return counts


def _shard_pair_tables(corpus_uri: str, payload: str, bucket_files: list[str], rows_from: int | None,
                       rows_to: int | None, storage_options: StorageOptions | None) -> Iterator[tuple[pa.Table, bool]]:
    """The candidate pairs pointing into one corpus shard (rows ``[rows_from, rows_to)``, None: unbounded) with
    the doc content, one table per row group read, then the pairs whose row the shard lacks (flagged: they
    are rejects)."""
    storage = cached_storage(storage_options)
    cands = pa.concat_tables([storage.read_table(u) for u in bucket_files]).sort_by("doc_row")
    rows = cands.column("doc_row").to_numpy()
    a = 0 if rows_from is None else int(np.searchsorted(rows, rows_from))
    b = len(rows) if rows_to is None else int(np.searchsorted(rows, rows_to))
    cands, rows = cands.slice(a, b - a), rows[a:b]
    pf = storage.parquet_file(corpus_uri)
    cols = [payload] + (["text"] if "text" in pf.schema_arrow.names else [])
    starts = row_group_starts(pf)
    found = np.zeros(len(rows), dtype=bool)
    for g in range(pf.metadata.num_row_groups):
        lo, hi = np.searchsorted(rows, [starts[g], starts[g + 1]])
        if lo == hi:
            continue  # only the row groups that hold wanted rows are read
        content = pf.read_row_group(g, columns=cols)
        found[lo:hi] = True
        yield _pair_block(cands.slice(lo, hi - lo), content.take(pa.array(rows[lo:hi] - starts[g])), payload, ""), False
        del content
    missing = np.nonzero(~found)[0]
    if len(missing):
        yield _pair_block(cands.take(pa.array(missing)), None, payload, CONTENT_MISSING), True


def row_group_starts(pf: pq.ParquetFile) -> list[int]:
    """First row of each row group, then the row count."""
    return np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]).tolist()


def _whole_blocks(tables: Iterable[tuple[pa.Table, bool]], block_rows: int) -> Iterator[pa.Table]:
    """Blocks of exactly block_rows pairs (a multiple of the reranker's batch size) across row-group and
    corpus-shard boundaries: Ray Data batches within a block bundle, so ragged blocks would give the actor
    ragged batches (measured: sizes 1-3 among the 16s). Only the last block is short; reject tables pass
    through on their own. Memory: one row group's pairs plus less than one block."""
    pending: list[pa.Table] = []
    n_pending = 0
    for table, reject in tables:
        if reject:
            yield table
            continue
        pending.append(table)
        n_pending += table.num_rows
        if n_pending >= block_rows:
            whole = pa.concat_tables(pending)
            full = n_pending // block_rows * block_rows
            for a in range(0, full, block_rows):
                beat("read pairs")
                yield whole.slice(a, block_rows)
            pending, n_pending = ([whole.slice(full)], n_pending - full) if n_pending > full else ([], 0)
    if n_pending:
        beat("read pairs")
        yield pa.concat_tables(pending)


# A read task's piece of a corpus shard: (corpus uri, payload column, bucket files, first row, end row).
Piece = tuple[str, str, list[str], int | None, int | None]


def _pairs_for_shards(pieces: list[Piece], storage_options: StorageOptions | None,
                      block_rows: int) -> Iterator[pa.Table]:
    """The pairs of several corpus shard pieces (each read once, in order) as one stream of whole blocks."""
    return _whole_blocks(itertools.chain.from_iterable(
        _shard_pair_tables(uri, payload, files, lo, hi, storage_options) for uri, payload, files, lo, hi in pieces),
        block_rows)


def _pair_block(c: pa.Table, content: pa.Table | None, payload: str, err: str) -> pa.Table:
    n = c.num_rows

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if content is not None and name in content.column_names:
            return content.column(name).cast(typ)
        return pa.nulls(n, typ)

    return pa.table({
        ID: c.column("query_id"), "doc_id": c.column("doc_id"), "rank": c.column("rank"),
        "retrieval_score": c.column("retrieval_score"), "doc_shard": c.column("doc_shard"),
        "doc_row": c.column("doc_row"), "query_text": c.column("query_text"),
        "doc_image": col("image", pa.binary()), "doc_image_uri": col("image_uri", pa.string()),
        "doc_caption": col("text", pa.string()),
        SHARD: c.column(PAIR_KEY),
        ROW: c.column(PAIR_ROW), SOURCE: c.column("doc_shard"),
        ERR_TYPE: pa.array([err] * n, pa.string()),
        ERR_MSG: pa.array([f"row {r} not in the corpus shard" if err else "" for r in c.column("doc_row").to_pylist()],
                          pa.string()),
    })


class RerankPairs:
    """Actor UDF: score every (query, candidate) pair of a batch with one reranker backend."""

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32",
                 torch_threads: int | None = None, max_pixels: int = 89_478_485,
                 allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"),
                 storage_options: StorageOptions | None = None) -> None:
        import torch

        t0 = time.perf_counter()
        if device == "cpu":
            torch.set_num_threads(torch_threads or max(1, len(os.sched_getaffinity(0))))
        precision = resolve_precision(precision, device)  # resolved where the GPU is
        self.backend = create(spec, device, precision)
        self.spec = spec
        self.max_pixels, self.allowed_formats = max_pixels, allowed_formats
        self.storage_options = storage_options
        log.info("reranker %s ready in %.1fs on %s/%s", spec.backend, time.perf_counter() - t0, device, precision)

    def _image(self, data: Any, uri: Any) -> Any:
        if data is None and uri is None:
            raise R.RejectError(CONTENT_MISSING, "candidate has no image content")
        if data is None:
            try:
                data = cached_storage(self.storage_options).read_bytes(uri)
            except Exception as e:  # noqa: BLE001
                raise R.RejectError(R.URI_UNREADABLE, f"cannot read {uri}: {type(e).__name__}: {e}") from None
        return R.decode_image(data, self.max_pixels, self.allowed_formats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_fail("rerank_batch")
        n = len(batch[ID])
        err_type = np.asarray(batch[ERR_TYPE], dtype=object).copy()
        err_msg = np.asarray(batch[ERR_MSG], dtype=object).copy()
        images: list[Any] = [None] * n
        captions = [c if isinstance(c, str) else None for c in batch["doc_caption"]]
        queries = [q if isinstance(q, str) else None for q in batch["query_text"]]
        # One decode per distinct doc of the batch (pairs arrive sorted by corpus row, so a doc retrieved by
        # several queries is usually in one batch); its pairs share the image object, or its reject reason.
        decoded: dict[tuple[Any, Any], Any] = {}
        for i in range(n):
            if err_type[i]:
                continue
            try:
                if queries[i] is None:
                    raise R.RejectError(QUERY_MISSING, f"no text for query {batch[ID][i]!r}")
                if self.backend.needs_caption and captions[i] is None:
                    raise R.RejectError(CONTENT_MISSING, "candidate has no caption and the reranker needs one")
                if self.backend.needs_image:
                    key = (batch["doc_shard"][i], batch["doc_row"][i])
                    if key not in decoded:
                        try:
                            decoded[key] = self._image(batch["doc_image"][i], batch["doc_image_uri"][i])
                        except R.RejectError as e:
                            decoded[key] = e
                    if isinstance(decoded[key], R.RejectError):
                        raise decoded[key]
                    images[i] = decoded[key]
            except R.RejectError as e:
                err_type[i], err_msg[i] = e.error_type, e.message
        scores = np.full(n, np.nan, dtype=np.float32)
        idx = [i for i in range(n) if not err_type[i]]
        if idx:
            try:
                scores[idx] = self._score(idx, queries, images, captions)
            except Exception as e:  # noqa: BLE001 - isolate the failing pair(s), keep the rest
                log.warning("rerank batch failed (%s: %s); scoring pair by pair", type(e).__name__, e)
                for i in idx:
                    try:
                        scores[i] = self._score([i], queries, images, captions)[0]
                    except Exception as e1:  # noqa: BLE001
                        err_type[i], err_msg[i] = RERANK_ERROR, f"{type(e1).__name__}: {e1}"
        out = {c: v for c, v in batch.items() if c not in ("doc_image", "doc_image_uri", "doc_caption", "query_text")}
        out[ERR_TYPE], out[ERR_MSG], out["rerank_score"] = err_type, err_msg, scores
        beat("rerank")
        return out

    def _score(self, idx: list[int], queries: list[Any], images: list[Any], captions: list[Any]) -> np.ndarray:
        maybe_fail_queries([queries[i] for i in idx])
        s = np.asarray(self.backend.score([queries[i] for i in idx], [images[i] for i in idx],
                                          [captions[i] if self.spec.use_caption else None for i in idx]),
                       dtype=np.float32)
        if s.shape != (len(idx),) or not np.isfinite(s).all():
            raise FloatingPointError(f"reranker returned {s.shape} scores with non-finite values for {len(idx)} pairs")
        return s


def bucket_of(query_id: str, buckets: int) -> int:
    return zlib.crc32(query_id.encode()) % buckets


class ScoredSink(PartsSink):
    """Scored pairs -> ``<run>/scored/b<bucket>/part-<key>-<row>.parquet``, bucketed by hash(query_id)
    so that one selection task sees all of a query's candidates; rejects -> ``<run>/rejects/rerank-...``.
    """

    def __init__(self, out: str, buckets: int, storage_options: StorageOptions | None = None) -> None:
        super().__init__("rerank", storage_options)
        self.out, self.buckets = out, buckets

    def write_batch(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        batch = dict(batch)
        batch[SHARD] = np.array([f"{bucket_of(str(q), self.buckets):05d}~{k}" for q, k in
                                 zip(batch[ID], batch[SHARD], strict=True)], dtype=object)
        return super().write_batch(batch)

    def path(self, what: str, key: str, first_row: int) -> str:
        bucket, cand = key.split("~", 1)
        if what == "ok":
            return join(self.out, "scored", f"b{bucket}", f"part-{cand}-{first_row:012d}.parquet")
        return join(self.out, "rejects", f"rerank-{cand}-{bucket}-{first_row:012d}.parquet")

    def ok_table(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
        return pa.table({
            "query_id": pa.array(batch[ID][mask].tolist(), pa.string()),
            "doc_id": pa.array(batch["doc_id"][mask].tolist(), pa.string()),
            "retrieval_rank": pa.array(np.asarray(batch["rank"])[mask], pa.int32()),
            "retrieval_score": pa.array(np.asarray(batch["retrieval_score"])[mask], pa.float32()),
            "rerank_score": pa.array(np.asarray(batch["rerank_score"])[mask], pa.float32()),
            "doc_shard": pa.array(batch["doc_shard"][mask].tolist(), pa.string()),
            "doc_row": pa.array(np.asarray(batch["doc_row"])[mask], pa.int64()),
        }, schema=SCORED)


def select_per_query(group: pa.Table, fusion: dict[str, Any], selection: dict[str, Any], reranker: str,
                     run_id: str) -> pa.Table:
    """``map_groups`` UDF over one query's scored candidates -> its kept results, ranked."""
    if group.num_rows == 0:
        return RESULTS.empty_table()
    docs = group.column("doc_id").to_pylist()
    ret = group.column("retrieval_score").to_numpy()
    rr = group.column("rerank_score").to_numpy()
    final = fuse(ret, rr, docs, **fusion)
    keep = select(final, docs, **selection)
    n = len(keep)
    return pa.table({
        "query_id": pa.array([group.column("query_id")[0].as_py()] * n, pa.string()),
        "rank": pa.array(np.arange(1, n + 1), pa.int32()),
        "doc_id": pa.array([docs[i] for i in keep], pa.string()),
        "retrieval_score": pa.array(ret[keep], pa.float32()),
        "rerank_score": pa.array(rr[keep], pa.float32()),
        "final_score": pa.array(np.asarray(final)[keep], pa.float32()),
        "reranker": pa.array([reranker] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
    }, schema=RESULTS)


def select_bucket(bucket: int, scored_dir: str, out: str, fusion: dict[str, Any], selection: dict[str, Any],
                  reranker: str, run_id: str, storage_options: StorageOptions | None = None) -> dict[str, int]:
    """Ray task: fuse + select for every query of one hash bucket; writes ``results/part-b<bucket>.parquet``."""
    storage = cached_storage(storage_options)
    files = storage.ls(join(scored_dir, f"b{bucket:05d}"), "*.parquet")
    name = join(out, "results", f"part-b{bucket:05d}.parquet")
    if not files:
        storage.rm(name)
        return {"rows": 0, "queries": 0}
    t = pa.concat_tables([storage.read_table(f) for f in files]).sort_by([("query_id", "ascending")])
    qids = t.column("query_id").to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.r_[True, qids[1:] != qids[:-1], True])
    parts = [select_per_query(t.slice(a, b - a), fusion, selection, reranker, run_id)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    res = pa.concat_tables(parts)
    storage.write_table(name, res)
    return {"rows": res.num_rows, "queries": len(set(res.column("query_id").to_pylist()))}
