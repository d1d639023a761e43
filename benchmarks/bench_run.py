"""Whole-run benchmark: ``mmrerank run`` on sample data against the sum of raw per-stage loops (no Ray).

    python benchmarks/bench_run.py                                     # 2000 docs, 100 queries, k=20, ViT-B-32 x2
    python benchmarks/bench_run.py --docs 500 --queries 20             # a quicker look (start-up weighs more)
    python benchmarks/bench_run.py --json out.json --workdir /tmp/bench-run
    python benchmarks/bench_run.py --rerank-model mmr-tiny             # a tiny clip reranker instead
    python benchmarks/bench_run.py --set index.shards=1 --set rerank.batch_size=32
    python benchmarks/bench_run.py --no-trace                          # the console script itself, untouched
    python benchmarks/bench_run.py --rounds 3 --raw-layouts Nx1,1xN    # + the one-process-all-threads row
    python benchmarks/bench_run.py --quick --wait-idle 0               # smoke

data and config
    ``make_sample`` (``--docs`` images of ``--image-size`` px in ``--shards`` shards, ``--queries`` queries; not
    timed). One YAML config, used by both sides: ``embed.model`` = ``--embed-model`` (default ``ViT-B-32``,
    ``pretrained: null``, seeded random weights), ``rerank: {backend: clip, clip_model: --rerank-model}``
    (default ``ViT-B-32`` random, seed 1), ``index.factory: Flat`` (``index.shards`` left at the pipeline
    default, 2), ``search.k`` = ``--k``, the rest at the pipeline defaults (embed batch 32, rerank batch 16,
    top_n 10, no fusion); ``--set KEY=VALUE`` overrides. Device: the CPU, fp32.

raw loops (one fresh subprocess, no Ray): the best plain loops on this box
    The model stages run in ``--raw-layouts`` worker processes (default ``Nx1``: one one-thread process per CPU,
    as many as the pipeline's CPU actors; ``Nx1,1xN`` adds the one-process-all-threads row),
    ``_common.run_workers``, each over an equal slice. A stage's wall = the driver's planning + the slowest
    worker's model load and reads + the time from every worker ready until the last is done (process spawn and
    imports are shown, not counted: the one-process loop's imports were not counted either).
    embed_corpus   driver: the doc ids (duplicates and nulls rejected); workers: resolve + build the open_clip
                   model, read their slice's image bytes, then decode + ``image_transform`` + ``encode_image`` in
                   batches of ``embed.batch_size``, L2-normalised;
    embed_queries  in the same workers after their images (the model loaded once): tokenize + ``encode_text``
                   their slice of the queries; wall = from the last image batch to the last worker done;
    index          driver, ``faiss.IndexFlatIP`` + ``add`` (all CPUs);
    search         driver, one ``index.search(queries, k)``;
    rerank         the pairs grouped by doc and cut into slices that never split a doc; workers: build the
                   backend (``create(reranker_spec(cfg.rerank, cfg))``), read their docs' image + caption, then
                   decode each distinct doc once; clip (the stage scores cached vectors): encode each distinct
                   doc once and each distinct query once, score = dot product; other backends: ``score`` in
                   batches of ``rerank.batch_size`` pairs in doc order;
    select         driver, ``operators.fusion.fuse`` + ``select`` per query, results written to one parquet file.
    Nothing else is written (the pipeline also writes its caches, candidates, scored pairs, manifest).

pipeline (one fresh subprocess, so Python start-up, imports and the Ray start are all counted)
    ``mmrerank run <config> --run-id bench`` on a fresh root. By default the subprocess is this file, which
    swaps thin timing subclasses into the pipeline modules (embedders, decode, searchers, router, reranker
    actor, index/rerank tasks, and each stage function of ``pipelines.run``: they only append timestamps to a
    file) and then calls ``pipelines.cli.main`` exactly as the console script does; ``--no-trace`` runs the
    console script itself (no per-stage breakdown beyond ``stats.json``). Reported: the subprocess wall time
    (the headline), ``stats.json`` ``wall_s`` (``run()`` itself) and each stage's ``wall_s``; with tracing also
    per stage: ``ray.init``, actor start (from the stage start until its actors' constructors return: Ray
    Data start, worker process start, imports, model / index load), model load alone, the actors' busy time,
    and what follows the last batch (write tail, markers, checks).

ratios (printed, never asserted)
    headline = pipeline subprocess wall / sum of the raw stage loops (target <= 1.2 with ViT-B-32 here);
    also ``run()`` wall / raw sum, and pipeline subprocess wall / raw subprocess wall (both with imports).
    ``--rounds N`` alternates raw and pipeline N times; the final markdown table shows median [min, max] over the
    rounds, ratios per round (the detailed report above it is the median round). ``--quick``: smoke sizes.

quiet machine
    before each side: wait (up to ``--wait-idle`` s) until the 1-minute load average is below ``--max-load``
    (default 1.0); each side reports the load average before/after and the CPU other processes took.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    fmt,
    layout_name,
    markdown_table,
    others_share,
    parse_layouts,
    parser,
    proc_start_time,
    read_events,
    run_side,
    run_workers,
    side_env,
    side_logging,
    split_even,
    split_groups,
    spread,
    timed_actor,
    wait_quiet,
)

RUN_ID = "bench"
STAGES = ("embed_corpus", "index", "embed_queries", "search", "rerank", "rejects")


# --- helpers -----------------------------------------------------------------------------------------------


def _config_dict(a: argparse.Namespace, corpus: str, queries: str, root: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "root": root, "corpus": corpus, "queries": queries,
        "ray": {"progress_bars": False},
        "embed": {"model": {"name": a.embed_model, "pretrained": None, "seed": 0}},
        "index": {"factory": "Flat"},
        "search": {"k": a.k},
        "rerank": {"backend": "clip", "clip_model": {"name": a.rerank_model, "pretrained": None, "seed": 1}},
    }
    return apply_sets(data, a.set)


# --- the raw loops -----------------------------------------------------------------------------------------


def _embed_init(payload: dict[str, Any], part: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """embed_corpus worker, before ready: the embed model, its slice's image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.models import build_model, image_transform, resolve_model
    from pipelines.config import load_config

    cfg = load_config(payload["config"])
    rm = resolve_model(cfg.embed.model)
    model, tokenizer = build_model(rm, "cpu", "fp32")
    items = payload["items"][slice(*part["img"])]  # (shard index, row)
    data: dict[tuple[int, int], Any] = {}
    for si in sorted({si for si, _ in items}):
        rows = [r for s_, r in items if s_ == si]
        col = pq.read_table(payload["shards"][si], columns=["image"]).take(pa.array(rows)).column(0).to_pylist()
        data.update(zip(((si, r) for r in rows), col, strict=True))
    return {"model": model, "tokenizer": tokenizer, "tf": image_transform(rm.preprocess), "cfg": cfg,
            "items": items, "data": data, "queries": payload["queries"][slice(*part["q"])], "q0": part["q"][0]}


def _embed_work(state: dict[str, Any], part: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """embed_corpus worker, timed: decode, preprocess, encode its images; then encode its slice of the queries."""
    import numpy as np
    import torch

    from operators import decode as R
    from operators.contracts import RejectError

    e, model, tf = state["cfg"].embed, state["model"], state["tf"]
    ok: list[tuple[int, int]] = []
    embs: list[Any] = []
    buf: list[Any] = []
    rejected = 0

    def flush() -> None:
        with torch.inference_mode():
            embs.append(torch.nn.functional.normalize(model.encode_image(torch.from_numpy(np.stack(buf))).float(),
                                                      dim=-1).numpy())
        buf.clear()

    for loc in state["items"]:
        try:
            img = R.decode_image(state["data"][loc], e.max_image_pixels, e.allowed_formats, e.max_image_bytes)
        except RejectError:
            rejected += 1
            continue
        buf.append(tf(img).numpy())
        ok.append(loc)
        if len(buf) == e.batch_size:
            flush()
    if buf:
        flush()
    t_img = time.time()
    qv = []
    qt = state["queries"]
    with torch.inference_mode():
        for b in range(0, len(qt), e.batch_size):
            qv.append(torch.nn.functional.normalize(
                model.encode_text(state["tokenizer"](qt[b:b + e.batch_size])).float(), dim=-1).numpy())
    return {"locs": ok, "emb": np.concatenate(embs) if embs else None, "rejected": rejected, "t_img": t_img,
            "qv": np.concatenate(qv) if qv else None, "q0": state["q0"]}


def _rerank_init(payload: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """rerank worker, before ready: the reranker, the bytes and captions of its slice's distinct docs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.rerankers.base import create
    from pipelines.config import load_config
    from pipelines.context import reranker_spec

    cfg = load_config(payload["config"])
    t = time.perf_counter()
    spec = reranker_spec(cfg.rerank, cfg)
    backend = create(spec, "cpu", "fp32")
    load_s = time.perf_counter() - t
    pairs = payload["pairs"][part[0]:part[1]]  # (pair index, query index, shard index, row)
    docs: dict[tuple[int, int], tuple[Any, Any]] = {}
    for si in sorted({p[2] for p in pairs}):
        rows = sorted({p[3] for p in pairs if p[2] == si})
        t2 = pq.read_table(payload["shards"][si], columns=["image", "text"]).take(pa.array(rows))
        docs.update(zip(((si, r) for r in rows), zip(t2.column(0).to_pylist(), t2.column(1).to_pylist(), strict=True),
                        strict=True))
    return {"backend": backend, "spec": spec, "cfg": cfg, "pairs": pairs, "docs": docs,
            "queries": payload["queries"], "load_s": load_s}


def _rerank_work(state: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """rerank worker, timed: each distinct doc decoded once (clip: encoded once, each query encoded once, scores =
    dot products, as the stage scores cached vectors); other backends: ``score`` batches in doc order."""
    import numpy as np
    import torch

    from operators import decode as R

    backend, spec, cfg, pairs, docs = state["backend"], state["spec"], state["cfg"], state["pairs"], state["docs"]
    e = cfg.embed
    t = time.perf_counter()
    images = {k: R.decode_image(v[0], e.max_image_pixels, e.allowed_formats) for k, v in docs.items()}
    decode_s = time.perf_counter() - t
    qtexts = state["queries"]
    if cfg.rerank.backend == "clip":
        uniq = sorted(images)
        with torch.inference_mode():
            vec: dict[Any, Any] = {}
            for i in range(0, len(uniq), e.batch_size):
                x = torch.stack([backend.transform(images[k]) for k in uniq[i:i + e.batch_size]])
                vec.update(zip(uniq[i:i + e.batch_size],
                               torch.nn.functional.normalize(backend.model.encode_image(x).float(), dim=-1), strict=True))
            uq = sorted({p[1] for p in pairs})
            tv: dict[int, Any] = {}
            for i in range(0, len(uq), e.batch_size):
                tok = backend.tokenizer([qtexts[q] for q in uq[i:i + e.batch_size]])
                tv.update(zip(uq[i:i + e.batch_size],
                              torch.nn.functional.normalize(backend.model.encode_text(tok).float(), dim=-1), strict=True))
            scores = np.array([float(vec[(p[2], p[3])] @ tv[p[1]]) for p in pairs], np.float32)
    else:
        bs = cfg.rerank.batch_size
        scores = np.zeros(len(pairs), np.float32)
        for i in range(0, len(pairs), bs):
            ch = pairs[i:i + bs]
            scores[i:i + bs] = backend.score([qtexts[p[1]] for p in ch], [images[(p[2], p[3])] for p in ch],
                                             [docs[(p[2], p[3])][1] if spec.use_caption else None for p in ch])
    return {"index": [p[0] for p in pairs], "scores": scores, "decode_s": decode_s, "load_s": state["load_s"],
            "docs": len(images)}


def run_raw(a: argparse.Namespace) -> dict[str, Any]:
    """The raw loops, stage by stage; embed_corpus and rerank (the model stages) in ``--raw-layout`` workers."""
    import faiss
    import numpy as np
    import open_clip  # noqa: F401 - imported before the clock starts, as the loops' other libraries
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from bench_embed import ProcSampler

    from operators import fusion
    from operators.shards import list_shards
    from operators.storage import Storage
    from pipelines.config import load_config

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    load0 = os.getloadavg()
    t_imports = time.time()
    workers, threads = parse_layouts(a.raw_layout)[0]
    torch.set_num_threads(cpus())  # the driver's own small steps (index, search) use every CPU
    faiss.omp_set_num_threads(cpus())
    cfg = load_config(a.config)
    rc = cfg.rerank
    storage = Storage()
    shards = list_shards(cfg.corpus, storage)
    stages: dict[str, dict[str, Any]] = {}

    # embed_corpus (+ embed_queries in the same workers, the model loaded once) ------------------------------
    t = time.perf_counter()
    items: list[tuple[int, int]] = []
    ids_of: dict[tuple[int, int], str] = {}
    seen: set[str] = set()
    dup = 0
    for si, uri in enumerate(shards):  # the doc ids (duplicates and nulls are rejected, as the pipeline does)
        for row, doc_id in enumerate(pq.read_table(uri, columns=["doc_id"]).column(0).to_pylist()):
            if doc_id is None or doc_id in seen:
                dup += 1
                continue
            seen.add(doc_id)
            items.append((si, row))
            ids_of[(si, row)] = doc_id
    qt = pa.concat_tables([pq.read_table(u, columns=["query_id", "text"]) for u in list_shards(cfg.queries, storage)])
    qids, qtexts = qt.column("query_id").to_pylist(), qt.column("text").to_pylist()
    plan_s = time.perf_counter() - t
    img = split_even(len(items), workers)
    qs = split_even(len(qtexts), len(img))
    parts = [{"img": sl, "q": qs[i] if i < len(qs) else (0, 0)} for i, sl in enumerate(img)]
    r = run_workers(_embed_init, _embed_work, {"config": a.config, "shards": shards, "items": items, "queries": qtexts},
                    parts, threads)
    ws = r["workers_out"]
    t_go = min(w["t0"] for w in ws)
    img_end = max(w["t_img"] for w in ws)
    locs = [loc for w in ws for loc in w["locs"]]
    ids = [ids_of[loc] for loc in locs]
    dv = np.concatenate([w["emb"] for w in ws if w["emb"] is not None])
    qm = np.concatenate([w["qv"] for w in sorted(ws, key=lambda w: w["q0"]) if w["qv"] is not None])
    stages["embed_corpus"] = {"wall_s": plan_s + r["init_s_max"] + (img_end - t_go), "model_load_and_read_s":
                              r["init_s_max"], "compute_s": img_end - t_go, "rows": len(ids),
                              "rejected": dup + sum(w["rejected"] for w in ws), "workers": len(ws),
                              "spawn_and_imports_s": r["startup_s"] - r["init_s_max"]}
    stages["embed_queries"] = {"wall_s": max(0.0, max(w["t1"] for w in ws) - img_end), "rows": len(qids)}

    # index ------------------------------------------------------------------------------------------
    t = time.perf_counter()
    index = faiss.IndexFlatIP(dv.shape[1])
    index.add(np.ascontiguousarray(dv, dtype=np.float32))
    stages["index"] = {"wall_s": time.perf_counter() - t, "rows": int(index.ntotal)}

    # search -----------------------------------------------------------------------------------------
    t = time.perf_counter()
    dist, nn = index.search(np.ascontiguousarray(qm, dtype=np.float32), cfg.search.k)
    stages["search"] = {"wall_s": time.perf_counter() - t, "rows": len(qids), "candidates": int((nn >= 0).sum())}

    # rerank: pairs grouped by doc, each distinct doc decoded (clip: encoded) once, as the stage does ---------
    t = time.perf_counter()
    pairs = [(qi, int(j)) for qi in range(len(qids)) for j in nn[qi] if j >= 0]  # query by query, rank order
    by_doc = sorted(range(len(pairs)), key=lambda n: locs[pairs[n][1]])
    plist = [(n, pairs[n][0], *locs[pairs[n][1]]) for n in by_doc]
    slices = split_groups([(p[2], p[3]) for p in plist], workers)
    plan_s = time.perf_counter() - t
    r = run_workers(_rerank_init, _rerank_work, {"config": a.config, "shards": shards, "pairs": plist,
                                                 "queries": qtexts}, slices, threads)
    scores = np.zeros(len(pairs), np.float32)
    for w in r["workers_out"]:
        scores[w["index"]] = w["scores"]
    stages["rerank"] = {"wall_s": plan_s + r["init_s_max"] + r["steady_s"], "model_load_and_read_s": r["init_s_max"],
                        "compute_s": r["steady_s"], "decode_s": max(w["decode_s"] for w in r["workers_out"]),
                        "rows": len(pairs), "docs": sum(w["docs"] for w in r["workers_out"]),
                        "workers": len(r["workers_out"]), "spawn_and_imports_s": r["startup_s"] - r["init_s_max"]}

    # select -----------------------------------------------------------------------------------------
    t = time.perf_counter()
    rr: dict[int, dict[int, float]] = {}
    for (qi, j), s in zip(pairs, scores, strict=True):
        rr.setdefault(qi, {})[j] = float(s)
    out_rows: list[dict[str, Any]] = []
    for qi in range(len(qids)):
        cands = [int(j) for j in nn[qi] if j >= 0]
        docs = [ids[j] for j in cands]
        ret = np.array([dist[qi][n] for n in range(len(cands))], np.float64)
        rs = np.array([rr[qi][j] for j in cands], np.float64)
        final = fusion.fuse(ret, rs, docs, **rc.fusion.model_dump())
        for rank, n in enumerate(fusion.select(final, docs, **rc.selection.model_dump()), start=1):
            out_rows.append({"query_id": qids[qi], "rank": rank, "doc_id": docs[n], "retrieval_score": float(ret[n]),
                             "rerank_score": float(rs[n]), "final_score": float(final[n])})
    pq.write_table(pa.Table.from_pylist(out_rows), Path(a.workdir) / "raw-results.parquet")
    stages["select"] = {"wall_s": time.perf_counter() - t, "rows": len(out_rows)}
    sampler.stop()
    (Path(a.workdir) / "raw-candidates.json").write_text(json.dumps(
        {qids[qi]: [ids[int(j)] for j in nn[qi] if j >= 0] for qi in range(len(qids))}))
    rss = sampler.report()
    return {"side": "raw", "layout": [workers, threads], "torch_threads": threads, "stages": stages,
            "sum_s": sum(s["wall_s"] for s in stages.values()),
            "imports_s": t_imports - (proc_start_time() or t_imports),
            "peak_rss_mb": rss["sum_of_process_peaks_mb"],
            "peak_pss_mb": sampler.peak_total_pss_kb / 1024, "rss": rss,
            "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}


# --- the traced pipeline -----------------------------------------------------------------------------------


def _install_tracing(events: str) -> None:
    """Swap timing subclasses / wrappers into the pipeline modules (the computation stays the pipeline's)."""
    import pipelines.embed as pe
    import pipelines.index as pi
    import pipelines.rerank as pr
    import pipelines.run as prun
    import pipelines.search as ps

    def actor(base: type, label: str) -> type:
        return timed_actor(base, events, "batch", name=base.__name__, tags={"cls": label})

    def searcher(base: type) -> type:
        class TimedSearcher(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                t0 = time.time()
                super().__init__(*args, **kwargs)
                event(events, {"ev": "actor_init", "cls": "ShardSearcher", "pid": os.getpid(),
                               "proc_start": proc_start_time(), "t0": t0, "t1": time.time()})

        TimedSearcher.__name__ = TimedSearcher.__qualname__ = base.__name__
        return TimedSearcher

    def decode(base: type) -> type:
        class TimedDecode(base):  # type: ignore[misc, valid-type]
            def __call__(self, batch: Any) -> Any:
                t0 = time.time()
                out = super().__call__(batch)
                event(events, {"ev": "batch", "cls": "DecodeImages", "pid": os.getpid(), "t0": t0, "t1": time.time()})
                return out

        return TimedDecode

    def task(fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            out = fn(*args, **kwargs)
            event(events, {"ev": "task", "cls": label, "pid": os.getpid(), "t0": t0, "t1": time.time()})
            return out

        timed.__name__ = fn.__name__
        return timed

    def span(fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = f"{label}:{args[1]}" if label == "embed_kind" and len(args) > 1 else label
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                event(events, {"ev": "span", "cls": name, "t0": t0, "t1": time.time()})

        return timed

    def ray_init(fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            import ray

            fresh = not ray.is_initialized()
            t0 = time.time()
            out = fn(*args, **kwargs)
            if fresh:
                event(events, {"ev": "span", "cls": "ray_init", "t0": t0, "t1": time.time()})
            return out

        return timed

    pe.ImageEmbedder = actor(pe.ImageEmbedder, "ImageEmbedder")
    pe.TextEmbedder = actor(pe.TextEmbedder, "TextEmbedder")
    pe.DecodeImages = decode(pe.DecodeImages)
    ps.SearchRouter = actor(ps.SearchRouter, "SearchRouter")
    ps.ShardSearcher = searcher(ps.ShardSearcher)
    pr.RerankPairs = actor(pr.RerankPairs, "RerankPairs")
    pr.bucket_candidates = task(pr.bucket_candidates, "bucket_candidates")
    pr.select_bucket = task(pr.select_bucket, "select_bucket")
    pi.build_shard = task(pi.build_shard, "index_build")
    for mod in (pe, pi, pr, ps, prun):
        mod.ensure_ray = ray_init(mod.ensure_ray)
    for name in ("preflight", "embed_kind", "build_index", "run_search", "run_rerank", "_collect_embed_rejects",
                 "write_manifest", "advance_latest"):
        setattr(prun, name, span(getattr(prun, name), name))


def run_pipeline_traced(a: argparse.Namespace) -> None:
    """The subprocess of the pipeline side: ``mmrerank run`` plus timestamps (see the module docstring)."""
    t_main = time.time()
    from bench_embed import ProcSampler

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    from pipelines.cli import main as cli_main

    events = Path(a.workdir) / "pipeline-events.jsonl"
    events.unlink(missing_ok=True)
    _install_tracing(str(events))
    t_cli = time.time()
    rc = cli_main(["run", a.config, "--run-id", RUN_ID])
    t_done = time.time()
    import ray

    if ray.is_initialized():
        ray.shutdown()  # what the console script's interpreter exit does anyway; timed apart here
    t_shut = time.time()
    sampler.stop()
    Path(a.result).write_text(json.dumps({
        "rc": rc, "proc_start": proc_start_time(), "t_main": t_main, "t_cli": t_cli, "t_done": t_done,
        "t_shutdown": t_shut, "rss": sampler.report(),
        "driver_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=2))
    sys.exit(rc)


def _stage_breakdown(events: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage: ray.init, actor start, model load, actors' busy time, time after the last batch."""
    spans = [e for e in events if e["ev"] == "span"]
    names = {"embed_corpus": "embed_kind:corpus", "index": "build_index", "embed_queries": "embed_kind:queries",
             "search": "run_search", "rerank": "run_rerank", "rejects": "_collect_embed_rejects"}
    main_cls = {"embed_corpus": "ImageEmbedder", "embed_queries": "TextEmbedder", "search": "SearchRouter",
                "rerank": "RerankPairs"}
    # Actors by stage (an actor of another stage started inside a span is not this stage's).
    stage_actors = {"embed_corpus": {"ImageEmbedder"}, "embed_queries": {"TextEmbedder"},
                    "search": {"SearchRouter", "ShardSearcher"}, "rerank": {"RerankPairs"}}
    out: dict[str, dict[str, Any]] = {}
    for stage, label in names.items():
        sp = [s for s in spans if s["cls"] == label]
        if not sp:
            continue
        t0, t1 = sp[0]["t0"], sp[0]["t1"]

        def inside(e: dict[str, Any], t0: float = t0, t1: float = t1) -> bool:
            return t0 - 1e-3 <= e["t0"] <= t1 + 1e-3

        ins = [e for e in events if e["ev"] != "span" and inside(e)]
        init = [s for s in spans if s["cls"] == "ray_init" and inside(s)]
        actors = [e for e in ins if e["ev"] == "actor_init" and e["cls"] in stage_actors.get(stage, ())]
        batches = [e for e in ins if e["ev"] == "batch" and e["cls"] == main_cls.get(stage)]
        decode = [e for e in ins if e["ev"] == "batch" and e["cls"] == "DecodeImages"]
        tasks = [e for e in ins if e["ev"] == "task"]
        rec: dict[str, Any] = {
            "wall_s": stats["stages"].get(stage, {}).get("wall_s", t1 - t0), "span_s": t1 - t0,
            "ray_init_s": sum(s["t1"] - s["t0"] for s in init),
            "actors": sorted({e["cls"] for e in actors}),
            "actor_ready_after_start_s": (max(e["t1"] for e in actors) - t0) if actors else None,
            "model_or_index_load_s": max(e["t1"] - e["t0"] for e in actors) if actors else None,
            "busy_s": sum(e["t1"] - e["t0"] for e in batches), "batches": len(batches),
            "decode_busy_s": sum(e["t1"] - e["t0"] for e in decode),
            "tasks": {c: sum(e["t1"] - e["t0"] for e in tasks if e["cls"] == c) for c in sorted({e["cls"] for e in tasks})},
            "after_last_batch_s": (t1 - max(e["t1"] for e in batches)) if batches else None,
            "first_batch_after_start_s": (min(e["t0"] for e in batches) - t0) if batches else None,
        }
        out[stage] = rec
    return out


# --- orchestration -----------------------------------------------------------------------------------------


def _run_raw(a: argparse.Namespace, cfg_path: Path, layout: str, rnd: int) -> dict[str, Any]:
    wd = Path(a.workdir)
    result, log = wd / f"result-raw-{layout}-{rnd}.json", wd / f"raw-{layout}-{rnd}.log"
    result.unlink(missing_ok=True)
    seen = wait_quiet(a.wait_idle, a.max_load) if a.wait_idle > 0 else None
    print(f"[bench] raw loops (log {log}) ...", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "raw", "--config", str(cfg_path),
           "--workdir", a.workdir, "--result", str(result), "--raw-layout", layout,
           "--rss-interval", str(a.rss_interval)]
    wall = run_side(cmd, log, "raw side", result=result, env=side_env())
    r = json.loads(result.read_text())
    r.update(process_wall_s=wall, quiet_wait=seen)
    return r


def _run_pipeline(a: argparse.Namespace, cfg_path: Path, root: Path) -> dict[str, Any]:
    from bench_embed import ProcSampler

    wd = Path(a.workdir)
    shutil.rmtree(root, ignore_errors=True)  # fresh: no embeddings cache, no index, no earlier run
    result, log = wd / "result-pipeline.json", wd / "pipeline.log"
    result.unlink(missing_ok=True)
    seen = wait_quiet(a.wait_idle, a.max_load) if a.wait_idle > 0 else None
    load0 = os.getloadavg()
    if a.no_trace:
        mmrerank = Path(sys.executable).parent / "mmrerank"
        cmd = [str(mmrerank), "run", str(cfg_path), "--run-id", RUN_ID]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "pipeline", "--config", str(cfg_path),
               "--workdir", a.workdir, "--result", str(result), "--rss-interval", str(a.rss_interval)]
    print(f"[bench] pipeline: {' '.join(cmd[:4])} ... (log {log})", flush=True)
    sampler = ProcSampler(a.rss_interval) if a.no_trace else None  # traced: the child samples itself
    if sampler:
        sampler.start()
    t = time.time()
    try:
        wall = run_side(cmd, log, "pipeline", env=side_env())
    finally:
        if sampler:
            sampler.stop()
    stats = json.loads((root / "runs" / RUN_ID / "stats.json").read_text())
    r: dict[str, Any] = {"side": "pipeline", "process_wall_s": wall, "run_wall_s": stats["wall_s"],
                         "stages": {k: stats["stages"][k] for k in STAGES if k in stats["stages"]},
                         "quiet_wait": seen, "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
                         "traced": not a.no_trace, "cmd": cmd}
    if sampler:
        r["rss"] = sampler.report()
    else:
        child = json.loads(result.read_text())
        r["rss"] = child["rss"]
        events = read_events(wd / "pipeline-events.jsonl")
        r["breakdown"] = _stage_breakdown(events, stats)
        start = child["proc_start"] or t
        spans = {e["cls"]: e["t1"] - e["t0"] for e in events if e["ev"] == "span" and e["cls"] in ("preflight", "ray_init")}
        r["process"] = {"python_start_and_imports_s": child["t_cli"] - start,
                        "preflight_s": spans.get("preflight"), "ray_init_s": spans.get("ray_init"),
                        "cli_main_s": child["t_done"] - child["t_cli"],
                        "ray_shutdown_s": child["t_shutdown"] - child["t_done"],
                        "exit_s": (t + wall) - child["t_shutdown"]}
    r["peak_rss_mb"] = r["rss"]["sum_of_process_peaks_mb"]
    r["peak_pss_mb"] = r["rss"]["peak_total_pss_mb"]
    return r


def _compare(a: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Same model, same exact search: same candidates (up to ties) and, from them, the same results."""
    import numpy as np
    import pyarrow.parquet as pq

    wd = Path(a.workdir)
    run = root / "runs" / RUN_ID
    raw_c = json.loads((wd / "raw-candidates.json").read_text())
    pc = pq.read_table(sorted((run / "candidates").glob("*.parquet")))
    pipe_c: dict[str, set[str]] = {}
    for q, d in zip(pc.column("query_id").to_pylist(), pc.column("doc_id").to_pylist(), strict=True):
        pipe_c.setdefault(q, set()).add(d)
    overlap = [len(set(v) & pipe_c.get(q, set())) / max(1, len(v)) for q, v in raw_c.items()]
    raw_r = pq.read_table(wd / "raw-results.parquet").to_pylist()
    pipe_r = pq.read_table(sorted((run / "results").glob("*.parquet"))).to_pylist()
    rk = {(r["query_id"], r["doc_id"]): r for r in raw_r}
    diffs = [abs(r["rerank_score"] - rk[(r["query_id"], r["doc_id"])]["rerank_score"]) for r in pipe_r
             if (r["query_id"], r["doc_id"]) in rk]
    same_top = sum(
        [r["doc_id"] for r in sorted((x for x in raw_r if x["query_id"] == q), key=lambda x: x["rank"])]
        == [r["doc_id"] for r in sorted((x for x in pipe_r if x["query_id"] == q), key=lambda x: x["rank"])]
        for q in raw_c)
    return {"queries": len(raw_c), "candidate_overlap_mean": float(np.mean(overlap)) if overlap else None,
            "results_raw": len(raw_r), "results_pipeline": len(pipe_r), "queries_same_results": same_top,
            "rerank_max_abs_diff": max(diffs) if diffs else None}


def _report(a: argparse.Namespace, raw: dict[str, Any], pipe: dict[str, Any], check: dict[str, Any] | None,
            n: dict[str, Any]) -> dict[str, Any]:
    rs, ps = raw["stages"], pipe["stages"]
    raw_stage = {
        "embed_corpus": rs["embed_corpus"]["wall_s"], "index": rs["index"]["wall_s"],
        "embed_queries": rs["embed_queries"]["wall_s"], "search": rs["search"]["wall_s"],
        "rerank": rs["rerank"]["wall_s"] + rs["select"]["wall_s"], "rejects": 0.0,
    }
    bd = pipe.get("breakdown") or {}
    print(f"\nwhole-run benchmark: {n['docs']} docs ({n['image_size']} px), {n['queries']} queries, k={a.k}, "
          f"embed {a.embed_model} + rerank clip:{a.rerank_model} (random weights), index Flat, cpus {cpus()}"
          + (f", overrides {a.set}" if a.set else ""))
    print(f"  {'stage':<14} {'raw s':>7} {'ray s':>7} {'ray-raw':>8} {'ray.init':>8} {'to ready':>8} "
          f"{'load':>6} {'busy':>7} {'tail':>6}   raw detail")
    for st in STAGES:
        b = bd.get(st, {})
        r = rs.get(st, {})
        detail = ""
        if st == "embed_corpus":
            detail = (f"{r['workers']} workers: model load + read {r['model_load_and_read_s']:.1f} + decode/prep/"
                      f"encode {r['compute_s']:.1f} (spawn + imports {r['spawn_and_imports_s']:.1f}, not counted)")
        elif st == "rerank":
            rr = rs["rerank"]
            detail = (f"{rr['workers']} workers: load + read {rr['model_load_and_read_s']:.1f} + decode/score "
                      f"{rr['compute_s']:.1f} (decode {rr['decode_s']:.2f}) + select {rs['select']['wall_s']:.2f} "
                      f"({rr['rows']} pairs over {rr['docs']} docs, each decoded/encoded once)")
        pw = ps.get(st, {}).get("wall_s")
        print(f"  {st:<14} {raw_stage[st]:>7.2f} {fmt(pw, 2):>7} "
              f"{fmt(pw - raw_stage[st] if pw is not None else None, 2):>8} "
              f"{fmt(b.get('ray_init_s') or None, 2):>8} {fmt(b.get('actor_ready_after_start_s'), 2):>8} "
              f"{fmt(b.get('model_or_index_load_s'), 2):>6} {fmt(b.get('busy_s') or None, 2):>7} "
              f"{fmt(b.get('after_last_batch_s'), 2):>6}   {detail}")
    stage_sum = sum(s.get("wall_s", 0.0) for s in ps.values())
    print(f"  {'sum of stages':<14} {raw['sum_s']:>7.2f} {stage_sum:>7.2f}")
    print(f"  {'run() wall':<14} {'':>7} {pipe['run_wall_s']:>7.2f}   (stages + preflight, stage markers, manifest, "
          f"LATEST: {pipe['run_wall_s'] - stage_sum:.2f} s)")
    print(f"  {'process wall':<14} {raw['process_wall_s']:>7.2f} {pipe['process_wall_s']:>7.2f}   (fresh "
          "interpreter, imports, Ray start and shutdown included)")
    if pipe.get("process"):
        p = pipe["process"]
        print(f"    pipeline process: python start + imports {p['python_start_and_imports_s']:.2f} s, cli main "
              f"{p['cli_main_s']:.2f} s, ray.shutdown {p['ray_shutdown_s']:.2f} s, exit {p['exit_s']:.2f} s")
        if p.get("preflight_s") is not None and p.get("ray_init_s") is not None:
            print(f"    in cli main: preflight {p['preflight_s']:.2f} s and ray.init {p['ray_init_s']:.2f} s "
                  "(run at once)")
    out = {"ratio_headline": pipe["process_wall_s"] / raw["sum_s"], "ratio_run": pipe["run_wall_s"] / raw["sum_s"],
           "ratio_process": pipe["process_wall_s"] / raw["process_wall_s"]}
    print(f"  ratio `mmrerank run` process wall / sum of raw stage loops: {out['ratio_headline']:.3f}   "
          "(target <= 1.2)")
    print(f"  ratio run() wall / sum of raw stage loops:                  {out['ratio_run']:.3f}")
    print(f"  ratio pipeline process wall / raw process wall:             {out['ratio_process']:.3f}")
    if bd:
        print("  columns (pipeline, traced): ray.init inside the stage (when a stage started Ray); to ready = stage start until its actors' "
              "constructors returned (Ray Data start, worker start, imports, model/index load); load = the longest "
              "constructor; busy = the stage's main actor's batch time (embedders, router, reranker; decode "
              "tasks not included); tail = after the last batch (write tail, markers, selection)")
        extra = [f"{st}: " + ", ".join(f"{k} {v:.2f} s" for k, v in b["tasks"].items()) for st, b in bd.items()
                 if b.get("tasks")]
        dec = bd.get("embed_corpus", {}).get("decode_busy_s")
        if extra or dec:
            print("  tasks: " + "; ".join(extra) + (f"; embed_corpus decode tasks {dec:.2f} s" if dec else ""))
    for name, s in (("raw", raw), ("pipeline", pipe)):
        c = s["rss"]["cpu_s"]
        share, warn = others_share(c)
        q = s.get("quiet_wait") or {}
        print(f"  {name}: peak RSS {s['peak_rss_mb']:.0f} MB, sampled peak PSS {s['peak_pss_mb']:.0f} MB; load average "
              f"at start {'/'.join(f'{x:.2f}' for x in s['loadavg_start'])}, at end "
              f"{'/'.join(f'{x:.2f}' for x in s['loadavg_end'])}" + (f" (waited {q['waited_s']:.0f} s)" if q else "")
              + f"; other processes took {c['others']:.1f} CPU-s = {100 * share:.0f}% of {c['wall']:.0f} s x "
              f"{c['cores']} cores{warn}")
    if check:
        print(f"  check: candidates overlap {fmt(check['candidate_overlap_mean'], 3)}, {check['queries_same_results']}/"
              f"{check['queries']} queries with identical results, rerank score max |diff| "
              f"{fmt(check['rerank_max_abs_diff'], 7)}")
    return {**out, "raw_stage_s": raw_stage}


def _table(a: argparse.Namespace, raws: dict[str, list[dict[str, Any]]], pipes: list[dict[str, Any]],
           layouts: list[str], n: dict[str, Any]) -> str:
    """The markdown table over the rounds: stage walls, sums, and the ratios to the first raw layout's round."""
    ref = raws[layouts[0]]

    def raw_stage(r: dict[str, Any], st: str) -> float:
        s = r["stages"]
        return s[st]["wall_s"] + (s["select"]["wall_s"] if st == "rerank" else 0.0) if st in s else 0.0

    head = ["figure (s)"] + [f"raw, {layout_name(parse_layouts(lay)[0])}" for lay in layouts] + ["pipeline",
                                                                                                "pipeline / raw"]
    rows = []
    for st in STAGES:
        p = [x["stages"].get(st, {}).get("wall_s") for x in pipes]
        rows.append([st] + [spread([raw_stage(r, st) for r in raws[lay]], 2) for lay in layouts] + [
            spread(p, 2), spread([pp / raw_stage(r, st) if pp is not None and raw_stage(r, st) else None
                                  for pp, r in zip(p, ref, strict=True)], 2)])
    rows.append(["sum of stages"] + [spread([r["sum_s"] for r in raws[lay]], 2) for lay in layouts] + [
        spread([sum(s.get("wall_s", 0.0) for s in x["stages"].values()) for x in pipes], 2), ""])
    rows.append(["`mmrerank run` process wall (headline: / raw sum)"] + ["" for _ in layouts] + [
        spread([x["process_wall_s"] for x in pipes], 2),
        "**" + spread([x["process_wall_s"] / r["sum_s"] for x, r in zip(pipes, ref, strict=True)], 3) + "**"])
    rows.append(["run() wall (/ raw sum)"] + ["" for _ in layouts] + [
        spread([x["run_wall_s"] for x in pipes], 2),
        spread([x["run_wall_s"] / r["sum_s"] for x, r in zip(pipes, ref, strict=True)], 3)])
    notes = [f"{n['docs']} docs ({n['image_size']} px), {n['queries']} queries, k={a.k}, embed {a.embed_model} + "
             f"rerank clip:{a.rerank_model} (random weights), index Flat" + (f", overrides {a.set}" if a.set else "")
             + ".",
             "raw: embed_corpus and rerank in one-thread worker processes (the layout), each over an equal slice; a "
             "stage's wall = the slowest worker's model load + reads, then the time from every worker ready to the "
             "last done (spawn and imports not counted, as the imports of the one-process loop were not); rerank "
             "decodes and encodes each distinct candidate doc once and each query once, as the stage does; "
             "rerank row includes select. Ratios: to the first raw layout of the same round."]
    return markdown_table("bench_run: `mmrerank run` against the raw stage loops", head, rows, a.rounds, notes)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    # ~9 min on 2 cores. The pipeline's fixed start-up (Ray, one actor process + imports + model per model
    # stage: ~35 s here) does not grow with the data; at 500 docs it is a third of the job.
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--embed-model", default="ViT-B-32")
    ap.add_argument("--rerank-model", default="ViT-B-32", help="clip reranker model (random weights), e.g. mmr-tiny")
    add_set_arg(ap, "rerank.batch_size=32")
    add_layout_arg(ap)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (raw, pipeline, raw, ...)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 32 docs, 4 queries, k=5, mmr-tiny models")
    ap.add_argument("--sides", default="raw,pipeline")
    ap.add_argument("--no-trace", action="store_true", help="run the mmrerank console script itself")
    ap.add_argument("--rss-interval", type=float, default=1.0)
    add_quiet_args(ap)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    ap.add_argument("--side", choices=["raw", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--raw-layout", default="Nx1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick and not a.side:
        a.docs, a.queries, a.k, a.shards, a.image_size = 32, 4, 5, 2, 64
        a.embed_model = a.rerank_model = "mmr-tiny"

    if a.side:
        if a.side == "raw":
            side_logging()
            Path(a.result).write_text(json.dumps(run_raw(a), indent=2))
        else:
            run_pipeline_traced(a)
        return

    import yaml

    from pipelines.sample import load_sample_info, make_sample

    a.workdir = str(Path(a.workdir or tempfile.mkdtemp(prefix="mmr-bench-run-")).resolve())
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t = time.time()
    sdir = wd / f"sample-{a.docs}-{a.queries}-{a.shards}-{a.image_size}-{a.seed}"
    info = (load_sample_info(str(sdir)) if (sdir / "sample.json").exists() else
            make_sample(str(sdir), docs=a.docs, queries=a.queries, shards=a.shards, seed=a.seed,
                        image_size=a.image_size))
    root = wd / "pipeline-root"
    cfg_path = wd / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config_dict(a, info.corpus, info.queries, str(root)), sort_keys=False))
    print(f"[bench] sample {sdir} ({time.time() - t:.1f} s, not timed); config {cfg_path}", flush=True)
    sides = [s.strip() for s in a.sides.split(",")]
    layouts = [f"{w}x{t}" for w, t in parse_layouts(a.raw_layouts)] if "raw" in sides else []
    raws: dict[str, list[dict[str, Any]]] = {lay: [] for lay in layouts}
    pipes: list[dict[str, Any]] = []
    checks: list[dict[str, Any] | None] = []
    for rnd in range(a.rounds):
        for lay in layouts:
            raws[lay].append(_run_raw(a, cfg_path, lay, rnd))
        if "pipeline" in sides:
            pipes.append(_run_pipeline(a, cfg_path, root))
            checks.append(_compare(a, root) if layouts else None)
    n = {"docs": a.docs, "queries": a.queries, "image_size": a.image_size}
    report: dict[str, Any] = {"params": {**n, "k": a.k, "shards": a.shards, "embed_model": a.embed_model,
                                         "rerank_model": a.rerank_model, "set": a.set, "cpus": cpus()},
                              "config": yaml.safe_load(cfg_path.read_text()), "raw": raws, "pipeline": pipes}
    raw = raws[layouts[0]] if layouts else []
    if raw and pipes:
        # The detailed report: the median round (by pipeline process wall / raw sum).
        ratios = [p["process_wall_s"] / r["sum_s"] for r, p in zip(raw, pipes, strict=True)]
        k = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
        report.update(_report(a, raw[k], pipes[k], checks[k], n), check=checks[k], median_round=k + 1)
        print("\n" + _table(a, raws, pipes, layouts, n), flush=True)
    else:
        print(json.dumps({"raw": {k: [r["stages"] for r in v] for k, v in raws.items()},
                          "pipeline": [p["stages"] for p in pipes]}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
        print(f"\n[bench] results written to {a.json}")


if __name__ == "__main__":
    main()
