"""Index stage operators (Ray tasks, run without Ray too): train the quantizer on a sample of the embeddings
cache, build one index shard from its corpus shards' cached vectors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import faiss_shards as F
from operators.embedding_cache import part_uris, read_vectors
from operators.storage import Storage, StorageOptions, join


def training_sample(storage: Storage, cache: str, shards: list[tuple[str, int]], dim: int, n: int,
                    seed: int) -> np.ndarray:
    """A seeded uniform sample of ``n`` corpus vectors (all of them when there are fewer) from the embeddings
    cache's ``shards`` (``(key, rows ok)``, in corpus order)."""
    counts = [c for _, c in shards]
    total = sum(counts)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False)) if total else np.zeros(0, np.int64)
    out, start = [], 0
    for (key, c) in shards:
        local = pick[(pick >= start) & (pick < start + c)] - start
        if len(local):
            _, _, vecs = read_vectors(storage, part_uris(storage, cache, key))
            out.append(vecs[local])
        start += c
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def train_index(factory: str, dim: int, cache: str, shards: list[tuple[str, int]], n: int, seed: int, threads: int,
                options: StorageOptions | None) -> bytes:
    """Ray task: train the index's quantizer on a seeded sample of the corpus vectors."""
    sample = training_sample(Storage(options), cache, shards, dim, n, seed)
    return F.train(factory, dim, sample, seed, threads)


def build_shard(trained: bytes, dim: int, cache: str, keys: list[str], out_dir: str, shard_no: int,
                threads: int, options: StorageOptions | None) -> dict[str, Any]:
    """Ray task: one index shard from its corpus shards' cached vectors; writes it and its id table and returns
    its manifest entry (sizes and sha256s)."""
    storage = Storage(options)
    ids: list[str] = []
    srcs: list[str] = []
    rows, vecs = [], []
    for key in keys:
        i, r, v = read_vectors(storage, part_uris(storage, cache, key))
        ids += i
        srcs += [key] * len(i)
        rows.append(r)
        vecs.append(v)
    vecs = [v for v in vecs if len(v)]  # a shard whose rows were all rejected has no parts
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    data = F.build_shard(trained, vectors, threads)
    name = f"shard-{shard_no:05d}"
    ids_table = pa.table({"doc_id": pa.array(ids, pa.string()), "shard": pa.array(srcs, pa.string()),
                          "row_index": pa.array(np.concatenate(rows) if rows else np.zeros(0, np.int64))})
    sink = pa.BufferOutputStream()
    pq.write_table(ids_table, sink, compression="zstd")
    ids_bytes = sink.getvalue().to_pybytes()
    storage.write_bytes(join(out_dir, f"{name}.faiss"), data)
    storage.write_bytes(join(out_dir, f"{name}.ids.parquet"), ids_bytes)
    return {"shard": shard_no, "file": f"{name}.faiss", "size": len(data), "sha256": F.sha256_bytes(data),
            "ids_file": f"{name}.ids.parquet", "ids_size": len(ids_bytes), "ids_sha256": F.sha256_bytes(ids_bytes),
            "ntotal": len(ids), "corpus_shards": keys}
