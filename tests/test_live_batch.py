"""The live path answers what the batch job wrote: for every query of a run, ``Live`` (what the served app's
model deployment runs for ``POST /v1/search``) gives the run's candidates and its published results: the same
ids in the same order, scores within 1e-6.

Both go through the same operators (embedder, search router, the rerank source's readers, the rerank UDF, the
selection UDF), so this holds whatever the models' weights are; here on the adversarial sample (CMYK, 16-bit,
palette, EXIF and RGBA images among the candidates; the undecodable rows are rejected at embedding time) for
three reranker setups: clip through the embedding cache with threshold selection, the tiny yes/no VLM with rank
fusion, and none. With the session's trained tiny models the same holds for the held-out queries' metrics, and
a live path without the retriever's trained weights is caught by them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from pipelines.config import parse_config
from pipelines.run import run
from pipelines.sample import SampleInfo, make_sample
from tests.helpers import by_query
from tests.trained import TrainedModels

pytestmark = pytest.mark.usefixtures("ray_local")

ATOL = 1e-6


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("lb") / "s"), docs=36, queries=8, shards=2, seed=3,
                       image_size=40, bad_rows=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root for the module's runs: they share its embedding cache and index (the corpus is the same), each
    run is published there in turn and read back at once."""
    return tmp_path_factory.mktemp("lb-root") / "root"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny_vlm import save_tiny_vlm

    return str(save_tiny_vlm(tmp_path_factory.mktemp("models") / "vlm"))




def _published(root: Path, sample: SampleInfo, rerank: dict[str, Any]) -> tuple[Any, str]:
    cfg = parse_config({
        "root": str(root), "corpus": sample.corpus, "queries": sample.queries, "ray": {"progress_bars": False},
        "embed": {"model": {"name": "mmr-tiny"}}, "index": {"factory": "Flat", "shards": 2}, "search": {"k": 12},
        "rerank": {"batch_size": 5, "select_buckets": 2, **rerank}})
    report = run(cfg)
    return cfg, report.run_dir


# Weighted fusion min-max normalises each query's scores, which multiplies float noise by 1/range: a query
# embedded alone (live) and in a batch of 8 (the batch job) differ by ~1e-8, and with the random-weight models'
# narrow score ranges the fused scores then differed by up to 1.7e-6. So the setups here use fusion none and
# rrf (rank-based); the rank-order equality holds for weighted fusion too.
SETUPS = {
    "clip-cache-threshold": {"backend": "clip", "clip_model": {"name": "mmr-tiny", "seed": 1},
                             "selection": {"mode": "top_k_above_threshold", "threshold": 0.12, "k": 8}},
    "vlm_yesno-rrf": {"backend": "vlm_yesno", "fusion": {"method": "rrf"}, "selection": {"mode": "top_n", "top_n": 7}},
    "none": {"backend": "none", "selection": {"mode": "top_n", "top_n": 5}},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_live_equals_batch_for_every_query(setup: str, sample: SampleInfo, vlm: str, root: Path) -> None:
    from operators.storage import Storage
    from pipelines.serve.live import Live
    from pipelines.serve.store import load_store

    rerank = dict(SETUPS[setup])
    if rerank["backend"] == "vlm_yesno":
        rerank["model"] = vlm
    cfg, run_dir = _published(root, sample, rerank)
    store = load_store(Storage(), cfg.root)  # what the served app loads: config, index, clip vectors
    assert store.run_dir.rstrip("/").endswith(Path(run_dir).name)
    if rerank["backend"] == "clip":
        assert store.clip_vectors  # the run says where its reranker vectors are
    live = Live(store.config, store.index_uri, "cpu", store.clip_vectors)

    want = by_query(ds.dataset(f"{run_dir}/results").to_table())
    cands = by_query(ds.dataset(f"{run_dir}/candidates").to_table())
    texts = {r["query_id"]: r["text"] for r in ds.dataset(sample.queries).to_table().to_pylist()}
    stats = json.loads(Path(run_dir, "rerank_stats.json").read_text())
    assert want
    rejected = 0
    for qid, text in sorted(texts.items()):
        hits = live.hits(live.embed([text]), cfg.search.k)
        assert [h["doc_id"] for h in hits] == [c["doc_id"] for c in cands[qid]], qid
        np.testing.assert_allclose([h["retrieval_score"] for h in hits],
                                   [c["retrieval_score"] for c in cands[qid]], rtol=0, atol=ATOL)
        docs = live.candidate_docs(f"live-{qid}", text, hits)
        got, n_rej = live.select(live.score(docs, live.query_vectors([f"live-{qid}"], [text])), None)
        rejected += n_rej
        exp = want.get(qid, [])
        assert [(r["rank"], r["doc_id"]) for r in got] == [(r["rank"], r["doc_id"]) for r in exp], qid
        for col in ("retrieval_score", "rerank_score", "final_score"):
            np.testing.assert_allclose([r[col] for r in got], [r[col] for r in exp], rtol=0, atol=ATOL,
                                       err_msg=f"{qid} {col}")
    assert rejected == stats["pairs_rejected"]  # the same pairs were rejects on both sides


def _live_rankings(live: Any, texts: dict[str, str], k: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(retrieval, kept)`` doc ids per query as the live path answers ``POST /v1/search``."""
    retrieval, kept = {}, {}
    for qid, text in sorted(texts.items()):
        hits = live.hits(live.embed([text]), k)
        retrieval[qid] = [h["doc_id"] for h in hits]
        docs = live.candidate_docs(f"live-{qid}", text, hits)
        got, _ = live.select(live.score(docs, live.query_vectors([f"live-{qid}"], [text])), None)
        kept[qid] = [r["doc_id"] for r in got]
    return retrieval, kept


def test_live_ranks_heldout_queries_as_the_trained_batch_run(trained_models: TrainedModels) -> None:
    """Where the weights are trained the rankings mean something: on the held-out queries (never trained on)
    the live path reaches exactly the batch run's retrieval and reranked metrics, and a live path that lost
    the retriever's trained weights (``embed.model.pretrained`` dropped) falls far below them."""
    import copy

    from operators.storage import Storage
    from operators.training.common import ranking_metrics
    from pipelines.evaluate import load_qrels
    from pipelines.serve.live import Live
    from pipelines.serve.store import load_store

    t = trained_models
    store = load_store(Storage(), t.root)
    assert store.run_dir.rstrip("/").endswith(t.run_b.run_id)
    qrels = load_qrels(t.heldout_qrels)
    texts = {r["query_id"]: r["text"] for r in ds.dataset(t.sample.queries).to_table().to_pylist()
             if r["query_id"] in qrels}
    assert len(texts) == len(qrels) >= 10
    k = store.config["search"]["k"]
    batch_cands = {q: [r["doc_id"] for r in rows] for q, rows in
                   by_query(ds.dataset(f"{store.run_dir}/candidates").to_table()).items() if q in qrels}
    batch_kept = {q: [r["doc_id"] for r in rows] for q, rows in
                  by_query(ds.dataset(f"{store.run_dir}/results").to_table()).items() if q in qrels}

    live = Live(store.config, store.index_uri, "cpu", store.clip_vectors)
    retrieval, kept = _live_rankings(live, texts, k)
    assert retrieval == batch_cands and kept == batch_kept
    good = {"retrieval": ranking_metrics(qrels, retrieval), "rerank": ranking_metrics(qrels, kept)}
    # The trained retriever is far above chance (~0.06 recall@10 here: 2 relevant of 160 docs per query).
    assert good["retrieval"]["recall@10"] >= 0.2, good

    lost = copy.deepcopy(store.config)
    lost["embed"]["model"]["pretrained"] = None
    bad_retrieval, bad_kept = _live_rankings(Live(lost, store.index_uri, "cpu", store.clip_vectors), texts, k)
    bad = {"retrieval": ranking_metrics(qrels, bad_retrieval), "rerank": ranking_metrics(qrels, bad_kept)}
    shown = {s: {m: (good[s][m], bad[s][m]) for m in ("recall@10", "ndcg@10")} for s in good}
    assert bad["retrieval"]["ndcg@10"] <= good["retrieval"]["ndcg@10"] - 0.05, shown
    for stage in ("retrieval", "rerank"):  # the reranker keeps from the (now wrong) candidates
        assert bad[stage]["recall@10"] <= good[stage]["recall@10"] - 0.1, shown
