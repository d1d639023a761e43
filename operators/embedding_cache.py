"""Reading the per-shard embedding cache that ``mmrerank embed`` writes (one home for its file layout).

``<cache>/<shard-key>/_SUCCESS.json`` lists the shard's part files (``part-*.parquet``: id, row_index,
unit-norm vector) and reject files (the rejects contract); an entry without its marker is incomplete and
never read. The search stage reads query vectors, the index build corpus vectors, and the clip reranker
both, through these functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators import layout as L
from operators.storage import Storage, join


def shard_marker(storage: Storage, cache: str, key: str) -> dict[str, Any]:
    """The ``_SUCCESS.json`` of one cached shard (raises FileNotFoundError when incomplete)."""
    return storage.read_json(L.shard_marker(cache, key))


def part_uris(storage: Storage, cache: str, key: str) -> list[str]:
    """Embedding part files of one cached shard, in row order (only those its marker lists)."""
    return [join(L.cache_entry(cache, key), p) for p in shard_marker(storage, cache, key)["parts"]]


def read_vectors(storage: Storage, uris: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, row indexes and float32 vectors of embedding part files, concatenated in order."""
    ids: list[str] = []
    rows, vecs = [], []
    for u in uris:
        t = storage.read_table(u)
        dim = t.schema.field("embedding").type.list_size
        ids += t.column("id").to_pylist()
        rows.append(t.column("row_index").to_numpy())
        flat = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vecs.append(np.asarray(flat, dtype=np.float32).reshape(t.num_rows, dim))
    if not uris:
        return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return ids, np.concatenate(rows), np.concatenate(vecs)


def shard_rejects(storage: Storage, cache: str, key: str) -> dict[int, tuple[str, str]]:
    """Row index -> (error type, message) of the rows one cached shard rejected."""
    marker = shard_marker(storage, cache, key)
    out: dict[int, tuple[str, str]] = {}
    for name in marker.get("rejects", []):
        t = storage.read_table(join(L.cache_entry(cache, key), name), ["row_index", "error_type", "error_message"])
        out.update(zip(t.column(0).to_pylist(), zip(t.column(1).to_pylist(), t.column(2).to_pylist(),
                                                     strict=True), strict=True))
    return out
