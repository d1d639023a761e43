"""Evaluation of a run against qrels: a hand-built run directory with known rankings (no Ray).

Every expected value is computed here from the metric's definition, not taken from the library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import Storage
from pipelines.evaluate import QrelsError, evaluate, export_trec, format_table, load_qrels, per_query
from pipelines.publish import PublishError, advance_latest, verify_run, write_manifest

RERANKER = "clip:mmr tiny/v1"

# Retrieval candidates, rank 1..5 (k = 5). q3 is judged but missing from the run; q4 is unjudged.
CANDIDATES = {
    "q1": [("d1", 0.9), ("d2", 0.8), ("d3", 0.7), ("d4", 0.6), ("d5", 0.5)],
    "q2": [("e1", 0.9), ("e2", 0.8), ("e3", 0.7), ("e4", 0.6), ("e5", 0.5)],
    "q4": [("g1", 0.9), ("g2", 0.8)],
    "q5": [("f1", 0.9), ("f2", 0.8), ("f3", 0.7), ("f4", 0.6), ("f5", 0.5)],
}
# Every scored pair (q1/d5 was rejected by the reranker, so it is absent). q2: e1 and e3 tie.
SCORED = {
    "q1": {"d1": 0.6, "d2": 0.3, "d3": 0.95, "d4": 0.2},
    "q2": {"e1": 0.3, "e2": 0.8, "e3": 0.3, "e4": 0.9, "e5": 0.2},
    "q4": {"g1": 0.1, "g2": 0.7},
    "q5": {"f1": 0.4, "f2": 0.3, "f3": 0.2, "f4": 0.1, "f5": 0.45},
}
# Kept lists (selection: up to 2 above a threshold), with the final (fused) score. In q2 the fusion put
# e2 before e4 although e4 has the higher rerank score; q5 kept nothing.
RESULTS = {
    "q1": [("d3", 0.95), ("d1", 0.6)],
    "q2": [("e2", 0.85), ("e4", 0.80)],
    "q4": [("g2", 0.7)],
}
QRELS = [("q1", "d3", 1), ("q1", "d1", 0), ("q2", "e2", 2), ("q2", "e4", 1), ("q2", "e9", 1),
         ("q3", "x1", 1), ("q5", "f5", 1), ("q6", "y1", 0)]


def _lg(r: int) -> float:
    return math.log2(r + 1)


# Expected per judged query (q1, q2, q3, q5): retrieval / rerank.
IDCG_Q2 = 2 / _lg(1) + 1 / _lg(2) + 1 / _lg(3)
EXPECTED = {
    "retrieval": {
        "q1": {"recall@1": 0, "recall@5": 1, "recall@10": 1, "mrr@10": 1 / 3, "ndcg@10": (1 / _lg(3)) / 1,
               "set_precision": 0, "set_recall": 0, "set_f1": 0},  # top-2 = {d1, d2}
        "q2": {"recall@1": 0, "recall@5": 2 / 3, "recall@10": 2 / 3, "mrr@10": 1 / 2,
               "ndcg@10": (2 / _lg(2) + 1 / _lg(4)) / IDCG_Q2,
               "set_precision": 1 / 2, "set_recall": 1 / 3, "set_f1": 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)},
        "q3": dict.fromkeys(("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "set_precision",
                             "set_recall", "set_f1"), 0),
        "q5": {"recall@1": 0, "recall@5": 1, "recall@10": 1, "mrr@10": 1 / 5, "ndcg@10": 1 / _lg(5),
               "set_precision": 0, "set_recall": 0, "set_f1": 0},
    },
    "rerank": {
        # [d3, d1, d2, d4]; kept {d3, d1}
        "q1": {"recall@1": 1, "recall@5": 1, "recall@10": 1, "mrr@10": 1, "ndcg@10": 1,
               "set_precision": 1 / 2, "set_recall": 1, "set_f1": 2 * (1 / 2) / (1 / 2 + 1)},
        # [e2, e4, e1, e3, e5]: kept in results order, then rerank_score desc, tie e1/e3 by doc_id
        "q2": {"recall@1": 1 / 3, "recall@5": 2 / 3, "recall@10": 2 / 3, "mrr@10": 1,
               "ndcg@10": (2 / _lg(1) + 1 / _lg(2)) / IDCG_Q2,
               "set_precision": 1, "set_recall": 2 / 3, "set_f1": 2 * (2 / 3) / (1 + 2 / 3)},
        "q3": dict.fromkeys(("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "set_precision",
                             "set_recall", "set_f1"), 0),
        # kept nothing: ranking = scored pairs by rerank_score [f5, f1, ...]; set metrics 0 (empty kept list)
        "q5": {"recall@1": 1, "recall@5": 1, "recall@10": 1, "mrr@10": 1, "ndcg@10": 1,
               "set_precision": 0, "set_recall": 0, "set_f1": 0},
    },
}
JUDGED = ("q1", "q2", "q3", "q5")


def _mean(stage: str, metric: str) -> float:
    return sum(EXPECTED[stage][q][metric] for q in JUDGED) / len(JUDGED)


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_run(root: Path, run_id: str = "r1", manifest: bool = True, selection: dict | None = None) -> Path:
    run = root / "runs" / run_id
    # candidates in two parts, rows shuffled (readers must sort)
    rows = [(q, i + 1, d, s) for q, lst in CANDIDATES.items() for i, (d, s) in enumerate(lst)]
    rows = rows[::-1]
    for n, part in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
        _write(run / "candidates" / f"part-{n:05d}.parquet", pa.table({
            "query_id": pa.array([r[0] for r in part], pa.string()),
            "rank": pa.array([r[1] for r in part], pa.int32()),
            "doc_id": pa.array([r[2] for r in part], pa.string()),
            "retrieval_score": pa.array([r[3] for r in part], pa.float32()),
            "doc_shard": pa.array(["s0"] * len(part), pa.string()),
            "doc_row": pa.array(list(range(len(part))), pa.int64())}))
    for b, qs in enumerate((("q1", "q4"), ("q2", "q5"))):
        srows = [(q, d, s) for q in qs for d, s in sorted(SCORED[q].items())]
        rank = {(q, d): i + 1 for q, lst in CANDIDATES.items() for i, (d, _) in enumerate(lst)}
        ret = {(q, d): s for q, lst in CANDIDATES.items() for d, s in lst}
        _write(run / "scored" / f"b{b:05d}" / "part-c0-000000000000.parquet", pa.table({
            "query_id": pa.array([r[0] for r in srows], pa.string()),
            "doc_id": pa.array([r[1] for r in srows], pa.string()),
            "retrieval_rank": pa.array([rank[r[0], r[1]] for r in srows], pa.int32()),
            "retrieval_score": pa.array([ret[r[0], r[1]] for r in srows], pa.float32()),
            "rerank_score": pa.array([r[2] for r in srows], pa.float32()),
            "doc_shard": pa.array(["s0"] * len(srows), pa.string()),
            "doc_row": pa.array([0] * len(srows), pa.int64())}))
        res = [(q, i + 1, d, f) for q in qs for i, (d, f) in enumerate(RESULTS.get(q, []))]
        _write(run / "results" / f"part-b{b:05d}.parquet", pa.table({
            "query_id": pa.array([r[0] for r in res], pa.string()),
            "rank": pa.array([r[1] for r in res], pa.int32()),
            "doc_id": pa.array([r[2] for r in res], pa.string()),
            "retrieval_score": pa.array([ret[r[0], r[2]] for r in res], pa.float32()),
            "rerank_score": pa.array([SCORED[r[0]][r[2]] for r in res], pa.float32()),
            "final_score": pa.array([r[3] for r in res], pa.float32()),
            "reranker": pa.array([RERANKER] * len(res), pa.string()),
            "run_id": pa.array([run_id] * len(res), pa.string())}))
    sel = selection or {"mode": "top_k_above_threshold", "top_n": 10, "threshold": 0.5, "k": 2}
    (run / "_RUN.json").write_text(json.dumps({"run_id": run_id, "config": {"rerank": {"selection": sel}}}))
    (run / "stats.json").write_text("{}")
    if manifest:
        write_manifest(Storage(), str(run), run_id, {})
    return run


def write_qrels(dir_: Path) -> tuple[Path, Path]:
    pq_path, txt_path = dir_ / "qrels.parquet", dir_ / "qrels.txt"
    pq.write_table(pa.table({"query_id": pa.array([r[0] for r in QRELS], pa.string()),
                             "doc_id": pa.array([r[1] for r in QRELS], pa.string()),
                             "relevance": pa.array([r[2] for r in QRELS], pa.int32())}), pq_path)
    txt_path.write_text("# a comment\n\n" + "".join(f"{q} 0 {d} {r}\n" for q, d, r in QRELS))
    return pq_path, txt_path


@pytest.fixture
def run_and_qrels(tmp_path: Path) -> tuple[Path, Path, Path]:
    run = make_run(tmp_path / "root")
    p, t = write_qrels(tmp_path)
    return run, p, t


# --- metrics ------------------------------------------------------------------------------------------


def test_every_metric_matches_hand_computation(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, qrels, _ = run_and_qrels
    m = evaluate(str(run), str(qrels))
    assert m["run_id"] == "r1" and m["k"] == 5 and m["top_n"] == 2
    assert m["metrics"] == ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10",
                            "set_precision", "set_recall", "set_f1"]
    assert m["queries"] == {"judged": 4, "evaluated_in_run": 3, "missing_from_run": 1, "unjudged_in_run": 1,
                            "rerank_empty": 1}
    for stage in ("retrieval", "rerank"):
        for metric in m["metrics"]:
            assert m[stage][metric] == pytest.approx(_mean(stage, metric), abs=1e-9), (stage, metric)
    for metric in m["metrics"]:
        assert m["delta"][metric] == pytest.approx(_mean("rerank", metric) - _mean("retrieval", metric))
    # the headline example: relevant doc at retrieval rank 3, rerank rank 1
    assert EXPECTED["retrieval"]["q1"]["mrr@10"] == pytest.approx(1 / 3)
    # metrics.json beside the manifest, same content; the run still verifies
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    verify_run(Storage(), str(run), deep=True)


def test_per_query_values(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, qrels, _ = run_and_qrels
    df = per_query(str(run), str(qrels))
    assert list(df["query_id"]) == list(JUDGED)
    for _, row in df.iterrows():
        q = row["query_id"]
        for metric in EXPECTED["rerank"][q]:
            a, b = EXPECTED["retrieval"][q][metric], EXPECTED["rerank"][q][metric]
            assert row[f"{metric}_retrieval"] == pytest.approx(a)
            assert row[f"{metric}_rerank"] == pytest.approx(b)
            assert row[f"{metric}_delta"] == pytest.approx(b - a)
    q1 = df.set_index("query_id").loc["q1"]
    assert (q1["mrr@10_retrieval"], q1["mrr@10_rerank"]) == (pytest.approx(1 / 3), 1.0)
    assert df.set_index("query_id").loc["q3", "in_run"] == False  # noqa: E712 - numpy bool
    assert dict(zip(df["query_id"], df["kept"], strict=True)) == {"q1": 2, "q2": 2, "q3": 0, "q5": 0}
    assert not (run / "metrics.json").exists()  # per_query does not write


def test_k_argument_adds_recall_at_k(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, qrels, _ = run_and_qrels
    m = evaluate(str(run), str(qrels), k=3)
    assert m["k"] == 3 and m["k_run"] == 5
    assert m["metrics"][:4] == ["recall@1", "recall@3", "recall@5", "recall@10"]
    # retrieval: q1 d3 at 3 -> 1; q2 e2 of 3 relevant -> 1/3; q3, q5 -> 0.  rerank: q1 1, q2 2/3, q5 1
    assert m["retrieval"]["recall@3"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["rerank"]["recall@3"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)


def test_selection_size_from_config_top_n(tmp_path: Path) -> None:
    run = make_run(tmp_path / "root", selection={"mode": "top_n", "top_n": 1, "threshold": None, "k": 10})
    p, _ = write_qrels(tmp_path)
    m = evaluate(str(run), str(p))
    assert m["top_n"] == 1 and m["top_n_source"] == "rerank.selection.top_n"
    # retrieval top-1 sets: q1 {d1} no, q2 {e1} no, q5 {f1} no -> P = R = 0
    assert m["retrieval"]["set_precision"] == 0 and m["retrieval"]["set_recall"] == 0


def test_format_table(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, qrels, _ = run_and_qrels
    m = evaluate(str(run), str(qrels))
    lines = format_table(m)
    assert lines[1].split() == ["metric", "retrieval", "rerank", "delta"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:2 + len(m["metrics"])]}
    assert list(rows) == m["metrics"]
    a, b = _mean("retrieval", "mrr@10"), _mean("rerank", "mrr@10")
    assert rows["mrr@10"] == [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
    assert "missing from the run" in lines[0] and "empty kept list: 1" in lines[-1]


# --- qrels --------------------------------------------------------------------------------------------


def test_trec_qrels_equal_parquet_qrels(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, p, t = run_and_qrels
    assert load_qrels(str(t)) == load_qrels(str(p)) == {
        "q1": {"d3": 1, "d1": 0}, "q2": {"e2": 2, "e4": 1, "e9": 1}, "q3": {"x1": 1}, "q5": {"f5": 1},
        "q6": {"y1": 0}}
    a = evaluate(str(run), str(p))
    b = evaluate(str(run), str(t))
    assert a["retrieval"] == b["retrieval"] and a["rerank"] == b["rerank"]
    # content sniffing: a Parquet file without the extension, a text file with an odd one
    (run.parent / "qrels_noext").write_bytes(p.read_bytes())
    (run.parent / "qrels.qrels").write_text(t.read_text())
    assert load_qrels(str(run.parent / "qrels_noext")) == load_qrels(str(run.parent / "qrels.qrels"))


@pytest.mark.parametrize(("text", "where", "what"), [
    ("q1 0 d1 1\nq1 0 d2\n", ":2:", "expected 4 fields"),
    ("q1 0 d1 1\n\nq1 0 d2 yes\n", ":3:", "relevance must be an integer"),
    ("q1 0 d1 1\nq1 0 d1 2\n", ":2:", "judged again"),
    ("# only a comment\n", "", "no judgements"),
])
def test_malformed_trec_qrels(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(QrelsError, match=what) as e:
        load_qrels(str(path))
    assert f"{path}{where}" in str(e.value)


def test_bad_parquet_qrels(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": ["q1"], "doc_id": ["d1"], "relevance": ["1"]}), path)
    with pytest.raises(QrelsError, match="column 'relevance' has type string") as e:
        load_qrels(str(path))
    assert str(path) in str(e.value)
    pq.write_table(pa.table({"query_id": ["q1"], "doc": ["d1"], "relevance": [1]}), path)
    with pytest.raises(QrelsError, match="'doc_id' is missing"):
        load_qrels(str(path))
    pq.write_table(pa.table({"query_id": ["q1", None], "doc_id": ["d1", "d2"], "relevance": [1, 1]}), path)
    with pytest.raises(QrelsError, match="row 1: column 'query_id' is null"):
        load_qrels(str(path))
    with pytest.raises(FileNotFoundError, match="qrels file not found"):
        load_qrels(str(tmp_path / "nope.txt"))


def test_qrels_without_relevant_docs(run_and_qrels: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run = run_and_qrels[0]
    path = tmp_path / "zero.txt"
    path.write_text("q1 0 d1 0\n")
    with pytest.raises(QrelsError, match="no query has a relevant doc"):
        evaluate(str(run), str(path))


# --- which run ----------------------------------------------------------------------------------------


def test_refuses_run_without_manifest(tmp_path: Path) -> None:
    run = make_run(tmp_path / "root", manifest=False)
    p, _ = write_qrels(tmp_path)
    with pytest.raises(PublishError, match="no _MANIFEST.json: the run is incomplete"):
        evaluate(str(run), str(p))
    with pytest.raises(PublishError, match="incomplete"):
        export_trec(str(run))
    assert not (run / "metrics.json").exists()
    with pytest.raises(FileNotFoundError, match="no such run directory or root"):
        evaluate(str(tmp_path / "nowhere"), str(p))
    # a root whose runs were never published
    with pytest.raises(PublishError, match="nothing was published"):
        evaluate(str(tmp_path / "root"), str(p))


def test_refuses_run_whose_files_do_not_check_out(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run, p, _ = run_and_qrels
    (run / "results" / "part-b00000.parquet").unlink()
    with pytest.raises(PublishError, match="listed in the manifest but missing"):
        evaluate(str(run), str(p))


def test_root_resolves_to_latest_published_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    storage = Storage()
    make_run(root, "r0")
    advance_latest(storage, str(root), "r0")
    make_run(root, "r1")
    advance_latest(storage, str(root), "r1")
    make_run(root, "r2", manifest=False)  # newer but unfinished: never chosen
    p, _ = write_qrels(tmp_path)
    m = evaluate(f"file://{root}", str(p))
    assert m["run_id"] == "r1"
    assert (root / "runs" / "r1" / "metrics.json").exists()
    assert not (root / "runs" / "r0" / "metrics.json").exists()
    files = export_trec(str(root))
    assert [Path(f).parent for f in files] == [root / "runs" / "r1" / "trec"] * 2


# --- TREC run export ----------------------------------------------------------------------------------


def test_export_trec_format_and_order(run_and_qrels: tuple[Path, Path, Path]) -> None:
    run = run_and_qrels[0]
    files = export_trec(str(run))
    assert files == [str(run / "trec" / "retrieval.run"), str(run / "trec" / "rerank.run")]
    retrieval = Path(files[0]).read_text().splitlines()
    rerank = Path(files[1]).read_text().splitlines()
    assert retrieval[:3] == ["q1 Q0 d1 1 0.9 mmrerank-retrieval", "q1 Q0 d2 2 0.8 mmrerank-retrieval",
                             "q1 Q0 d3 3 0.7 mmrerank-retrieval"]
    tag = "mmrerank-clip_mmr_tiny_v1"
    assert rerank == [f"q1 Q0 d3 1 0.95 {tag}", f"q1 Q0 d1 2 0.6 {tag}",
                      f"q2 Q0 e2 1 0.85 {tag}", f"q2 Q0 e4 2 0.8 {tag}", f"q4 Q0 g2 1 0.7 {tag}"]
    expected_order = [(q, i + 1, d) for q in sorted(CANDIDATES) for i, (d, _) in enumerate(CANDIDATES[q])]
    parsed = []
    for line in retrieval:  # trec_eval reads whitespace-separated: qid Q0 docno rank score tag
        f = line.split()
        assert len(f) == 6 and f[1] == "Q0" and f[5] == "mmrerank-retrieval"
        parsed.append((f[0], int(f[3]), f[2]))
        float(f[4])
    assert parsed == expected_order
    # deterministic: a second export is byte-identical
    before = [Path(f).read_bytes() for f in files]
    export_trec(str(run))
    assert [Path(f).read_bytes() for f in files] == before


def test_export_trec_scores_reproduce_metrics(run_and_qrels: tuple[Path, Path, Path]) -> None:
    """The exported retrieval run, read back as trec_eval would (by score), gives the same MRR."""
    import pytrec_eval

    run, p, _ = run_and_qrels
    m = evaluate(str(run), str(p))
    f = export_trec(str(run))[0]
    trec_run: dict[str, dict[str, float]] = {}
    for line in Path(f).read_text().splitlines():
        q, _, d, _, s, _ = line.split()
        trec_run.setdefault(q, {})[d] = float(s)
    qrels = {q: dict(v) for q, v in load_qrels(str(p)).items() if any(r > 0 for r in v.values())}
    res = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(trec_run)
    assert sum(r["recip_rank"] for r in res.values()) / len(qrels) == pytest.approx(m["retrieval"]["mrr@10"])


def test_export_trec_out_dir(run_and_qrels: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run = run_and_qrels[0]
    out = tmp_path / "elsewhere"
    files = export_trec(str(run), out=str(out))
    assert files == [str(out / "retrieval.run"), str(out / "rerank.run")]
    assert not (run / "trec").exists()
