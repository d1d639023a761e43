"""The no-Ray reference of a nightly run and the checks of a finished run against it (test_run, test_stop,
test_cluster).

The reference shares no code with the pipeline between the input files and the numbers: it decodes with plain
PIL (its own rules for modes and rejects), embeds and rerank-scores with open_clip's own model, transforms and
tokenizer, searches exhaustively with a flat faiss index, and fuses and selects with its own few lines below. A
bug in the pipeline's decode, preprocessing, clip reranker, min-max/rrf or tie-breaking shows as a difference.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from operators import contracts as R
from operators.models import SHIPPED_CONFIGS, ModelSpec
from operators.storage import Storage, join, strip_scheme
from pipelines import publish as P
from pipelines.config import Config, EmbedConfig
from pipelines.context import reranker_label
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


def lean(d: dict[str, Any], one_actor: bool = True) -> dict[str, Any]:
    """``d`` for the tests of faults and stops (cluster, stop, S3 faults, security): the clip reranker scores
    with the retriever's own model, so the rerank stage reuses the retrieval vectors instead of embedding the
    corpus and the queries a second time; with ``one_actor``, one actor per embed and rerank pool. How distinct
    reranker scores fuse, and the default pools, are test_run's checks; these tests check what a fault does."""
    d["rerank"]["clip_model"] = dict(d.get("embed", {}).get("model") or ModelSpec().model_dump())
    if one_actor:
        d["embed"]["num_actors"] = 1
        d["rerank"]["num_actors"] = 1
    return d


# ----------------------------------------------------------------------------------------------
# brute-force reference: no Ray, no pipeline code between the input files and the numbers
# ----------------------------------------------------------------------------------------------


def plain_decode(data: bytes | None, e: EmbedConfig) -> Image.Image | str:
    """An 8-bit RGB image, or the reject reason, by the decode rules (docs/concepts.md, "Reject reasons")
    written on plain PIL and numpy."""
    if data is None:
        return R.NULL_PAYLOAD
    if not data:
        return R.EMPTY_IMAGE
    if len(data) > e.max_image_bytes:
        return R.TOO_LARGE
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return R.BOMB
    except Exception:  # noqa: BLE001 - no image signature
        return R.UNDECODABLE
    if img.format not in e.allowed_formats:
        return R.UNSUPPORTED
    if img.width * img.height > e.max_image_pixels:
        return R.BOMB
    try:
        img.load()
    except OSError:
        return R.TRUNCATED
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):  # 16-bit grey: scaled to 8 bits, not clipped
        return Image.fromarray(np.floor(np.asarray(img, np.float64) / 257 + 0.5).astype(np.uint8)).convert("RGB")
    if "A" in img.mode or "transparency" in img.info:  # over white: a / 255 * colour + (1 - a / 255) * 255
        rgba = np.asarray(img.convert("RGBA"), np.float64)
        a = rgba[..., 3:] / 255.0
        return Image.fromarray(np.floor(rgba[..., :3] * a + 255.0 * (1 - a) + 0.5).astype(np.uint8))
    return img.convert("RGB")


def _order(scores: np.ndarray, ids: list[str]) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))  # ties: doc_id ascending


def _minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return np.ones_like(x) if span <= 0 else (x - x.min()) / span


def ref_fuse(ret: np.ndarray, rr: np.ndarray, ids: list[str], f: dict[str, Any]) -> np.ndarray:
    """The final score of one query's candidates, by the fusion methods' definitions (docs/nightly-run.md,
    "Reranking")."""
    if f["method"] == "none":
        return rr
    if f["method"] == "weighted":
        return f["weight"] * _minmax(rr) + (1 - f["weight"]) * _minmax(ret)
    assert f["method"] == "rrf", f
    rank = {m: {j: n + 1 for n, j in enumerate(_order(x, ids))} for m, x in (("rr", rr), ("ret", ret))}
    return np.array([1 / (f["rrf_k"] + rank["rr"][j]) + 1 / (f["rrf_k"] + rank["ret"][j]) for j in range(len(ids))])


def ref_select(final: np.ndarray, ids: list[str], sel: dict[str, Any]) -> list[int]:
    """Kept candidates, best first: top n, all above the threshold, or up to k above it."""
    order = _order(final, ids)
    if sel["mode"] == "top_n":
        return order[:sel["top_n"]]
    above = [j for j in order if final[j] >= sel["threshold"]]
    return above if sel["mode"] == "threshold" else above[:sel["k"]]


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
        return [self.doc_ids[i] for i in _order(self.retrieval[self.row[q]], self.doc_ids)[:k]]

    def expected(self, q: str, cands: list[str]) -> tuple[list[dict[str, Any]], dict[str, tuple[float, ...]]]:
        """Rows this query keeps from candidates ``cands``, and (retrieval, rerank, final) per candidate."""
        i = self.row[q]
        ret = np.array([self.retrieval[i, self.col[d]] for d in cands], np.float64)
        rr = np.array([self.rerank[i, self.col[d]] for d in cands], np.float64)
        final = ref_fuse(ret, rr, cands, self.fusion)
        keep = ref_select(final, cands, self.selection)
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
    """Decode, embed, search exhaustively, score every (query, doc) pair with the clip reranker's model: directly,
    in this process, with open_clip and PIL only."""
    import faiss
    import torch

    if cfg.rerank.backend != "clip":
        raise ValueError(f"the reference scores with open_clip: rerank.backend clip, not {cfg.rerank.backend!r}")
    storage = storage or Storage()
    seen: set[str] = set()
    docs: dict[str, Image.Image] = {}
    rejects: set[tuple[str, int, str]] = set()
    for uri in storage.ls(cfg.corpus, "*.parquet"):
        t = storage.read_table(uri)
        name = uri.rsplit("/", 1)[-1]
        for i, (d, img) in enumerate(zip(t.column("doc_id").to_pylist(), t.column("image").to_pylist(), strict=True)):
            if d is None:
                rejects.add((name, i, R.NULL_ID))
                continue
            if d in seen:  # first occurrence (shard order, row order) wins
                rejects.add((name, i, R.DUPLICATE_ID))
                continue
            seen.add(d)
            got = plain_decode(img, cfg.embed)
            if isinstance(got, str):
                rejects.add((name, i, got))
            else:
                docs[d] = got
    qt = pa.concat_tables([storage.read_table(u) for u in storage.ls(cfg.queries, "*.parquet")])
    qids, qtexts = qt.column("query_id").to_pylist(), qt.column("text").to_pylist()
    doc_ids = list(docs)

    def vectors(spec: Any) -> tuple[np.ndarray, np.ndarray]:
        if spec.pretrained is not None:
            raise ValueError(f"the reference builds random-init open_clip models, not pretrained {spec.pretrained!r}")
        model, preprocess, tokenizer = reference_model(spec.name, spec.seed)
        with torch.no_grad():
            dv = model.encode_image(torch.stack([preprocess(docs[d]) for d in doc_ids]))
            qv = model.encode_text(tokenizer(qtexts))
        return (torch.nn.functional.normalize(dv, dim=-1).numpy(), torch.nn.functional.normalize(qv, dim=-1).numpy())

    dv, qv = vectors(cfg.embed.model)
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(np.ascontiguousarray(dv, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(qv, dtype=np.float32), len(doc_ids))
    retrieval = np.zeros((len(qids), len(doc_ids)), np.float32)
    for i in range(len(qids)):
        retrieval[i, ids[i]] = dist[i]
    rdv, rqv = vectors(cfg.rerank.clip_model)  # the clip reranker: cosine
    rerank = (rqv @ rdv.T).astype(np.float32)
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
