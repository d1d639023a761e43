"""Ranking and set metrics per query, computed by ``pytrec_eval`` (the reference trec_eval C code).

One home for the metric computation of ``mmrerank eval`` (:mod:`pipelines.evaluate`, which documents what
is measured) and of training validation (:func:`operators.training.common.ranking_metrics`).
"""

from __future__ import annotations

import math

Ranking = dict[str, list[str]]  # query_id -> doc_ids, best first
Qrels = dict[str, dict[str, int]]  # query_id -> doc_id -> relevance


def _as_run(ranking: Ranking, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Ranks as strictly decreasing scores, so trec_eval's tie-breaking (docno descending) never applies."""
    out = {}
    for q, docs in ranking.items():
        docs = docs[:limit] if limit is not None else docs
        if docs:
            out[q] = {d: float(len(docs) - i) for i, d in enumerate(docs)}
    return out


def _evaluate(qrels: Qrels, ranking: Ranking, measures: set[str], limit: int | None = None) -> dict[str, dict]:
    import pytrec_eval

    run = _as_run({q: v for q, v in ranking.items() if q in qrels}, limit)
    if not run:
        return {}
    return pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=1).evaluate(run)


def stage_scores(qrels: Qrels, ranking: Ranking, chosen: Ranking, cutoffs: list[int]) -> dict[str, dict[str, float]]:
    """Per judged query: every metric for one stage (``chosen`` is the set for the set metrics)."""
    full = _evaluate(qrels, ranking, {"recall." + ",".join(map(str, cutoffs)), "ndcg_cut.10"})
    top10 = _evaluate(qrels, ranking, {"recip_rank"}, limit=10)
    sets = _evaluate(qrels, chosen, {"set_P", "set_recall", "set_F"})
    out: dict[str, dict[str, float]] = {}
    for q in qrels:
        f, r, s = full.get(q, {}), top10.get(q, {}), sets.get(q, {})
        row = {f"recall@{c}": f.get(f"recall_{c}", 0.0) for c in cutoffs}
        row["mrr@10"] = r.get("recip_rank", 0.0)
        row["ndcg@10"] = f.get("ndcg_cut_10", 0.0)
        row["set_precision"] = s.get("set_P", 0.0)
        row["set_recall"] = s.get("set_recall", 0.0)
        row["set_f1"] = s.get("set_F", 0.0)
        out[q] = {k: float(v) if math.isfinite(v) else 0.0 for k, v in row.items()}
    return out
