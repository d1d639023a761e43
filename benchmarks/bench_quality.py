"""Quality over seeds: does the fine-tuned reranker beat the retriever on held-out queries and on new corpora?

For each sample seed the quickstart's recipe (``pipelines.quickstart.fine_tune``: the binding sample, the
retriever and the yes/no reranker fine-tuned from the shipped pretrained bases, hard negatives from the
retriever's own candidates) and then, with no-publish nightly runs (``pipelines.run.run``) evaluated by
``mmrerank eval``'s code (pytrec_eval):

- ``heldout``: the sample's held-out queries (never trained on);
- ``new-1``, ``new-2``, ...: new binding corpora (other seeds, nothing of them trained on), every query;
- ``off-template``: the held-out queries reworded outside the generator's four templates (``OFF_TEMPLATES``: other
  lead-ins, "together with" for "and"), same qrels. The tiny reranker reads a closed word-level vocabulary (the
  generator's words): a word it never saw is one unknown token. The retriever reads open_clip's BPE.

Rows (``reranker-random`` and ``base`` on the held-out queries only): ``retrieval`` (the fine-tuned
retriever's top-k order), ``reranker`` (the fine-tuned reranker alone, fusion none: the quickstart's run),
``rrf`` (reciprocal rank fusion of the two),
``reranker-random`` (the reranker fine-tuned with random instead of hard negatives, same steps: RagVL's
claim that hard negatives help), ``base`` (the shipped reranker base alone, before fine-tuning: what
fine-tuning adds). The table gives mean, min and max over seeds of each metric, and of each row's
nDCG@10 gain over retrieval::

    python benchmarks/bench_quality.py                       # 5 seeds x (held-out + 2 new corpora)
    python benchmarks/bench_quality.py --seeds 0 1 --new-corpora 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repo root on sys.path)

log = logging.getLogger("bench_quality")

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")
ROWS = ("retrieval", "reranker", "rrf", "reranker-random", "base")
# Wordings the sample generator never writes (its templates: pipelines.sample.QUERY_TEMPLATES); {p} is the query's
# colour-shape phrase as the generator wrote it ("a red circle and a blue square" or "red circle and blue square").
OFF_TEMPLATES = ("show me {p}", "i am looking for {p}", "find pictures that contain {p}", "{p} is what i want")
NEW_CORPUS_SEED = 1000  # new corpus j of sample seed s: NEW_CORPUS_SEED + 10 * s + j (never a sample seed here)


def _metrics(run_dir: str, qrels: str) -> dict[str, dict[str, float]]:
    from pipelines.evaluate import evaluate

    m = evaluate(run_dir, qrels)
    return {"retrieval": {k: m["retrieval"][k] for k in METRICS}, "rerank": {k: m["rerank"][k] for k in METRICS}}


def off_template_text(text: str, i: int) -> str:
    """The query ``text`` reworded: its phrase under another lead-in; every other query also says "together with"."""
    from pipelines.sample import QUERY_TEMPLATES

    phrase = text
    for tmpl in QUERY_TEMPLATES:
        lead = tmpl.split("{")[0]
        if lead and text.startswith(lead):
            phrase = text[len(lead):]
            break
    if i % 2:
        phrase = phrase.replace(" and ", " together with ")
    return OFF_TEMPLATES[i % len(OFF_TEMPLATES)].format(p=phrase)


def off_template_queries(queries: str, qrels: str, out: Path) -> str:
    """The judged queries of ``qrels`` from the sample's ``queries``, reworded, as a queries directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.evaluate import load_qrels

    judged = set(load_qrels(qrels))  # Parquet or TREC text (training writes the held-out qrels as TREC text)
    t = pq.read_table(queries)
    t = t.filter(pa.array([q in judged for q in t.column("query_id").to_pylist()]))
    texts = [off_template_text(x, i) for i, x in enumerate(t.column("text").to_pylist())]
    t = t.set_column(t.column_names.index("text"), "text", pa.array(texts, pa.string()))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out / "queries-00000.parquet")
    return str(out)


def one_seed(seed: int, work: Path, new_corpora: int, docs: int, queries: int) -> dict[str, dict[str, dict]]:
    """``{corpus: {row: {metric: value}}}`` for one sample seed."""
    from operators.bases import reranker_dir
    from pipelines.quickstart import DEFAULT_CONFIG, TRAIN_VLM_CONFIG, _merged, fine_tune
    from pipelines.run import run
    from pipelines.sample import make_sample
    from pipelines.train import run_train

    out = str(work / f"seed-{seed}")
    ft = fine_tune(out, docs=docs, queries=queries, shards=4, seed=seed, bad_rows=False, log_steps=False)
    random_neg = run_train(_merged(TRAIN_VLM_CONFIG, out, rerank={"model": reranker_dir()},
                                   train={"candidates": ft.candidates.run_dir, "negatives": "random"}))
    models = {"reranker": ft.vlm.output, "reranker-random": random_neg.output, "base": reranker_dir()}

    corpora: dict[str, tuple[str, str]] = {"heldout": (out, ft.heldout_qrels)}
    reworded = off_template_queries(str(Path(out, "sample", "queries")), ft.heldout_qrels, work / f"seed-{seed}-off")
    corpora["off-template"] = (out, ft.heldout_qrels)
    for j in range(1, new_corpora + 1):
        new_out = str(work / f"seed-{seed}-new-{j}")
        info = make_sample(str(Path(new_out, "sample")), docs=docs, queries=queries, shards=4,
                           seed=NEW_CORPUS_SEED + 10 * seed + j, binding=True)
        corpora[f"new-{j}"] = (new_out, info.qrels)

    result: dict[str, dict[str, dict]] = {}
    for corpus, (where, qrels) in corpora.items():
        rows: dict[str, dict] = {}
        variants = [("reranker", models["reranker"], "none"), ("rrf", models["reranker"], "rrf")]
        if corpus == "heldout":  # what hard negatives and fine-tuning add: on the held-out queries
            variants += [("reranker-random", models["reranker-random"], "none"), ("base", models["base"], "none")]
        for row, model, fusion in variants:
            c = _merged(DEFAULT_CONFIG, where, embed={"model": ft.retriever},
                        rerank=ft.rerank(model=model, fusion=fusion), ray={"progress_bars": False})
            if corpus == "off-template":
                c = c.model_copy(update={"queries": reworded})
            m = _metrics(run(c, publish=False).run_dir, qrels)
            rows.setdefault("retrieval", m["retrieval"])
            rows[row] = m["rerank"]
        result[corpus] = rows
        log.info("seed %d %s: %s", seed, corpus, ", ".join(f"{r} {v['ndcg@10']:.3f}" for r, v in rows.items()))
    return result


def summarize(per_seed: dict[int, dict[str, dict[str, dict]]]) -> list[str]:
    """Markdown table: per corpus kind (held-out / new) and row, mean [min, max] over seeds (and corpora)."""
    kinds = {"held-out queries": lambda c: c == "heldout", "held-out, reworded": lambda c: c == "off-template",
             "new corpora": lambda c: c.startswith("new-")}
    lines = [f"| corpus | row | {' | '.join(METRICS)} | nDCG@10 - retrieval |", "|" + "---|" * (len(METRICS) + 3)]
    for kind, pick in kinds.items():
        for row in ROWS:
            cells_of = [per_seed[s][c] for s in per_seed for c in per_seed[s] if pick(c) and row in per_seed[s][c]]
            if not cells_of:
                continue
            vals = {m: [r[row][m] for r in cells_of] for m in METRICS}
            gain = [r[row]["ndcg@10"] - r["retrieval"]["ndcg@10"] for r in cells_of]
            cells = [f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in vals.values()]
            g = "-" if row == "retrieval" else f"{statistics.mean(gain):+.3f} [{min(gain):+.3f}, {max(gain):+.3f}]"
            lines.append(f"| {kind} | {row} | {' | '.join(cells)} | {g} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--new-corpora", type=int, default=2)
    ap.add_argument("--docs", type=int, default=640)
    ap.add_argument("--queries", type=int, default=160)
    ap.add_argument("--work", type=Path, help="keep samples, models and runs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=_common.LOG_FORMAT)
    for noisy in ("ray", "pipelines", "operators"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the benchmark's own local Ray only

    started = time.monotonic()
    per_seed: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mmr-bench-quality-") as tmp:
        work = args.work or Path(tmp)
        for s in args.seeds:
            per_seed[s] = one_seed(s, work, args.new_corpora, args.docs, args.queries)
            if args.json:  # after every seed: a late failure loses nothing measured
                args.json.write_text(json.dumps({"per_seed": per_seed}, indent=2))
    wall = time.monotonic() - started
    table = summarize(per_seed)
    cmd = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
    header = (f"`{cmd.strip()}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{wall / 60:.1f} min): seeds {args.seeds}, {args.new_corpora} new corpora each, "
              f"{args.docs} docs / {args.queries} queries per sample; mean [min, max]")
    print(header)  # noqa: T201
    print("\n".join(table))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps({"command": cmd, "wall_s": wall, "per_seed": per_seed, "table": table},
                                        indent=2))


if __name__ == "__main__":
    main()
