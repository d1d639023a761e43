"""Rerank model batches end at doc boundaries (issue #33): a doc whose pairs were split across two model batches
had its image encoded twice by the prefix-sharing VLM path. No Ray: the actor UDF is called in-process."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from operators.contracts import ERR_TYPE, ID, SHARD
from operators.rerank_ops import RerankPairs, doc_batches, docs_from_pairs, select_per_query
from pipelines.config import parse_config
from pipelines.context import reranker_spec
from pipelines.sample import SampleInfo, make_sample


def _check(batches: list[list[int]], idx: list[int], doc_of: np.ndarray, batch_size: int) -> None:
    """Every pair once, in order; at most batch_size a batch; a doc in one batch unless it has more pairs than
    batch_size, and then every batch but its last holds only its pairs."""
    assert [i for b in batches for i in b] == idx
    assert all(0 < len(b) <= batch_size for b in batches)
    sizes = {d: len(list(g)) for d, g in itertools.groupby(doc_of[idx].tolist())}
    where: dict[int, list[int]] = {}
    for n, b in enumerate(batches):
        for d in dict.fromkeys(doc_of[b].tolist()):
            where.setdefault(d, []).append(n)
    for d, in_batches in where.items():
        if sizes[d] <= batch_size:
            assert len(in_batches) == 1, (d, sizes[d], in_batches)
        else:
            assert len(in_batches) == -(-sizes[d] // batch_size)
            assert all(set(doc_of[batches[n]].tolist()) == {d} and len(batches[n]) == batch_size
                       for n in in_batches[:-1])


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8, 64])
def test_doc_batches_end_at_doc_boundaries(batch_size: int) -> None:
    counts = [3, 5, 1, 11, 2, 4, 4, 9, 1]
    doc_of = np.repeat(np.arange(len(counts)), counts)
    idx = list(range(len(doc_of)))
    _check(doc_batches(idx, doc_of, batch_size), idx, doc_of, batch_size)
    rejected = {0, 7, 8, 20, 21}  # pairs rejected before scoring are not in any batch
    kept = [i for i in idx if i not in rejected]
    _check(doc_batches(kept, doc_of, batch_size), kept, doc_of, batch_size)
    assert doc_batches([], doc_of, batch_size) == []


def test_doc_batches_fill_up_to_the_batch_size() -> None:
    doc_of = np.repeat(np.arange(4), [2, 2, 3, 1])
    assert doc_batches(list(range(8)), doc_of, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert doc_batches(list(range(8)), doc_of, 5) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # doc 2 is not cut
    doc_of = np.repeat(np.arange(2), [7, 2])  # a doc over the batch size is cut; its rest takes the next doc
    assert doc_batches(list(range(9)), doc_of, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("rb") / "s"), docs=8, queries=4, shards=1, seed=5,
                       image_size=32)


def _spec(sample: SampleInfo) -> Any:
    cfg = parse_config({"root": "/unused", "corpus": sample.corpus, "queries": sample.queries,
                        "rerank": {"backend": "clip"}})
    return reranker_spec(cfg.rerank, cfg)


def test_actor_batches_end_at_doc_boundaries_and_scores_are_unchanged(sample: SampleInfo) -> None:
    """The clip backend (scores independent of the batch): each model call holds whole docs, and the scores
    and kept lists equal those of one pair per call."""
    t = pa.concat_tables([pq.read_table(u) for u in sample.shard_uris])
    images, captions, ids = (t.column(c).to_pylist() for c in ("image", "text", "doc_id"))
    per_doc = [1, 6, 2, 3, 1, 4, 2, 5]  # pairs per doc: one over the batch size (4), most under it
    queries = ["a red circle", "green star", "blue square", "a small yellow thing", "two circles", "red"]
    rows = [(d, j) for d, n in enumerate(per_doc) for j in range(n)]
    n = len(rows)
    pairs = pa.table({
        "query_id": [f"q{j}" for _, j in rows], "query_text": [queries[j] for _, j in rows],
        "doc_id": [ids[d] for d, _ in rows], "rank": pa.array([d + 1 for d, _ in rows], pa.int64()),
        "retrieval_score": pa.array(np.linspace(1, 0, n), pa.float32()), "doc_shard": ["s"] * n,
        "doc_row": pa.array([d for d, _ in rows], pa.int64()), "doc_image": pa.array([images[d] for d, _ in rows]),
        "doc_image_uri": pa.nulls(n, pa.string()), "doc_caption": [captions[d] for d, _ in rows]})
    docs = docs_from_pairs(pairs)
    assert docs.num_rows == len(per_doc)

    def run(batch_size: int) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        op = RerankPairs(_spec(sample), torch_threads=1, batch_size=batch_size)
        calls: list[list[int]] = []
        score = op._score

        def recording(idx: list[int], *a: Any, **kw: Any) -> np.ndarray:
            calls.append(list(idx))
            return score(idx, *a, **kw)

        op._score = recording  # type: ignore[method-assign]
        return op(docs), calls

    out, calls = run(4)
    doc_of = np.repeat(np.arange(len(per_doc)), per_doc)  # the actor's pairs are in doc order
    _check(calls, list(range(n)), doc_of, 4)
    assert len(calls) < n
    ref, ref_calls = run(1)
    assert len(ref_calls) == n
    assert not any(out[ERR_TYPE]) and not any(ref[ERR_TYPE])
    assert out[ID].tolist() == ref[ID].tolist() and out[SHARD].tolist() == ref[SHARD].tolist()
    np.testing.assert_allclose(out["rerank_score"], ref["rerank_score"], atol=1e-5)

    def kept(o: dict[str, np.ndarray]) -> dict[str, list[str]]:
        t = pa.table({"query_id": o[ID].astype(str).tolist(), "doc_id": o["doc_id"].astype(str).tolist(),
                      "retrieval_score": pa.array(o["retrieval_score"], pa.float32()),
                      "rerank_score": pa.array(o["rerank_score"], pa.float32())})
        res = {}
        for q in sorted(set(t.column("query_id").to_pylist())):
            g = t.filter(pc.equal(t.column("query_id"), q))
            res[q] = select_per_query(g, {"method": "none"}, {"mode": "top_n", "top_n": 3}, "clip", "r").column(
                "doc_id").to_pylist()
        return res

    assert kept(out) == kept(ref)
