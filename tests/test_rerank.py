"""Reranking stage on local Ray: scores equal direct backend calls, order equals sorting, rows accounted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from operators import fusion
from operators.contracts import ERR_MSG, ERR_TYPE, RERANK_ERROR, ROW
from operators.rerank_ops import RerankPairs, docs_from_pairs, pair_counts
from operators.rerankers.base import create
from pipelines.config import parse_config
from pipelines.context import reranker_spec
from pipelines.rerank import run_rerank
from pipelines.sample import SampleInfo, make_sample
from pipelines.search import run_search

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("rr") / "s"), docs=30, queries=5, shards=3, seed=11,
                       image_size=40)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root for the module's runs (each its own run id): they share its embedding cache and index, since the
    corpus is the same, so a test embeds nothing that an earlier one embedded."""
    return tmp_path_factory.mktemp("rr-root") / "out"


def _cfg(root: Path, sample: SampleInfo, **rerank: Any) -> Any:
    return parse_config({
        "root": str(root), "corpus": sample.corpus, "queries": sample.queries, "ray": {"progress_bars": False},
        "index": {"factory": "Flat", "shards": 2}, "search": {"k": 8},
        "rerank": {"backend": "clip", "batch_size": 8, "select_buckets": 3, **rerank},
    })


def _corpus(sample: SampleInfo) -> dict[str, tuple[bytes, str]]:
    t = pa.concat_tables([pq.read_table(u) for u in sample.shard_uris])
    return {d: (img, cap) for d, img, cap in zip(t.column("doc_id").to_pylist(), t.column("image").to_pylist(),
                                                 t.column("text").to_pylist(), strict=True)}


def _read(dir_: Path) -> pa.Table:
    return pq.read_table(sorted(dir_.rglob("*.parquet")))


def test_clip_rerank_matches_direct_scores_and_sorting(sample: SampleInfo, root: Path) -> None:
    cfg = _cfg(root, sample, selection={"mode": "top_n", "top_n": 5})
    search = run_search(cfg, run_id="r1")
    res = run_rerank(cfg, "r1")
    run = Path(search.out)
    assert res.pairs_in == search.candidates == 5 * 8
    assert res.pairs_scored + res.pairs_rejected == res.pairs_in and res.pairs_rejected == 0

    # Direct reference, no Ray: the same backend built in-process on the same pairs.
    backend = create(reranker_spec(cfg.rerank, cfg))
    docs = _corpus(sample)
    qt = pq.read_table(sample.queries)
    qtext = dict(zip(qt.column("query_id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    scored = _read(run / "scored").to_pylist()
    ref = backend.score([qtext[r["query_id"]] for r in scored],
                        [Image.open(io.BytesIO(docs[r["doc_id"]][0])).convert("RGB") for r in scored],
                        [docs[r["doc_id"]][1] for r in scored])
    np.testing.assert_allclose([r["rerank_score"] for r in scored], ref, atol=1e-5)

    # Final order per query = sort by (rerank score desc, doc_id), first 5.
    results = _read(run / "results").to_pylist()
    assert {r["run_id"] for r in results} == {"r1"} and {r["reranker"] for r in results} == {"clip:mmr-tiny"}
    for q in qtext:
        mine = sorted((r for r in scored if r["query_id"] == q), key=lambda r: (-r["rerank_score"], r["doc_id"]))
        got = sorted((r for r in results if r["query_id"] == q), key=lambda r: r["rank"])
        assert [r["doc_id"] for r in got] == [r["doc_id"] for r in mine[:5]]
        assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
    assert res.results == 25 and res.queries_with_results == 5


def test_threshold_selection_can_leave_a_query_empty(sample: SampleInfo, root: Path) -> None:
    base = _cfg(root, sample)
    run_search(base, run_id="r2")
    run_rerank(base, "r2")
    scored = _read(root / "runs" / "r2" / "scored").to_pylist()
    best = {}
    for r in scored:
        best[r["query_id"]] = max(best.get(r["query_id"], -9.0), r["rerank_score"])
    # A threshold between the best scores of two queries: at least one query keeps nothing.
    thr = float(np.median(sorted(best.values())))
    cfg = _cfg(root, sample, selection={"mode": "top_k_above_threshold", "threshold": thr, "k": 3},
               fusion={"method": "none"})
    res = run_rerank(cfg, "r2")
    expect = {}
    for q in best:
        rows = [r for r in scored if r["query_id"] == q]
        keep = fusion.select(np.array([r["rerank_score"] for r in rows]), [r["doc_id"] for r in rows],
                             "top_k_above_threshold", threshold=thr, k=3)
        expect[q] = [rows[i]["doc_id"] for i in keep]
    results = _read(root / "runs" / "r2" / "results").to_pylist()
    got = {q: [r["doc_id"] for r in sorted((r for r in results if r["query_id"] == q), key=lambda r: r["rank"])]
           for q in best}
    assert got == expect
    empty = sum(1 for v in expect.values() if not v)
    assert empty >= 1 and res.queries_without_results == empty
    assert all(r["rerank_score"] >= thr for r in results)


def _docs(n: int, **cols: Any) -> pa.Table:
    """Pairs (one per index) -> the doc blocks the reranker actor takes (pairs of one doc_row grouped)."""
    base = {"query_id": [f"q{i}" for i in range(n)], "rank": pa.array(np.ones(n), pa.int32()),
            "retrieval_score": pa.array(np.ones(n), pa.float32()), "doc_shard": ["s"] * n,
            "doc_image_uri": pa.nulls(n, pa.string()), "doc_caption": pa.nulls(n, pa.string())}
    base.update(cols)
    return docs_from_pairs(pa.table(base))


def _by_pair(out: dict[str, np.ndarray], col: str) -> list[Any]:
    """A RerankPairs output column in the input pairs' order (the output is grouped by doc)."""
    order = np.argsort(np.asarray(out[ROW]))
    return [out[col][i] for i in order]


def test_failing_pair_is_rejected_rest_scored(sample: SampleInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(Path("/unused"), sample)
    docs = list(_corpus(sample).items())[:4]
    n = len(docs)
    batch = _docs(n, query_id=["q1", "q2", "q1", "q3"], doc_id=[d for d, _ in docs], doc_row=list(range(n)),
                  query_text=["a red circle", "POISON blue", "a red circle", "green star"],
                  doc_image=[img for _, (img, _) in docs], doc_caption=[c for _, (_, c) in docs])
    monkeypatch.setenv("MMR_FAULT_INJECT", "rerank_query:POISON")
    op = RerankPairs(reranker_spec(cfg.rerank, cfg), torch_threads=1)
    out = op(batch)
    assert _by_pair(out, ERR_TYPE) == ["", RERANK_ERROR, "", ""]
    assert "injected" in _by_pair(out, ERR_MSG)[1]
    monkeypatch.delenv("MMR_FAULT_INJECT")
    clean = RerankPairs(reranker_spec(cfg.rerank, cfg), torch_threads=1)(batch)
    ok = [0, 2, 3]
    got, want = np.array(_by_pair(out, "rerank_score")), np.array(_by_pair(clean, "rerank_score"))
    np.testing.assert_allclose(got[ok], want[ok], atol=1e-6)
    assert np.isnan(got[1])


def test_missing_content_and_query_text_are_rejects(sample: SampleInfo) -> None:
    cfg = _cfg(Path("/unused"), sample)
    img = next(iter(_corpus(sample).values()))[0]
    batch = _docs(3, doc_id=["a", "b", "c"], doc_row=[0, 1, 2], query_text=["x", None, "y"],
                  doc_image=pa.array([img, img, None], pa.binary()))
    out = RerankPairs(reranker_spec(cfg.rerank, cfg), torch_threads=1)(batch)
    assert _by_pair(out, ERR_TYPE) == ["", "query_text_missing", "doc_content_missing"]
    assert np.isfinite(_by_pair(out, "rerank_score")[0])


@pytest.mark.parametrize("in_actor", [True, False])
def test_each_doc_is_decoded_once(sample: SampleInfo, monkeypatch: pytest.MonkeyPatch, in_actor: bool) -> None:
    """Pairs of one doc share one decode (in the actor, or in a DecodeDocs task that ships RGB pixels); the
    scores are the per-pair direct scores, and a broken doc rejects every pair that points at it with the
    same reason."""
    import operators.rerank_ops as ops

    cfg = _cfg(Path("/unused"), sample)
    (d1, (img1, _)), (d2, (img2, _)) = list(_corpus(sample).items())[:2]
    docs = [d1, d1, d2, "bad", d1, "bad"]
    rows = {d1: 0, d2: 1, "bad": 2}
    data = {d1: img1, d2: img2, "bad": b"not an image"}
    qs = ["a red circle", "green star", "a red circle", "blue square", "blue square", "green star"]
    n = len(docs)
    batch = _docs(n, doc_id=docs, doc_row=[rows[d] for d in docs], query_text=qs, doc_image=[data[d] for d in docs])
    assert batch.num_rows == 3  # one row per distinct doc, its image bytes once
    calls: list[bytes] = []
    real = ops.R.decode_image

    def counting(data: bytes, *a: Any, **kw: Any) -> Any:
        calls.append(data)
        return real(data, *a, **kw)

    monkeypatch.setattr(ops.R, "decode_image", counting)
    op = RerankPairs(reranker_spec(cfg.rerank, cfg), torch_threads=1)
    if not in_actor:
        batch = ops.DecodeDocs(True, op.max_pixels, op.allowed_formats)(batch)
        assert "doc_image" not in batch.column_names
    out = op(batch)
    assert sorted(calls) == sorted([img1, img2, b"not an image"])  # 3 distinct docs, 6 pairs
    assert int(np.sum(out[ops.DECODED])) == 3 and int(np.sum(out[ops.DOC_FIRST])) == 3
    err, msg, score = _by_pair(out, ERR_TYPE), _by_pair(out, ERR_MSG), np.array(_by_pair(out, "rerank_score"))
    bad = [i for i, d in enumerate(docs) if d == "bad"]
    assert all(err[i] for i in bad) and len({msg[i] for i in bad}) == 1
    ok = [i for i in range(n) if i not in bad]
    assert not any(err[i] for i in ok)
    # Reference: the backend called once per pair, each with its own decode.
    backend = create(reranker_spec(cfg.rerank, cfg), "cpu", "fp32")
    want = [backend.score([qs[i]], [real(data[docs[i]], op.max_pixels, op.allowed_formats)], [None])[0] for i in ok]
    np.testing.assert_allclose(score[ok], want, atol=1e-5)


def _hf_model(backend: str, dest: Path) -> str:
    from tests.tiny_hf import save_tiny_bert, save_tiny_blip
    from tests.tiny_vlm import save_tiny_vlm

    if backend == "blip_itm":
        return str(save_tiny_blip(dest))
    if backend == "cross_encoder":
        return str(save_tiny_bert(dest))
    return str(save_tiny_vlm(dest))


@pytest.mark.parametrize("backend", ["blip_itm", "cross_encoder", "vlm_yesno"])
def test_hf_backend_pipeline_scores_equal_direct_calls(backend: str, sample: SampleInfo, root: Path,
                                                      tmp_path: Path) -> None:
    """Each HF backend through Ray (content fetch, batching, actors) scores like a direct call without Ray."""
    model = _hf_model(backend, tmp_path / "model")
    cfg = _cfg(root, sample, backend=backend, model=model, batch_size=6,
               selection={"mode": "top_n", "top_n": 3})
    run_id = f"h1-{backend}"
    run_search(cfg, run_id=run_id)
    res = run_rerank(cfg, run_id)
    assert res.pairs_rejected == 0 and res.pairs_scored == res.pairs_in
    backend_obj = create(reranker_spec(cfg.rerank, cfg))
    docs = _corpus(sample)
    qt = pq.read_table(sample.queries)
    qtext = dict(zip(qt.column("query_id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    scored = _read(root / "runs" / run_id / "scored").to_pylist()
    ref = np.concatenate([  # one call per pair: no batching effects in the reference
        backend_obj.score([qtext[r["query_id"]]], [Image.open(io.BytesIO(docs[r["doc_id"]][0])).convert("RGB")],
                          [docs[r["doc_id"]][1]]) for r in scored])
    np.testing.assert_allclose([r["rerank_score"] for r in scored], ref, atol=1e-5)
    results = _read(root / "runs" / run_id / "results").to_pylist()
    for q in qtext:
        mine = sorted((r for r in scored if r["query_id"] == q), key=lambda r: (-r["rerank_score"], r["doc_id"]))
        got = sorted((r for r in results if r["query_id"] == q), key=lambda r: r["rank"])
        assert [r["doc_id"] for r in got] == [r["doc_id"] for r in mine[:3]]


def _candidates_part(tmp_path: Path, q: str, rows: list[int]) -> str:
    """A candidates part: query ``q``'s candidates at ``rows`` of corpus shard ``k``."""
    from operators.storage import Storage

    cand = str(tmp_path / "run" / "candidates" / f"part-{q}.parquet")
    Storage().write_table(cand, pa.table({
        "query_id": [q] * len(rows), "rank": pa.array(range(1, len(rows) + 1), pa.int32()),
        "doc_id": [f"d{r}" for r in rows], "retrieval_score": pa.array(np.ones(len(rows)), pa.float32()),
        "doc_shard": ["k"] * len(rows), "doc_row": pa.array(rows, pa.int64())}))
    return cand


def _pairs_of(blocks: list[pa.Table]) -> list[tuple[str, int, Any, Any, str]]:
    """(query, doc_row, image, caption, error type) per pair of some doc blocks."""
    out = []
    for b in blocks:
        for d, q in enumerate(b.column("p_query_id").to_pylist()):
            out += [(qq, b.column("doc_row")[d].as_py(), b.column("doc_image")[d].as_py(),
                     b.column("doc_caption")[d].as_py(), b.column(ERR_TYPE)[d].as_py()) for qq in q]
    return out


def test_doc_blocks_hold_whole_docs_across_row_groups(tmp_path: Path) -> None:
    """PairsSource blocks hold whole docs (each distinct candidate doc once, with its content once and all its
    pairs) and at least block_rows pairs each, only the last fewer, across corpus row groups; every candidate
    comes out once with its own doc's content, and a row the shard lacks is a reject."""
    from operators.contracts import CONTENT_MISSING
    from operators.rerank_ops import bucket_candidates, docs_for_shards
    from operators.storage import Storage, join

    storage = Storage()
    n_docs = 50
    corpus = str(tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(n_docs)],
                             "image": [f"img{i}".encode() for i in range(n_docs)],
                             "text": [f"cap{i}" for i in range(n_docs)]}), corpus, row_group_size=7)
    queries = str(tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1", "q2"], "text": ["one", "two"]}), queries)
    rng = np.random.default_rng(3)
    want = []
    for q in ("q1", "q2"):
        rows = sorted(rng.choice(n_docs, 19, replace=False).tolist()) + [n_docs + 5]  # + a row the shard lacks
        want += [(q, r) for r in rows]
        cand = _candidates_part(tmp_path, q, rows)
        bucket_candidates(cand, f"part-{q}", str(tmp_path / "run" / "_pairs"), [queries])
    files = storage.ls(join(str(tmp_path / "run" / "_pairs"), "k"), "*.parquet")
    blocks = list(docs_for_shards([(corpus, "image", files, None, None, None)], None, 8))
    sizes = [int(pair_counts(b).sum()) for b in blocks]
    assert all(n >= 8 for n in sizes[:-1]) and sizes[-1] > 0 and sum(sizes) == len(want)
    doc_rows = [r for b in blocks for r in b.column("doc_row").to_pylist()]
    assert len(doc_rows) == len(set(doc_rows)) == len({r for _, r in want})  # each doc once in all
    got = _pairs_of(blocks)
    assert sorted((q, r) for q, r, *_ in got) == sorted(want)
    for _, r, img, cap, err in got:
        if r < n_docs:
            assert (img, cap, err) == (f"img{r}".encode(), f"cap{r}", "")
        else:
            assert (img, err) == (None, CONTENT_MISSING)


def test_small_corpus_shards_share_a_read_task_and_whole_blocks(tmp_path: Path) -> None:
    """Shards with few pairs share one read task whose blocks are whole across the shard boundary (one
    short block in all, not one per shard); each shard is still read once, and a shard with enough pairs
    for its own task gets one."""
    from operators.pair_source import PairsSource
    from operators.rerank_ops import bucket_candidates, docs_for_shards
    from operators.storage import Storage, join

    storage = Storage()
    queries = str(tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["one"]}), queries)
    shards = []
    for key, n_pairs in (("a", 13), ("b", 11)):
        corpus = str(tmp_path / f"corpus-{key}.parquet")
        pq.write_table(pa.table({"doc_id": [f"{key}{i}" for i in range(30)],
                                 "image": [f"{key}img{i}".encode() for i in range(30)],
                                 "text": [f"{key}cap{i}" for i in range(30)]}), corpus, row_group_size=4)
        rows = list(range(0, 2 * n_pairs, 2))
        cand = str(tmp_path / "run" / "candidates" / f"part-{key}.parquet")
        storage.write_table(cand, pa.table({
            "query_id": ["q1"] * n_pairs, "rank": pa.array(range(1, n_pairs + 1), pa.int32()),
            "doc_id": [f"{key}{r}" for r in rows], "retrieval_score": pa.array(np.ones(n_pairs), pa.float32()),
            "doc_shard": [key] * n_pairs, "doc_row": pa.array(rows, pa.int64())}))
        bucket_candidates(cand, f"part-{key}", str(tmp_path / "run" / "_pairs"), [queries])
        shards.append((corpus, "image", storage.ls(join(str(tmp_path / "run" / "_pairs"), key), "*.parquet")))
    blocks = list(docs_for_shards([(*shard, None, None, None) for shard in shards], None, 8))
    assert [int(pair_counts(b).sum()) for b in blocks] == [8, 8, 8]  # per shard it would be 8, 5, 8, 3
    got = [(d, img) for b in blocks for d, img in zip(b.column("doc_id").to_pylist(),
                                                     b.column("doc_image").to_pylist(), strict=True)]
    assert got == [(f"{k}{r}", f"{k}img{r}".encode()) for k, n in (("a", 13), ("b", 11)) for r in range(0, 2 * n, 2)]
    starts = list(range(0, 32, 4)) + [30]
    src = {k: (*shard, starts, np.bincount(np.arange(0, 2 * n, 2) // 4, minlength=8), None)
           for k, shard, n in zip("ab", shards, (13, 11), strict=True)}
    assert PairsSource(src, None, 8).groups() == [[("a", 0, 8), ("b", 0, 8)]]
    assert len(PairsSource(src, None, 8).get_read_tasks(1)) == 1
    big = {k: (*v[:4], v[4] * 16, None) for k, v in src.items()}
    assert PairsSource(big, None, 8).groups() == [[("a", 0, 8)], [("b", 0, 8)]]


def test_pairs_of_a_shard_split_between_row_groups_for_several_actors(tmp_path: Path) -> None:
    """With ``task_rows`` (an actor pool of several) a shard's pairs are cut between row groups into tasks
    of about that many pairs; every pair still comes out once, each row group is read by one task only, and
    rows the shard lacks are rejects of its last piece. The counts per row group come from bucket_candidates."""
    from unittest import mock

    from operators.contracts import CONTENT_MISSING
    from operators.pair_source import PairsSource
    from operators.rerank_ops import bucket_candidates, row_group_starts
    from operators.storage import Storage, join

    storage = Storage()
    n_docs = 40
    corpus = str(tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(n_docs)],
                             "image": [f"img{i}".encode() for i in range(n_docs)]}), corpus, row_group_size=5)
    starts = row_group_starts(pq.ParquetFile(corpus))
    assert starts == list(range(0, 45, 5))
    queries = str(tmp_path / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1", "q2"], "text": ["one", "two"]}), queries)
    want, per_group = [], np.zeros(8, dtype=np.int64)
    for q, rows in (("q1", [0, 1, 7, 8, 12, 20, 21, 22, 33, 39, 41]), ("q2", [2, 7, 13, 14, 26, 27, 38, 40])):
        want += [(q, r) for r in rows]
        cand = _candidates_part(tmp_path, q, rows)
        per_group += bucket_candidates(cand, f"part-{q}", str(tmp_path / "run" / "_pairs"), [queries],
                                       row_group_starts={"k": starts})["k"]
    # Rows 40 and 41 lie past the shard's end: counted in its last row group.
    assert per_group.tolist() == [3, 3, 3, 0, 3, 2, 1, 4]
    files = storage.ls(join(str(tmp_path / "run" / "_pairs"), "k"), "*.parquet")
    src = PairsSource({"k": (corpus, "image", files, starts, per_group, None)}, None, 4, task_rows=5)
    assert src.groups() == [[("k", 0, 2)], [("k", 2, 5)], [("k", 5, 8)]]
    tasks = src.get_read_tasks(1)
    read_groups: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self: pq.ParquetFile, i: int, *args: Any, **kwargs: Any) -> pa.Table:
        read_groups.append(i)
        return real(self, i, *args, **kwargs)

    got, rejects = [], []
    with mock.patch.object(pq.ParquetFile, "read_row_group", spy):
        for t, n in zip(tasks, (7, 6, 6), strict=True):  # biggest first
            blocks = list(t())
            assert sum(int(pair_counts(b).sum()) for b in blocks) == n
            for q, r, img, _, err in _pairs_of(blocks):
                (rejects if err else got).append((q, r))
                assert err == CONTENT_MISSING or img == f"img{r}".encode()
    assert sorted(read_groups) == [0, 1, 2, 4, 5, 6, 7]  # each group with pairs, once
    assert sorted(got + rejects) == sorted(want)
    assert sorted(rejects) == [("q1", 41), ("q2", 40)]
    # One actor: no cut inside the shard.
    assert PairsSource({"k": (corpus, "image", files, starts, per_group, None)}, None, 4).groups() == [[("k", 0, 8)]]


def test_read_source_keeps_whole_blocks_so_the_actor_gets_whole_batches() -> None:
    """Few read tasks (fewer than Ray Data's minimum block count): their blocks reach an actor pool unsplit,
    so every batch has batch_size rows (plain read_datasource would split each task's output)."""
    from ray.data import ActorPoolStrategy
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from operators.shards import read_source

    class Blocks(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: object | None = None) -> list[ReadTask]:
            def read(t: int) -> Any:
                for b in range(4):
                    yield pa.table({"x": np.arange(16) + 100 * (4 * t + b)})
            return [ReadTask(lambda t=t: read(t), BlockMetadata(num_rows=64, size_bytes=None, exec_stats=None,
                                                               input_files=None)) for t in range(3)]

    class Sizes:
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"size": np.array([len(batch["x"])]), "first": batch["x"][:1]}

    out = read_source(Blocks(), num_cpus=0.25).map_batches(
        Sizes, compute=ActorPoolStrategy(size=1), batch_size=16, batch_format="numpy", num_cpus=0.25).take_all()
    assert sorted(r["size"] for r in out) == [16] * 12
    assert sorted(r["first"] for r in out) == [100 * i for i in range(12)]
