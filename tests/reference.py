"""The no-Ray reference of a nightly run and the checks of a finished run against it (test_run, test_stop,
test_cluster).

The reference embeds with open_clip's own model and transforms, searches exhaustively with a flat faiss index,
calls the rerank backend in this process on every (query, doc) pair, then fuses and selects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import contracts as R
from operators import fusion
from operators.decode import decode_image
from operators.models import SHIPPED_CONFIGS
from operators.storage import Storage, join, strip_scheme
from pipelines import publish as P
from pipelines.config import Config
from pipelines.context import reranker_label, reranker_spec
from pipelines.run import STAGES
from tests.helpers import by_query, read_rows

K = 8  # search.k
TOP_N = 5  # rerank.selection.top_n
ATOL = 1e-5  # embeddings / retrieval / rerank scores vs the reference
# Weighted fusion min-max normalises per query: score errors are divided by the query's score range.
FINAL_ATOL = 1e-4


def run_cfg_dict(root: str, corpus: str, queries: str) -> dict[str, Any]:
    return {
        "root": root, "corpus": corpus, "queries": queries,
        "ray": {"num_cpus": 2, "progress_bars": False},
        # Small write batches: embedding parts appear one by one (a kill lands mid-stage).
        "embed": {"batch_size": 8, "rows_per_read_task": 16, "write_batch_size": 8},
        "index": {"factory": "Flat", "shards": 2},
        "search": {"k": K, "searcher_num_cpus": 0.25},
        "rerank": {"backend": "clip", "batch_size": 8, "select_buckets": 3,
                   "fusion": {"method": "weighted", "weight": 0.7},
                   "selection": {"mode": "top_n", "top_n": TOP_N}},
    }


# ----------------------------------------------------------------------------------------------
# brute-force reference: no Ray, no pipeline code between the checkpoints and the numbers
# ----------------------------------------------------------------------------------------------


@dataclass
class Reference:
    doc_ids: list[str]
    query_ids: list[str]
    rejects: set[tuple[str, int, str]]  # (shard file name, row, error_type)
    retrieval: np.ndarray  # (queries, docs) inner products of the reference embeddings
    rerank: np.ndarray  # (queries, docs) direct backend scores
    fusion: dict[str, Any]
    selection: dict[str, Any]
    col: dict[str, int] = field(init=False)
    row: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.col = {d: i for i, d in enumerate(self.doc_ids)}
        self.row = {q: i for i, q in enumerate(self.query_ids)}

    def score(self, q: str, d: str) -> float:
        return float(self.retrieval[self.row[q], self.col[d]])

    def topk(self, q: str, k: int) -> list[str]:
        s = self.retrieval[self.row[q]]
        return [self.doc_ids[i] for i in fusion.order_by(s, self.doc_ids)[:k]]

    def expected(self, q: str, cands: list[str]) -> tuple[list[dict[str, Any]], dict[str, tuple[float, ...]]]:
        """Rows this query keeps from candidates ``cands``, and (retrieval, rerank, final) per candidate."""
        i = self.row[q]
        ret = np.array([self.retrieval[i, self.col[d]] for d in cands], np.float64)
        rr = np.array([self.rerank[i, self.col[d]] for d in cands], np.float64)
        final = fusion.fuse(ret, rr, cands, **self.fusion)
        keep = fusion.select(final, cands, **self.selection)
        rows = [{"doc_id": cands[j], "rank": n + 1, "retrieval_score": ret[j], "rerank_score": rr[j],
                 "final_score": final[j]} for n, j in enumerate(keep)]
        return rows, {d: (ret[j], rr[j], final[j]) for j, d in enumerate(cands)}


def reference_model(name: str, seed: int) -> Any:
    import open_clip
    import torch

    if name not in open_clip.list_models():
        open_clip.add_model_config(SHIPPED_CONFIGS)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def build_reference(cfg: Config, storage: Storage | None = None) -> Reference:
    """Embed, search exhaustively, rerank every (query, doc) pair: directly, in this process."""
    import faiss
    import torch

    from operators.rerankers.base import create

    storage = storage or Storage()
    e = cfg.embed
    seen: set[str] = set()
    docs: dict[str, tuple[Any, str | None]] = {}
    rejects: set[tuple[str, int, str]] = set()
    for uri in storage.ls(cfg.corpus, "*.parquet"):
        t = storage.read_table(uri)
        name = uri.rsplit("/", 1)[-1]
        caps = t.column("text").to_pylist() if "text" in t.column_names else [None] * t.num_rows
        for i, (d, img, cap) in enumerate(zip(t.column("doc_id").to_pylist(), t.column("image").to_pylist(),
                                              caps, strict=True)):
            if d is None:
                rejects.add((name, i, R.NULL_ID))
                continue
            if d in seen:  # first occurrence (shard order, row order) wins
                rejects.add((name, i, R.DUPLICATE_ID))
                continue
            seen.add(d)
            try:
                docs[d] = (decode_image(img, e.max_image_pixels, e.allowed_formats, e.max_image_bytes), cap)
            except R.RejectError as err:
                rejects.add((name, i, err.error_type))
    qt = pa.concat_tables([storage.read_table(u) for u in storage.ls(cfg.queries, "*.parquet")])
    qids, qtexts = qt.column("query_id").to_pylist(), qt.column("text").to_pylist()
    doc_ids = list(docs)

    model, preprocess, tokenizer = reference_model(e.model.name, e.model.seed)
    with torch.no_grad():
        dv = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(docs[d][0]) for d in doc_ids])), dim=-1).numpy()
        qv = torch.nn.functional.normalize(model.encode_text(tokenizer(qtexts)), dim=-1).numpy()
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(np.ascontiguousarray(dv, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(qv, dtype=np.float32), len(doc_ids))
    retrieval = np.zeros((len(qids), len(doc_ids)), np.float32)
    for i in range(len(qids)):
        retrieval[i, ids[i]] = dist[i]

    backend = create(reranker_spec(cfg.rerank, cfg))
    images = [docs[d][0] for d in doc_ids]
    captions = [docs[d][1] if cfg.rerank.use_caption else None for d in doc_ids]
    rerank = np.stack([np.asarray(backend.score([q] * len(doc_ids), images, captions), np.float32)
                       for q in qtexts])
    return Reference(doc_ids, qids, rejects, retrieval, rerank, cfg.rerank.fusion.model_dump(),
                     cfg.rerank.selection.model_dump())


def check_against_reference(storage: Storage, cfg: Config, run_dir: str, run_id: str, ref: Reference) -> None:
    """Candidates = exact top-k (ties at the k-th score may swap), results = reference fusion + selection."""
    cands = by_query(read_rows(storage, join(run_dir, "candidates")))
    results = by_query(read_rows(storage, join(run_dir, "results")))
    assert set(cands) == set(ref.query_ids)
    assert set(results) == set(ref.query_ids)
    k = min(cfg.search.k, len(ref.doc_ids))
    for q in ref.query_ids:
        got = [r["doc_id"] for r in cands[q]]
        assert [r["rank"] for r in cands[q]] == list(range(1, k + 1)), q
        assert len(set(got)) == len(got) == k, f"{q}: duplicate or missing candidates {got}"
        exp = ref.topk(q, k)
        got_scores = [r["retrieval_score"] for r in cands[q]]
        np.testing.assert_allclose(got_scores, [ref.score(q, d) for d in got], atol=ATOL, err_msg=q)
        np.testing.assert_allclose(got_scores, [ref.score(q, d) for d in exp], atol=ATOL, err_msg=q)
        boundary = ref.score(q, exp[-1])
        for d in set(got) ^ set(exp):  # only docs tied with the k-th score may differ
            assert abs(ref.score(q, d) - boundary) <= ATOL, f"{q}: {d} is not an exact top-{k} candidate"

        expected, per_doc = ref.expected(q, got)
        rows = results[q]
        assert [r["rank"] for r in rows] == list(range(1, len(expected) + 1)), q
        assert len({r["doc_id"] for r in rows}) == len(rows), f"{q}: duplicate results"
        assert {r["run_id"] for r in rows} == {run_id}
        assert {r["reranker"] for r in rows} == {reranker_label(cfg.rerank)}
        for g, x in zip(rows, expected, strict=True):
            if g["doc_id"] != x["doc_id"]:  # a swap is only allowed between (near) ties
                assert abs(per_doc[g["doc_id"]][2] - x["final_score"]) <= FINAL_ATOL, (q, g, x)
            ret, rr, final = per_doc[g["doc_id"]]
            assert g["retrieval_score"] == pytest.approx(ret, abs=ATOL), (q, g)
            assert g["rerank_score"] == pytest.approx(rr, abs=ATOL), (q, g)
            assert g["final_score"] == pytest.approx(final, abs=FINAL_ATOL), (q, g)


def _rel(run_dir: str, uri: str) -> str:
    return strip_scheme(uri)[len(strip_scheme(run_dir)) + 1:]


def check_manifest(storage: Storage, run_dir: str, run_id: str) -> dict[str, Any]:
    """Every file of the run is listed with its size, sha256 and (Parquet) row count; nothing else."""
    manifest = P.verify_run(storage, run_dir, deep=True)
    assert manifest["run_id"] == run_id
    present = {_rel(run_dir, u) for u in P.list_files(storage, run_dir)}
    assert present - {P.MANIFEST} == set(manifest["files"]), (
        f"unlisted: {sorted(present - {P.MANIFEST} - set(manifest['files']))}, "
        f"missing: {sorted(set(manifest['files']) - present)}")
    assert not [r for r in present if r.startswith("_pairs/") or ".tmp" in r], sorted(present)
    for rel, e in manifest["files"].items():
        data = storage.read_bytes(join(run_dir, rel))
        assert e["size"] == len(data), rel
        assert e["sha256"] == hashlib.sha256(data).hexdigest(), rel
        if rel.endswith(".parquet"):
            assert e["rows"] == pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows, rel
        else:
            assert "rows" not in e, rel
    for required in ("stats.json", "_RUN.json", *(f"_STAGES/{s}.json" for s in STAGES)):
        assert required in manifest["files"], required
    assert any(r.startswith("results/") for r in manifest["files"])
    return manifest
