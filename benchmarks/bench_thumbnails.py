"""Thumbnail endpoint latency: ``GET /v1/docs/{doc_id}/thumbnail?size=`` of ``mmrerank serve``, cold and cached.

    python benchmarks/bench_thumbnails.py                       # quickstart run (120 docs) in a tmp dir, served here
    python benchmarks/bench_thumbnails.py --docs 200 --concurrency 8 --cached 4000 --json /tmp/thumbs.json

What is measured (client side, keep-alive ``http.client`` connections, one per client thread, on this machine):

cold
    every (doc, size) pair once, ``--sizes`` per indexed doc, pulled from one shared queue by ``--concurrency``
    threads: nothing is cached yet, so each request goes ingress -> model replica -> read the corpus row group
    -> decode with the run's limits -> resize -> JPEG encode -> back. p50 / p90 / p99 / max, requests/s.
cached
    ``--cached`` requests over the same pairs (round-robin per thread): answered from the ingress replica's
    byte-bounded LRU, no model-replica hop.
floor
    ``GET /healthz`` under the same load: the HTTP path into the same ingress with no thumbnail work.
raw loop
    the cold path's compute without HTTP, Ray or storage, in this process: decode the stored bytes (already in
    memory) with the same limits, resize, encode; per-thumbnail mean over the same pairs, sequential.

One warm-up request (a size outside ``--sizes``) first builds the model replica's doc index. Nothing is
asserted; the machine may be shared (load average and CPU busy fraction are recorded per phase).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_serve import _conn, _free_port, _request, _wait_ok, load_test, run_timed, summary  # noqa: E402


def cold_test(url: str, paths: list[str], concurrency: int) -> dict[str, Any]:
    """Each path requested exactly once, by whichever of ``concurrency`` threads is free."""
    todo: queue.Queue[str] = queue.Queue()
    for p in paths:
        todo.put(p)
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        c = _conn(url)
        barrier.wait()
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                break
            t0 = time.perf_counter()
            status, _ = _request(c, "GET", p)
            dt = time.perf_counter() - t0
            with lock:
                (lat.append(dt) if status == 200 else errors.append(f"HTTP {status} for {p}"))
        c.close()

    load, wall = run_timed([threading.Thread(target=worker, daemon=True) for _ in range(concurrency)], barrier)
    return {"concurrency": concurrency, **summary(lat), "rps": len(lat) / wall if wall > 0 else 0.0,
            "errors": len(errors), "error_examples": errors[:3], **load.as_dict()}


def raw_loop_ms(images: dict[str, bytes], limits: dict[str, Any], pairs: list[tuple[str, int]]) -> float:
    """Mean ms per thumbnail of the compute alone, in-process: decode (run limits), resize, JPEG encode of
    image bytes already in memory (the server also reads the doc's row group and crosses two processes)."""
    from operators.decode import decode_image
    from pipelines.explorer.docs import JPEG_QUALITY

    t0 = time.perf_counter()
    for doc_id, size in pairs:
        img = decode_image(images[doc_id], limits["max_image_pixels"], tuple(limits["allowed_formats"]),
                           limits["max_image_bytes"])
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return 1000 * (time.perf_counter() - t0) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--docs", type=int, default=120)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--sizes", default="32,64,96,128")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cached", type=int, default=3000, help="cached-phase requests")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import logging

    import httpx
    import ray

    from pipelines.quickstart import quickstart, quickstart_config
    from pipelines.serve import ServeSettings, start

    logging.basicConfig(level=logging.WARNING)
    work = tempfile.mkdtemp(prefix="bench-thumbs-")
    env = {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    rep = quickstart(work, docs=args.docs, queries=args.queries, shards=2)
    ray.shutdown()
    print(f"quickstart: run {rep.run_id} under {work}", flush=True)
    root = quickstart_config(work).root
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
    settings = ServeSettings(root=root, port=_free_port(), device="cpu")
    start(settings)
    url = f"http://{settings.host}:{settings.port}"
    _wait_ok(url)

    import pyarrow.dataset as ds

    cfg = quickstart_config(work)
    images: dict[str, bytes] = {}
    for r in ds.dataset(cfg.corpus).to_table(columns=["doc_id", "image"]).to_pylist():
        if r["doc_id"] is not None:
            images.setdefault(r["doc_id"], r["image"])  # the first occurrence is the indexed one
    ids: list[str] = []
    corpus_ids = sorted(images)
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(0, len(corpus_ids), 200):  # the indexed docs: the corpus minus its rejects
            got = c.post("/v1/docs", json={"doc_ids": corpus_ids[i:i + 200]})
            ids += [d["doc_id"] for d in got.json()["docs"]]
        assert c.get(f"/v1/docs/{urllib.parse.quote(ids[0], safe='')}/thumbnail?size=24").status_code == 200  # warm-up
    sizes = [int(s) for s in args.sizes.split(",")]
    pairs = [(d, s) for s in sizes for d in ids]
    paths = [f"/v1/docs/{urllib.parse.quote(d, safe='')}/thumbnail?size={s}" for d, s in pairs]
    res: dict[str, Any] = {"run_id": rep.run_id, "docs_indexed": len(ids), "sizes": sizes, "pairs": len(pairs),
                           "loadavg_start": os.getloadavg()[0]}
    res["cold"] = cold_test(url, paths, args.concurrency)
    res["cached"] = load_test(url, paths, args.cached, args.concurrency, warmup=0)
    res["floor_healthz"] = load_test(url, ["/healthz"], args.cached, args.concurrency, warmup=50)
    res["raw_loop_ms_per_thumbnail"] = raw_loop_ms(images, cfg.embed.model_dump(), pairs)
    print(f"{len(ids)} indexed docs x sizes {sizes} = {len(pairs)} thumbnails, concurrency {args.concurrency}")
    print(f"{'phase':<14}{'n':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'req/s':>9}{'err':>5}{'cpu busy':>10}")
    for name in ("cold", "cached", "floor_healthz"):
        r = res[name]
        print(f"{name:<14}{r['n']:>6}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}"
              f"{r['rps']:>9.0f}{r['errors']:>5}{r['cpu_busy']:>10.2f}")
    raw = res["raw_loop_ms_per_thumbnail"]
    print(f"raw loop (in-process decode + resize + encode, sequential): {raw:.2f} ms per thumbnail; "
          f"cold throughput {res['cold']['rps'] * raw / 1000:.2f}x the raw loop's")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
