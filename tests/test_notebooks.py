"""The notebooks run end to end on a quickstart run and show what they claim.

One quickstart run (sample + nightly job + eval on the tiny random-weight default, local Ray) is made for
the module; each notebook is executed once with nbclient on the venv's own ``python3`` kernel, its
parameters cell pointing at that run, and the tests check the outputs of its tagged cells. The shared
helpers (``notebooks/_helpers.py``) are also checked directly against the pipeline's own numbers and files.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.helpers import QuickstartRun
from tests.trained import TrainedModels

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPLORE = "explore_results.ipynb"
EVALUATE = "evaluate.ipynb"
QUERY_ID = "q-00001"  # an explicit QUERY_ID exercises the parameter (None = the first query is unit-tested)


@pytest.fixture(scope="module")
def qs(quickstart_run: QuickstartRun, tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    """The session's ``quickstart(docs=40, queries=6, shards=2)``, copied for this module."""
    return quickstart_run.copy(tmp_path_factory.mktemp("notebooks") / "qs")


@pytest.fixture(scope="module")
def helpers() -> ModuleType:
    """``notebooks/_helpers.py`` imported by path (the notebooks import it from their own directory)."""
    import matplotlib

    matplotlib.use("Agg")
    spec = importlib.util.spec_from_file_location("mmrerank_notebook_helpers", NOTEBOOKS / "_helpers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# --- executing the notebooks ----------------------------------------------------------------------------


def _parameters_cell(nb: Any) -> Any:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    return cells[0]


def _execute(name: str, params: dict[str, Any]) -> Any:
    """Run a notebook with ``params`` assigned after its defaults (papermill style) plus a kernel probe."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = _parameters_cell(nb)
    for k in params:
        assert re.search(rf"^{k} = ", cell.source, re.M), f"{name}: no parameter {k} in {cell.source!r}"
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    probe = nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)")
    probe.metadata["tags"] = ["kernel-probe"]
    nb.cells.append(probe)
    mp = pytest.MonkeyPatch()
    mp.setenv("MPLBACKEND", "Agg")  # headless; the notebooks display figures as PNG themselves
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell
    finally:
        mp.undo()
    return nb


def _cell(nb: Any, tag: str) -> Any:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"no single cell tagged {tag!r}"
    return cells[0]


def _text(cell: Any) -> str:
    """Everything a cell printed or displayed as text."""
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts.append(o.data.get("text/plain", ""))
    return "\n".join(parts)


def _pngs(cell: Any) -> list[bytes]:
    import base64

    return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def _assert_figure(cell: Any) -> None:
    pngs = _pngs(cell)
    assert len(pngs) == 1, f"expected one figure, got {len(pngs)}: {_text(cell)[:500]}"
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and len(pngs[0]) > 2000


def _no_errors(nb: Any) -> None:
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.output_type != "error", f"{o.ename}: {o.evalue}"


@pytest.fixture(scope="module")
def explore_nb(qs: QuickstartRun) -> Any:
    return _execute(EXPLORE, {"ROOT": qs.root, "QRELS": qs.qrels, "QUERY_ID": QUERY_ID})


@pytest.fixture(scope="module")
def evaluate_nb(qs: QuickstartRun) -> Any:
    return _execute(EVALUATE, {"ROOT": qs.root, "QRELS": qs.qrels})


def test_notebooks_are_committed_clean() -> None:
    for name in (EXPLORE, EVALUATE):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear its outputs"
        assert code[0] is _parameters_cell(nb), f"{name}: the parameters cell must be the first code cell"
        for p in ("ROOT", "QRELS"):
            assert re.search(rf"^{p} = ", code[0].source, re.M)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert any("random weights" in c.source for c in nb.cells if c.cell_type == "markdown")
    assert re.search(r"^QUERY_ID = None$", _parameters_cell(nbformat.read(NOTEBOOKS / EXPLORE, as_version=4)).source,
                     re.M)


def test_explore_notebook(explore_nb: Any, qs: QuickstartRun) -> None:
    _no_errors(explore_nb)
    assert _text(_cell(explore_nb, "kernel-probe")).strip() == sys.prefix  # the venv's own interpreter

    run_id = Path(qs.run_dir).name
    assert f"run {run_id}" in _text(_cell(explore_nb, "load"))
    texts = pq.read_table(qs.queries).to_pandas().set_index("query_id")["text"]
    query = _text(_cell(explore_nb, "query"))
    assert f"query {QUERY_ID}: {texts[QUERY_ID]!r}" in query
    assert "20 candidates, 10 kept" in query  # search.k = 20, selection top_n = 10

    for tag in ("grid-before", "grid-after"):
        cell = _cell(explore_nb, tag)
        _assert_figure(cell)
        assert "images: 10 shown, 0 unavailable" in _text(cell)  # every tile has its corpus image

    tables = _text(_cell(explore_nb, "tables"))
    for col in ("retrieval_score", "rerank_score", "final_rank", "retrieval_rank"):
        assert col in tables

    hist = _cell(explore_nb, "score-hist")
    _assert_figure(hist)
    assert "120 scored pairs: 60 kept, 60 not kept" in _text(hist)

    rejects = _cell(explore_nb, "rejects")
    _assert_figure(rejects)
    text = _text(rejects)
    # The sample's deliberately broken corpus rows, by reason.
    for reason in ("duplicate_id", "empty_image", "truncated_image", "undecodable", "null_id"):
        assert reason in text
    assert "embed_corpus" in text


def test_evaluate_notebook(evaluate_nb: Any, qs: QuickstartRun) -> None:
    _no_errors(evaluate_nb)
    assert _text(_cell(evaluate_nb, "kernel-probe")).strip() == sys.prefix
    assert "6 judged queries, 0 of them missing" in _text(_cell(evaluate_nb, "load"))

    table = _text(_cell(evaluate_nb, "metrics-table"))
    for m in ("ndcg@10", "mrr@10", "recall@1", "recall@20", "set_f1"):
        assert m in table
    for col in ("retrieval", "rerank", "delta"):
        assert col in table

    _assert_figure(_cell(evaluate_nb, "metrics-plot"))
    _assert_figure(_cell(evaluate_nb, "per-query-plot"))
    gl = _text(_cell(evaluate_nb, "gain-loss-table"))
    assert "query_id" in gl and "ndcg@10_delta" in gl


def test_evaluate_notebook_on_the_trained_models(trained_models: TrainedModels) -> None:
    """On the session's trained run and its held-out qrels the notebook shows a ranking that means something:
    the held-out query count and ``mmrerank eval``'s numbers, the trained retriever well above chance."""
    from pipelines.evaluate import evaluate

    t = trained_models
    nb = _execute(EVALUATE, {"ROOT": t.root, "QRELS": t.heldout_qrels})
    _no_errors(nb)
    n = len(t.vlm.card["split"]["heldout_query_ids"])
    assert f"{n} judged queries, 0 of them missing" in _text(_cell(nb, "load"))
    want = evaluate(t.root, t.heldout_qrels)
    rows = {line.split()[0]: line.split()[1:] for line in _text(_cell(nb, "metrics-table")).splitlines()
            if line.split() and "@" in line.split()[0]}
    for m in ("recall@10", "mrr@10", "ndcg@10"):
        shown = [float(x) for x in rows[m][:2]]  # retrieval, rerank (then delta)
        assert shown == pytest.approx([want["retrieval"][m], want["rerank"][m]], abs=6e-5), (m, rows[m])
    assert want["retrieval"]["recall@10"] >= 0.2, want["retrieval"]  # chance here is ~0.06


# --- the helpers against the pipeline ---------------------------------------------------------------


def test_metric_summary_matches_evaluate(helpers: ModuleType, qs: QuickstartRun) -> None:
    from pipelines.evaluate import evaluate, per_query

    metrics = evaluate(qs.root, qs.qrels)
    summary = helpers.metric_summary(per_query(qs.root, qs.qrels))
    assert list(summary.index) == metrics["metrics"]
    for m in metrics["metrics"]:
        assert summary.loc[m, "retrieval"] == pytest.approx(metrics["retrieval"][m], abs=1e-12)
        assert summary.loc[m, "rerank"] == pytest.approx(metrics["rerank"][m], abs=1e-12)
        assert summary.loc[m, "delta"] == pytest.approx(metrics["delta"][m], abs=1e-12)


def test_run_reads_only_manifest_files(helpers: ModuleType, qs: QuickstartRun, tmp_path: Path) -> None:
    root = tmp_path / "out"
    shutil.copytree(qs.root, root)
    run = helpers.load_run(str(root))
    assert run.run_dir == str(root / "runs" / Path(qs.run_dir).name) and run.root == str(root)
    n_results = sum(e["rows"] for rel, e in run.manifest["files"].items() if rel.startswith("results/"))
    assert len(run.results()) == n_results == 60
    # A file the manifest does not list (e.g. written after publishing) is never read.
    stray = pq.read_table(next((Path(run.run_dir) / "results").glob("*.parquet")))
    pq.write_table(stray, Path(run.run_dir) / "results" / "zz-unlisted.parquet")
    assert len(helpers.load_run(str(root)).results()) == n_results
    # The run directory itself works as ROOT too.
    assert helpers.load_run(run.run_dir).run_id == run.run_id


def test_corpus_images_by_shard_row_and_by_id(helpers: ModuleType, qs: QuickstartRun) -> None:
    from PIL import Image

    run = helpers.load_run(qs.root)
    cands = run.candidates()
    q = helpers.pick_query(cands, None)
    assert q == sorted(cands["query_id"].unique())[0]
    with pytest.raises(ValueError, match="no candidates"):
        helpers.pick_query(cands, "no-such-query")
    before, after = helpers.before_after(run, q)
    assert list(before["rank"]) == sorted(before["rank"]) and list(after["rank"]) == list(range(1, len(after) + 1))

    # The reference: the corpus shards as written by make_sample, first occurrence of an id wins.
    corpus: dict[str, bytes] = {}
    for shard in sorted((qs.out / "sample" / "corpus").glob("*.parquet")):
        t = pq.read_table(shard)
        for d, img in zip(t.column("doc_id").to_pylist(), t.column("image").to_pylist(), strict=True):
            if d is not None and d not in corpus:
                corpus[d] = img

    images = helpers.CorpusImages(run)
    recs = images.records(before)
    assert [r["doc_id"] for r in recs] == list(before["doc_id"])
    assert [r["image"] for r in recs] == [corpus[d] for d in before["doc_id"]]
    assert all(isinstance(i, Image.Image) for i in images.images(before.head(3)))

    # A stale (doc_shard, doc_row) -- the corpus changed, the cache was pruned -- falls back to the doc_id.
    stale = before.head(4).copy()
    stale["doc_shard"] = ["no-such-shard", stale["doc_shard"].iloc[1], stale["doc_shard"].iloc[2], None]
    stale["doc_row"] = [0, 10_000, (stale["doc_row"].iloc[2] + 1) % 5, None]
    assert [r["doc_id"] for r in images.records(stale)] == list(stale["doc_id"])
    gone = stale.head(1).assign(doc_id="doc-not-in-corpus")
    assert images.records(gone) == ["not found in the corpus"]
    assert images.image("not found in the corpus") == "not found in the corpus"


def test_summaries_and_plots_on_edge_cases(helpers: ModuleType, qs: QuickstartRun) -> None:
    import matplotlib.pyplot as plt

    run = helpers.load_run(qs.root)
    summary = helpers.rejects_summary(run.rejects())
    assert int(summary["rows"].sum()) == len(run.rejects()) == 8
    assert summary.iloc[0]["error_type"] == "duplicate_id" and summary.iloc[0]["rows"] == 2
    empty = helpers.rejects_summary(run.rejects().head(0))
    assert empty.empty
    scored, results = run.scored(), run.results()
    kept = helpers.kept_flags(scored, results)
    assert int(kept.sum()) == len(results)
    figs = [helpers.rejects_bar(empty), helpers.score_histograms(scored, kept),
            helpers.image_grid(["a reason", "another"], ["t1", "t2"], "placeholders", relevant=[True]),
            helpers.image_grid([], [], "nothing")]
    for fig in figs:
        plt.close(fig)
    gl = helpers.gains_losses(
        pd.DataFrame({"query_id": ["a", "b", "c"], "m_retrieval": [0.5, 0.2, 0.3], "m_rerank": [0.9, 0.1, 0.3],
                      "m_delta": [0.4, -0.1, 0.0], "relevant": [1, 1, 1], "kept": [2, 2, 2]}),
        "m", 5, {"a": "text a"})
    assert list(gl["query_id"]) == ["a", "b"] and list(gl["change"]) == ["gain", "loss"]
    assert list(gl["text"]) == ["text a", ""]


def test_helpers_read_a_run_on_s3(helpers: ModuleType, qs: QuickstartRun, s3_bucket: str) -> None:
    """The same run uploaded under ``s3://``: manifest-verified reads, the shard-cache glob and images."""
    from operators.storage import Storage

    storage = Storage()
    local = Path(qs.root)
    for f in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
        storage.write_bytes(f"{s3_bucket}/out/{f.relative_to(local).as_posix()}", f.read_bytes())
    run = helpers.load_run(f"{s3_bucket}/out", storage)
    assert run.run_dir == f"{s3_bucket}/out/runs/{Path(qs.run_dir).name}" and run.root == f"{s3_bucket}/out"
    assert len(run.results()) == 60 and len(run.candidates()) == 120 and len(run.rejects()) == 8
    before, _ = helpers.before_after(run, QUERY_ID)
    images = helpers.CorpusImages(run)
    # doc_shard -> <root>/embeddings/*/corpus/<doc_shard>/_SUCCESS.json, found by a glob on the bucket
    assert all(images.shard_source(s) for s in before["doc_shard"].unique())
    recs = images.records(before.head(5))
    assert [r["doc_id"] for r in recs] == list(before.head(5)["doc_id"])
