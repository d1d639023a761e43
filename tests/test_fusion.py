"""Fusion and selection (pure functions, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from operators.fusion import fuse, minmax, ranks, select


def test_ties_break_by_doc_id_and_ranks_are_dense() -> None:
    s = np.array([0.5, 0.9, 0.5, 0.1])
    docs = ["d", "a", "b", "c"]
    assert list(select(s, docs, "top_n", top_n=4)) == [1, 2, 0, 3]  # 0.9, then the 0.5 tie by doc_id
    assert list(ranks(s, docs)) == [3, 1, 2, 4]


def test_weighted_fusion_uses_per_query_minmax() -> None:
    ret = np.array([10.0, 20.0, 30.0])
    rr = np.array([0.0, 1.0, 0.5])
    f = fuse(ret, rr, ["a", "b", "c"], "weighted", weight=0.5)
    np.testing.assert_allclose(f, 0.5 * np.array([0, 1, 0.5]) + 0.5 * np.array([0, 0.5, 1]))
    np.testing.assert_allclose(minmax(np.array([3.0, 3.0])), [1.0, 1.0])
    np.testing.assert_allclose(fuse(ret, rr, ["a", "b", "c"], "weighted", weight=1.0), [0, 1, 0.5])


def test_rrf_fusion() -> None:
    ret = np.array([0.9, 0.8, 0.7])  # retrieval ranks 1, 2, 3
    rr = np.array([0.1, 0.9, 0.5])  # rerank ranks 3, 1, 2
    f = fuse(ret, rr, ["a", "b", "c"], "rrf", rrf_k=60)
    np.testing.assert_allclose(f, [1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    assert list(select(f, ["a", "b", "c"], "top_n", top_n=3)) == [1, 0, 2]


def test_threshold_modes() -> None:
    s = np.array([0.2, 0.95, 0.6, 0.7, 0.4])
    docs = list("abcde")
    assert list(select(s, docs, "threshold", threshold=0.5)) == [1, 3, 2]
    assert list(select(s, docs, "top_k_above_threshold", threshold=0.5, k=2)) == [1, 3]
    assert list(select(s, docs, "top_k_above_threshold", threshold=0.99, k=2)) == []
    with pytest.raises(ValueError, match="threshold"):
        select(s, docs, "threshold")
    with pytest.raises(ValueError, match="fusion.method"):
        fuse(s, s, docs, "max")
