"""Rerank at scale: the doc-grouped rerank stage against the best plain loop, on a workload where docs repeat
across queries as in real query logs.

    python benchmarks/bench_rerank_scale.py --rounds 3                          # both backends
    python benchmarks/bench_rerank_scale.py --backends vlm_yesno --rounds 3     # #33: prefix sharing off / on / raw
    python benchmarks/bench_rerank_scale.py --quick                             # smoke: tiny sizes, one round
    python benchmarks/bench_rerank_scale.py --old-tree /tmp/mmr-old             # + the per-pair stage it replaced

``--old-tree`` is a checkout of the per-pair stage (``git worktree add /tmp/mmr-old d27ad02``).

workload (not timed; one per backend, kept in ``--workdir/<backend>``)
    ``make_sample`` (clip: ``--docs`` ``--image-size`` px images; vlm_yesno: ``--vlm-docs`` ``--vlm-image-size``
    px images, 448 px = 256 image tokens, so the image outnumbers the prompt), corpus embedded with ``mmr-tiny``
    (the retrieval cache gives each doc its ``(shard, row)``), then synthetic candidates: each query gets k
    distinct docs drawn with Zipf popularity (``--zipf``): a few docs recur across many queries. vlm_yesno's
    model is a random Qwen2-VL (``bench_prefix_sharing.build``; default ~34M parameters: a 4-block 384-wide
    vision tower, a 6-layer 512-wide language model) and its workload has >= 5 queries per doc on average
    (printed). clip: ViT-B-32, random weights.

sides (each a fresh subprocess; ``--rounds`` alternates them: side A, B, C, A, B, C, ...)
    * ``old``: ``run_rerank`` of ``--old-tree`` (pairs with a copy of their doc's content each).
    * ``stage`` (clip) / ``stage-off`` and ``stage-on`` (vlm_yesno, ``rerank.prefix_sharing`` off / on): this
      tree's ``run_rerank`` on a local Ray of the machine's CPUs (Ray started before, not counted). For clip a
      second night (a new run id, same corpus) follows. Timestamping subclasses (``bench_rerank``) show where
      the time goes: start-up (candidate regrouping, Ray Data start, actor process start, imports, model load,
      until the last actor is ready), the steady window, and the tail.
    * ``raw``: no Ray, the best plain loop: as many one-thread worker processes as the stage has actors
      (``--raw-layouts``, default one per CPU; ``_common.run_workers``), each over an equal slice of the pairs
      grouped by doc. A worker loads the backend and reads its docs' bytes and captions before it reports
      ready; then it decodes each distinct doc once and scores. clip: encodes each doc once and each query of
      its slice once, score = dot product; vlm_yesno: ``backend.score`` with ``prefix_sharing: off`` (the
      per-pair transformers forward) over batches of ``rerank.batch_size`` pairs in doc order.

figures
    whole = pairs / the stage's own wall (``RerankResult.rerank_s``: regrouping, actor start and model load,
    read, decode, score, write; not Ray start or selection); raw: pairs / (spawn until the last worker is done).
    steady = pairs finished after the last actor (worker) was ready / the time from then until the last scored
    write (the last worker done); a batch straddling that mark counts pro rata. Both sides decode and score in
    that window; their reads may happen before it (raw: always; the stage's read tasks run while its actors
    start). Ratios are to the raw loop of the same round; median [min, max] over rounds; never asserted.

object-store bytes per pair (clip workload)
    From the blocks the stage's read tasks produce, built here without Ray: the new source's doc blocks
    (``docs_for_shards``), the same docs after ``DecodeDocs`` (RGB pixels instead of bytes), and the per-pair
    layout of the old stage (each pair with its doc's content columns).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    add_layout_arg,
    items_after,
    layout_name,
    markdown_table,
    median,
    parse_layouts,
    read_events,
    run_workers,
    split_groups,
    spread,
)

log = logging.getLogger("bench_rerank_scale")
BACKENDS = ("clip", "vlm_yesno")


def _params(a: argparse.Namespace, backend: str) -> dict[str, Any]:
    """The workload parameters of one backend."""
    if backend == "clip":
        return {"docs": a.docs, "queries": a.queries, "k": a.k, "image_size": a.image_size}
    return {"docs": a.vlm_docs, "queries": a.vlm_queries, "k": a.vlm_k, "image_size": a.vlm_image_size,
            "model": [a.vision_dim, a.vision_depth, a.text_dim, a.text_layers]}


def _config(work: Path, backend: str, tree_root: Path | None = None, prefix: str = "auto",
            batch_size: int = 16) -> dict[str, Any]:
    rerank: dict[str, Any] = {"backend": backend, "batch_size": batch_size, "device": "cpu", "precision": "fp32"}
    if backend == "clip":
        rerank["clip_model"] = {"name": "ViT-B-32", "pretrained": None, "seed": 1}
    else:
        rerank["model"] = str(work / "vlm")
        if prefix != "auto":  # (the old tree has no such key)
            rerank["prefix_sharing"] = prefix
    return {"root": str(tree_root or work / "root"), "corpus": str(work / "sample" / "corpus"),
            "queries": str(work / "sample" / "queries"), "ray": {"progress_bars": False},
            "embed": {"model": {"name": "mmr-tiny", "pretrained": None, "seed": 0}, "device": "cpu"},
            "index": {"factory": "Flat", "shards": 1}, "search": {"k": 20}, "rerank": rerank}


def _files(path: str) -> list[str]:
    """A parquet file, or the parquet files of a directory."""
    p = Path(path)
    return sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]


# --- workload ------------------------------------------------------------------------------------------------


def prepare(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.embedding_cache import part_uris, read_vectors
    from operators.storage import Storage, join
    from pipelines.config import parse_config
    from pipelines.embed import embed_kind
    from pipelines.ray_env import ensure_ray
    from pipelines.sample import make_sample

    work = Path(a.workdir)
    p = _params(a, a.backend)
    info = make_sample(str(work / "sample"), docs=p["docs"], queries=p["queries"], shards=4, seed=3,
                       image_size=p["image_size"])
    n_params = None
    if a.backend == "vlm_yesno":
        from bench_prefix_sharing import build

        n_params = build(work / "vlm", *p["model"])
    cfg = parse_config(_config(work, "clip"))
    ensure_ray(cfg.ray)
    corpus = embed_kind(cfg, "corpus")
    storage = Storage()
    where = []  # (doc_id, shard key, row) of every embedded doc
    for s in corpus.shards:
        ids, rows, _ = read_vectors(storage, part_uris(storage, corpus.cache, s.key))
        where += [(d, s.key, int(r)) for d, r in zip(ids, rows.tolist(), strict=True)]
    rng = np.random.default_rng(7)
    pop = 1.0 / np.arange(1, len(where) + 1) ** a.zipf
    pop /= pop.sum()
    perm = rng.permutation(len(where))  # popularity unrelated to position in the corpus
    qids = pq.read_table(_files(info.queries), columns=["query_id"]).column(0).to_pylist()[: p["queries"]]
    cols: dict[str, list[Any]] = {"query_id": [], "rank": [], "doc_id": [], "retrieval_score": [],
                                  "doc_shard": [], "doc_row": []}
    for q in qids:
        picks = perm[rng.choice(len(where), min(p["k"], len(where)), replace=False, p=pop)]
        for rank, i in enumerate(picks, 1):
            d, key, row = where[i]
            for c, v in zip(cols, (q, rank, d, 1.0 - rank / 100, key, row), strict=True):
                cols[c].append(v)
    t = pa.table(cols).cast(pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
                                       ("retrieval_score", pa.float32()), ("doc_shard", pa.string()),
                                       ("doc_row", pa.int64())]))
    shutil.rmtree(work / "candidates", ignore_errors=True)
    for i in range(0, t.num_rows, 2000):
        storage.write_table(join(str(work / "candidates"), f"part-{i:08d}.parquet"), t.slice(i, 2000))
    docs = len(set(zip(cols["doc_shard"], cols["doc_row"], strict=True)))
    counts = np.unique(np.array([f"{s}/{r}" for s, r in zip(cols["doc_shard"], cols["doc_row"], strict=True)]),
                       return_counts=True)[1]
    return {"pairs": t.num_rows, "docs": docs, "queries": len(qids), "corpus_docs": len(where),
            "queries_per_doc": t.num_rows / max(1, docs), "image_size": p["image_size"],
            "max_pairs_per_doc": int(counts.max()), "docs_seen_once": int((counts == 1).sum()),
            "model_params": n_params}


def _fresh_run(root: Path, work: Path, run_id: str) -> None:
    dest = root / "runs" / run_id
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(work / "candidates", dest / "candidates")


# --- the stage -----------------------------------------------------------------------------------------------


def _stage_times(events: list[dict[str, Any]], t_call: float, pairs: int) -> dict[str, Any]:
    """Where the stage's time went, from the timestamping operators' events (see the module docstring)."""
    actor = [e for e in events if e["ev"] == "actor_init"]
    score = [e for e in events if e["ev"] == "score"]
    write = [e for e in events if e["ev"] == "write"]
    if not actor or not score:
        return {}
    ready = max(e["t1"] for e in actor)
    end = max((e["t1"] for e in write), default=max(e["t1"] for e in score))
    busy = sum(e["t1"] - e["t0"] for e in score)
    steady_pairs = items_after(score, ready)
    return {"startup_s": ready - t_call, "model_load_s": max(e["t1"] - e["t0"] for e in actor),
            "actors": len(actor), "actor_threads": [e.get("torch_threads") for e in actor],
            "steady_s": max(0.0, end - ready), "steady_pairs": steady_pairs,  # 0: all done before the last was ready
            "steady_pairs_per_s": steady_pairs / (end - ready) if end > ready else None,
            "pairs_before_ready": pairs - steady_pairs, "score_busy_s": busy,
            "busy_pairs_per_s": sum(e["rows"] for e in score) / busy if busy else None}


def side_stage(a: argparse.Namespace) -> dict[str, Any]:
    """One stage run (old or new tree, whichever ``pipelines`` this process imports)."""
    from pipelines.config import parse_config
    from pipelines.ray_env import ensure_ray

    work = Path(a.workdir)
    old = a.side == "old"
    root = work / f"root-{a.side}"
    if not (root / "embeddings").exists():  # the embedding cache of the corpus, as the workload's
        shutil.copytree(work / "root" / "embeddings", root / "embeddings")
    prefix = {"stage-off": "off", "stage-on": "on"}.get(a.side, "auto")
    cfg = parse_config(_config(work, a.backend, root, prefix, a.batch_size))
    ensure_ray(cfg.ray)
    import pipelines
    import pipelines.rerank as pr

    out: dict[str, Any] = {"tree": str(Path(pipelines.__file__).parent.parent), "prefix_sharing": prefix}
    for night in range(2 if a.side == "stage" and a.backend == "clip" else 1):
        run_id = f"{a.backend}-{a.side}-{a.round}-{night}"
        _fresh_run(root, work, run_id)
        events = work / f"events-{run_id}.jsonl"
        events.unlink(missing_ok=True)
        if not old:  # the old tree's operators differ: no tracing there
            from bench_rerank import _timed_operators

            for name, obj in _timed_operators(str(events)).items():
                setattr(pr, name, obj)
        t_call = time.time()
        r = pr.run_rerank(cfg, run_id)
        n = {"pairs": r.pairs_in, "rerank_s": r.rerank_s, "pairs_per_s": r.pairs_in / r.rerank_s,
             "docs_decoded": getattr(r, "docs_decoded", None),
             "clip_images_embedded": getattr(r, "clip_images_embedded", None)}
        n.update(_stage_times(read_events(events), t_call, r.pairs_in))
        out[f"night{night + 1}"] = n
    if a.side == "stage" and a.backend == "clip":  # next round's first night must encode again
        shutil.rmtree(root / "embeddings", ignore_errors=True)
        shutil.copytree(work / "root" / "embeddings", root / "embeddings")
    return out


# --- the raw loop: N one-thread worker processes ------------------------------------------------------------


def _raw_init(payload: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """In a worker, before it reports ready: the backend, and its docs' bytes and captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.rerankers.base import create
    from pipelines.config import parse_config
    from pipelines.context import reranker_spec

    work = Path(payload["workdir"])
    cfg = parse_config(_config(work, payload["backend"], prefix="off", batch_size=payload["batch_size"]))
    backend = create(reranker_spec(cfg.rerank, cfg), "cpu", "fp32")
    docs: dict[tuple[str, int], tuple[bytes, Any]] = {}
    keys = sorted({(k, r) for k, r, _ in part["pairs"]})
    for shard in sorted({k for k, _ in keys}):
        rows = [r for k, r in keys if k == shard]
        t = pq.read_table(payload["source"][shard], columns=["image", "text"]).take(pa.array(rows))
        docs.update(zip(((shard, r) for r in rows),
                        zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True), strict=True))
    return {"backend": backend, "docs": docs, "cfg": cfg}


def _raw_work(state: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """In a worker, timed: decode each distinct doc once, then score its pairs (see the module docstring)."""
    import numpy as np
    import torch

    from operators import decode as R

    backend, cfg, pairs = state["backend"], state["cfg"], part["pairs"]
    images = {k: R.decode_image(v[0], cfg.embed.max_image_pixels, cfg.embed.allowed_formats)
              for k, v in state["docs"].items()}
    keys = [(k, r) for k, r, _ in pairs]
    queries = [q for _, _, q in pairs]
    if cfg.rerank.backend == "clip":
        uniq = sorted(images)
        with torch.inference_mode():
            vec: dict[Any, Any] = {}
            for i in range(0, len(uniq), 64):
                x = torch.stack([backend.transform(images[k]) for k in uniq[i:i + 64]])
                v = torch.nn.functional.normalize(backend.model.encode_image(x).float(), dim=-1)
                vec.update(zip(uniq[i:i + 64], v, strict=True))
            uq = sorted(set(queries))
            tv: dict[str, Any] = {}
            for i in range(0, len(uq), 256):
                t = torch.nn.functional.normalize(backend.model.encode_text(backend.tokenizer(uq[i:i + 256])).float(),
                                                  dim=-1)
                tv.update(zip(uq[i:i + 256], t, strict=True))
            scores = np.array([float(vec[k] @ tv[q]) for k, q in zip(keys, queries, strict=True)], np.float32)
    else:
        bs = cfg.rerank.batch_size
        caps = {k: v[1] for k, v in state["docs"].items()}
        scores = np.zeros(len(pairs), np.float32)
        for i in range(0, len(pairs), bs):  # pairs of one doc together (the parent sorted them), as the stage
            ks = keys[i:i + bs]
            scores[i:i + bs] = backend.score(queries[i:i + bs], [images[k] for k in ks], [caps[k] for k in ks])
    return {"pairs": len(pairs), "docs": len(images), "scores_sum": float(scores.sum())}


def side_raw(a: argparse.Namespace) -> dict[str, Any]:
    """The best plain loop: ``--raw-layout`` worker processes over equal slices of the doc-sorted pairs."""
    import pyarrow.parquet as pq

    from pipelines.config import parse_config
    from pipelines.embed import embed_kind

    work = Path(a.workdir)
    cfg = parse_config(_config(work, a.backend))
    source = {s.key: s.source for s in embed_kind(cfg, "corpus").shards}  # cached: no work
    cand = pq.read_table(sorted(str(p) for p in (work / "candidates").glob("*.parquet")))
    qt = pq.read_table(_files(cfg.queries), columns=["query_id", "text"])
    qtext = dict(zip(qt.column(0).to_pylist(), qt.column(1).to_pylist(), strict=True))
    pairs = sorted(zip(cand.column("doc_shard").to_pylist(), cand.column("doc_row").to_pylist(),
                       (qtext[q] for q in cand.column("query_id").to_pylist()), strict=True))
    workers, threads = parse_layouts(a.raw_layout)[0]
    slices = split_groups([(k, r) for k, r, _ in pairs], workers)
    payload = {"workdir": str(work), "backend": a.backend, "batch_size": a.batch_size, "source": source}
    r = run_workers(_raw_init, _raw_work, payload, [{"pairs": pairs[s:e]} for s, e in slices], threads)
    n = len(pairs)
    return {"pairs": n, "layout": [len(slices), threads], "startup_s": r["startup_s"], "steady_s": r["steady_s"],
            "e2e_s": r["e2e_s"], "pairs_per_s": n / r["e2e_s"], "steady_pairs_per_s": n / r["steady_s"],
            "busy_s": [w["t1"] - w["t0"] for w in r["workers_out"]],
            "worker_pairs": [w["pairs"] for w in r["workers_out"]], "init_s_max": r["init_s_max"],
            "scores_sum": sum(w["scores_sum"] for w in r["workers_out"])}


# --- object-store bytes per pair ------------------------------------------------------------------------------


def block_bytes(a: argparse.Namespace) -> dict[str, Any]:
    """Object-store bytes per pair of the three block layouts (see the module docstring)."""
    import numpy as np
    import pyarrow as pa

    from operators.contracts import CORPUS, check_shard_schema
    from operators.rerank_ops import (
        DecodeDocs,
        bucket_candidates,
        docs_for_shards,
        pair_counts,
        row_group_starts,
    )
    from operators.storage import Storage, join
    from pipelines.config import parse_config
    from pipelines.embed import embed_kind

    work = Path(a.workdir)
    cfg = parse_config(_config(work, "clip"))
    storage = Storage()
    pairs_dir = str(work / "bytes-pairs")
    shutil.rmtree(pairs_dir, ignore_errors=True)
    for u in storage.ls(str(work / "candidates"), "*.parquet"):
        bucket_candidates(u, u.rsplit("/", 1)[-1][:-8], pairs_dir, _files(cfg.queries))
    new = rgb = old = pairs = 0
    dec = DecodeDocs(True, cfg.embed.max_image_pixels, cfg.embed.allowed_formats)
    for s in embed_kind(cfg, "corpus").shards:
        files = storage.ls(join(pairs_dir, s.key), "*.parquet")
        if not files:
            continue
        pf = storage.parquet_file(s.source)
        payload = check_shard_schema(pf.schema_arrow, CORPUS, s.source)
        assert row_group_starts(pf)
        for block in docs_for_shards([(s.source, payload, files, None, None, None)], None, 64):
            n = pair_counts(block)
            pairs += int(n.sum())
            new += block.nbytes
            rgb += dec(block).nbytes
            # The old layout: every pair a row with its doc's content columns (_pair_block).
            doc_of = pa.array(np.repeat(np.arange(block.num_rows), n))
            per_pair = pa.table({c: block.column(c).take(doc_of) for c in
                                 ("doc_id", "doc_shard", "doc_row", "doc_image", "doc_image_uri", "doc_caption",
                                  "_err_type", "_err_msg")})
            flat = {c: block.column(c).combine_chunks().flatten() for c in
                    ("p_query_id", "p_query_text", "p_rank", "p_score", "p_key", "p_row")}
            old += per_pair.nbytes + sum(v.nbytes for v in flat.values()) + 2 * 8 * int(n.sum())
    shutil.rmtree(pairs_dir, ignore_errors=True)
    return {"pairs": pairs, "old_per_pair": old / pairs, "new_per_pair": new / pairs, "new_rgb_per_pair": rgb / pairs}


# --- orchestration ------------------------------------------------------------------------------------------


def _run_side(a: argparse.Namespace, side: str, backend: str, rnd: int, layout: str = "") -> dict[str, Any]:
    work = Path(a.workdir) / backend
    tag = f"{side}{'-' + layout if layout else ''}-{rnd}"
    out = work / f"side-{tag}.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tree = a.old_tree if side == "old" else str(REPO)
    env["PYTHONPATH"] = os.pathsep.join([tree, str(REPO)])  # the old tree's packages shadow this one's
    cmd = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(work), "--side", side,
           "--backend", backend, "--round", str(rnd), "--out", str(out), "--batch-size", str(a.batch_size),
           "--raw-layout", layout or "Nx1", "--zipf", str(a.zipf)]
    for k in ("docs", "queries", "k", "image_size", "vlm_docs", "vlm_queries", "vlm_k", "vlm_image_size",
              "vision_dim", "vision_depth", "text_dim", "text_layers"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    logf = work / f"side-{tag}.log"
    log.info("%s: %s round %d%s (log %s)", backend, side, rnd + 1, f" {layout}" if layout else "", logf)
    with open(logf, "w") as f:
        rc = subprocess.run(cmd, env=env, cwd=tree, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0 or not out.exists():
        sys.stderr.write("".join(logf.read_text().splitlines(keepends=True)[-40:]))
        raise SystemExit(f"{backend} {side} failed (exit {rc}); see {logf}")
    return json.loads(out.read_text())


def _prepare(a: argparse.Namespace, backend: str) -> dict[str, Any]:
    """The backend's workload, reused from ``--workdir`` when its parameters match."""
    work = Path(a.workdir) / backend
    want = {**_params(a, backend), "zipf": a.zipf}
    f = work / "workload.json"
    if f.exists():
        got = json.loads(f.read_text())
        if got.get("params") == want:
            return got
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    w = _run_side(a, "prepare", backend, 0)
    w["params"] = want
    f.write_text(json.dumps(w, indent=2))
    return w


def _table(a: argparse.Namespace, backend: str, w: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
           layouts: list[str]) -> str:
    raw = runs[f"raw-{layouts[0]}"]
    rows = []
    for side, rs in runs.items():
        if side.startswith("raw-"):
            lay = parse_layouts(side[4:])[0]
            name = f"raw loop, {layout_name(lay)}" + (", prefix sharing off" if backend == "vlm_yesno" else "")
            whole = [r["pairs_per_s"] for r in rs]
            steady = [r["steady_pairs_per_s"] for r in rs]
            start = [r["startup_s"] for r in rs]
            load = [r["init_s_max"] for r in rs]
            st_s = [r["steady_s"] for r in rs]
        else:
            name = {"old": "old per-pair stage", "stage": "stage", "stage-off": "stage, prefix sharing off",
                    "stage-on": "stage, prefix sharing on"}[side]
            n1 = [r["night1"] for r in rs]
            whole = [n["pairs_per_s"] for n in n1]
            steady = [n.get("steady_pairs_per_s") for n in n1]
            start = [n.get("startup_s") for n in n1]
            load = [n.get("model_load_s") for n in n1]
            st_s = [n.get("steady_s") for n in n1]
        ratio = [x / r["pairs_per_s"] for x, r in zip(whole, raw, strict=True)]
        ratio_st = [x / r["steady_pairs_per_s"] if x else None for x, r in zip(steady, raw, strict=True)]
        rows.append([name, spread(whole), spread(ratio, 2), spread(steady), spread(ratio_st, 2),
                     spread(start, 1), spread(load, 1), spread(st_s, 1)])
    head = ["side", "whole pairs/s", "ratio to raw", "steady pairs/s", "steady ratio to raw", "start-up s",
            "of it model load s", "steady s"]
    if backend == "vlm_yesno":
        mp = w.get("model_params")
        what = (f"vlm_yesno, random Qwen2-VL {mp / 1e6:.1f}M parameters, {w['image_size']} px images"
                if mp else "vlm_yesno")
    else:
        what = f"clip ViT-B-32 (random weights), {w['image_size']} px images"
    notes = [f"Workload: {w['pairs']} pairs = {w['queries']} queries x k over {w['docs']} distinct docs of "
             f"{w['corpus_docs']} ({w['queries_per_doc']:.1f} queries per doc on average; the most popular doc in "
             f"{w['max_pairs_per_doc']} pairs, {w['docs_seen_once']} docs in one), batch {a.batch_size}.",
             "whole = pairs / the stage's rerank_s (regrouping, clip: its embedding-cache step, actor start + "
             "model load, read, decode, score, write; not Ray start or selection); raw: spawn until the last worker is done (model load "
             "included). steady = pairs finished after the last actor / worker was ready / the time from then "
             "to the last write / last worker done. start-up = the stage's start (raw: spawn) until the last "
             "actor (worker) is ready; model load = the slowest actor constructor (raw: worker init, its reads "
             "included). Ratios to the raw loop of the same round."]
    if "stage" in runs:
        n2 = [r["night2"]["pairs_per_s"] for r in runs["stage"] if "night2" in r]
        if n2:
            notes.append(f"clip second night (vectors cached): {spread(n2)} pairs/s.")
    return markdown_table(f"bench_rerank_scale: {what}", head, rows, a.rounds, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench-rerank-scale")
    p.add_argument("--old-tree", help="a checkout of the per-pair stage: adds the 'old' side")
    p.add_argument("--backends", default="clip,vlm_yesno")
    p.add_argument("--docs", type=int, default=1000, help="clip: corpus docs")
    p.add_argument("--queries", type=int, default=250, help="clip: queries")
    p.add_argument("--k", type=int, default=20, help="clip: candidates per query")
    p.add_argument("--image-size", type=int, default=64, help="clip: image side (px)")
    p.add_argument("--vlm-docs", type=int, default=48, help="vlm_yesno: corpus docs")
    p.add_argument("--vlm-queries", type=int, default=36, help="vlm_yesno: queries")
    p.add_argument("--vlm-k", type=int, default=8, help="vlm_yesno: candidates per query")
    p.add_argument("--vlm-image-size", type=int, default=448, help="vlm_yesno: image side (448 px = 256 tokens)")
    p.add_argument("--vision-dim", type=int, default=384, help="vlm_yesno model: vision tower width")
    p.add_argument("--vision-depth", type=int, default=4, help="vlm_yesno model: vision blocks")
    p.add_argument("--text-dim", type=int, default=512, help="vlm_yesno model: language model width")
    p.add_argument("--text-layers", type=int, default=6, help="vlm_yesno model: language model layers")
    p.add_argument("--batch-size", type=int, default=16, help="rerank.batch_size (stage and raw loop)")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every side")
    add_layout_arg(p)
    p.add_argument("--quick", action="store_true", help="smoke sizes: a few docs and queries, a tiny model")
    p.add_argument("--json")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--raw-layout", default="Nx1", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.side:
        fn = {"old": side_stage, "stage": side_stage, "stage-off": side_stage, "stage-on": side_stage,
              "raw": side_raw, "prepare": prepare, "bytes": block_bytes}[a.side]
        Path(a.out).write_text(json.dumps(fn(a)))
        return
    if a.quick:
        a.docs, a.queries, a.k, a.vlm_docs, a.vlm_queries, a.vlm_k, a.vlm_image_size = 40, 10, 5, 6, 6, 5, 112
        a.vision_dim, a.vision_depth, a.text_dim, a.text_layers = 128, 1, 128, 2
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if any(b not in BACKENDS for b in backends):
        raise SystemExit(f"--backends: choose from {list(BACKENDS)}")
    layouts = [f"{w}x{t}" for w, t in parse_layouts(a.raw_layouts)]
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    tables = []
    for backend in backends:
        w = _prepare(a, backend)
        if backend == "vlm_yesno" and w["queries_per_doc"] < 5:
            log.warning("vlm_yesno workload: %.1f queries per doc on average (< 5): raise --vlm-queries or lower "
                        "--vlm-docs", w["queries_per_doc"])
        rep: dict[str, Any] = {"workload": w}
        if backend == "clip":
            rep["bytes"] = _run_side(a, "bytes", backend, 0)
        stages = ["stage"] if backend == "clip" else ["stage-off", "stage-on"]
        sides = (["old"] if a.old_tree else []) + stages
        runs: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(a.rounds):
            for side in sides:
                runs.setdefault(side, []).append(_run_side(a, side, backend, rnd))
            for lay in layouts:
                runs.setdefault(f"raw-{lay}", []).append(_run_side(a, "raw", backend, rnd, lay))
        rep["runs"] = runs
        tables.append(_table(a, backend, w, runs, layouts))
        if "bytes" in rep:
            tables.append("object-store bytes per pair: old {old_per_pair:.0f}, new {new_per_pair:.0f} (docs with "
                          "bytes), new with decode tasks {new_rgb_per_pair:.0f} (RGB pixels)".format(**rep["bytes"]))
        report[backend] = rep
        raw = runs[f"raw-{layouts[0]}"]
        for side in ("stage-off", "stage-on", "stage"):
            if side in runs:
                rep[f"ratio_{side}"] = median([x["night1"]["pairs_per_s"] / r["pairs_per_s"]
                                               for x, r in zip(runs[side], raw, strict=True)])
    print("\n\n".join(tables), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
