"""Rerank at scale: the doc-grouped rerank stage against the per-pair stage it replaced and a raw loop, on a
workload where docs repeat across queries as in real query logs.

    python benchmarks/bench_rerank_scale.py --old-tree /tmp/mmr-old          # both backends
    python benchmarks/bench_rerank_scale.py --old-tree /tmp/mmr-old --backends vlm_yesno --docs 500

``--old-tree`` is a checkout of the per-pair stage (``git worktree add /tmp/mmr-old d27ad02``); without
it only the new stage and the raw loop run.

workload (not timed)
    ``make_sample`` (``--docs`` 64 px images in 4 shards, ``--queries`` queries), corpus embedded with
    ``mmr-tiny`` (the retrieval cache gives each doc its ``(shard, row)``), then synthetic candidates: each
    query gets ``--k`` distinct docs drawn with Zipf popularity (``--zipf``), so a few docs recur across
    many queries and most appear once or twice. ``runs/<id>/candidates`` as ``mmrerank search`` writes it.

sides (each a fresh subprocess, one local Ray of the machine's CPUs; ``--rounds`` alternates them)
    * ``old``: ``pipelines.rerank.run_rerank`` of ``--old-tree`` (pairs with a copy of their doc's content each).
    * ``new``: this tree's ``run_rerank``. For clip a second night (a new run id, same corpus) follows.
    * ``raw``: no Ray, one process: pyarrow reads the candidates and each distinct candidate doc's bytes,
      decodes each once; clip: encodes each distinct doc once and each query once (the rerank model),
      score = dot product; vlm_yesno: ``backend.score`` over batches of ``rerank.batch_size`` pairs.
    Rates are pairs / the stage's own wall (``RerankResult.rerank_s``: candidate regrouping, clip's
    embedding-cache step, read, decode, score, write; not Ray start or selection). Ratios, never asserted.

object-store bytes per pair
    From the blocks the stage's read tasks produce (what Ray Data puts in the object store), built here
    without Ray from the same candidates: the new source's doc blocks (``docs_for_shards``), the same docs
    after ``DecodeDocs`` (the GPU layout: RGB pixels instead of bytes), and the per-pair layout of the old
    stage (each pair with its doc's content columns: ``_pair_block``'s columns).
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

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_rerank_scale")


def _config(work: Path, backend: str, tree_root: Path | None = None) -> dict[str, Any]:
    rerank: dict[str, Any] = {"backend": backend, "batch_size": 16, "device": "cpu", "precision": "fp32"}
    if backend == "clip":
        rerank["clip_model"] = {"name": "ViT-B-32", "pretrained": None, "seed": 1}
    else:
        rerank["model"] = str(work / "vlm")
    return {"root": str(tree_root or work / "root"), "corpus": str(work / "sample" / "corpus"),
            "queries": str(work / "sample" / "queries"), "ray": {"progress_bars": False},
            "embed": {"model": {"name": "mmr-tiny", "pretrained": None, "seed": 0}, "device": "cpu"},
            "index": {"factory": "Flat", "shards": 1}, "search": {"k": 20}, "rerank": rerank}


def prepare(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    from operators.embedding_cache import part_uris, read_vectors
    from operators.storage import Storage, join
    from pipelines.config import parse_config
    from pipelines.embed import embed_kind
    from pipelines.sample import make_sample
    from tests.tiny_vlm import save_tiny_vlm

    work = Path(a.workdir)
    info = make_sample(str(work / "sample"), docs=a.docs, queries=a.queries, shards=4, seed=3)
    save_tiny_vlm(work / "vlm")
    cfg = parse_config(_config(work, "clip"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipelines.ray_env import ensure_ray

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
    import pyarrow.parquet as pq

    qids = pq.read_table(_files(info.queries), columns=["query_id"]).column(0).to_pylist()[: a.queries]
    cols: dict[str, list[Any]] = {"query_id": [], "rank": [], "doc_id": [], "retrieval_score": [],
                                  "doc_shard": [], "doc_row": []}
    for q in qids:
        picks = perm[rng.choice(len(where), a.k, replace=False, p=pop)]
        for rank, i in enumerate(picks, 1):
            d, key, row = where[i]
            for c, v in zip(cols, (q, rank, d, 1.0 - rank / 100, key, row), strict=True):
                cols[c].append(v)
    t = pa.table(cols).cast(pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
                                       ("retrieval_score", pa.float32()), ("doc_shard", pa.string()),
                                       ("doc_row", pa.int64())]))
    for i in range(0, t.num_rows, 2000):
        storage.write_table(join(str(work / "candidates"), f"part-{i:08d}.parquet"), t.slice(i, 2000))
    docs = len(set(zip(cols["doc_shard"], cols["doc_row"], strict=True)))
    counts = np.unique(np.array([f"{s}/{r}" for s, r in zip(cols["doc_shard"], cols["doc_row"], strict=True)]),
                       return_counts=True)[1]
    return {"pairs": t.num_rows, "docs": docs, "queries": len(qids), "corpus_docs": len(where),
            "max_pairs_per_doc": int(counts.max()), "docs_seen_once": int((counts == 1).sum())}


def _files(path: str) -> list[str]:
    """A parquet file, or the parquet files of a directory."""
    p = Path(path)
    return sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]


def _fresh_run(root: Path, work: Path, run_id: str) -> None:
    dest = root / "runs" / run_id
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(work / "candidates", dest / "candidates")


def side_stage(a: argparse.Namespace) -> dict[str, Any]:
    """One stage run (old or new tree, whichever ``pipelines`` this process imports)."""
    from pipelines.config import parse_config
    from pipelines.ray_env import ensure_ray
    from pipelines.rerank import run_rerank

    work = Path(a.workdir)
    root = work / f"root-{a.side}"
    if a.side == "old" and not root.exists():  # the embedding cache of the corpus, as the new tree's
        shutil.copytree(work / "root" / "embeddings", root / "embeddings")
    cfg = parse_config(_config(work, a.backend, root))
    ensure_ray(cfg.ray)
    import pipelines

    out: dict[str, Any] = {"tree": str(Path(pipelines.__file__).parent.parent)}
    for night in range(2 if a.side == "new" and a.backend == "clip" else 1):
        run_id = f"{a.backend}-{a.side}-{a.round}-{night}"
        _fresh_run(root, work, run_id)
        r = run_rerank(cfg, run_id)
        out[f"night{night + 1}"] = {"pairs": r.pairs_in, "rerank_s": r.rerank_s, "pairs_per_s": r.pairs_in / r.rerank_s,
                                    "docs_decoded": getattr(r, "docs_decoded", None),
                                    "clip_images_embedded": getattr(r, "clip_images_embedded", None)}
    if a.side == "new" and a.backend == "clip":  # next round's first night must encode again
        shutil.rmtree(root / "embeddings", ignore_errors=True)
        shutil.copytree(work / "root" / "embeddings", root / "embeddings")
    return out


def side_raw(a: argparse.Namespace) -> dict[str, Any]:
    """The plain loop: each distinct candidate doc decoded (and for clip encoded) once, no Ray."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from operators import decode as R
    from operators.rerankers.base import create
    from pipelines.config import parse_config
    from pipelines.context import reranker_spec
    from pipelines.embed import embed_kind

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    work = Path(a.workdir)
    cfg = parse_config(_config(work, a.backend))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    source = {s.key: s.source for s in embed_kind(cfg, "corpus").shards}  # cached: no work
    backend = create(reranker_spec(cfg.rerank, cfg), "cpu", "fp32")
    t0 = time.perf_counter()
    cand = pq.read_table(sorted(str(p) for p in (work / "candidates").glob("*.parquet")))
    qt = pq.read_table(_files(cfg.queries), columns=["query_id", "text"])
    qtext = dict(zip(qt.column(0).to_pylist(), qt.column(1).to_pylist(), strict=True))
    keys = list(zip(cand.column("doc_shard").to_pylist(), cand.column("doc_row").to_pylist(), strict=True))
    uniq = sorted(set(keys))
    images: dict[tuple[str, int], Any] = {}
    captions: dict[tuple[str, int], Any] = {}
    for key in sorted({k for k, _ in uniq}):
        rows = [r for k, r in uniq if k == key]
        t = pq.read_table(source[key], columns=["image", "text"]).take(pa.array(rows))
        for r, data, cap in zip(rows, t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True):
            images[(key, r)] = R.decode_image(data, cfg.embed.max_image_pixels, cfg.embed.allowed_formats)
            captions[(key, r)] = cap
    queries = [qtext[q] for q in cand.column("query_id").to_pylist()]
    if a.backend == "clip":
        with torch.inference_mode():
            vec = {}
            for i in range(0, len(uniq), 64):
                x = torch.stack([backend.transform(images[k]) for k in uniq[i:i + 64]])
                v = torch.nn.functional.normalize(backend.model.encode_image(x).float(), dim=-1)
                vec.update(zip(uniq[i:i + 64], v, strict=True))
            uq = sorted(set(queries))
            tv = {}
            for i in range(0, len(uq), 256):
                t = torch.nn.functional.normalize(backend.model.encode_text(backend.tokenizer(uq[i:i + 256])).float(),
                                                  dim=-1)
                tv.update(zip(uq[i:i + 256], t, strict=True))
            scores = np.array([float(vec[k] @ tv[q]) for k, q in zip(keys, queries, strict=True)], np.float32)
    else:
        order = sorted(range(len(keys)), key=lambda i: keys[i])  # pairs of one doc together, as the stage has them
        scores = np.zeros(len(keys), np.float32)
        bs = cfg.rerank.batch_size
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            scores[idx] = backend.score([queries[j] for j in idx], [images[keys[j]] for j in idx],
                                        [captions[keys[j]] for j in idx])
    wall = time.perf_counter() - t0
    return {"pairs": len(keys), "docs": len(uniq), "wall_s": wall, "pairs_per_s": len(keys) / wall,
            "scores_checksum": float(np.sum(scores))}


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
    cfg = parse_config(_config(work, "vlm_yesno"))
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


def _run_side(a: argparse.Namespace, side: str, backend: str, rnd: int) -> dict[str, Any]:
    out = Path(a.workdir) / f"side-{side}-{backend}-{rnd}.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    tree = a.old_tree if side == "old" else str(REPO)
    env["PYTHONPATH"] = os.pathsep.join([tree, str(REPO)])  # the old tree's packages shadow this one's
    cmd = [sys.executable, str(Path(__file__).resolve()), "--workdir", a.workdir, "--side", side,
           "--backend", backend, "--round", str(rnd), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/bench-rerank-scale")
    p.add_argument("--old-tree")
    p.add_argument("--backends", default="clip,vlm_yesno")
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--queries", type=int, default=250)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.side:
        fn = {"old": side_stage, "new": side_stage, "raw": side_raw, "prepare": prepare, "bytes": block_bytes}[a.side]
        Path(a.out).write_text(json.dumps(fn(a)))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"workload": _run_side(a, "prepare", "-", 0)}
    report["bytes"] = _run_side(a, "bytes", "-", 0)
    sides = (["old"] if a.old_tree else []) + ["new", "raw"]
    for backend in a.backends.split(","):
        for rnd in range(a.rounds):
            for side in sides:
                report.setdefault(backend, {}).setdefault(side, []).append(_run_side(a, side, backend, rnd))
    w = report["workload"]
    lines = [f"workload: {w['pairs']} pairs, {w['queries']} queries x k, over {w['docs']} distinct docs of "
             f"{w['corpus_docs']} (the most popular in {w['max_pairs_per_doc']} pairs, {w['docs_seen_once']} in one)",
             "object-store bytes per pair: old {old_per_pair:.0f}, new {new_per_pair:.0f} (docs with bytes), "
             "new with decode tasks {new_rgb_per_pair:.0f} (RGB pixels)".format(**report["bytes"])]
    for backend in a.backends.split(","):
        r = report[backend]
        raw = [x["pairs_per_s"] for x in r["raw"]]
        for side in ("old", "new"):
            for x in r.get(side, []):
                n1 = x["night1"]
                line = (f"{backend} {side}: {n1['pairs_per_s']:.0f} pairs/s ({n1['rerank_s']:.1f} s; "
                        f"decodes {n1['docs_decoded']}, clip images encoded {n1['clip_images_embedded']})")
                if "night2" in x:
                    n2 = x["night2"]
                    line += (f"; night 2 {n2['pairs_per_s']:.0f} pairs/s ({n2['rerank_s']:.1f} s, "
                             f"{n2['clip_images_embedded']} encoded)")
                lines.append(line)
        lines.append(f"{backend} raw loop: " + ", ".join(f"{v:.0f}" for v in raw) + " pairs/s")
    for ln in lines:
        log.info("%s", ln)
    report["lines"] = lines
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
