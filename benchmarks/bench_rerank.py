"""Rerank benchmark: the Ray rerank stage against the raw backend loop, on the same (query, candidate) pairs.

Backends: ``clip`` (a second open_clip model, ``ViT-B-32`` with seeded random weights by default) and
``vlm_yesno`` on the tiny random Qwen2-VL of ``tests/tiny_vlm.py`` (built offline into the workdir)::

    python benchmarks/bench_rerank.py                                  # both backends, 300 docs x 30 queries, k=20
    python benchmarks/bench_rerank.py --backends clip --json out.json --workdir /tmp/bench-rerank
    python benchmarks/bench_rerank.py --backends vlm_yesno --set rerank.batch_size=32
    python benchmarks/bench_rerank.py --plain-order query              # raw loop in query order (see below)
    python benchmarks/bench_rerank.py --rounds 3 --raw-layouts Nx1,1xN # + the one-process-all-threads row
    python benchmarks/bench_rerank.py --quick --wait-idle 0            # smoke

setup (not timed)
    ``make_sample`` (``--docs`` x ``--image-size`` px images in ``--shards`` shards, ``--queries`` queries), then
    embed / index (Flat) / search with the tiny embedder (``--embed-model``, default ``mmr-tiny``) on a local Ray
    in its own subprocess: ``runs/<id>/candidates`` holds queries x k pairs. Kept in ``--workdir`` and reused
    when the parameters match.

raw loop (one fresh subprocess, no Ray): the best plain loop on this box
    ``--raw-layouts`` (default ``Nx1``: as many one-thread worker processes as the stage has CPU actors, one per
    CPU; ``Nx1,1xN`` adds the one-process-all-threads row), ``_common.run_workers``: each worker (spawned,
    ``torch.set_num_threads``) builds the backend exactly as the pipeline's actor does
    (``operators.rerankers.base.create(reranker_spec(cfg.rerank, cfg))``) and reads its slice's query texts and
    the corpus rows its pairs point at (image bytes + caption) before it reports ready. The pairs are cut into
    equal contiguous slices, never splitting a doc. Timed from every worker ready until the last one is done:
    per batch of ``rerank.batch_size`` pairs, ``operators.decode.decode_image`` decodes each distinct doc once
    (as ``RerankPairs`` does) and ``backend.score`` scores. The pairs go in the pipeline's order by default
    (corpus shard, then row: how ``PairsSource`` streams them), so the batches hold the same mix of queries; this
    matters for ``clip``, which encodes each distinct query of a batch once. ``--plain-order query`` puts each
    query's candidates together instead (what a hand-written loop would do) to show what that order is worth.

ray stage (one fresh subprocess)
    ``ray.init`` (timed), then ``pipelines.rerank.run_rerank(cfg, run_id)`` on a copy of the same candidates,
    as ``mmrerank rerank`` runs it (it looks the corpus up in the embeddings cache itself). Thin subclasses /
    wrappers of ``RerankPairs``, ``ScoredSink``, ``PairsSource``, ``bucket_candidates`` and ``select_bucket``
    are swapped into ``pipelines.rerank``; they only append wall-clock timestamps to a file (microseconds per
    batch), the computation is the pipeline's own.

    * start-up = from before ``ray.init`` until the reranker actor's constructor returns (``ray.init``, driver
      planning, the ``bucket_candidates`` tasks, Ray Data start + actor process start + imports, model load;
      each shown separately). Time to the first scored batch is shown too.
    * steady = the window rule both sides share: pairs scored after the LAST actor was ready (a batch straddling
      that mark counts pro rata) / the time from that mark to the end of the last scored-pairs write (raw: pairs
      / the time from every worker ready to the last one done). Decode and score fall inside on both sides; reads
      happen where they happen (the stage's read tasks may run while its actors start; the raw workers read
      before they report ready). Idle time waiting for input counts against the stage.
    * tail = the rest: the ``select_bucket`` tasks (fusion + selection), row accounting, stats.
    * end-to-end = ``ray.init`` + ``run_rerank`` (``ray.shutdown`` is not counted).
    * ``--pipeline-runs 2`` runs the stage again in the same Ray session (pooled workers, imports done; a new
      actor still loads the model): the warm figures, never the headline.

peak RSS
    as ``bench_embed.py`` (its ``ProcSampler``): raw loop = ``ru_maxrss``; Ray side = the sum of per-process
    peaks (VmHWM) of the driver and every process Ray started (an upper bound), the sampled peak of the total
    at one instant, and the sampled peak total PSS (shared pages split: the fair total).

quiet machine
    The machine is shared. Before each timed side the benchmark waits (up to ``--wait-idle`` s) until the
    1-minute load average is below ``--max-load`` (default 1.0), and reports the load average before and after
    each side plus the CPU time other processes took while it ran (a warning above 5%).

Ratios (Ray / raw, the raw loop of the same round) are printed, never asserted. Target: steady >= 0.9.
``--rounds N`` alternates the sides N times; the final markdown table shows median [min, max] over the rounds
(the detailed report above it is each side's median round). ``--quick``: smoke sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (  # this script's directory is on sys.path; _common adds the repo root
    add_layout_arg,
    add_quiet_args,
    add_set_arg,
    apply_sets,
    cpus,
    event,
    finish_pipeline_side,
    fmt,
    items_after,
    layout_name,
    markdown_table,
    others_share,
    parse_layouts,
    parser,
    read_events,
    run_side,
    run_workers,
    side_env,
    side_logging,
    split_groups,
    spread,
    stop_ray,
    timed_actor,
    torch_threads,
    wait_quiet,
)

log = logging.getLogger("bench_rerank")
RUN_ID = "bench-candidates"
BACKENDS = ("clip", "vlm_yesno")


# --- helpers -----------------------------------------------------------------------------------------------


def _config(a: argparse.Namespace, backend: str, setup: dict[str, Any]) -> Any:
    """The pipeline config both sides use (the raw loop takes the backend spec and decode caps from it)."""
    from pipelines.config import parse_config

    rerank: dict[str, Any] = {"backend": backend, "batch_size": a.batch_size, "device": "cpu", "precision": "fp32"}
    if backend == "clip":
        rerank["clip_model"] = {"name": a.clip_model, "pretrained": None, "seed": 1}
    else:
        rerank["model"] = setup["vlm_dir"]
    data: dict[str, Any] = {
        "root": setup["root"], "corpus": setup["corpus"], "queries": setup["queries"],
        "ray": {"progress_bars": False},
        "embed": {"model": {"name": a.embed_model, "pretrained": None, "seed": 0}, "device": "cpu",
                  "precision": "fp32"},
        "index": {"factory": "Flat", "shards": 1},
        "search": {"k": a.k},
        "rerank": rerank,
    }
    return parse_config(apply_sets(data, a.set), "bench_rerank")


def _setup(a: argparse.Namespace) -> dict[str, Any]:
    return json.loads((Path(a.workdir) / "setup.json").read_text())


def _prepared(a: argparse.Namespace) -> dict[str, Any]:
    return json.loads((Path(a.workdir) / "prepared.json").read_text())


# --- setup: sample -> embed -> index -> search (not timed) -------------------------------------------------


def run_prepare(a: argparse.Namespace) -> dict[str, Any]:
    import ray

    from operators.storage import Storage
    from pipelines.embed import embed_kind
    from pipelines.index import build_index
    from pipelines.search import run_search

    setup = _setup(a)
    t = time.time()
    vlm = Path(setup["vlm_dir"])
    if not (vlm / "config.json").exists():
        from tests.tiny_vlm import save_tiny_vlm

        save_tiny_vlm(vlm)
    cfg = _config(a, "clip", setup)  # embed / index / search are the same for every backend
    storage = Storage(cfg.storage.options())
    corpus = embed_kind(cfg, "corpus", storage=storage)
    index = build_index(cfg, corpus, storage)
    s = run_search(cfg, run_id=RUN_ID, storage=storage, index=index)
    ray.shutdown()
    return {"run_id": RUN_ID, "candidates": s.candidates, "queries": s.queries_in, "k": s.k,
            "corpus_map": {sh.key: sh.source for sh in corpus.shards}, "prepare_s": time.time() - t,
            "retrieval_fp": corpus.model_fingerprint}


def _clear_rerank_caches(root: str, retrieval_fp: str) -> list[str]:
    """Remove every model's embedding cache but the retrieval model's: each timed run is then a first night for
    the clip reranker (it encodes the corpus, as the raw loop does), not a later night reading cached vectors."""
    from operators import layout as L

    keep = Path(L.embeddings_dir(root, retrieval_fp))
    gone = [d.name for d in keep.parent.iterdir() if d.is_dir() and d != keep]
    for name in gone:
        shutil.rmtree(keep.parent / name)
    return gone


# --- the raw loop ------------------------------------------------------------------------------------------


def _pairs_in_order(cand: Any, order: str) -> list[int]:
    """Row indices of the candidates table in the order the pairs are scored."""
    qids = cand.column("query_id").to_pylist()
    ranks = cand.column("rank").to_pylist()
    shards = cand.column("doc_shard").to_pylist()
    rows = cand.column("doc_row").to_pylist()
    if order == "query":
        return sorted(range(cand.num_rows), key=lambda i: (qids[i], ranks[i]))
    # PairsSource: corpus shards in key order, each shard's pairs by row (stable over the candidate parts)
    return sorted(range(cand.num_rows), key=lambda i: (shards[i], rows[i], i))


def _plain_init(payload: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """In a raw worker, before it reports ready: the backend, and its slice's queries, doc bytes and captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.rerankers.base import create
    from pipelines.context import reranker_spec

    a = argparse.Namespace(**payload["args"])
    setup, prep = _setup(a), _prepared(a)
    cfg = _config(a, a.backend, setup)
    t0 = time.perf_counter()
    spec = reranker_spec(cfg.rerank, cfg)
    backend = create(spec, "cpu", "fp32")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pairs = payload["pairs"][part[0]:part[1]]  # (row index, query text, shard, doc row)
    docs: dict[tuple[str, int], tuple[Any, Any]] = {}
    for key in sorted({p[2] for p in pairs}):
        rows = sorted({p[3] for p in pairs if p[2] == key})
        ct = pq.read_table(prep["corpus_map"][key], columns=["image", "text"]).take(pa.array(rows))
        docs.update(zip(((key, r) for r in rows), zip(ct.column("image").to_pylist(), ct.column("text").to_pylist(),
                                                         strict=True), strict=True))
    return {"backend": backend, "spec": spec, "cfg": cfg, "docs": docs, "pairs": pairs, "load_s": load_s,
            "read_s": time.perf_counter() - t1}


def _plain_work(state: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """In a raw worker, timed: per batch of ``rerank.batch_size`` pairs, decode each distinct doc once, score."""
    import numpy as np

    from operators import decode as R

    backend, spec, cfg, docs = state["backend"], state["spec"], state["cfg"], state["docs"]
    caps = cfg.embed
    pairs = state["pairs"]
    bs = cfg.rerank.batch_size
    scores = np.full(len(pairs), np.nan, np.float32)
    decode_s = score_s = 0.0
    uniq, batch_s = [], []
    for b in range(0, len(pairs), bs):
        chunk = pairs[b:b + bs]
        t = time.perf_counter()
        decoded: dict[tuple[str, int], Any] = {}  # one decode per distinct doc of the batch, as RerankPairs does
        for _, _, key, row in chunk:
            if (key, row) not in decoded:
                decoded[key, row] = R.decode_image(docs[key, row][0], caps.max_image_pixels, caps.allowed_formats)
        images = [decoded[key, row] for _, _, key, row in chunk]
        captions = [docs[key, row][1] if spec.use_caption else None for _, _, key, row in chunk]
        queries = [q for _, q, _, _ in chunk]
        t2 = time.perf_counter()
        scores[b:b + len(chunk)] = np.asarray(backend.score(queries, images, captions), dtype=np.float32)
        score_s += time.perf_counter() - t2
        decode_s += t2 - t
        batch_s.append(time.perf_counter() - t)
        uniq.append(len(set(queries)))
    return {"index": [i for i, _, _, _ in pairs], "scores": scores.tolist(), "decode_s": decode_s,
            "score_s": score_s, "batch_s": batch_s, "queries_per_batch": uniq, "load_s": state["load_s"],
            "read_s": state["read_s"]}


def run_plain(a: argparse.Namespace) -> dict[str, Any]:
    """The best plain loop: ``--plain-layout`` worker processes over equal doc-grouped slices of the pairs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_embed import ProcSampler

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    load0 = os.getloadavg()
    setup, prep = _setup(a), _prepared(a)
    workers, threads = parse_layouts(a.plain_layout)[0]
    cand_dir = Path(setup["root"]) / "runs" / prep["run_id"] / "candidates"
    cand = pa.concat_tables([pq.read_table(p) for p in sorted(cand_dir.glob("*.parquet"))])
    qt = pq.read_table(setup["queries"], columns=["query_id", "text"])
    qtext = dict(zip(qt.column("query_id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    order = _pairs_in_order(cand, a.plain_order)
    qids, dids = cand.column("query_id").to_pylist(), cand.column("doc_id").to_pylist()
    shards, rows = cand.column("doc_shard").to_pylist(), cand.column("doc_row").to_pylist()
    pairs = [(i, qtext[qids[i]], shards[i], rows[i]) for i in order]
    # Contiguous slices of the scoring order; in pipeline order a doc's pairs stay in one worker.
    slices = split_groups([(p[2], p[3]) for p in pairs] if a.plain_order == "pipeline" else list(range(len(pairs))),
                          workers)
    r = run_workers(_plain_init, _plain_work, {"args": vars(a), "pairs": pairs}, slices, threads)
    sampler.stop()

    scores = np.full(cand.num_rows, np.nan, np.float32)
    for w in r["workers_out"]:
        scores[w["index"]] = w["scores"]
    out_dir = Path(a.workdir) / f"plain-scores-{a.backend}"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "pairs.json").write_text(json.dumps([qids, dids]))
    np.save(out_dir / "scores.npy", scores)
    n = cand.num_rows
    ws = r["workers_out"]
    batch_s = sorted(x for w in ws for x in w["batch_s"])
    uniq = [x for w in ws for x in w["queries_per_batch"]]
    decode_s, score_s = max(w["decode_s"] for w in ws), max(w["score_s"] for w in ws)
    rss = sampler.report()
    return {
        "side": "plain", "backend": a.backend, "layout": [len(slices), threads], "torch_threads": threads,
        "workers": len(slices), "order": a.plain_order,
        "pairs": n, "batches": len(batch_s), "queries_per_batch": sum(uniq) / max(1, len(uniq)),
        "startup_s": r["startup_s"], "steady_s": r["steady_s"], "e2e_s": r["e2e_s"],
        "model_load_s": max(w["load_s"] for w in ws), "read_s": max(w["read_s"] for w in ws),
        "decode_s": decode_s, "score_s": score_s, "worker_busy_s": [w["t1"] - w["t0"] for w in ws],
        "steady_pairs_s": n / r["steady_s"], "e2e_pairs_s": n / r["e2e_s"],
        "score_rate_pairs_s": n / sum(w["decode_s"] + w["score_s"] for w in ws) * len(ws),
        "first_batch_s": ws[0]["batch_s"][0] if ws[0]["batch_s"] else None,
        "median_batch_s": batch_s[len(batch_s) // 2] if batch_s else None,
        "peak_rss_mb": rss["sum_of_process_peaks_mb"], "peak_pss_mb": sampler.peak_total_pss_kb / 1024,
        "rss": rss, "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
    }


# --- the Ray stage -----------------------------------------------------------------------------------------


def _timed_operators(events: str) -> dict[str, Any]:
    """Subclasses / wrappers of the stage's operators that only add timestamps (swapped into pipelines.rerank)."""
    from ray.data.datasource import ReadTask

    from operators.contracts import ID
    from operators.pair_source import PairsSource
    from operators.rerank_ops import RerankPairs, ScoredSink, bucket_candidates, select_bucket

    # A block of candidate docs: count its pairs and their distinct queries.
    TimedRerankPairs = timed_actor(  # noqa: N806 - a class
        RerankPairs, events, "score", init_rec=torch_threads,
        call_rec=lambda batch, out: {"rows": len(out[ID]), "queries": len({str(q) for q in out[ID]})})

    class TimedScoredSink(ScoredSink):
        def write_batch(self, batch: Any) -> Any:
            t0 = time.time()
            out = super().write_batch(batch)
            event(events, {"ev": "write", "pid": os.getpid(), "t0": t0, "t1": time.time(), "rows": len(batch[ID])})
            return out

    def timed_read(fn: Any) -> Any:
        def read() -> Any:
            t0 = time.time()
            rows = 0
            from operators.rerank_ops import pair_counts

            for block in fn():
                rows += int(pair_counts(block).sum())  # blocks are candidate docs with their pairs
                yield block
            event(events, {"ev": "read", "pid": os.getpid(), "t0": t0, "t1": time.time(), "rows": rows})

        return read

    class TimedPairsSource(PairsSource):
        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: object | None = None) -> list[Any]:
            tasks = super().get_read_tasks(parallelism, per_task_row_limit, data_context)
            return [ReadTask(timed_read(t.read_fn), t.metadata) for t in tasks]

    def timed_bucket(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        out = bucket_candidates(*args, **kwargs)
        event(events, {"ev": "bucket", "pid": os.getpid(), "t0": t0, "t1": time.time()})
        return out

    def timed_select(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        out = select_bucket(*args, **kwargs)
        event(events, {"ev": "select", "pid": os.getpid(), "t0": t0, "t1": time.time()})
        return out

    return {"RerankPairs": TimedRerankPairs, "ScoredSink": TimedScoredSink, "PairsSource": TimedPairsSource,
            "bucket_candidates": timed_bucket, "select_bucket": timed_select}


def _span(evs: list[dict[str, Any]]) -> tuple[float, float] | None:
    return (min(e["t0"] for e in evs), max(e["t1"] for e in evs)) if evs else None


def _summarise(events: list[dict[str, Any]], t_start: float, t_rr0: float, t_rr1: float, init_s: float,
               pairs: int) -> dict[str, Any]:
    def of(kind: str) -> list[dict[str, Any]]:
        return sorted((e for e in events if e["ev"] == kind), key=lambda e: e["t0"])

    actor, score, write, read, bucket, sel = (of(k) for k in ("actor_init", "score", "write", "read", "bucket",
                                                              "select"))
    ready = max((e["t1"] for e in actor), default=t_rr1)
    last_write = max((e["t1"] for e in write), default=t_rr1)
    b, r, s = _span(bucket), _span(read), _span(sel)
    busy = sum(e["t1"] - e["t0"] for e in score)
    e2e, startup = t_rr1 - t_start, ready - t_start
    steady = last_write - ready
    out: dict[str, Any] = {
        "pairs": pairs, "e2e_s": e2e, "stage_s": t_rr1 - t_rr0, "startup_s": startup, "steady_s": steady,
        "tail_s": t_rr1 - last_write,
        "startup_breakdown_s": {
            "ray_init": init_s,
            "driver_plan": (b[0] if b else ready) - t_rr0,
            "bucket_tasks": (b[1] - b[0]) if b else None,
            "to_actor_constructor": (min(e["t0"] for e in actor) - (b[1] if b else t_rr0)) if actor else None,
            "actor_model_load": max(e["t1"] - e["t0"] for e in actor) if actor else None,
        },
        "actor_process_start_after_buckets_s": (min(e["proc_start"] for e in actor) - (b[1] if b else t_rr0))
        if actor and all(e.get("proc_start") for e in actor) else None,
        "actors": len(actor), "actor_torch_threads": [e["torch_threads"] for e in actor],
        "time_to_first_scored_batch_s": (score[0]["t1"] - t_start) if score else None,
        "first_batch_after_ready_s": (score[0]["t0"] - ready) if score else None,
        "score_batches": len(score), "score_busy_s": busy,
        "first_batch_s": (score[0]["t1"] - score[0]["t0"]) if score else None,
        "median_batch_s": sorted(e["t1"] - e["t0"] for e in score)[len(score) // 2] if score else None,
        "actor_rate_pairs_s": sum(e["rows"] for e in score) / busy if busy else None,
        "actor_idle_in_window_s": (score[-1]["t1"] - score[0]["t0"] - busy) if score else None,
        "batch_sizes": sorted({e["rows"] for e in score}),
        "queries_per_batch": sum(e["queries"] for e in score) / max(1, len(score)),
        "read_tasks": len(read), "read_window_after_ready_s": [r[0] - ready, r[1] - ready] if r else None,
        "read_busy_s": sum(e["t1"] - e["t0"] for e in read),
        "writes": len(write), "write_busy_s": sum(e["t1"] - e["t0"] for e in write),
        "write_after_last_score_s": (last_write - score[-1]["t1"]) if score and write else None,
        "select_tasks": len(sel), "select_window_s": (s[1] - s[0]) if s else None,
        "select_start_after_last_write_s": (s[0] - last_write) if s else None,
    }
    # The window rule both sides share: pairs scored after the last actor was ready / the time from then.
    out["steady_pairs"] = items_after(score, ready)
    out["pairs_before_ready"] = pairs - out["steady_pairs"]
    out["steady_pairs_s"] = out["steady_pairs"] / steady if steady > 0 else None
    out["e2e_pairs_s"] = pairs / e2e
    out["stage_pairs_s"] = pairs / out["stage_s"]
    return out


def run_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    import ray
    from bench_embed import ProcSampler

    import pipelines.rerank as pr
    from pipelines.ray_env import ensure_ray

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    load0 = os.getloadavg()
    setup, prep = _setup(a), _prepared(a)
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"side": "pipeline", "backend": a.backend}
    try:
        for k in range(a.pipeline_runs):
            cfg = _config(a, a.backend, setup)
            run_id = f"bench-{a.backend}-{os.getpid()}-{k}"
            runs_dir = Path(setup["root"]) / "runs"
            shutil.rmtree(runs_dir / run_id, ignore_errors=True)
            shutil.copytree(runs_dir / prep["run_id"] / "candidates", runs_dir / run_id / "candidates")
            cleared = _clear_rerank_caches(setup["root"], prep["retrieval_fp"])
            if cleared:
                log.info("cleared the embedding caches of %s: the run encodes what it scores", cleared)
            events = Path(a.workdir) / f"pipeline-events-{a.backend}-{os.getpid()}-{k}.jsonl"
            events.unlink(missing_ok=True)
            for name, obj in _timed_operators(str(events)).items():
                setattr(pr, name, obj)
            t_start = time.time()
            init_s = 0.0
            if k == 0:
                ensure_ray(cfg.ray)
                init_s = time.time() - t_start
                result["cluster_resources"] = dict(ray.cluster_resources())
            t_rr0 = time.time()
            res = pr.run_rerank(cfg, run_id)
            t_rr1 = time.time()
            run = _summarise(read_events(events), t_start, t_rr0, t_rr1, init_s, res.pairs_in)
            run.update(warm=k > 0, run_id=run_id, pairs_scored=res.pairs_scored, pairs_rejected=res.pairs_rejected,
                       rerank_s=res.rerank_s, results=res.results)
            runs.append(run)
    finally:
        sampler.stop()
        stop_ray(result)
    finish_pipeline_side(result, runs, sampler)
    result["loadavg_start"], result["loadavg_end"] = list(load0), list(os.getloadavg())
    return result


# --- orchestration -----------------------------------------------------------------------------------------


def _side_cmd(a: argparse.Namespace, side: str, backend: str, result: Path, layout: str = "") -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--backend", backend,
           "--workdir", a.workdir, "--result", str(result), "--embed-model", a.embed_model,
           "--clip-model", a.clip_model, "--k", str(a.k), "--batch-size", str(a.batch_size),
           "--plain-order", a.plain_order, "--pipeline-runs", str(a.pipeline_runs),
           "--rss-interval", str(a.rss_interval), "--plain-layout", layout or "Nx1"]
    for s in a.set:
        cmd += ["--set", s]
    return cmd


def _run_side(a: argparse.Namespace, side: str, backend: str, tag: str, quiet: bool = True,
              layout: str = "") -> dict[str, Any]:
    wd = Path(a.workdir)
    tag = f"{layout}-{tag}" if layout else tag
    result = wd / f"result-{side}-{tag}.json"
    result.unlink(missing_ok=True)
    log = wd / f"{side}-{tag}.log"
    seen = wait_quiet(a.wait_idle, a.max_load) if quiet and a.wait_idle > 0 else None
    print(f"[bench] {side} side ({backend}; log {log}) ...", flush=True)
    wall = run_side(_side_cmd(a, side, backend, result, layout), log, f"{side} side", result=result, verbose=a.verbose,
                    env=side_env())
    r = json.loads(result.read_text())
    r["subprocess_wall_s"] = wall
    r["quiet_wait"] = seen
    return r


def _ensure_sample(a: argparse.Namespace) -> dict[str, Any]:
    from pipelines.sample import load_sample_info, make_sample

    wd = Path(a.workdir)
    out = wd / f"sample-{a.docs}-{a.queries}-{a.shards}-{a.image_size}-{a.seed}"
    if (out / "sample.json").exists():
        info = load_sample_info(str(out))
    else:
        info = make_sample(str(out), docs=a.docs, queries=a.queries, shards=a.shards, seed=a.seed,
                           image_size=a.image_size)
    return {"corpus": info.corpus, "queries": info.queries, "root": str(wd / f"root-{out.name}"),
            "vlm_dir": str(wd / "tiny-vlm"), "sample": str(out)}


def _check_scores(a: argparse.Namespace, setup: dict[str, Any], pipe: dict[str, Any]) -> dict[str, Any]:
    """The Ray stage must have written the raw loop's scores (same backend, same pairs)."""
    import numpy as np
    import pyarrow.parquet as pq

    d = Path(a.workdir) / f"plain-scores-{pipe['backend']}"
    qids, dids = json.loads((d / "pairs.json").read_text())
    plain = np.load(d / "scores.npy")
    scored = Path(setup["root"]) / "runs" / pipe["runs"][0]["run_id"] / "scored"
    got: dict[tuple[str, str], float] = {}
    for p in sorted(scored.rglob("*.parquet")):
        t = pq.read_table(p, columns=["query_id", "doc_id", "rerank_score"])
        got.update(zip(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True),
                       t.column(2).to_pylist(), strict=True))
    diffs = [abs(got[(q, dd)] - float(s)) for q, dd, s in zip(qids, dids, plain, strict=True) if (q, dd) in got]
    return {"pairs_plain": len(qids), "pairs_pipeline": len(got), "matched": len(diffs),
            "max_abs_diff": max(diffs) if diffs else None}


def _report_backend(a: argparse.Namespace, backend: str, plain: dict[str, Any] | None,
                    pipe: dict[str, Any] | None, check: dict[str, Any] | None) -> dict[str, Any]:
    label = f"clip:{a.clip_model} (random weights)" if backend == "clip" else "vlm_yesno: tiny random Qwen2-VL"
    side = plain or pipe or {}
    print(f"\n=== rerank benchmark: {label}; {side.get('pairs')} pairs, batch {a.batch_size}, cpus {cpus()}"
          + (f", overrides {a.set}" if a.set else ""))
    rows = [("start-up (s)", "startup_s", 2), ("steady wall (s)", "steady_s", 2),
            ("steady throughput (pairs/s)", "steady_pairs_s", 1), ("end-to-end wall (s)", "e2e_s", 2),
            ("end-to-end throughput (pairs/s)", "e2e_pairs_s", 1), ("peak RSS (MB)", "peak_rss_mb", 0),
            ("peak PSS, sampled (MB)", "peak_pss_mb", 0)]
    print(f"  {'':34} {'raw loop':>10} {'ray stage':>10}")
    for name, key, nd in rows:
        print(f"  {name:34} {fmt((plain or {}).get(key), nd):>10} {fmt((pipe or {}).get(key), nd):>10}")
    out: dict[str, Any] = {"backend": backend, "label": label, "plain": plain, "pipeline": pipe, "score_check": check}
    if plain and pipe:
        out["ratio_steady"] = pipe["steady_pairs_s"] / plain["steady_pairs_s"]
        out["ratio_e2e"] = pipe["e2e_pairs_s"] / plain["e2e_pairs_s"]
        out["ratio_actor_rate"] = (pipe["actor_rate_pairs_s"] or 0) / plain["score_rate_pairs_s"]
        print(f"  {'ratio steady (ray / raw)':34} {out['ratio_steady']:>21.3f}   (target >= 0.9)")
        print(f"  {'ratio end-to-end':34} {out['ratio_e2e']:>21.3f}")
        print(f"  {'ratio decode+score rate only':34} {out['ratio_actor_rate']:>21.3f}   "
              "(actor busy time vs the raw loop's decode+score time)")
    if plain:
        print(f"  raw: {plain['workers']} worker process(es) x {plain['torch_threads']} torch thread(s); start-up = "
              f"spawn + imports + build the backend ({plain['model_load_s']:.2f} s) + read the slice "
              f"({plain['read_s']:.2f} s), until every worker is ready; steady = decode {plain['decode_s']:.2f} s + "
              f"score {plain['score_s']:.2f} s (slowest worker) in {plain['batches']} batches "
              f"({plain['queries_per_batch']:.1f} distinct queries per batch, order {plain['order']}), worker busy "
              f"{', '.join(f'{x:.2f}' for x in plain['worker_busy_s'])} s; median batch "
              f"{fmt(plain['median_batch_s'], 3)} s")
    if pipe:
        b = pipe["startup_breakdown_s"]
        print(f"  ray start-up = ray.init {fmt(b['ray_init'], 2)} + driver planning {fmt(b['driver_plan'], 2)} + "
              f"bucket_candidates tasks {fmt(b['bucket_tasks'], 2)} + Ray Data start & actor process/imports "
              f"{fmt(b['to_actor_constructor'], 2)} + model load {fmt(b['actor_model_load'], 2)} s; first scored "
              f"batch {fmt(pipe['time_to_first_scored_batch_s'], 2)} s after the start")
        print(f"  ray steady: actor busy {pipe['score_busy_s']:.2f} s in {pipe['score_batches']} batches "
              f"(sizes {pipe['batch_sizes']}, {pipe['queries_per_batch']:.1f} distinct queries per batch, "
              f"{fmt(pipe['actor_rate_pairs_s'], 1)} pairs/s while busy; first batch {fmt(pipe['first_batch_s'], 2)} s,"
              f" median {fmt(pipe['median_batch_s'], 3)} s), idle in its window "
              f"{fmt(pipe['actor_idle_in_window_s'], 2)} s, first batch {fmt(pipe['first_batch_after_ready_s'], 2)} s "
              f"after ready, last write {fmt(pipe['write_after_last_score_s'], 2)} s after the last batch; "
              f"{pipe['read_tasks']} read tasks ({pipe['read_busy_s']:.2f} s), {pipe['writes']} writes "
              f"({pipe['write_busy_s']:.2f} s); actor torch threads {pipe['actor_torch_threads']}")
        print(f"  ray tail {pipe['tail_s']:.2f} s: {pipe['select_tasks']} select tasks in "
              f"{fmt(pipe['select_window_s'], 2)} s, starting {fmt(pipe['select_start_after_last_write_s'], 2)} s "
              f"after the last write; run_rerank {pipe['stage_s']:.2f} s (Ray already up); ray.shutdown "
              f"{pipe['ray_shutdown_s']:.1f} s (not counted)")
        rss = pipe["rss"]
        print(f"  ray RSS: sum of per-process peaks {rss['sum_of_process_peaks_mb']:.0f} MB = driver "
              f"{rss['driver_mb']:.0f} + Ray workers {rss['ray_workers_mb']:.0f} + Ray system "
              f"{rss['ray_system_mb']:.0f} ({rss['processes']} processes); sampled peak total RSS "
              f"{rss['peak_total_rss_mb']:.0f} MB, PSS {rss['peak_total_pss_mb']:.0f} MB")
        for k, run in enumerate(pipe["runs"][1:], start=2):
            print(f"  warm run {k} (same Ray session): run_rerank {run['stage_s']:.2f} s, start-up "
                  f"{run['startup_s']:.2f} s (model load {fmt(run['startup_breakdown_s']['actor_model_load'], 2)}),"
                  f" steady {fmt(run['steady_pairs_s'], 1)} pairs/s, whole stage {run['stage_pairs_s']:.1f} pairs/s")
    for name, s in (("raw", plain), ("ray", pipe)):
        if not s:
            continue
        c = s["rss"]["cpu_s"]
        share, warn = others_share(c)
        q = s.get("quiet_wait") or {}
        print(f"  {name}: load average 1/5/15 min at start {'/'.join(f'{x:.2f}' for x in s['loadavg_start'])}, "
              f"at end {'/'.join(f'{x:.2f}' for x in s['loadavg_end'])}"
              + (f" (waited {q['waited_s']:.0f} s)" if q else "")
              + f"; other processes took {c['others']:.1f} CPU-s = {100 * share:.0f}% of {c['wall']:.0f} s x "
              f"{c['cores']} cores{warn}")
    if check:
        print(f"  scores: {check['matched']}/{check['pairs_plain']} pairs matched by (query, doc), max |diff| "
              f"{fmt(check['max_abs_diff'], 7) if check['max_abs_diff'] is not None else '-'}")
    return out


def _table(a: argparse.Namespace, backend: str, rs: dict[str, list[dict[str, Any]]], layouts: list[str]) -> str:
    """The markdown table: every side's figures over the rounds, ratios to the first raw layout's same round."""
    label = f"clip:{a.clip_model} (random weights)" if backend == "clip" else "vlm_yesno: tiny random Qwen2-VL"
    ref = rs.get(f"plain-{layouts[0]}") if layouts else None
    rows = []
    for name, runs in rs.items():
        what = (f"raw loop, {layout_name(parse_layouts(name[6:])[0])}" if name.startswith("plain-")
                else "ray stage")

        def ratio(key: str, runs: list[dict[str, Any]] = runs) -> str:
            if not ref:
                return "-"
            return spread([r[key] / p[key] if r.get(key) and p.get(key) else None
                           for r, p in zip(runs, ref, strict=True)], 3)

        rows.append([what, spread([r["steady_pairs_s"] for r in runs]), ratio("steady_pairs_s"),
                     spread([r["e2e_pairs_s"] for r in runs]), ratio("e2e_pairs_s"),
                     spread([r["startup_s"] for r in runs], 2), spread([r["steady_s"] for r in runs], 2),
                     spread([r["peak_pss_mb"] for r in runs], 0)])
    pairs = next(iter(rs.values()))[0]["pairs"] if rs else "-"
    head = ["side", "steady pairs/s", "steady ratio", "end-to-end pairs/s", "e2e ratio", "start-up s", "steady s",
            "peak PSS MB"]
    notes = [f"{pairs} pairs ({a.queries} queries x k={a.k} over {a.docs} docs of {a.image_size} px), batch "
             f"{a.batch_size}, raw order {a.plain_order}" + (f", overrides {a.set}" if a.set else "") + ".",
             "steady = pairs scored after the last actor (raw: every worker) was ready / the time from then to the "
             "last scored write (raw: the last worker done); decode and score inside, reads before it where they "
             "happened there (raw workers read their slice's bytes while loading the model). Ratios: to the "
             f"raw loop ({layout_name(parse_layouts(layouts[0])[0]) if layouts else '-'}) of the same round."]
    return markdown_table(f"bench_rerank: {label}", head, rows, a.rounds, notes)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--backends", default="clip,vlm_yesno", help="comma separated: clip, vlm_yesno")
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip name for the clip backend (random weights)")
    ap.add_argument("--embed-model", default="mmr-tiny", help="embedder that produces the candidates (setup only)")
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=20, help="candidates per query (pairs = queries x k)")
    ap.add_argument("--batch-size", type=int, default=16, help="rerank.batch_size, both sides")
    ap.add_argument("--plain-order", choices=["pipeline", "query"], default="pipeline",
                    help="order of the pairs in the raw loop (see the module docstring)")
    add_layout_arg(ap)
    add_set_arg(ap, "rerank.torch_threads=1")
    ap.add_argument("--sides", default="plain,pipeline")
    ap.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=1,
                    help="alternating rounds of every side; the table shows median [min, max]")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 24 docs x 4 queries, k=6, mmr-tiny clip")
    ap.add_argument("--pipeline-runs", type=int, default=1, help="run_rerank runs in one Ray session (first = headline)")
    ap.add_argument("--rss-interval", type=float, default=1.0)
    add_quiet_args(ap)
    ap.add_argument("--workdir", help="sample, setup and outputs (default: a new temp dir); reused when kept")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--side", choices=["prepare", "plain", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=BACKENDS, default="clip", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--plain-layout", default="Nx1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick and not a.side:
        a.docs, a.queries, a.k, a.shards, a.image_size, a.clip_model = 24, 4, 6, 2, 64, "mmr-tiny"

    if a.side:
        side_logging()
        fn = {"prepare": run_prepare, "plain": run_plain, "pipeline": run_pipeline}[a.side]
        Path(a.result).write_text(json.dumps(fn(a), indent=2))
        return

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise SystemExit(f"--backends: unknown {bad}; choose from {list(BACKENDS)}")
    a.workdir = str(Path(a.workdir or tempfile.mkdtemp(prefix="mmr-bench-rerank-")).resolve())
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t = time.time()
    setup = _ensure_sample(a)
    (wd / "setup.json").write_text(json.dumps(setup, indent=2))
    # "prepared": bumped when prepared.json gains a field (2: retrieval_fp), so an older workdir is prepared again.
    params = {"embed_model": a.embed_model, "k": a.k, "sample": setup["sample"], "set": a.set, "prepared": 2}
    prep_file = wd / "prepared.json"
    prep = json.loads(prep_file.read_text()) if prep_file.exists() else None
    if not prep or prep.get("params") != params:
        shutil.rmtree(setup["root"], ignore_errors=True)
        prep = _run_side(a, "prepare", "clip", "setup", quiet=False)
        prep["params"] = params
        prep_file.write_text(json.dumps(prep, indent=2))
    print(f"[bench] setup: sample {setup['sample']}, {prep['candidates']} candidate pairs ({prep['queries']} queries "
          f"x k={prep['k']}) from {a.embed_model} ({time.time() - t:.1f} s, not timed)", flush=True)

    sides = [s.strip() for s in a.sides.split(",") if s.strip() in ("plain", "pipeline")]
    report: dict[str, Any] = {"cpus": cpus(), "docs": a.docs, "queries": a.queries, "k": a.k,
                              "image_size": a.image_size, "batch_size": a.batch_size, "workdir": a.workdir,
                              "pairs": prep["candidates"], "loadavg_rule": f"1-min load average < {a.max_load}",
                              "backends": {}}
    layouts = [f"{w}x{t}" for w, t in parse_layouts(a.raw_layouts)] if "plain" in sides else []
    names = [f"plain-{lay}" for lay in layouts] + (["pipeline"] if "pipeline" in sides else [])
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for backend in backends:
        results[backend] = {s: [] for s in names}
        for rnd in range(a.rounds):
            for name in names:
                side, _, lay = name.partition("-")
                results[backend][name].append(_run_side(a, side, backend, f"{backend}-{rnd}", layout=lay))
    tables = []
    for backend in backends:
        rs = results[backend]
        # The detailed report is of the median round (by steady pairs/s) of each side.
        mid = {s: sorted(v, key=lambda r: r["steady_pairs_s"] or 0)[(len(v) - 1) // 2] for s, v in rs.items()}
        plain = mid.get(f"plain-{layouts[0]}") if layouts else None
        pipe = mid.get("pipeline")
        check = _check_scores(a, setup, pipe) if plain and pipe else None
        out = _report_backend(a, backend, plain, pipe, check)
        out["all_runs"] = rs
        report["backends"][backend] = out
        tables.append(_table(a, backend, rs, layouts))
    print("\n\n" + "\n\n".join(tables), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
        print(f"\n[bench] results written to {a.json}")


if __name__ == "__main__":
    main()
