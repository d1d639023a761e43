"""operators/faiss_shards.py (and the Ray-free parts of operators/search_ops.py), without Ray.

Assignment, factory checks, seeded training, verified persistence, search parameters, the exact merge
of per-shard top-k lists (compared with one flat index over all vectors), and IVF recall on clustered
data. The router (and the candidates sink after it) is exercised directly on an Arrow batch with
in-process shard searchers.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import faiss_shards as F
from operators.contracts import BAD_DIMENSION, ERR_MSG, ERR_TYPE, ID, NON_FINITE, ROW, SHARD, SOURCE
from operators.search_ops import (
    CandidatesSink,
    SearchRouter,
    ShardSearcher,
    check_vectors,
)
from operators.storage import Storage

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _random_unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def _clustered(n: int, clusters: int, dim: int = DIM, seed: int = 0, spread: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((clusters, dim)))
    labels = rng.integers(clusters, size=n)
    return _unit(centers[labels] + spread * rng.standard_normal((n, dim)))


def _flat(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


def _sharded_search(factory: str, x: np.ndarray, q: np.ndarray, k: int, sizes: list[int],
                    nprobe: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train once, one shard per slice of ``x`` (sizes in order), search each, merge."""
    assert sum(sizes) == len(x)
    trained = F.train(factory, x.shape[1], x, seed)
    parts, offset = [], 0
    for n in sizes:
        index = faiss.deserialize_index(np.frombuffer(F.build_shard(trained, x[offset:offset + n]), np.uint8))
        F.set_search_params(index, F.SearchParams(k=k, nprobe=nprobe))
        parts.append(F.search(index, q, k, offset))
        offset += n
    return F.merge(parts)


def _recall(I: np.ndarray, ref: np.ndarray) -> float:  # noqa: E741
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(I, ref, strict=True)]))


# ----------------------------------------------------------------------------------------------
# assign_shards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts,num_shards", [
    ([10, 10, 10, 10], 2),
    ([5, 40, 3, 3, 7, 0, 12, 9], 3),
    ([100, 1, 1, 1, 1, 1, 1, 1], 4),
    ([3, 12, 15], 5),  # more index shards than inputs: some stay empty
    ([], 3),
    ([7], 1),
])
def test_assign_shards_covers_balances_and_is_deterministic(counts: list[int], num_shards: int) -> None:
    out = F.assign_shards(counts, num_shards)
    assert len(out) == num_shards
    # Every input exactly once, in input order within each index shard.
    flat = [i for s in out for i in s]
    assert sorted(flat) == list(range(len(counts)))
    assert all(s == sorted(s) for s in out)
    # Deterministic: same inputs, same answer (also from a fresh list object).
    assert F.assign_shards(list(counts), num_shards) == out
    # Greedy balance: the spread of loads never exceeds the largest single input.
    loads = [sum(counts[i] for i in s) for s in out]
    assert max(loads) - min(loads) <= max(counts, default=0)
    # No index shard is empty while another holds two inputs and the empty one could take one.
    if len(counts) >= num_shards and all(c > 0 for c in counts):
        assert all(out)


def test_assign_shards_known_answer() -> None:
    # Each input goes to the least-loaded shard, lowest index on ties.
    assert F.assign_shards([3, 12, 15], 3) == [[0], [1], [2]]
    assert F.assign_shards([3, 12, 15], 5) == [[0], [1], [2], [], []]
    assert F.assign_shards([10, 1, 1, 1, 10], 2) == [[0], [1, 2, 3, 4]]
    assert F.assign_shards([4, 4, 4, 4], 2) == [[0, 2], [1, 3]]


# ----------------------------------------------------------------------------------------------
# factory checks and training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,dim", [
    ("NotAFactory", 64),
    ("IVF", 64),
    ("PQ7", 64),  # 64 is not divisible by 7 subquantizers
    ("IVF16,PQ5", 64),
    ("IVF16,Flat,Flat", 64),
])
def test_check_factory_rejects(factory: str, dim: int) -> None:
    with pytest.raises(F.IndexConfigError, match=r"^index\.factory: ") as ei:
        F.check_factory(factory, dim)
    assert repr(factory) in str(ei.value) and f"dim {dim}" in str(ei.value)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "PQ8", "IVF8,PQ4x4", "PCA16,IVF4,Flat"])
def test_check_factory_accepts(factory: str) -> None:
    F.check_factory(factory, 64)


def test_min_training_vectors_and_needs_training() -> None:
    assert F.min_training_vectors("Flat") == 1
    assert F.min_training_vectors("IVF64,Flat") == 64
    assert F.min_training_vectors("IVF16,PQ8") == 256
    assert F.min_training_vectors("IVF300,PQ8x4") == 300
    assert F.min_training_vectors("PQ8x4") == 16
    assert not F.needs_training("Flat", DIM)
    assert not F.needs_training("HNSW8", DIM)
    assert F.needs_training("IVF4,Flat", DIM)
    assert F.needs_training("PQ4", DIM)


@pytest.mark.parametrize("factory,n", [("IVF64,Flat", 63), ("IVF8,PQ8", 255), ("PQ4", 10), ("IVF4,Flat", 0)])
def test_train_with_too_few_vectors(factory: str, n: int) -> None:
    with pytest.raises(F.IndexConfigError, match=r"^index\.factory: .*needs at least \d+ training vectors") as ei:
        F.train(factory, DIM, _random_unit(n), seed=0)
    assert f"only {n} available" in str(ei.value)


def test_train_is_seeded() -> None:
    x = _clustered(400, 8, seed=1)
    a = F.train("IVF8,Flat", DIM, x, seed=3)
    assert F.train("IVF8,Flat", DIM, x, seed=3) == a
    assert F.train("IVF8,Flat", DIM, x, seed=4) != a
    index = faiss.deserialize_index(np.frombuffer(a, np.uint8))
    assert index.is_trained and index.ntotal == 0
    # PQ codebooks are seeded too.
    b = F.train("IVF4,PQ4x4", DIM, x, seed=3)
    assert F.train("IVF4,PQ4x4", DIM, x, seed=3) == b
    # Shards built from the same trained bytes and vectors are byte-identical.
    assert F.build_shard(a, x[:50]) == F.build_shard(a, x[:50])
    # A Flat "training" ignores the sample: an empty index.
    flat = faiss.deserialize_index(np.frombuffer(F.train("Flat", DIM, np.zeros((0, DIM), np.float32), 0), np.uint8))
    assert flat.ntotal == 0 and flat.d == DIM


def test_build_shard_empty_and_nonempty() -> None:
    trained = F.train("Flat", DIM, np.zeros((0, DIM), np.float32), 0)
    empty = faiss.deserialize_index(np.frombuffer(F.build_shard(trained, np.zeros((0, DIM), np.float32)), np.uint8))
    assert empty.ntotal == 0
    x = _random_unit(7)
    full = faiss.deserialize_index(np.frombuffer(F.build_shard(trained, x), np.uint8))
    assert full.ntotal == 7
    np.testing.assert_array_equal(faiss.rev_swig_ptr(full.get_xb(), 7 * DIM).reshape(7, DIM), x)


# ----------------------------------------------------------------------------------------------
# search parameters
# ----------------------------------------------------------------------------------------------


def test_set_search_params_ivf_nprobe() -> None:
    for factory in ("IVF8,Flat", "PCA16,IVF8,Flat", "IVF8,PQ4x4"):
        index = faiss.deserialize_index(np.frombuffer(F.train(factory, DIM, _clustered(300, 8), 0), np.uint8))
        F.set_search_params(index, F.SearchParams(k=10, nprobe=5, ef_search=99))
        assert faiss.extract_index_ivf(index).nprobe == 5, factory
        F.set_search_params(index, F.SearchParams(k=10, nprobe=7))
        assert faiss.extract_index_ivf(index).nprobe == 7, factory


def test_set_search_params_hnsw_ef_search() -> None:
    index = faiss.index_factory(DIM, "HNSW8", faiss.METRIC_INNER_PRODUCT)
    F.set_search_params(index, F.SearchParams(k=10, nprobe=3, ef_search=77))
    assert faiss.downcast_index(index).hnsw.efSearch == 77
    # efSearch below k would cap what HNSW can return: raised to k.
    F.set_search_params(index, F.SearchParams(k=200, ef_search=16))
    assert faiss.downcast_index(index).hnsw.efSearch == 200


def test_set_search_params_flat_is_a_no_op() -> None:
    index = faiss.IndexFlatIP(DIM)
    F.set_search_params(index, F.SearchParams(k=5, nprobe=3, ef_search=9))  # nothing to set, no error
    index.add(_random_unit(4))
    assert index.search(_random_unit(1, seed=9), 2)[1].shape == (1, 2)


@pytest.mark.parametrize("factory", ["L2norm,HNSW8", "PCA16,HNSW8"])
def test_set_search_params_wrapped_hnsw(factory: str) -> None:
    trained = F.train(factory, DIM, _random_unit(100), 0)
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    F.set_search_params(index, F.SearchParams(k=10, ef_search=77))
    assert faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch == 77


# ----------------------------------------------------------------------------------------------
# search + merge: exactness against one flat index
# ----------------------------------------------------------------------------------------------


def test_search_on_empty_shard_and_short_shard() -> None:
    q = _random_unit(3, seed=1)
    empty = faiss.IndexFlatIP(DIM)
    D, I = F.search(empty, q, 4, offset=100)  # noqa: E741
    assert D.shape == I.shape == (3, 4) and (I == -1).all() and np.isneginf(D).all()
    short = faiss.IndexFlatIP(DIM)
    short.add(_random_unit(2, seed=2))
    D, I = F.search(short, q, 4, offset=10)  # noqa: E741
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert (np.sort(I[:, :2], axis=1) == [10, 11]).all()  # global ids = offset + local
    assert (I[:, 2:] == -1).all() and np.isneginf(D[:, 2:]).all()
    assert np.isfinite(D[:, :2]).all()


@pytest.mark.parametrize("sizes,k", [
    ([200], 10),  # one shard: merge is the identity
    ([50, 150], 10),
    ([13, 0, 120, 67], 25),  # an empty shard in the middle
    ([3, 5, 2, 190], 8),  # shards smaller than k: -1 padding from them
    ([4, 0, 3, 2], 20),  # k larger than everything: padded result
])
def test_merge_equals_single_flat_search(sizes: list[int], k: int) -> None:
    n = sum(sizes)
    x = _random_unit(n, seed=len(sizes))
    q = _random_unit(17, seed=100 + k)
    D, I = _sharded_search("Flat", x, q, k, sizes)  # noqa: E741
    Dr, Ir = _flat(x, q, min(k, n))
    m = min(k, n)
    assert D.shape == I.shape == (17, k)
    np.testing.assert_array_equal(I[:, :m], Ir)  # random data: no exact ties
    np.testing.assert_allclose(D[:, :m], Dr, rtol=0, atol=1e-5)
    # Missing results: id -1 (faiss pads the score with -inf or -FLT_MAX, below every real score).
    assert (I[:, m:] == -1).all() and (D[:, m:] < -1e30).all()
    assert (np.diff(D[:, :m], axis=1) <= 1e-6).all()  # largest first


def test_merge_handles_shards_with_padding_directly() -> None:
    # Hand-made per-shard lists: shard b has one hit, shard c none; ids are already global.
    a = (np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[0, 1, 2]], np.int64))
    b = (np.array([[0.7, -np.inf, -np.inf]], np.float32), np.array([[10, -1, -1]], np.int64))
    c = (np.full((1, 3), -np.inf, np.float32), np.full((1, 3), -1, np.int64))
    D, I = F.merge([a, b, c])  # noqa: E741
    assert I.tolist() == [[0, 10, 1]]
    np.testing.assert_allclose(D, [[0.9, 0.7, 0.5]])
    D, I = F.merge([b, c])  # noqa: E741
    assert I.tolist() == [[10, -1, -1]]
    assert D[0, 0] == np.float32(0.7) and (D[0, 1:] < -1e30).all()


def test_merge_sharded_hnsw_and_ivf_are_consistent_with_own_shards() -> None:
    """Approximate shards still merge into a sorted, duplicate-free global list of real ids."""
    x = _clustered(600, 10, seed=4)
    q = _clustered(20, 10, seed=5)
    for factory in ("HNSW16", "IVF10,Flat"):
        D, I = _sharded_search(factory, x, q, 15, [200, 0, 250, 150], nprobe=2)  # noqa: E741
        for d, i in zip(D, I, strict=True):
            real = i[i >= 0]
            assert len(set(real.tolist())) == len(real) and real.max() < 600
            assert (np.diff(d[i >= 0]) <= 1e-6).all()
            # Every score is the true inner product of the query and that doc.
        ok = I >= 0
        rows = np.nonzero(ok)[0]
        np.testing.assert_allclose(D[ok], np.einsum("ij,ij->i", q[rows], x[I[ok]]), atol=1e-5)


def test_ivf_recall_on_clustered_data() -> None:
    """20 gaussian clusters: IVF20 probing every list is exact; probing one list is a recall in [0, 1]."""
    x = _clustered(2000, 20, seed=7)
    q = _clustered(50, 20, seed=8, spread=0.1)
    k = 10
    _, ref = _flat(x, q, k)
    sizes = [700, 0, 800, 500]
    D_all, I_all = _sharded_search("IVF20,Flat", x, q, k, sizes, nprobe=20, seed=1)
    assert _recall(I_all, ref) == 1.0
    np.testing.assert_array_equal(I_all, ref)
    np.testing.assert_allclose(D_all, _flat(x, q, k)[0], atol=1e-5)
    _, I_one = _sharded_search("IVF20,Flat", x, q, k, sizes, nprobe=1, seed=1)
    r1 = _recall(I_one, ref)
    assert 0.0 <= r1 <= 1.0
    # nprobe beyond nlist is clamped by faiss: still exact.
    _, I_more = _sharded_search("IVF20,Flat", x, q, k, sizes, nprobe=64, seed=1)
    assert _recall(I_more, ref) == 1.0


# ----------------------------------------------------------------------------------------------
# verified persistence
# ----------------------------------------------------------------------------------------------


def _serialized_flat(n: int = 20) -> bytes:
    return F.build_shard(F.train("Flat", DIM, np.zeros((0, DIM), np.float32), 0), _random_unit(n, seed=3))


def test_verify_bytes_and_load_index() -> None:
    data = _serialized_flat()
    sha = F.sha256_bytes(data)
    index = F.load_index(data, "x/shard-00000.faiss", len(data), sha)
    assert index.ntotal == 20

    with pytest.raises(F.IndexIntegrityError, match=r"x/shard-00000\.faiss: \d+ bytes, manifest says \d+"):
        F.load_index(data[:-7], "x/shard-00000.faiss", len(data), sha)
    with pytest.raises(F.IndexIntegrityError, match=r"x/shard-00000\.faiss: \d+ bytes"):
        F.load_index(data + b"\0", "x/shard-00000.faiss", len(data), sha)
    for pos in (0, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        with pytest.raises(F.IndexIntegrityError, match=r"x/shard-00000\.faiss: sha256 .* does not match"):
            F.load_index(bytes(flipped), "x/shard-00000.faiss", len(data), sha)
    F.verify_bytes(data, "n", len(data), sha)  # no error
    with pytest.raises(F.IndexIntegrityError):
        F.verify_bytes(b"", "n", len(data), sha)


def _write_index(d: Path, shards: list[np.ndarray]) -> dict[str, Any]:
    """An index directory written the way pipelines.index does, manifest last."""
    storage = Storage()
    trained = F.train("Flat", DIM, np.zeros((0, DIM), np.float32), 0)
    entries, offset = [], 0
    for s, x in enumerate(shards):
        data = F.build_shard(trained, x)
        ids = pa.table({"doc_id": [f"d{offset + i}" for i in range(len(x))], "shard": [f"src{s}"] * len(x),
                        "row_index": pa.array(np.arange(len(x)), pa.int64())})
        sink = pa.BufferOutputStream()
        pq.write_table(ids, sink)
        ids_bytes = sink.getvalue().to_pybytes()
        name = f"shard-{s:05d}"
        storage.write_bytes(str(d / f"{name}.faiss"), data)
        storage.write_bytes(str(d / f"{name}.ids.parquet"), ids_bytes)
        entries.append({"shard": s, "file": f"{name}.faiss", "size": len(data), "sha256": F.sha256_bytes(data),
                        "ids_file": f"{name}.ids.parquet", "ids_size": len(ids_bytes),
                        "ids_sha256": F.sha256_bytes(ids_bytes), "ntotal": len(x), "offset": offset})
        offset += len(x)
    manifest = {"dim": DIM, "ntotal": offset, "shards": entries}
    storage.write_json(str(d / F.MANIFEST), manifest)
    return manifest


def test_read_manifest_and_load_shard(tmp_path: Path) -> None:
    storage = Storage()
    with pytest.raises(F.IndexIntegrityError, match="no manifest.json: not a complete index"):
        F.read_manifest(storage, str(tmp_path))
    x = [_random_unit(5, seed=1), _random_unit(0), _random_unit(9, seed=2)]
    written = _write_index(tmp_path, x)
    manifest = F.read_manifest(storage, str(tmp_path))
    assert manifest == written
    for e, xs in zip(manifest["shards"], x, strict=True):
        index, ids = F.load_shard(storage, str(tmp_path), e)
        assert index.ntotal == ids.num_rows == len(xs)


def test_load_shard_rejects_altered_files(tmp_path: Path) -> None:
    storage = Storage()
    manifest = _write_index(tmp_path, [_random_unit(6, seed=1), _random_unit(4, seed=2)])
    e0, e1 = manifest["shards"]
    faiss_file = tmp_path / "shard-00000.faiss"
    good = faiss_file.read_bytes()

    faiss_file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(F.IndexIntegrityError, match=r"shard-00000\.faiss: \d+ bytes, manifest says"):
        F.load_shard(storage, str(tmp_path), e0)
    flipped = bytearray(good)
    flipped[len(good) - 5] ^= 0x01
    faiss_file.write_bytes(bytes(flipped))
    with pytest.raises(F.IndexIntegrityError, match=r"shard-00000\.faiss: sha256"):
        F.load_shard(storage, str(tmp_path), e0)
    faiss_file.write_bytes(good)
    F.load_shard(storage, str(tmp_path), e0)  # restored: loads again

    ids_file = tmp_path / "shard-00001.ids.parquet"
    t = pq.read_table(ids_file)
    pq.write_table(t.set_column(0, "doc_id", pa.array(["evil"] * t.num_rows)), ids_file)
    with pytest.raises(F.IndexIntegrityError, match=r"shard-00001\.ids\.parquet: "):
        F.load_shard(storage, str(tmp_path), e1)

    # A manifest entry whose count disagrees with the (intact) files.
    with pytest.raises(F.IndexIntegrityError, match=r"shard-00000\.faiss: 6 vectors, 6 ids, manifest 7"):
        F.load_shard(storage, str(tmp_path), {**e0, "ntotal": 7})
    (tmp_path / "shard-00000.faiss").unlink()
    with pytest.raises(FileNotFoundError):
        F.load_shard(storage, str(tmp_path), e0)


# ----------------------------------------------------------------------------------------------
# the search router on a dict batch (no Ray: shard searchers called in-process)
# ----------------------------------------------------------------------------------------------


class _LocalRouter(SearchRouter):
    def _search_all(self, q: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [s.search(q, self.k) for s in self.searchers]


def _batch(ids: list[str | None], vectors: list[Any], fixed: bool = False, shards: list[str] | None = None) -> pa.Table:
    """A read block of query vectors: ``list<float>`` (any length) or ``fixed_size_list<float, DIM>``."""
    n = len(ids)
    vals = [np.asarray(v, dtype=np.float32).tolist() for v in vectors]
    emb = pa.array(vals, pa.list_(pa.float32(), DIM) if fixed else pa.list_(pa.float32()))
    return pa.table({ID: pa.array(ids, pa.string()), "embedding": emb, ROW: pa.array(np.arange(n, dtype=np.int64)),
                     SHARD: pa.array(shards or ["qkey"] * n, pa.string()), SOURCE: pa.array(["q.parquet"] * n),
                     ERR_TYPE: pa.array([""] * n), ERR_MSG: pa.array([""] * n)})


def _cols(t: pa.Table) -> dict[str, np.ndarray]:
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def test_check_vectors_marks_bad_rows() -> None:
    good = _random_unit(1)[0]
    nan = good.copy()
    nan[3] = np.nan
    inf = good.copy()
    inf[0] = -np.inf
    values = [good, nan, inf, good[:-1], np.concatenate([good, good]), good]
    err_type = np.asarray(["", "", "", "", "", "null_id"], dtype=object)
    err_msg = np.asarray(["", "", "", "", "", "query_id is null"], dtype=object)
    q = check_vectors(values, DIM, err_type, err_msg)
    assert err_type.tolist() == ["", NON_FINITE, NON_FINITE, BAD_DIMENSION, BAD_DIMENSION, "null_id"]
    assert err_msg[3] == f"vector has {DIM - 1} values, the index has dim {DIM}"
    assert err_msg[5] == "query_id is null"  # earlier rejects are kept as they are
    np.testing.assert_array_equal(q[0], good)
    assert q.shape == (6, DIM) and np.isfinite(q).all()




@pytest.mark.parametrize("k", [4, 30])
@pytest.mark.parametrize("sizes", [
    [7, 12],
    [7, 0, 12],
])
def test_router_merges_and_rejects(tmp_path: Path, k: int, sizes: list[int]) -> None:
    shards = [_random_unit(n, seed=11 + i) for i, n in enumerate(sizes)]
    manifest = _write_index(tmp_path, shards)
    searchers = [ShardSearcher(str(tmp_path), e, F.SearchParams(k=k)) for e in manifest["shards"]]
    x = np.concatenate([s for s in shards if len(s)])
    n = len(x)
    good = _random_unit(3, seed=13)
    bad_nan = good[0].copy()
    bad_nan[1] = np.nan
    ids = ["q0", "q-nan", "q1", "q-short", "q2"]
    router = _LocalRouter(searchers, k, DIM)
    out = _cols(router(_batch(ids, [good[0], bad_nan, good[1], good[2][:5], good[2]])))

    m = min(k, n)
    ok = np.asarray([not e for e in out[ERR_TYPE]])
    assert ok.sum() == 3 * m and (~ok).sum() == 2
    rej = {out[ID][i]: out[ERR_TYPE][i] for i in np.nonzero(~ok)[0]}
    assert rej == {"q-nan": NON_FINITE, "q-short": BAD_DIMENSION}
    assert all(out[ERR_MSG][i] for i in np.nonzero(~ok)[0])
    Dr, Ir = _flat(x, good, m)
    for qi, qid in enumerate(["q0", "q1", "q2"]):
        sel = ok & (out[ID] == qid)
        assert out["rank"][sel].tolist() == list(range(1, m + 1))
        assert out["doc_id"][sel].tolist() == [f"d{i}" for i in Ir[qi]]
        np.testing.assert_allclose(out["retrieval_score"][sel], Dr[qi], atol=1e-5)
        # Where the doc lives: its source shard and row there.
        src = [0 if i < 7 else len(sizes) - 1 for i in Ir[qi]]
        assert out[SHARD][sel].tolist() == ["qkey"] * m  # the query's shard, for the sink
        assert out["doc_shard"][sel].tolist() == [f"src{s}" for s in src]
        assert out["doc_row"][sel].tolist() == [i if i < 7 else i - 7 for i in Ir[qi]]
        assert (out[ROW][sel] == ids.index(qid)).all()


def test_router_all_rejected_batch(tmp_path: Path) -> None:
    manifest = _write_index(tmp_path, [_random_unit(3, seed=1)])
    searchers = [ShardSearcher(str(tmp_path), e, F.SearchParams(k=2)) for e in manifest["shards"]]
    out = _cols(_LocalRouter(searchers, 2, DIM)(_batch(["a", "b"], [np.full(DIM, np.inf), np.zeros(3)])))
    assert out[ERR_TYPE].tolist() == [NON_FINITE, BAD_DIMENSION]
    assert out["doc_id"].tolist() == [None, None] and out["rank"].tolist() == [0, 0]


def test_router_fixed_size_vectors_equal_list_vectors(tmp_path: Path) -> None:
    """The bulk check of fixed-size vectors (the embeddings cache's type) gives the per-row check's output."""
    manifest = _write_index(tmp_path, [_random_unit(9, seed=2), _random_unit(5, seed=3)])
    searchers = [ShardSearcher(str(tmp_path), e, F.SearchParams(k=6)) for e in manifest["shards"]]
    good = _random_unit(3, seed=4)
    nan = good[1].copy()
    nan[7] = np.nan
    ids, vecs = ["a", "b", "c", "d"], [good[0], nan, good[1], good[2]]
    router = _LocalRouter(searchers, 6, DIM)
    fixed, listed = router(_batch(ids, vecs, fixed=True)), router(_batch(ids, vecs))
    assert fixed.schema == listed.schema
    for name, col in _cols(fixed).items():
        np.testing.assert_array_equal(col, _cols(listed)[name], err_msg=name)  # NaN scores of rejects compare equal
    assert _cols(fixed)[ERR_TYPE].tolist() == [""] * 18 + [NON_FINITE]


def test_candidates_sink_writes_arrow_parts_per_query_shard(tmp_path: Path) -> None:
    """Router output of a batch spanning two query shards, with rejects: one candidates part per shard
    named by its first query row, reject rows in the rejects contract, nothing lost."""
    manifest = _write_index(tmp_path / "index", [_random_unit(8, seed=5)])
    searchers = [ShardSearcher(str(tmp_path / "index"), e, F.SearchParams(k=3)) for e in manifest["shards"]]
    good = _random_unit(4, seed=6)
    batch = _batch(["a", "b", "c", "d", "e"], [good[0], good[1][:4], good[1], good[2], good[3]],
                   shards=["qa", "qa", "qb", "qb", "qb"])
    out = _LocalRouter(searchers, 3, DIM)(batch)
    recs = CandidatesSink(str(tmp_path / "run"), "search").write_arrow(out)
    assert sum(r["rows_ok"] for r in recs) == 4 * 3 and sum(r["rows_rejected"] for r in recs) == 1
    parts = {r["shard"]: r["part"] for r in recs if r["part"]}
    assert parts == {"qa": "part-qa-000000000000.parquet", "qb": "part-qb-000000000002.parquet"}
    qa = pq.read_table(tmp_path / "run" / "candidates" / parts["qa"])
    expected = _cols(out)
    sel = expected[SHARD] == "qa"
    assert qa.column("query_id").to_pylist() == ["a"] * 3
    assert qa.column("doc_id").to_pylist() == expected["doc_id"][sel & (expected[ERR_TYPE] == "")].tolist()
    rej = [r for r in recs if r["rejects"]]
    assert [(r["shard"], r["reject_types"]) for r in rej] == [("qa", {BAD_DIMENSION: 1})]
    rows = pq.read_table(tmp_path / "run" / "rejects" / rej[0]["rejects"]).to_pylist()
    assert [(r["id"], r["row_index"], r["error_type"]) for r in rows] == [("b", 1, BAD_DIMENSION)]


def test_manifest_json_is_plain_data(tmp_path: Path) -> None:
    manifest = _write_index(tmp_path, [_random_unit(2)])
    on_disk = json.loads((tmp_path / F.MANIFEST).read_text())
    assert on_disk == manifest
    assert set(itertools.chain.from_iterable(e.keys() for e in on_disk["shards"])) >= {
        "file", "size", "sha256", "ids_file", "ids_size", "ids_sha256", "ntotal", "offset"}
