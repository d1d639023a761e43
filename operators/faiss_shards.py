"""FAISS index shards: deterministic assignment, seeded training, verified persistence, exact merge.

Every shard is a copy of one trained (empty) index with its own vectors added, so IVF/PQ shards share
one quantizer and their scores are comparable. Ids inside shard ``s`` are ``offset[s] + local``, so
faiss's own ``merge_knn_results`` turns per-shard top-k lists into the global top-k. An index file is
only deserialised after its size and sha256 match the manifest: a truncated or altered file is a
clear :class:`IndexIntegrityError`, never a crash inside faiss.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators import layout as L
from operators.layout import INDEX_MANIFEST as MANIFEST  # re-exported (its home is operators.layout)

log = logging.getLogger(__name__)


class IndexMismatchError(ValueError):
    """Embeddings and index (or queries and index) come from different models or dimensions."""


class IndexIntegrityError(RuntimeError):
    """An index file does not match its manifest (size or sha256), or the manifest is unusable."""


class IndexConfigError(ValueError):
    """The factory string cannot be built for these vectors (names the field and the reason)."""


def assign_shards(counts: list[int], num_shards: int) -> list[list[int]]:
    """Deterministic, size-balanced assignment of input shards (in order) to ``num_shards`` index shards.

    Greedy: each input shard goes to the index shard holding the fewest vectors so far (lowest index on
    ties). The same inputs always give the same assignment, so a rebuilt index is identical.
    """
    loads = [0] * num_shards
    out: list[list[int]] = [[] for _ in range(num_shards)]
    for i, c in enumerate(counts):
        s = min(range(num_shards), key=lambda j: (loads[j], j))
        out[s].append(i)
        loads[s] += c
    return out


def _nlist(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def check_factory(factory: str, dim: int) -> None:
    """Build the factory once on a tiny dimension check: a bad string or incompatible dim fails early."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with its own message
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexConfigError(f"index.factory: cannot build {factory!r} for dim {dim}: {msg}") from None


def needs_training(factory: str, dim: int) -> bool:
    import faiss

    return not faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained


def min_training_vectors(factory: str) -> int:
    """faiss k-means wants at least one point per centroid (39 per centroid to be happy)."""
    n = _nlist(factory)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    pq_k = 2 ** int(pq.group(2) or 8) if pq else 0
    return max(n, pq_k, 1)


def train(factory: str, dim: int, sample: np.ndarray, seed: int, threads: int | None = None) -> bytes:
    """Train an empty index on ``sample`` (seeded) and return it serialised."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        need = min_training_vectors(factory)
        if len(sample) < need:
            raise IndexConfigError(
                f"index.factory: {factory!r} needs at least {need} training vectors, only {len(sample)} available"
                " (use a smaller nlist / PQ, or Flat / HNSW for small corpora)")
        _seed_clustering(index, seed)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def _seed_clustering(index: Any, seed: int) -> None:
    """faiss k-means takes its seed from ClusteringParameters; set it on every level that clusters."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    for obj in (index, ivf):
        pq = getattr(faiss.downcast_index(obj), "pq", None) if obj is not None else None
        if pq is not None:
            pq.cp.seed = seed


def build_shard(trained: bytes, vectors: np.ndarray, threads: int | None = None) -> bytes:
    """Add ``vectors`` to a copy of the trained index; returns the serialised shard."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, name: str, size: int, sha256: str) -> None:
    if len(data) != size:
        raise IndexIntegrityError(f"{name}: {len(data)} bytes, manifest says {size} (truncated or replaced)")
    got = sha256_bytes(data)
    if got != sha256:
        raise IndexIntegrityError(f"{name}: sha256 {got[:16]}… does not match the manifest ({sha256[:16]}…)")


def load_index(data: bytes, name: str, size: int, sha256: str) -> Any:
    """Verify, then deserialise one index shard."""
    import faiss

    verify_bytes(data, name, size, sha256)
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


@dataclass(frozen=True)
class SearchParams:
    k: int
    nprobe: int = 16
    ef_search: int = 64


def set_search_params(index: Any, params: SearchParams) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = params.nprobe
    # HNSW may sit inside wrappers (PCA/L2norm pre-transforms, IDMap, refine): unwrap to find it.
    cur, seen = index, 0
    while cur is not None and seen < 8:
        cur = faiss.downcast_index(cur)
        hnsw = getattr(cur, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(params.ef_search, params.k)
            break
        cur = getattr(cur, "index", None) or getattr(cur, "base_index", None)
        seen += 1


def to_device(index: Any, device: str) -> Any:
    """Move an index to the GPU when asked and faiss has GPU support; CPU otherwise (logged)."""
    import faiss

    if device != "cuda":
        return index
    if getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        log.warning("faiss has no GPU support here (faiss-cpu?); searching on CPU")
        return index
    try:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index)
    except Exception as e:  # noqa: BLE001 - e.g. HNSW has no GPU implementation
        log.warning("index type cannot move to GPU (%s); searching on CPU", e)
        return index


def search(index: Any, queries: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one shard with global ids (``offset + local``); missing results keep id -1."""
    if index.ntotal == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    D, I = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # noqa: E741
    I = np.where(I >= 0, I + offset, -1)  # noqa: E741
    D = np.where(I >= 0, D, -np.inf).astype(np.float32)
    return D, I


def merge(results: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact global top-k from per-shard top-k lists (faiss.merge_knn_results, largest first)."""
    import faiss

    if len(results) == 1:
        return results[0]
    Dall = np.ascontiguousarray(np.stack([d for d, _ in results]), dtype=np.float32)
    Iall = np.ascontiguousarray(np.stack([i for _, i in results]), dtype=np.int64)
    return faiss.merge_knn_results(Dall, Iall, keep_max=True)


def faiss_version() -> str:
    import faiss

    return str(faiss.__version__)


def read_manifest(storage: Any, uri: str) -> dict[str, Any]:
    """The manifest of a complete index (written last by the builder)."""
    try:
        return storage.read_json(L.index_manifest(uri))
    except FileNotFoundError:
        raise IndexIntegrityError(f"{uri}: no {MANIFEST}: not a complete index") from None


def load_shard(storage: Any, uri: str, entry: dict[str, Any]) -> tuple[Any, Any]:
    """Load one shard and its id table, each checked against the manifest before faiss sees it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.storage import join

    name = join(uri, entry["file"])
    index = load_index(storage.read_bytes(name), name, entry["size"], entry["sha256"])
    ids_name = join(uri, entry["ids_file"])
    ids_bytes = storage.read_bytes(ids_name)
    verify_bytes(ids_bytes, ids_name, entry["ids_size"], entry["ids_sha256"])
    ids = pq.read_table(pa.BufferReader(ids_bytes))
    if ids.num_rows != index.ntotal or index.ntotal != entry["ntotal"]:
        raise IndexIntegrityError(f"{name}: {index.ntotal} vectors, {ids.num_rows} ids, manifest {entry['ntotal']}")
    return index, ids
