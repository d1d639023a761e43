"""Index build + sharded search on local Ray: fidelity against one brute-force faiss.IndexFlatIP (no Ray),
unequal/empty shards, k beyond the corpus, S3 reuse, corrupted files, bad query vectors, reuse and
fingerprints, model mismatch, IVF training limits and seeded (byte-identical) rebuilds.

One corpus (30 docs in 3 parquet shards of 3, 12 and 15 rows) is embedded once per module with the tiny
random model; the reference reads the same vectors straight from the embeddings cache.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from operators import faiss_shards as F
from operators.contracts import BAD_DIMENSION, NON_FINITE
from operators.embedding_cache import part_uris, read_vectors
from operators.faiss_shards import IndexMismatchError
from operators.storage import Storage, join
from pipelines.config import Config, parse_config
from pipelines.embed import EmbedResult, embed_kind, run_embed
from pipelines.index import IndexResult, build_index, index_fingerprint
from pipelines.sample import SampleInfo, make_sample
from pipelines.search import SearchResult, run_search

pytestmark = pytest.mark.usefixtures("ray_local")

SHARD_ROWS = (3, 12, 15)  # unequal corpus shards
N_DOCS = sum(SHARD_ROWS)
N_QUERIES = 6
ATOL = 1e-5


@dataclasses.dataclass
class Env:
    tmp: Path
    sample: SampleInfo
    corpus_dir: str
    shard_uris: list[str]
    root: str
    corpus: EmbedResult
    queries: EmbedResult
    doc_ids: list[str]
    X: np.ndarray  # corpus vectors in cache order
    query_ids: list[str]
    Q: np.ndarray
    runs: dict[Any, tuple[IndexResult, SearchResult, pa.Table]] = dataclasses.field(default_factory=dict)

    def cfg(self, root: str | None = None, index: dict[str, Any] | None = None, search: dict[str, Any] | None = None,
            embed: dict[str, Any] | None = None) -> Config:
        return _make_cfg(root or self.root, self.corpus_dir, self.sample.queries, index, search, embed)

    def index_dirs(self) -> set[str]:
        d = Path(self.root) / "indexes"
        return {p.name for p in d.iterdir()} if d.exists() else set()


def _make_cfg(root: str, corpus: str, queries: str, index: dict[str, Any] | None = None,
              search: dict[str, Any] | None = None, embed: dict[str, Any] | None = None) -> Config:
    return parse_config({
        "root": root, "corpus": corpus, "queries": queries,
        "ray": {"progress_bars": False},
        "embed": {"batch_size": 16, "rows_per_read_task": 32, **(embed or {})},
        "index": {"factory": "Flat", "shards": 3, **(index or {})},
        # Small CPU share per searcher: five shard actors fit on the 2-CPU test cluster.
        "search": {"k": 10, "searcher_num_cpus": 0.1, "batch_size": 4, **(search or {})},
    })


def _vectors(storage: Storage, res: EmbedResult) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    vecs = []
    for s in res.shards:
        i, _, v = read_vectors(storage, part_uris(storage, res.cache, s.key))
        ids += i
        if len(v):
            vecs.append(v)
    return ids, np.concatenate(vecs)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    tmp = tmp_path_factory.mktemp("index-search")
    sample = make_sample(str(tmp / "sample"), docs=N_DOCS, queries=N_QUERIES, shards=2, seed=11, image_size=32)
    table = pa.concat_tables([pq.read_table(u) for u in sample.shard_uris])
    assert table.num_rows == N_DOCS
    corpus_dir = tmp / "corpus"
    corpus_dir.mkdir()
    uris, start = [], 0
    for i, n in enumerate(SHARD_ROWS):
        uri = str(corpus_dir / f"shard-{i:05d}.parquet")
        pq.write_table(table.slice(start, n), uri, row_group_size=8)
        uris.append(uri)
        start += n
    root = str(tmp / "root")
    corpus, queries = run_embed(_make_cfg(root, str(corpus_dir), sample.queries))
    assert [s.rows_ok for s in corpus.shards] == list(SHARD_ROWS)
    assert queries.rows_ok == N_QUERIES
    storage = Storage()
    doc_ids, X = _vectors(storage, corpus)
    query_ids, Q = _vectors(storage, queries)
    assert X.shape == (N_DOCS, 64) and Q.shape == (N_QUERIES, 64)
    assert sorted(doc_ids) == sorted(table.column("doc_id").to_pylist())
    return Env(tmp, sample, str(corpus_dir), uris, root, corpus, queries, doc_ids, X, query_ids, Q)


# ----------------------------------------------------------------------------------------------
# helpers: reading candidates and comparing with brute force
# ----------------------------------------------------------------------------------------------


def _candidates(res: SearchResult, storage: Storage | None = None) -> pa.Table:
    storage = storage or Storage()
    parts = storage.ls(join(res.out, "candidates"), "*.parquet")
    assert parts, f"no candidate parts under {res.out}"
    t = pa.concat_tables([storage.read_table(p) for p in parts])
    assert t.schema.names == ["query_id", "rank", "doc_id", "retrieval_score", "doc_shard", "doc_row"]
    assert t.schema.field("rank").type == pa.int32() and t.schema.field("retrieval_score").type == pa.float32()
    idx = pc.sort_indices(t, [("query_id", "ascending"), ("rank", "ascending")])
    return t.take(idx)


def _rejects(res: SearchResult, storage: Storage | None = None) -> list[dict[str, Any]]:
    storage = storage or Storage()
    rows: list[dict[str, Any]] = []
    for p in storage.ls(join(res.out, "rejects"), "search-*.parquet"):
        rows += storage.read_table(p).to_pylist()
    return rows


def _query_vectors(ids: list[str | None], vectors: list[Any]) -> pa.Table:
    return pa.table({"query_id": pa.array(ids, pa.string()),
                     "embedding": pa.array([None if v is None else [float(x) for x in v] for v in vectors],
                                           pa.list_(pa.float32()))})


def _tie_groups(scores: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of (near-)equal consecutive scores in a descending list."""
    groups, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or scores[i - 1] - scores[i] > ATOL:
            groups.append((start, i))
            start = i
    return groups


def _assert_brute_force(env: Env, cands: pa.Table, k: int, query_ids: list[str] | None = None,
                        Q: np.ndarray | None = None) -> None:
    """Per query: the pipeline's list equals a single IndexFlatIP over every corpus vector (up to ties)."""
    query_ids = env.query_ids if query_ids is None else query_ids
    Q = env.Q if Q is None else Q
    flat = faiss.IndexFlatIP(env.X.shape[1])
    flat.add(env.X)
    D, I = flat.search(Q, N_DOCS)  # noqa: E741  full ranking: tie groups are complete
    m = min(k, N_DOCS)
    pos_of = {d: i for i, d in enumerate(env.doc_ids)}
    rows = cands.to_pylist()
    assert sorted({r["query_id"] for r in rows}) == sorted(query_ids)
    assert len(rows) == m * len(query_ids)
    for qi, qid in enumerate(query_ids):
        got = [r for r in rows if r["query_id"] == qid]
        assert [r["rank"] for r in got] == list(range(1, m + 1)), qid
        docs = [r["doc_id"] for r in got]
        assert len(set(docs)) == m, f"{qid}: duplicate docs"
        scores = np.array([r["retrieval_score"] for r in got], np.float32)
        np.testing.assert_allclose(scores, D[qi, :m], rtol=0, atol=ATOL, err_msg=qid)
        # Each score is the doc's own inner product with the query.
        np.testing.assert_allclose(scores, env.X[[pos_of[d] for d in docs]] @ Q[qi], rtol=0, atol=ATOL)
        ref = [env.doc_ids[j] for j in I[qi]]
        for a, b in _tie_groups(D[qi]):
            if a >= m:
                break
            if b <= m:
                assert set(docs[a:b]) == set(ref[a:b]), f"{qid}: ranks {a + 1}..{b}"
            else:
                assert set(docs[a:m]) <= set(ref[a:b]), f"{qid}: ranks {a + 1}..{m} (cut tie group)"


def _assert_doc_locations(env: Env, cands: pa.Table) -> None:
    """doc_shard/doc_row point at the corpus row holding that doc (content is fetched from there)."""
    by_key = {s.key: s.source for s in env.corpus.shards}
    tables = {u: pq.read_table(u, columns=["doc_id"]).column(0).to_pylist() for u in env.shard_uris}
    for r in cands.to_pylist():
        assert tables[by_key[r["doc_shard"]]][r["doc_row"]] == r["doc_id"], r


def _flat_run(env: Env, shards: int, k: int = 10) -> tuple[IndexResult, SearchResult, pa.Table]:
    """Build (or reuse) a Flat index with ``shards`` shards and search it once (memoised per module)."""
    if (shards, k) not in env.runs:
        cfg = env.cfg(index={"shards": shards}, search={"k": k})
        index = build_index(cfg)
        res = run_search(cfg, index=index)
        env.runs[(shards, k)] = (index, res, _candidates(res))
    return env.runs[(shards, k)]


# ----------------------------------------------------------------------------------------------
# fidelity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_flat_search_equals_brute_force(env: Env, shards: int) -> None:
    index, res, cands = _flat_run(env, shards)
    m = index.manifest
    assert index.ntotal == m["ntotal"] == N_DOCS and m["dim"] == 64 and m["factory"] == "Flat"
    sizes = [e["ntotal"] for e in m["shards"]]
    assert sizes == ([N_DOCS] if shards == 1 else list(SHARD_ROWS))  # unequal index shards
    assert [e["offset"] for e in m["shards"]] == list(np.cumsum([0] + sizes[:-1]))
    assert (res.queries_in, res.queries_rejected, res.queries_ok) == (N_QUERIES, 0, N_QUERIES)
    assert res.candidates == cands.num_rows == N_QUERIES * 10 and res.reject_types == {}
    assert res.index_uri == index.uri and res.out == join(env.root, "runs", res.run_id)
    assert _rejects(res) == []
    stats = Storage().read_json(join(res.out, "search_stats.json"))
    assert stats["queries_in"] == N_QUERIES and stats["candidates"] == N_QUERIES * 10
    _assert_brute_force(env, cands, k=10)
    _assert_doc_locations(env, cands)


def test_k_larger_than_corpus_returns_every_doc(env: Env) -> None:
    index, res, cands = _flat_run(env, 3, k=50)
    assert res.k == 50 and res.candidates == N_QUERIES * N_DOCS
    for qid in env.query_ids:
        got = cands.filter(pc.equal(cands.column("query_id"), qid))
        assert got.column("rank").to_pylist() == list(range(1, N_DOCS + 1))
        assert sorted(got.column("doc_id").to_pylist()) == sorted(env.doc_ids)
    _assert_brute_force(env, cands, k=50)


def test_empty_index_shards(env: Env) -> None:
    # Five index shards for three corpus shards: two stay empty.
    cfg = env.cfg(index={"shards": 5}, search={"k": 12})
    index = build_index(cfg)
    assert [e["ntotal"] for e in index.manifest["shards"]] == [*SHARD_ROWS, 0, 0]
    res = run_search(cfg, index=index)
    assert res.candidates == N_QUERIES * 12
    _assert_brute_force(env, _candidates(res), k=12)


# ----------------------------------------------------------------------------------------------
# S3: build on the S3-compatible server, then a fresh call reuses it
# ----------------------------------------------------------------------------------------------


def test_s3_index_reused_by_a_fresh_search(env: Env, s3_bucket: str) -> None:
    local_index, _, local = _flat_run(env, 3)
    cfg = env.cfg(root=f"{s3_bucket}/root")
    storage = Storage()
    # The embeddings cache (tested on s3 in test_embed.py) is copied up rather than recomputed.
    storage.fs(s3_bucket).put(str(Path(env.root) / "embeddings"), f"{s3_bucket[5:]}/root/embeddings",
                              recursive=True)
    corpus = embed_kind(cfg, "corpus")
    assert all(s.reused for s in corpus.shards) and corpus.cache.startswith(f"{s3_bucket}/root/embeddings/")
    built = build_index(cfg)
    assert not built.reused and built.uri.startswith(f"{s3_bucket}/root/indexes/")
    # Same corpus content, same model, same settings: the same fingerprint as the local index.
    assert built.fingerprint == local_index.fingerprint
    for e in built.manifest["shards"]:
        assert storage.sha256(join(built.uri, e["file"])) == e["sha256"]

    res = run_search(cfg)  # a fresh call: finds the index on s3 and loads it from there
    assert res.index_uri == built.uri and res.out.startswith(f"{s3_bucket}/root/runs/")
    again = build_index(cfg)
    assert again.reused and again.uri == built.uri and again.manifest == built.manifest
    cands = _candidates(res, storage)
    for col in ("query_id", "rank", "doc_id", "doc_shard", "doc_row"):
        assert cands.column(col).to_pylist() == local.column(col).to_pylist(), col
    np.testing.assert_allclose(cands.column("retrieval_score").to_numpy(),
                               local.column("retrieval_score").to_numpy(), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# corrupted index files
# ----------------------------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 9])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _replace_ids(p: Path) -> None:
    t = pq.read_table(p)
    pq.write_table(t.set_column(0, "doc_id", pa.array([f"x{i}" for i in range(t.num_rows)])), p)


def _damaged_copy(index: IndexResult, dest: Path, target: str, damage: Any) -> IndexResult:
    shutil.copytree(index.uri, dest)
    damage(dest / target)
    return IndexResult(str(dest), index.fingerprint, index.manifest, True, 0.0)


@pytest.mark.parametrize("target,damage", [
    ("shard-00000.faiss", _truncate),
    ("shard-00000.ids.parquet", _replace_ids),
])
def test_corrupted_index_fails_cleanly_naming_the_file(env: Env, tmp_path: Path, target: str, damage: Any) -> None:
    """A damaged shard file stops the search before any query runs, with the integrity check's message.

    """
    index, _, _ = _flat_run(env, 3)
    bad = _damaged_copy(index, tmp_path / "index", target, damage)
    run_id = f"corrupt-{damage.__name__}"
    with pytest.raises((F.IndexIntegrityError, ray.exceptions.RayActorError)) as ei:
        run_search(env.cfg(), run_id=run_id, index=bad)
    msg = str(ei.value)
    assert f"IndexIntegrityError: {tmp_path / 'index' / target}: " in msg or msg.startswith(
        f"{tmp_path / 'index' / target}: "), msg
    assert re.search(r": \d+ bytes, manifest says \d+|: sha256 \w+… does not match the manifest", msg), msg
    out = Path(env.root) / "runs" / run_id
    assert not (out / "candidates").exists() and not (out / "search_stats.json").exists()
    assert F.read_manifest(Storage(), index.uri) == index.manifest  # the original is untouched


def test_corrupted_index_raises_index_integrity_error(env: Env, tmp_path: Path) -> None:
    index, _, _ = _flat_run(env, 3)
    bad = _damaged_copy(index, tmp_path / "index", "shard-00000.faiss", _flip)
    with pytest.raises(F.IndexIntegrityError, match=re.escape(f"{tmp_path / 'index' / 'shard-00000.faiss'}: ")):
        run_search(env.cfg(), run_id="corrupt-type", index=bad)


def test_index_without_manifest_is_an_integrity_error(env: Env, tmp_path: Path) -> None:
    index, _, _ = _flat_run(env, 3)
    copy = tmp_path / "index"
    shutil.copytree(index.uri, copy)
    (copy / F.MANIFEST).unlink()
    with pytest.raises(F.IndexIntegrityError, match="not a complete index"):
        F.read_manifest(Storage(), str(copy))


# ----------------------------------------------------------------------------------------------
# bad query vectors
# ----------------------------------------------------------------------------------------------


def test_bad_query_vectors_are_rejected(env: Env, tmp_path: Path) -> None:
    index, _, _ = _flat_run(env, 3)
    good = [v.tolist() for v in env.Q]
    nan = list(good[0])
    nan[5] = float("nan")
    inf = list(good[1])
    inf[0] = float("inf")
    rows: list[tuple[str | None, list[float] | None, str | None]] = [
        (qid, v, None) for qid, v in zip(env.query_ids, good, strict=True)]
    rows[2:2] = [
        ("bad-nan", nan, NON_FINITE),
        ("bad-inf", inf, NON_FINITE),
        ("bad-short", good[2][:63], BAD_DIMENSION),
        ("bad-long", good[2] + [0.0], BAD_DIMENSION),
        (None, good[3], "null_id"),
        (env.query_ids[0], good[4], "duplicate_id"),  # a second row with an id already used
        ("bad-null", None, "null_payload"),
    ]
    qdir = tmp_path / "qvecs"
    qdir.mkdir()
    # Two shards: the duplicate id is in the second one. One router batch holds every row (see
    # test_batch_of_only_rejected_queries for batches without a single good row).
    t = _query_vectors([r[0] for r in rows], [r[1] for r in rows])
    pq.write_table(t.slice(0, 5), qdir / "part-0.parquet")
    pq.write_table(t.slice(5), qdir / "part-1.parquet")
    cfg = env.cfg(search={"query_embeddings": str(qdir), "batch_size": 64})
    res = run_search(cfg, index=index)

    expected = {(r[0], r[2]) for r in rows if r[2]}
    assert res.queries_in == len(rows) == res.queries_ok + res.queries_rejected
    assert res.queries_rejected == len(expected) and res.queries_ok == N_QUERIES
    assert res.reject_types == {NON_FINITE: 2, BAD_DIMENSION: 2, "null_id": 1, "duplicate_id": 1, "null_payload": 1}
    rej = _rejects(res)
    assert {(r["id"], r["error_type"]) for r in rej} == expected
    assert all(r["stage"] == "search" and r["error_message"] and r["source"].startswith(str(qdir)) for r in rej)
    by_id = {r["id"]: r for r in rej}
    assert by_id["bad-short"]["error_message"] == "vector has 63 values, the index has dim 64"
    # Row indexes are per input shard: rows 0-4 in part-0, the rest in part-1.
    assert by_id["bad-nan"]["row_index"] == 2 and by_id[env.query_ids[0]]["row_index"] == 7 - 5
    assert by_id[None]["error_type"] == "null_id" and by_id["bad-null"]["row_index"] == 8 - 5
    # Only the good rows were searched, and they equal brute force on the same vectors.
    cands = _candidates(res)
    assert res.candidates == cands.num_rows == N_QUERIES * 10
    _assert_brute_force(env, cands, k=10)


def test_batch_of_only_rejected_queries(env: Env, tmp_path: Path) -> None:
    index, _, _ = _flat_run(env, 3)
    qdir = tmp_path / "qvecs"
    qdir.mkdir()
    bad = list(env.Q[0])
    bad[0] = float("nan")
    # batch_size 2: the first file is one router batch with no good row, the second a good query.
    pq.write_table(_query_vectors(["nan", "short"], [bad, list(env.Q[0][:10])]), qdir / "a.parquet")
    pq.write_table(_query_vectors([env.query_ids[1]], [list(env.Q[1])]), qdir / "b.parquet")
    res = run_search(env.cfg(search={"query_embeddings": str(qdir), "batch_size": 2}), index=index)
    assert (res.queries_in, res.queries_rejected) == (3, 2)
    assert res.reject_types == {NON_FINITE: 1, BAD_DIMENSION: 1}
    _assert_brute_force(env, _candidates(res), k=10, query_ids=[env.query_ids[1]], Q=env.Q[1:2])


# ----------------------------------------------------------------------------------------------
# reuse, fingerprints, mismatches, configuration errors
# ----------------------------------------------------------------------------------------------


def test_index_reuse_and_fingerprint(env: Env) -> None:
    index, _, _ = _flat_run(env, 3)
    cfg = env.cfg()
    again = build_index(cfg)
    assert again.reused and again.uri == index.uri and again.fingerprint == index.fingerprint
    assert again.manifest == index.manifest
    storage = Storage()
    for e in again.manifest["shards"]:
        assert storage.sha256(join(again.uri, e["file"])) == e["sha256"]
        assert storage.sha256(join(again.uri, e["ids_file"])) == e["ids_sha256"]

    base = index_fingerprint(cfg, env.corpus)
    assert base == index.fingerprint
    variants = [env.cfg(index={"factory": "HNSW8"}), env.cfg(index={"shards": 2}), env.cfg(index={"seed": 1}),
                env.cfg(index={"factory": "IVF4,Flat", "train_sample": 20})]
    fps = {index_fingerprint(c, env.corpus) for c in variants}
    assert len(fps) == len(variants) and base not in fps
    # Search settings do not change the index.
    assert index_fingerprint(env.cfg(search={"k": 3, "nprobe": 2}), env.corpus) == base

    two = build_index(env.cfg(index={"shards": 2}))
    assert not two.reused and two.uri != index.uri and two.fingerprint != index.fingerprint
    assert sorted(e["ntotal"] for e in two.manifest["shards"]) == [12, 18] and two.ntotal == N_DOCS
    assert build_index(env.cfg(index={"shards": 2})).reused


def test_query_model_mismatch_fails_before_searching(env: Env) -> None:
    index, _, _ = _flat_run(env, 3)
    other = env.cfg(embed={"model": {"name": "mmr-tiny", "seed": 1}})
    with pytest.raises(IndexMismatchError, match=r"queries embedded with model \w+ \(dim 64\) cannot search index"):
        run_search(other, run_id="mismatch", index=index)
    assert not (Path(env.root) / "runs" / "mismatch").exists()


def test_corpus_embeddings_from_another_model_are_refused(env: Env) -> None:
    forged = dataclasses.replace(env.corpus, model_fingerprint="f" * 64)
    before = env.index_dirs()
    with pytest.raises(IndexMismatchError, match=r"embeddings are from model \w+ dim 64, the index is for model ffff"):
        build_index(env.cfg(index={"shards": 4}), forged)
    assert env.index_dirs() == before


@pytest.mark.parametrize("factory,pattern", [
    ("IVF64,Flat", r"index\.factory: 'IVF64,Flat' needs at least 64 training vectors, the corpus has 30"),
    ("IVF4,PQ8", r"index\.factory: 'IVF4,PQ8' needs at least 256 training vectors"),
    ("PQ7", r"index\.factory: cannot build 'PQ7' for dim 64"),
    ("Nonsense", r"index\.factory: cannot build 'Nonsense'"),
])
def test_index_config_errors(env: Env, factory: str, pattern: str) -> None:
    cfg = env.cfg(index={"factory": factory})
    before = env.index_dirs()
    with pytest.raises(F.IndexConfigError, match=pattern):
        build_index(cfg, env.corpus)
    assert env.index_dirs() == before


def test_train_sample_smaller_than_nlist_is_a_config_error(env: Env) -> None:
    with pytest.raises(F.IndexConfigError, match=r"index\.train_sample=3"):
        build_index(env.cfg(index={"factory": "IVF4,Flat", "train_sample": 3}), env.corpus)


# ----------------------------------------------------------------------------------------------
# IVF: seeded, byte-identical rebuilds; exact when probing every list
# ----------------------------------------------------------------------------------------------


def test_ivf_rebuild_is_byte_identical_and_exact_at_full_nprobe(env: Env) -> None:
    cfg = env.cfg(index={"factory": "IVF4,Flat", "train_sample": 20, "seed": 7}, search={"nprobe": 4})
    first = build_index(cfg)
    assert not first.reused and first.manifest["factory"] == "IVF4,Flat"
    storage = Storage()
    files = {e["file"]: storage.read_bytes(join(first.uri, e["file"])) for e in first.manifest["shards"]}
    shutil.rmtree(first.uri)
    second = build_index(cfg)
    assert not second.reused and second.uri == first.uri
    assert [(e["sha256"], e["ids_sha256"], e["ntotal"]) for e in second.manifest["shards"]] == [
        (e["sha256"], e["ids_sha256"], e["ntotal"]) for e in first.manifest["shards"]]
    for e in second.manifest["shards"]:
        assert storage.read_bytes(join(second.uri, e["file"])) == files[e["file"]]
    # Another seed trains other centroids.
    other = build_index(env.cfg(index={"factory": "IVF4,Flat", "train_sample": 20, "seed": 8}))
    assert [e["sha256"] for e in other.manifest["shards"]] != [e["sha256"] for e in first.manifest["shards"]]

    res = run_search(cfg, index=second)  # nprobe = nlist: every list is scanned, the search is exact
    _assert_brute_force(env, _candidates(res), k=10)


def test_ivf_low_nprobe_may_return_fewer_than_k(env: Env) -> None:
    cfg = env.cfg(index={"factory": "IVF4,Flat", "train_sample": 20, "seed": 7}, search={"nprobe": 1, "k": N_DOCS})
    res = run_search(cfg, index=build_index(cfg))
    cands = _candidates(res)
    assert res.queries_ok == N_QUERIES and 0 < cands.num_rows <= N_QUERIES * N_DOCS
    for qid in env.query_ids:
        ranks = cands.filter(pc.equal(cands.column("query_id"), qid)).column("rank").to_pylist()
        assert ranks == list(range(1, len(ranks) + 1)) and ranks


def test_embed_kind_is_reused_by_search(env: Env) -> None:
    # The module's searches never re-embedded: every cached shard is still reused as is.
    again = embed_kind(env.cfg(), "queries")
    assert all(s.reused for s in again.shards) and again.embed_s == 0.0
