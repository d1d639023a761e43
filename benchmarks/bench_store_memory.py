"""Memory of the serve app's in-memory results (``pipelines.serve.store``) per million result rows.

    python benchmarks/bench_store_memory.py                          # 1M rows: 100k queries x 10, 400k docs
    python benchmarks/bench_store_memory.py --queries 20000 --per-query 50 --docs 100000 --json /tmp/store.json

Builds a results table shaped as a run's ``results/`` files (query and doc ids as the sample writes them,
random scores), then the columns the store holds, with the store's own ``sorted_columns``. Reported: the bytes
of the held columns (Arrow buffers and numpy arrays), of the query-id index (the dict, its keys and span
tuples, by ``sys.getsizeof``), and the process's RSS before the table was built and after it was dropped with
only the store's columns kept (includes allocator slack). Nothing is asserted; the figures are bytes, not
timings, so the machine's load does not move them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.serve.store import sorted_columns  # noqa: E402

log = logging.getLogger("bench_store_memory")


def results_table(queries: int, per_query: int, docs: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = queries * per_query
    qids = np.repeat(np.array([f"q{i:07d}" for i in range(queries)], dtype=object), per_query)
    dids = np.array([f"doc-{i:07d}" for i in range(docs)], dtype=object)[rng.integers(0, docs, n)]
    return pa.table({
        "query_id": pa.array(qids, pa.string()), "doc_id": pa.array(dids, pa.string()),
        "rank": pa.array(np.tile(np.arange(1, per_query + 1, dtype=np.int32), queries)),
        **{c: pa.array(rng.random(n, dtype=np.float32)) for c in ("retrieval_score", "rerank_score", "final_score")},
    })


def held_bytes(cols: dict[str, Any]) -> dict[str, int]:
    index = sys.getsizeof(cols["offsets"]) + sum(sys.getsizeof(k) + sys.getsizeof(v) + 2 * sys.getsizeof(v[0])
                                                 for k, v in cols["offsets"].items())
    doc = cols["doc_id"]
    return {"query_index": index, "doc_id_indices": doc.indices.nbytes, "doc_id_dictionary": doc.dictionary.nbytes,
            "rank_and_scores": sum(cols[c].nbytes for c in ("rank", "retrieval_score", "rerank_score", "final_score"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--per-query", type=int, default=10)
    ap.add_argument("--docs", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    t = results_table(a.queries, a.per_query, a.docs, a.seed)
    cols = sorted_columns(t)
    del t
    gc.collect()
    rss1 = proc.memory_info().rss
    rows = len(cols["rank"])
    parts = held_bytes(cols)
    total = sum(parts.values())
    per_m = 1e6 / rows
    out = {"rows": rows, "queries": a.queries, "distinct_docs_asked": a.docs,
           "distinct_docs": len(cols["doc_id"].dictionary), "held_bytes": parts, "held_total": total,
           "held_mb_per_million_rows": round(total * per_m / 1e6, 1),
           "rss_growth_mb_per_million_rows": round((rss1 - rss0) * per_m / 1e6, 1)}
    log.info("%d rows, %d queries, %d distinct docs", rows, a.queries, out["distinct_docs"])
    for k, v in parts.items():
        log.info("  %-20s %8.1f MB", k, v / 1e6)
    log.info("held: %.1f MB per million rows; process RSS growth: %.1f MB per million rows",
             out["held_mb_per_million_rows"], out["rss_growth_mb_per_million_rows"])
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
