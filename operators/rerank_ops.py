"""Reranking stage operators: candidate docs with their pairs, batched reranker actors, fusion + selection.

* :func:`bucket_candidates` (Ray task per candidates part) regroups candidates by corpus shard, then
  :class:`operators.pair_source.PairsSource` (the Ray Data source, kept apart so that this module imports
  without Ray) reads each corpus shard once, only the row groups holding wanted rows, using the
  ``(shard, row)`` recorded at embedding time: no join against the corpus, memory bounded by a row group.
  It yields one row per distinct candidate doc, its content once and its pairs as list columns
  (:func:`group_by_doc`): a doc retrieved by many queries is read, moved and decoded once per run.
* :class:`DecodeDocs` decodes each doc's image once, in CPU tasks (GPU clusters) or in the actor (CPU).
* :class:`RerankPairs` (actor UDF) scores each doc's pairs; a pair that fails is a reject row with a
  reason, the rest of the block is scored. The clip backend scores cached vectors instead (no model).
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import decode as R
from operators import layout as L
from operators.contracts import (
    ALLOWED_FORMATS,
    CONTENT_MISSING,
    DEFAULT_MAX_IMAGE_PIXELS,
    ERR_MSG,
    ERR_TYPE,
    ID,
    PAIR_KEY,
    PAIR_ROW,
    QUERY_MISSING,
    RERANK_ERROR,
    RESULTS,
    ROW,
    SCORED,
    SHARD,
    SOURCE,
    URI_UNREADABLE,
    CacheEntry,
    Piece,
    RejectError,
)
from operators.fusion import fuse, select
from operators.models import resolve_precision
from operators.parts import PartsSink, cached_storage
from operators.rerankers.base import RerankerSpec, create
from operators.storage import StorageOptions, join
from operators.watchdog import beat, maybe_fail, maybe_fail_queries

log = logging.getLogger(__name__)


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


# A candidate doc's pairs travel with it as list columns (one row per doc, never one copy of its content per pair).
P_QUERY, P_TEXT, P_RANK, P_SCORE, P_KEY, P_ROW = "p_query_id", "p_query_text", "p_rank", "p_score", "p_key", "p_row"
PAIR_LISTS = (P_QUERY, P_TEXT, P_RANK, P_SCORE, P_KEY, P_ROW)
DOC_VEC, DOC_RGB, DOC_H, DOC_W, DECODED = "doc_vec", "doc_rgb", "doc_h", "doc_w", "_decoded"
DOC_FIRST = "_doc_first"  # 1 on each doc's first pair: the sink counts docs and decodes from the pairs


def group_by_doc(pairs: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Pairs sorted by ``doc_row`` (one corpus shard) -> one row per distinct doc with its pairs as list
    columns, and the index of each doc's first pair (to take the doc's content once)."""
    rows = pairs.column("doc_row").to_numpy()
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    offsets = pa.array(np.r_[first, len(rows)].astype(np.int32))
    src = {P_QUERY: "query_id", P_TEXT: "query_text", P_RANK: "rank", P_SCORE: "retrieval_score",
           P_KEY: PAIR_KEY, P_ROW: PAIR_ROW}
    take = pa.array(first)
    cols = {"doc_shard": pairs.column("doc_shard").take(take), "doc_row": pairs.column("doc_row").take(take),
            "doc_id": pairs.column("doc_id").take(take)}
    for name, c in src.items():
        cols[name] = pa.ListArray.from_arrays(offsets, pairs.column(c).combine_chunks())
    return pa.table(cols), first


def _doc_table(docs: pa.Table, content: pa.Table | None, errors: list[tuple[str, str]] | None = None,
               vectors: np.ndarray | None = None) -> pa.Table:
    """Doc rows (from :func:`group_by_doc`) with their content columns and a reject reason per doc."""
    n = docs.num_rows

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if content is not None and name in content.column_names:
            return content.column(name).cast(typ)
        return pa.nulls(n, typ)

    errors = errors or [("", "")] * n
    out = docs.append_column("doc_image", col("image", pa.binary())) \
        .append_column("doc_image_uri", col("image_uri", pa.string())) \
        .append_column("doc_caption", col("text", pa.string())) \
        .append_column(ERR_TYPE, pa.array([e[0] for e in errors], pa.string())) \
        .append_column(ERR_MSG, pa.array([e[1] for e in errors], pa.string()))
    if vectors is not None:
        out = out.append_column(DOC_VEC, pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]))
    return out


def pair_docs(cands: pa.Table) -> pa.Table:
    """Candidate pairs of one corpus shard, sorted by ``doc_row`` -> its docs without content (a backend that
    needs none)."""
    return _doc_table(group_by_doc(cands)[0], None)


def _missing(docs: pa.Table) -> list[tuple[str, str]]:
    return [(CONTENT_MISSING, f"row {r} not in the corpus shard") for r in docs.column("doc_row").to_pylist()]


def _shard_pairs(storage: Any, bucket_files: list[str], rows_from: int | None, rows_to: int | None) -> pa.Table:
    """The candidate pairs of one corpus shard piece, sorted by corpus row (stable: deterministic order)."""
    cands = pa.concat_tables([storage.read_table(u) for u in bucket_files]).sort_by("doc_row")
    rows = cands.column("doc_row").to_numpy()
    a = 0 if rows_from is None else int(np.searchsorted(rows, rows_from))
    b = len(rows) if rows_to is None else int(np.searchsorted(rows, rows_to))
    return cands.slice(a, b - a)


def _shard_doc_tables(corpus_uri: str, payload: str, bucket_files: list[str], rows_from: int | None,
                      rows_to: int | None, storage_options: StorageOptions | None,
                      vectors: CacheEntry | None = None) -> Iterator[pa.Table]:
    """The candidate docs of one corpus shard (rows ``[rows_from, rows_to)``, None: unbounded), each once with
    its content and its pairs, one table per row group read; docs whose row the shard lacks are rejects.

    ``vectors`` (clip backend): ``(cache dir, shard key)`` of the reranker model's embedding cache entry for
    this shard; each doc then carries its cached vector (or the reason the cache rejected its row) instead of
    its content, and the corpus shard is not read at all.
    """
    storage = cached_storage(storage_options)
    cands = _shard_pairs(storage, bucket_files, rows_from, rows_to)
    if vectors is not None:
        yield ShardVectors.load(storage, *vectors).docs(cands)
        return
    yield from shard_docs(storage.parquet_file(corpus_uri), payload, cands)


def read_rows(pf: pq.ParquetFile, payload: str, rows: np.ndarray,
              starts: list[int] | None = None) -> Iterator[tuple[int, int, pa.Table]]:
    """Content (payload column, and ``text`` when the shard has it) of sorted corpus ``rows``: per row group
    holding any of them, ``(lo, hi, table of rows[lo:hi])``. Only those row groups are read, each once (a row
    group is the smallest unit a parquet reader fetches); rows past the shard's end are never yielded."""
    cols = [payload] + (["text"] if "text" in pf.schema_arrow.names else [])
    starts = starts if starts is not None else row_group_starts(pf)
    for g in range(pf.metadata.num_row_groups):
        lo, hi = (int(x) for x in np.searchsorted(rows, [starts[g], starts[g + 1]]))
        if lo < hi:
            yield lo, hi, pf.read_row_group(g, columns=cols).take(pa.array(rows[lo:hi] - starts[g]))


def shard_docs(pf: pq.ParquetFile, payload: str, cands: pa.Table,
               starts: list[int] | None = None) -> Iterator[pa.Table]:
    """Candidate pairs of one corpus shard, sorted by ``doc_row`` -> its docs with their content and pairs, one
    table per row group read, then the docs whose row the shard lacks as rejects. The batch source and the live
    path both read candidates' content here."""
    docs, _ = group_by_doc(cands)
    rows = docs.column("doc_row").to_numpy()
    found = np.zeros(len(rows), dtype=bool)
    for lo, hi, content in read_rows(pf, payload, rows, starts):
        found[lo:hi] = True
        beat("read candidate docs")
        yield _doc_table(docs.slice(lo, hi - lo), content)
        del content
    missing = np.nonzero(~found)[0]
    if len(missing):
        lost = docs.take(pa.array(missing))
        yield _doc_table(lost, None, _missing(lost))


@dataclass(frozen=True)
class ShardVectors:
    """One corpus shard's entry of the clip reranker's embedding cache: vectors sorted by corpus row, the
    shard's row count and the rows the cache rejected (with their reasons). Loaded once per read task (batch)
    or per served run (live)."""

    rows: np.ndarray
    vecs: np.ndarray
    n_rows: int
    rejected: dict[int, tuple[str, str]]

    @classmethod
    def load(cls, storage: Any, cache: str, key: str) -> ShardVectors:
        from operators.embedding_cache import part_uris, read_vectors, shard_marker, shard_rejects

        _, rows, vecs = read_vectors(storage, part_uris(storage, cache, key))
        # A part holds its write call's blocks in arrival order: rows are not sorted within the shard's entry.
        order = np.argsort(rows, kind="stable")
        return cls(rows[order], vecs[order], int(shard_marker(storage, cache, key)["rows_in"]),
                   shard_rejects(storage, cache, key))

    def docs(self, cands: pa.Table) -> pa.Table:
        """Candidate pairs of this shard -> its docs, each with its cached vector or the reason it has none."""
        docs, _ = group_by_doc(cands)
        index_rows, vecs = self.rows, self.vecs
        rows = docs.column("doc_row").to_numpy()
        pos = np.searchsorted(index_rows, rows)
        hit = (pos < len(index_rows)) & (index_rows[np.minimum(pos, max(len(index_rows) - 1, 0))] == rows) \
            if len(index_rows) else np.zeros(len(rows), bool)
        dim = vecs.shape[1] if vecs.ndim == 2 and vecs.shape[1] else 1
        out = np.zeros((len(rows), dim), np.float32)
        out[hit] = vecs[pos[hit]]
        errors = []
        for r, ok in zip(rows.tolist(), hit.tolist(), strict=True):
            if ok:
                errors.append(("", ""))
            elif r in self.rejected:  # the reranker model's embedding rejected the image: same reason as a decode
                errors.append(self.rejected[r])
            elif r >= self.n_rows:
                errors.append((CONTENT_MISSING, f"row {r} not in the corpus shard"))
            else:
                errors.append((CONTENT_MISSING, f"row {r} has no vector in the reranker's embedding cache"))
        beat("read candidate docs")
        return _doc_table(docs, None, errors, out)


def row_group_starts(pf: pq.ParquetFile) -> list[int]:
    """First row of each row group, then the row count."""
    return np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]).tolist()


def pair_counts(docs: pa.Table) -> np.ndarray:
    return pc.list_value_length(docs.column(P_QUERY)).to_numpy(zero_copy_only=False).astype(np.int64)


def _doc_blocks(tables: Iterable[pa.Table], block_pairs: int) -> Iterator[pa.Table]:
    """Blocks of whole docs holding at least ``block_pairs`` pairs each (only the last may hold fewer): a doc's
    content is in exactly one block, so it travels and is decoded once. Memory: one row group's docs plus
    less than one block."""
    pending: list[pa.Table] = []
    n = 0
    for t in tables:
        cum = np.cumsum(pair_counts(t))
        a = 0
        while a < t.num_rows:
            base = int(cum[a - 1]) if a else 0
            b = min(int(np.searchsorted(cum, base + block_pairs - n, side="left")) + 1, t.num_rows)
            pending.append(t.slice(a, b - a))
            n += int(cum[b - 1]) - base
            a = b
            if n >= block_pairs:
                yield pa.concat_tables(pending)
                pending, n = [], 0
    if pending:
        yield pa.concat_tables(pending)


def docs_for_shards(pieces: list[Piece], storage_options: StorageOptions | None,
                    block_pairs: int) -> Iterator[pa.Table]:
    """The candidate docs of several corpus shard pieces (each read once, in order) as one stream of blocks."""
    return _doc_blocks(itertools.chain.from_iterable(
        _shard_doc_tables(p.uri, p.payload, p.bucket_files, p.rows_from, p.rows_to, storage_options, p.vectors)
        for p in map(Piece._make, pieces)), block_pairs)


def docs_from_pairs(pairs: pa.Table) -> pa.Table:
    """Per-pair rows (query_id, query_text, doc_id, rank, retrieval_score, doc_shard, doc_row, doc_image,
    doc_image_uri, doc_caption and optionally _cand_key/_cand_row) -> the doc blocks the reranker actor takes:
    what the pair source builds from storage, for callers that hold pairs in memory (tests, gpu_check)."""
    n = pairs.num_rows
    if PAIR_KEY not in pairs.column_names:
        pairs = pairs.append_column(PAIR_KEY, pa.array(["mem"] * n, pa.string()))
    if PAIR_ROW not in pairs.column_names:
        pairs = pairs.append_column(PAIR_ROW, pa.array(np.arange(n, dtype=np.int64)))
    pairs = pairs.sort_by([("doc_shard", "ascending"), ("doc_row", "ascending")])
    out = []
    shard = pairs.column("doc_shard").to_numpy(zero_copy_only=False)
    for key in sorted(set(shard.tolist())):
        sub = pairs.filter(pa.array(shard == key))
        docs, first = group_by_doc(sub)
        content = pa.table({"image": sub.column("doc_image").take(pa.array(first)),
                            "image_uri": sub.column("doc_image_uri").take(pa.array(first)),
                            "text": sub.column("doc_caption").take(pa.array(first))})
        out.append(_doc_table(docs, content))
    return pa.concat_tables(out)


def explode(docs: pa.Table) -> dict[str, np.ndarray]:
    """A block of candidate docs -> its pairs as numpy columns (what :class:`ScoredSink` writes), doc by doc."""
    doc_of = np.repeat(np.arange(docs.num_rows), pair_counts(docs))
    n = len(doc_of)

    def flat(name: str) -> np.ndarray:
        return docs.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False) if n else np.zeros(0)

    def per_pair(name: str) -> np.ndarray:
        return docs.column(name).to_numpy(zero_copy_only=False)[doc_of]

    err = np.array([e or "" for e in per_pair(ERR_TYPE)], dtype=object)
    msg = np.array([e or "" for e in per_pair(ERR_MSG)], dtype=object)
    return {ID: np.asarray(flat(P_QUERY), dtype=object), "doc_id": per_pair("doc_id"), "rank": flat(P_RANK),
            "retrieval_score": flat(P_SCORE), "doc_shard": per_pair("doc_shard"), "doc_row": per_pair("doc_row"),
            SHARD: flat(P_KEY), ROW: flat(P_ROW), SOURCE: per_pair("doc_shard"), ERR_TYPE: err, ERR_MSG: msg}


@dataclass(frozen=True)
class DecodeDocs:
    """Batch fn (CPU task, or called inside the reranker actor): each candidate doc's image decoded once.

    As a task it ships 8-bit RGB pixels (``doc_rgb``, ``doc_h``, ``doc_w``) instead of the encoded bytes;
    :meth:`images` is the in-actor form (PIL images, no copy). ``_decoded`` counts the decodes done.
    """

    needs_image: bool
    max_pixels: int
    allowed_formats: tuple[str, ...]
    storage_options: StorageOptions | None = None
    max_bytes: int | None = None

    def images(self, docs: pa.Table) -> tuple[list[Any], np.ndarray]:
        """Per doc: a PIL image, a :class:`RejectError`, or None (not needed / doc already rejected)."""
        n = docs.num_rows
        out: list[Any] = [None] * n
        decoded = np.zeros(n, np.int8)
        if not self.needs_image:
            return out, decoded
        err = docs.column(ERR_TYPE).to_pylist()
        data = docs.column("doc_image").to_pylist()
        uris = docs.column("doc_image_uri").to_pylist()
        for i in range(n):
            if err[i]:
                continue
            decoded[i] = 1
            try:
                out[i] = self._image(data[i], uris[i])
            except RejectError as e:
                out[i] = e
        beat("decode candidate docs")
        return out, decoded

    def _image(self, data: Any, uri: Any) -> Any:
        if data is None and uri is None:
            raise RejectError(CONTENT_MISSING, "candidate has no image content")
        if data is None:
            try:
                data = cached_storage(self.storage_options).read_bytes(uri)
            except Exception as e:  # noqa: BLE001
                raise RejectError(URI_UNREADABLE, f"cannot read {uri}: {type(e).__name__}: {e}") from None
        return R.decode_image(data, self.max_pixels, self.allowed_formats, self.max_bytes)

    def __call__(self, docs: pa.Table) -> pa.Table:
        images, decoded = self.images(docs)
        err_type = docs.column(ERR_TYPE).to_pylist()
        err_msg = docs.column(ERR_MSG).to_pylist()
        rgb: list[bytes | None] = [None] * len(images)
        h = np.zeros(len(images), np.int32)
        w = np.zeros(len(images), np.int32)
        for i, im in enumerate(images):
            if isinstance(im, RejectError):
                err_type[i], err_msg[i] = im.error_type, im.message
            elif im is not None:
                rgb[i], (w[i], h[i]) = im.tobytes(), im.size
        keep = [c for c in docs.column_names if c not in ("doc_image", "doc_image_uri", ERR_TYPE, ERR_MSG)]
        return docs.select(keep).append_column(ERR_TYPE, pa.array(err_type, pa.string())) \
            .append_column(ERR_MSG, pa.array(err_msg, pa.string())).append_column(DOC_RGB, pa.array(rgb, pa.binary())) \
            .append_column(DOC_H, pa.array(h)).append_column(DOC_W, pa.array(w)) \
            .append_column(DECODED, pa.array(decoded))


def _rgb_images(docs: pa.Table) -> list[Any]:
    from PIL import Image

    data = docs.column(DOC_RGB).to_pylist()
    h, w = docs.column(DOC_H).to_pylist(), docs.column(DOC_W).to_pylist()
    return [None if d is None else Image.frombytes("RGB", (w[i], h[i]), d) for i, d in enumerate(data)]


class RerankPairs:
    """Actor UDF: score every (query, candidate) pair of a block of candidate docs with one reranker backend.

    A block holds whole docs, each with its pairs: a doc's image is decoded once (here, or by
    :class:`DecodeDocs` tasks before the actor) and shared by all its pairs, and backends that can compute
    the image side once per doc do (clip and blip_itm encode each distinct image once per call). Model batches
    end at doc boundaries (:func:`doc_batches`), so a doc's pairs share one such call. With
    ``query_vectors`` (clip backend through the embedding cache) no model is loaded: a doc carries its cached
    vector and a pair's score is its dot product with the query's cached vector.
    """

    def __init__(self, spec: RerankerSpec, device: str = "cpu", precision: str = "fp32",
                 torch_threads: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 allowed_formats: tuple[str, ...] = ALLOWED_FORMATS,
                 storage_options: StorageOptions | None = None, batch_size: int = 16,
                 query_vectors: Any = None, max_bytes: int | None = None) -> None:
        import torch

        t0 = time.perf_counter()
        if device == "cpu":
            torch.set_num_threads(torch_threads or max(1, len(os.sched_getaffinity(0))))
        self.spec, self.batch_size = spec, batch_size
        self.query_index: dict[str, int] | None = None
        self.query_vecs: np.ndarray | None = None
        if query_vectors is not None:
            if not isinstance(query_vectors, tuple):  # a Ray object ref: the matrix is shared, not copied
                import ray

                query_vectors = ray.get(query_vectors)
            ids, self.query_vecs = query_vectors
            self.query_index = {q: i for i, q in enumerate(ids)}
            self.backend = None
            needs_image = needs_caption = False
            label = "cached vectors"
        else:
            precision = resolve_precision(precision, device)  # resolved where the GPU is
            self.backend = create(spec, device, precision)
            needs_image, needs_caption = self.backend.needs_image, self.backend.needs_caption
            label = f"{device}/{precision}"
        self.needs_caption = needs_caption
        self.decoder = DecodeDocs(needs_image, max_pixels, allowed_formats, storage_options, max_bytes)
        self.max_pixels, self.allowed_formats = max_pixels, allowed_formats
        log.info("reranker %s ready in %.1fs on %s", spec.backend, time.perf_counter() - t0, label)

    def __call__(self, docs: pa.Table, query_vectors: tuple[list[str], np.ndarray] | None = None,
                 ) -> dict[str, np.ndarray]:
        """Score a block of docs. ``query_vectors`` (clip through the cache): this call's ``(ids, matrix)``
        instead of the ones given at construction (the live path brings each request's query vector)."""
        maybe_fail("rerank_batch")
        qindex, qvecs = self.query_index, self.query_vecs
        if query_vectors is not None:
            qindex, qvecs = {q: i for i, q in enumerate(query_vectors[0])}, query_vectors[1]
        if DOC_RGB in docs.column_names:  # decoded by DecodeDocs tasks
            images, decoded = _rgb_images(docs), docs.column(DECODED).to_numpy()
        else:
            images, decoded = self.decoder.images(docs)
        counts = pair_counts(docs)
        doc_of = np.repeat(np.arange(docs.num_rows), counts)
        out = explode(docs)  # the pairs' own columns; errors and scores are filled in below
        n = len(doc_of)
        captions_doc = docs.column("doc_caption").to_pylist() if "doc_caption" in docs.column_names else [None] * docs.num_rows
        queries = docs.column(P_TEXT).combine_chunks().flatten().to_pylist() if n else []
        err_type, err_msg = out[ERR_TYPE], out[ERR_MSG]
        qids = out[ID].tolist()
        # clip: the doc vectors of this block as one matrix, taken once per call.
        dvecs = None
        if self.backend is None and n:
            vecs = docs.column(DOC_VEC).combine_chunks()
            dvecs = vecs.flatten().to_numpy().reshape(-1, vecs.type.list_size)
        pair_images: list[Any] = [None] * n
        captions: list[Any] = [None] * n
        for i, d in enumerate(doc_of.tolist()):
            if err_type[i]:
                continue
            cap = captions_doc[d] if isinstance(captions_doc[d], str) else None
            captions[i] = cap
            if queries[i] is None:
                err_type[i], err_msg[i] = QUERY_MISSING, f"no text for query {qids[i]!r}"
            elif qindex is not None and qids[i] not in qindex:
                err_type[i], err_msg[i] = QUERY_MISSING, f"no embedding for query {qids[i]!r} in the reranker's cache"
            elif self.needs_caption and cap is None:
                err_type[i], err_msg[i] = CONTENT_MISSING, "candidate has no caption and the reranker needs one"
            elif isinstance(images[d], RejectError):
                err_type[i], err_msg[i] = images[d].error_type, images[d].message
            else:
                pair_images[i] = images[d]  # the doc's one image object, shared by its pairs
        scores = np.full(n, np.nan, dtype=np.float32)
        for chunk in doc_batches([i for i in range(n) if not err_type[i]], doc_of, self.batch_size):
            try:
                scores[chunk] = self._score(chunk, queries, qids, pair_images, captions, doc_of, dvecs, qindex, qvecs)
            except Exception as e:  # noqa: BLE001 - isolate the failing pair(s), keep the rest
                log.warning("rerank batch failed (%s: %s); scoring pair by pair", type(e).__name__, e)
                for i in chunk:
                    try:
                        scores[i] = self._score([i], queries, qids, pair_images, captions, doc_of, dvecs, qindex,
                                                qvecs)[0]
                    except Exception as e1:  # noqa: BLE001
                        err_type[i], err_msg[i] = RERANK_ERROR, f"{type(e1).__name__}: {e1}"
        first, dec = np.zeros(n, np.int8), np.zeros(n, np.int8)
        starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        has = counts > 0
        first[starts[has]] = 1
        dec[starts[has]] = np.asarray(decoded, np.int8)[has]
        out.update({"rerank_score": scores, DECODED: dec, DOC_FIRST: first})
        beat("rerank")
        return out

    def _score(self, idx: list[int], queries: list[Any], qids: list[Any], images: list[Any], captions: list[Any],
               doc_of: np.ndarray, dvecs: np.ndarray | None, qindex: dict[str, int] | None = None,
               qvecs: np.ndarray | None = None) -> np.ndarray:
        maybe_fail_queries([queries[i] for i in idx])
        if self.backend is None:
            dv = dvecs[doc_of[idx]]  # type: ignore[index]
            qv = qvecs[[qindex[qids[i]] for i in idx]]  # type: ignore[index]
            s = np.einsum("ij,ij->i", dv, qv).astype(np.float32)
        else:
            s = np.asarray(self.backend.score([queries[i] for i in idx], [images[i] for i in idx],
                                              [captions[i] if self.spec.use_caption else None for i in idx]),
                           dtype=np.float32)
        if s.shape != (len(idx),) or not np.isfinite(s).all():
            raise FloatingPointError(f"reranker returned {s.shape} scores with non-finite values for {len(idx)} pairs")
        return s


def doc_batches(idx: list[int], doc_of: np.ndarray, batch_size: int) -> list[list[int]]:
    """Model batches of the pairs ``idx`` (in doc order; ``doc_of[i]``: pair i's doc) that end at doc boundaries:
    whole docs, at most ``batch_size`` pairs a batch, so each doc's image is encoded in one batch (the
    prefix-sharing VLM path encodes it once per batch it is in). A doc with more pairs than ``batch_size``
    fills batches of its own; its last, partial one is topped up with the docs after it."""
    out: list[list[int]] = []
    cur: list[int] = []
    for _, group in itertools.groupby(idx, key=lambda i: doc_of[i]):
        pairs = list(group)
        if cur and len(cur) + len(pairs) > batch_size:
            out.append(cur)
            cur = []
        while len(pairs) > batch_size:
            out.append(pairs[:batch_size])
            pairs = pairs[batch_size:]
        cur += pairs
    if cur:
        out.append(cur)
    return out


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
        records = super().write_batch(batch)
        zeros = np.zeros(len(batch[ID]), np.int8)
        decoded = np.asarray(batch.get(DECODED, zeros), np.int64)
        first = np.asarray(batch.get(DOC_FIRST, zeros), np.int64)
        keys = np.asarray(batch[SHARD]).astype(str)
        for r in records:  # each doc and each decode counted once: on the doc's first pair
            sel = keys == r["shard"]
            r["docs"], r["docs_decoded"] = int(first[sel].sum()), int(decoded[sel].sum())
        return records

    def path(self, what: str, key: str, first_row: int) -> str:
        bucket, cand = key.split("~", 1)
        if what == "ok":
            return join(L.scored_bucket(L.stage_dir(self.out, L.SCORED), bucket), f"part-{cand}-{first_row:012d}.parquet")
        return L.stage_reject(self.out, "rerank", f"{cand}-{bucket}", first_row)

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
    files = storage.ls(L.scored_bucket(scored_dir, bucket), "*.parquet")
    name = L.results_part(out, bucket)
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
