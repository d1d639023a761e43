"""The rerank stage at scale, checked against the per-pair path: each candidate doc is read and decoded once,
its pairs share it, clip scores come from the embedding cache, and no score or kept list changes.

Reference (no Ray): every candidate pair scored on its own, as the stage did before docs were grouped: the
doc's bytes decoded for that pair alone (``operators.decode.decode_image``), then one ``backend.score`` call
with that one pair (clip: ``ClipReranker``, the model itself, not the cache). Run on the adversarial sample
(``make_sample(bad_rows=True)``: CMYK, 16-bit, palette, EXIF-rotated and RGBA images among the candidates).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import contracts as R
from operators.decode import decode_image
from operators.rerank_ops import select_per_query
from operators.rerankers.base import create
from pipelines.config import Config, parse_config
from pipelines.context import reranker_spec
from pipelines.embed import embed_kind
from pipelines.rerank import RerankResult, run_rerank
from pipelines.sample import SampleInfo, make_sample
from pipelines.search import run_search

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("rs") / "s"), docs=36, queries=8, shards=2, seed=5,
                       image_size=40, bad_rows=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny_hf import save_tiny_bert, save_tiny_blip
    from tests.tiny_vlm import save_tiny_vlm

    d = tmp_path_factory.mktemp("models")
    return {"blip_itm": str(save_tiny_blip(d / "blip")), "cross_encoder": str(save_tiny_bert(d / "ce")),
            "vlm_yesno": str(save_tiny_vlm(d / "vlm"))}


@pytest.fixture(scope="module")
def searched(sample: SampleInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One search (k=10 over 8 queries: docs recur across queries), nothing reranked yet: read-only, copied."""
    r = tmp_path_factory.mktemp("searched")
    run_search(_cfg(r, sample), run_id="base")
    return r


@pytest.fixture(scope="module")
def root(searched: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``searched`` whose candidates every per-pair test reranks (sharing its clip cache)."""
    r = tmp_path_factory.mktemp("root") / "r"
    shutil.copytree(searched, r)
    return r


def _cfg(root: Path, sample: SampleInfo, **rerank: Any) -> Config:
    return parse_config({
        "root": str(root), "corpus": sample.corpus, "queries": sample.queries, "ray": {"progress_bars": False},
        "index": {"factory": "Flat", "shards": 2}, "search": {"k": 10},
        "rerank": {"backend": "clip", "batch_size": 5, "select_buckets": 2, **rerank},
    })


def _rerank(root: Path, run_id: str, cfg: Config) -> RerankResult:
    dest = root / "runs" / run_id
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "runs" / "base" / "candidates", dest / "candidates")
    return run_rerank(cfg, run_id)


def _read(d: Path) -> list[dict[str, Any]]:
    files = sorted(d.rglob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def _reference(cfg: Config, run: Path) -> tuple[dict[tuple[str, str, int], tuple[float | None, str]], bool]:
    """(query, doc shard, doc row) -> (score, reject type) for every candidate pair, pair by pair; and whether
    the backend reads images."""
    corpus = {s.key: pq.read_table(s.source) for s in embed_kind(cfg, "corpus").shards}
    qt = pq.read_table(cfg.queries)
    qtext = dict(zip(qt.column("query_id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    backend = create(reranker_spec(cfg.rerank, cfg), "cpu", "fp32")
    out = {}
    for c in _read(run / "candidates"):
        row = corpus[c["doc_shard"]].slice(c["doc_row"], 1).to_pylist()[0]
        key = (c["query_id"], c["doc_shard"], c["doc_row"])
        try:
            img = decode_image(row["image"], cfg.embed.max_image_pixels, cfg.embed.allowed_formats) \
                if backend.needs_image else None
        except R.RejectError as e:
            out[key] = (None, e.error_type)
            continue
        cap = row.get("text") if cfg.rerank.use_caption else None
        out[key] = (float(backend.score([qtext[c["query_id"]]], [img], [cap])[0]), "")
    return out, backend.needs_image


def _kept(scored: list[dict[str, Any]], cfg: Config) -> dict[str, list[str]]:
    """Per query, the doc ids selection keeps from these scores (the stage's own fusion + selection)."""
    out = {}
    for q in sorted({r["query_id"] for r in scored}):
        rows = [r for r in scored if r["query_id"] == q]
        t = pa.table({k: [r[k] for r in rows] for k in ("query_id", "doc_id", "retrieval_score", "rerank_score")})
        res = select_per_query(t, cfg.rerank.fusion.model_dump(), cfg.rerank.selection.model_dump(), "x", "r")
        out[q] = res.column("doc_id").to_pylist()
    return out


def _check_per_pair(cfg: Config, res: RerankResult, run: Path) -> None:
    """The stage's scores, rejects and kept lists equal the per-pair reference's; each distinct candidate doc was
    decoded at most once (exactly once where the backend reads images, whether in the actor or in decode tasks)."""
    ref, needs_image = _reference(cfg, run)
    assert res.pairs_in == len(ref) and res.pairs_scored + res.pairs_rejected == res.pairs_in
    cands = _read(run / "candidates")
    n_docs = len({(c["doc_shard"], c["doc_row"]) for c in cands})
    assert len(cands) > n_docs  # docs recur across queries
    decoded = n_docs if needs_image and cfg.rerank.backend != "clip" else 0  # clip: vectors from the cache
    assert (res.pairs_in, res.docs_in, res.docs_decoded) == (len(cands), n_docs, decoded)
    scored = _read(run / "scored")
    got = {(r["query_id"], r["doc_shard"], r["doc_row"]): r["rerank_score"] for r in scored}
    want = {k: s for k, (s, err) in ref.items() if not err}
    assert sorted(got) == sorted(want)
    keys = sorted(want)
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=0, atol=1e-5)
    assert res.pairs_rejected == sum(1 for _, err in ref.values() if err)
    # Kept lists: the published results equal selection over the reference scores.
    ref_scored = [dict(r, rerank_score=want[(r["query_id"], r["doc_shard"], r["doc_row"])]) for r in scored]
    results = _read(run / "results")
    published = {q: [r["doc_id"] for r in sorted((r for r in results if r["query_id"] == q), key=lambda r: r["rank"])]
                 for q in {r["query_id"] for r in results}}
    assert published == {q: v for q, v in _kept(ref_scored, cfg).items() if v}


# clip's case is test_clip_encodes_the_corpus_once_then_reuses_the_cache (its first night is checked here too).
# The decode-once counts ride along: blip decodes in the actor, the second vlm case in decode tasks.
CASES = [("blip_itm", {"decode_in_actor": True}), ("cross_encoder", {}), ("vlm_yesno", {}),
         ("vlm_yesno", {"decode_in_actor": False})]


@pytest.mark.parametrize(("backend", "extra"), CASES, ids=["blip_itm", "cross_encoder", "vlm_yesno",
                                                           "vlm_yesno-decode-tasks"])
def test_scores_and_kept_lists_equal_the_per_pair_path(backend: str, extra: dict[str, Any], sample: SampleInfo,
                                                       models: dict[str, str], root: Path) -> None:
    cfg = _cfg(root, sample, backend=backend, selection={"mode": "top_n", "top_n": 4}, model=models[backend],
               **extra)
    run_id = f"fid-{backend}-{len(extra)}"
    _check_per_pair(cfg, _rerank(root, run_id, cfg), root / "runs" / run_id)


def test_clip_encodes_the_corpus_once_then_reuses_the_cache(sample: SampleInfo, searched: Path,
                                                            tmp_path: Path) -> None:
    """clip: the first night encodes every corpus row once (whole shards into the cache), decodes nothing at
    rerank time, and its scores and kept lists equal the per-pair path (the model itself, not the cache); a
    second night over the same corpus encodes no image and gives the same scores. On a fresh copy of the
    searched root: no clip reranker vectors cached yet."""
    root = tmp_path / "root"
    shutil.copytree(searched, root)
    cfg = _cfg(root, sample, selection={"mode": "top_n", "top_n": 4})
    first = _rerank(root, "n1", cfg)
    rows = sum(pq.ParquetFile(u).metadata.num_rows for u in sample.shard_uris)
    assert (first.clip_images_embedded, first.docs_decoded) == (rows, 0) and first.docs_in < first.pairs_in
    _check_per_pair(cfg, first, root / "runs" / "n1")
    second = _rerank(root, "n2", cfg)
    assert (second.clip_images_embedded, second.docs_decoded) == (0, 0)
    s1, s2 = (sorted((r["query_id"], r["doc_id"], r["rerank_score"]) for r in _read(root / "runs" / n / "scored"))
              for n in ("n1", "n2"))
    assert s1 == s2 and len(s1) == first.pairs_scored


def test_clip_vectors_are_found_whatever_the_row_order_of_the_cache(tmp_path: Path) -> None:
    """A cache part holds its write call's blocks in arrival order (rows not sorted): every candidate still gets
    its own row's vector, the rejected row its reason, and a row past the shard's end is missing content."""
    from operators.contracts import embeddings_schema
    from operators.rerank_ops import DOC_VEC, ShardVectors
    from operators.storage import Storage, join

    storage, cache = Storage(), str(tmp_path / "cache")
    rows = np.array([4, 5, 0, 1, 2], np.int64)  # row 3 rejected; blocks [4, 5] and [0, 1, 2] out of order
    vecs = np.eye(6, dtype=np.float32)[rows]
    storage.write_table(join(cache, "k", "part-000000000000.parquet"), pa.Table.from_arrays(
        [pa.array([f"d{r}" for r in rows]), pa.array(rows), pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 6)],
        schema=embeddings_schema(6)))
    storage.write_table(join(cache, "k", "rejects-000000000003.parquet"), pa.table({
        "stage": ["embed"], "source": ["s"], "row_index": pa.array([3], pa.int64()), "id": ["d3"],
        "error_type": [R.UNDECODABLE], "error_message": ["not an image"]}))
    storage.write_json(join(cache, "k", "_SUCCESS.json"), {"rows_in": 6, "parts": ["part-000000000000.parquet"],
                                                           "rejects": ["rejects-000000000003.parquet"]})
    want = [5, 0, 3, 2, 9, 4, 1]
    cands = pa.table({"query_id": [f"q{i}" for i in range(7)], "query_text": ["t"] * 7,
                      "rank": pa.array([1] * 7, pa.int32()),
                      "retrieval_score": pa.array([1.0] * 7, pa.float32()), "doc_id": [f"d{r}" for r in want],
                      "doc_shard": ["k"] * 7, "doc_row": pa.array(want, pa.int64()), "_cand_key": ["c"] * 7,
                      "_cand_row": pa.array(range(7), pa.int64())}).sort_by("doc_row")
    docs = ShardVectors.load(storage, cache, "k").docs(cands)
    got = {r["doc_row"]: (r["_err_type"], r[DOC_VEC]) for r in docs.to_pylist()}
    for r in (0, 1, 2, 4, 5):
        assert got[r][0] == "" and int(np.argmax(got[r][1])) == r
    assert got[3][0] == R.UNDECODABLE and got[9][0] == "doc_content_missing"
