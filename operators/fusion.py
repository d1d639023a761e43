"""Per-query score fusion and candidate selection (top-n, threshold, "up to k above a threshold").

Fusion combines the reranker score with the retrieval score of the same query's candidates:
``none`` (rerank score alone), ``weighted`` (min-max normalised per query, then
``w * rerank + (1 - w) * retrieval``) or ``rrf`` (reciprocal-rank fusion, ``1/(k + rank)`` summed).
Selection follows arXiv 2501.04695 where asked: keep up to k entries whose score clears a
threshold, which can leave a query with none. Ties always break by doc_id, so output is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] within one query; a constant vector maps to all ones (nothing to separate)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.ones_like(x) if hi - lo <= 0 else (x - lo) / (hi - lo)


def ranks(scores: np.ndarray, doc_ids: Sequence[str]) -> np.ndarray:
    """1-based rank of each entry by score descending, ties by doc_id ascending."""
    order = order_by(scores, doc_ids)
    r = np.empty(len(order), dtype=np.int64)
    r[order] = np.arange(1, len(order) + 1)
    return r


def order_by(scores: np.ndarray, doc_ids: Sequence[str]) -> np.ndarray:
    """Indices sorted by score descending, ties by doc_id ascending."""
    ids = np.asarray(doc_ids, dtype=object)
    return np.array(sorted(range(len(ids)), key=lambda i: (-float(scores[i]), str(ids[i]))), dtype=np.int64)


def fuse(retrieval: np.ndarray, rerank: np.ndarray, doc_ids: Sequence[str], method: str = "none",
         weight: float = 0.7, rrf_k: int = 60) -> np.ndarray:
    """Final score of one query's candidates."""
    if method == "none":
        return np.asarray(rerank, dtype=np.float64)
    if method == "weighted":
        return weight * minmax(rerank) + (1.0 - weight) * minmax(retrieval)
    if method == "rrf":
        return 1.0 / (rrf_k + ranks(rerank, doc_ids)) + 1.0 / (rrf_k + ranks(retrieval, doc_ids))
    raise ValueError(f"rerank.fusion.method: unknown {method!r}")


def select(final: np.ndarray, doc_ids: Sequence[str], mode: str = "top_n", top_n: int = 10,
           threshold: float | None = None, k: int = 10) -> np.ndarray:
    """Indices of the kept candidates, best first."""
    order = order_by(final, doc_ids)
    if mode == "top_n":
        return order[:top_n]
    if threshold is None:
        raise ValueError(f"rerank.selection.threshold is required with mode {mode!r}")
    above = order[np.asarray(final)[order] >= threshold]
    if mode == "threshold":
        return above
    if mode == "top_k_above_threshold":
        return above[:k]
    raise ValueError(f"rerank.selection.mode: unknown {mode!r}")
