"""Search benchmark: the sharded Ray search (``pipelines.search.run_search``) against one in-process faiss search.

Both sides search the same synthetic, seeded, *clustered* unit vectors (uniform random vectors make IVF
recall meaningless) with the same factory, k and search parameters::

    python benchmarks/bench_search.py --docs 200000 --dim 512 --queries 5000 --k 100 --factory Flat --shards 1,2,4
    python benchmarks/bench_search.py --docs 100000 --factory IVF1024,Flat --nprobe 1,8,32 --shards 1,2
    python benchmarks/bench_search.py --docs 100000 --factory HNSW32 --ef-search 16,64,128 --shards 1,2
    python benchmarks/bench_search.py ... --json out.json --root /tmp/bench-root   # keep data + indexes

data
    ``--clusters`` unit centres in ``--dim`` dimensions, grouped around ``--superclusters`` unit super-centres
    (offset norm ~``--spread``); a point is a centre plus gaussian noise of norm ~``--noise``, L2-normalised;
    queries are drawn the same way from another seeded stream. The defaults (1000 / 50 / 1.0 / 2.0) give an
    IVF1024 recall@100 curve of roughly 0.6 / 0.87 / 0.98 at nprobe 1 / 8 / 32 (100k vectors).
    The corpus is written straight into the embeddings-cache layout of ``pipelines.embed`` (``--corpus-shards``
    shards, each ``part-*.parquet`` + ``_SUCCESS.json``) and described by a hand-built ``EmbedResult``; the
    queries are a ``search.query_embeddings`` parquet (query_id, embedding). ``pipelines.index.build_index``
    builds one index per shard count S (reused when ``--root`` is kept). None of this is timed.

in-process baseline
    a fresh subprocess loads the S=1 index the pipeline built (one faiss index of the factory over all
    vectors, verified against its manifest), ``faiss.omp_set_num_threads(t)`` for each ``--baseline-threads``
    t (default: all cores) and searches all queries in one ``index.search`` call per setting (wall and CPU
    seconds). Peak RSS is the subprocess's ``ru_maxrss`` (index load included). Exact ground truth
    (``IndexFlatIP`` over the same vectors, for recall) is computed afterwards in the same subprocess and is
    not part of its reported peak. Paired mode (default): the reference (first thread count) is timed again in
    a fresh subprocess right before every Ray run, and that run's ratio uses it: the machine may be shared.

ray side
    ``pipelines.search.run_search(cfg, index=...)`` on one local Ray session (started once, before the
    index builds). Thin subclasses of ``SearchRouter`` / ``ShardSearcher`` are swapped into ``pipelines.search``
    that only append timestamps to a file (``--no-trace``: not swapped); the computation is the pipeline's
    own. Per run: ``startup`` = ``start_searchers`` (actor processes, shard load + sha256 check), timed by
    wrapping it; ``steady`` = ``SearchResult.search_s`` (run_search starts that clock after the searchers are
    up: the Ray Data job, i.e. reading the queries, routing, merging, writing the candidates, killing the
    searchers); ``e2e`` = startup + steady. ``batch window`` = first batch into the router -> last batch out
    (no fixed start-up costs at all). Throughput = queries / time. ``ratio`` = Ray steady q/s / in-process q/s
    (``ratio_best``: against the fastest in-process thread count seen; ``ratio_e2e``: e2e). ``cpu_ratio`` =
    in-process search CPU seconds / CPU seconds of every process of ours during the whole run_search (driver,
    Ray system processes, searchers, router, read and write tasks): the efficiency, robust to other load.
    The candidates written are read back and compared with the in-process result (Flat: same ids up to
    ties) and with exact search (recall@k = fraction of the exact top-k ids found, averaged over queries).
    ``search.searcher_num_cpus`` is lowered (printed) where S x its value leaves no CPU for the router, read
    and write tasks: with the default 0.5, S=4 on 2 CPUs is refused by ``start_searchers``'s resource check.

memory
    a sampler thread polls ``/proc`` for the driver and all its descendants (the local Ray instance).
    Per run: the peak of the summed VmRSS at one instant (driver + Ray workers + Ray system processes;
    pages of the shared object store are counted in every process that maps them), the searchers' own
    peaks (VmHWM: the index load is ~3x the shard size, bytes + a copy + the index) and their RSS at the
    end. Alongside, the machine's CPU use by processes outside this benchmark (others_cores), so noisy
    numbers can be recognised.

Nothing is asserted; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    add_set_arg,
    apply_sets,
    descendants,
    event,
    markdown_table,
    median,
    proc_files,
    read_events,
    spread,
)

MB = 1024 * 1024


# --- helpers ------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _settings(a: argparse.Namespace) -> list[dict[str, int]]:
    """Search-parameter settings to run: one per --nprobe (IVF) / --ef-search (HNSW) value."""
    f = a.factory.upper()
    if "IVF" in f:
        return [{"nprobe": n} for n in a.nprobe]
    if "HNSW" in f:
        return [{"ef_search": e} for e in a.ef_search]
    return [{}]


def _label(s: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in s.items()) or "-"


# --- synthetic data -----------------------------------------------------------------------------------------


def _unit(x: Any) -> Any:
    import numpy as np

    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(n: int, dim: int, clusters: int, noise: float, seed: int, stream: int, superclusters: int = 0,
                 spread: float = 1.0, chunk: int = 50_000) -> Any:
    """``n`` unit vectors around ``clusters`` seeded centres (stream 0: corpus, 1: queries).

    With ``superclusters`` > 0 the centres themselves lie around that many unit super-centres (gaussian
    offset of norm ~``spread``), so a query's neighbours spread over several related clusters, as in real
    embeddings; without, clusters are unrelated and IVF recall is unrealistically high even at nprobe=1.
    """
    import numpy as np

    r0 = np.random.default_rng([seed, 0])
    if superclusters > 0:
        sup = _unit(r0.standard_normal((superclusters, dim)))
        centres = _unit(sup[np.arange(clusters) % superclusters]
                        + spread * r0.standard_normal((clusters, dim)) / np.sqrt(dim))
    else:
        centres = _unit(r0.standard_normal((clusters, dim)))
    rng = np.random.default_rng([seed, 1 + stream])
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        c = centres[rng.integers(clusters, size=m)]
        out[lo:lo + m] = _unit(c + rng.standard_normal((m, dim)).astype(np.float32) * (noise / np.sqrt(dim)))
    return out


def write_corpus(a: argparse.Namespace, root: str) -> Any:
    """Write the corpus into the embeddings-cache layout and return the matching ``EmbedResult``."""
    import numpy as np
    import pyarrow as pa

    from operators.contracts import embeddings_schema
    from operators.shards import cache_dir
    from operators.storage import Storage, join
    from pipelines.embed import EmbedResult, ShardStats

    storage = Storage()
    spec = (f"bench_search|{a.docs}|{a.dim}|{a.clusters}|{a.noise}|{a.superclusters}|{a.spread}|{a.seed}|"
            f"{a.corpus_shards}")
    fp = hashlib.sha256(spec.encode()).hexdigest()  # stands in for the model fingerprint
    cache = cache_dir(root, fp, "corpus")
    bounds = np.linspace(0, a.docs, a.corpus_shards + 1).astype(int)
    keys = [hashlib.sha256(f"{fp}|{i}".encode()).hexdigest()[:32] for i in range(a.corpus_shards)]
    stats = []
    todo = [i for i, k in enumerate(keys) if not storage.exists(join(cache, k, "_SUCCESS.json"))]
    vecs = make_vectors(a.docs, a.dim, a.clusters, a.noise, a.seed, 0, a.superclusters, a.spread) if todo else None
    for i, key in enumerate(keys):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        src = f"synthetic://bench_search/corpus-{i:05d}.parquet"
        if i in todo:
            part = "part-000000000000.parquet"
            table = pa.Table.from_arrays(
                [pa.array([f"d{j:09d}" for j in range(lo, hi)], pa.string()),
                 pa.array(np.arange(hi - lo, dtype=np.int64)),
                 pa.FixedSizeListArray.from_arrays(pa.array(vecs[lo:hi].reshape(-1)), a.dim)],
                schema=embeddings_schema(a.dim))
            storage.write_table(join(cache, key, part), table, row_group_size=8192)
            storage.write_json(join(cache, key, "_SUCCESS.json"), {
                "source": src, "source_fingerprint": spec, "kind": "corpus", "model_fingerprint": fp,
                "dim": a.dim, "dtype": "float32", "rows_in": hi - lo, "rows_ok": hi - lo, "rows_rejected": 0,
                "reject_types": {}, "parts": [part], "rejects": []})
        stats.append(ShardStats(src, key, hi - lo, hi - lo, 0, i not in todo))
    set_uri = join(cache, "sets", f"{fp[:24]}.json")
    storage.write_json(set_uri, {"input": "synthetic://bench_search", "shards": [s.__dict__ for s in stats],
                                 "dim": a.dim, "dtype": "float32", "model_fingerprint": fp})
    return EmbedResult("corpus", fp, cache, set_uri, a.dim, "float32", stats, 0.0, 0.0)


def write_queries(a: argparse.Namespace, root: str, batch_size: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(root, "bench_queries",
                        f"q-{a.queries}-{a.dim}-{a.clusters}-{a.noise}-{a.superclusters}-{a.spread}-{a.seed}.parquet")
    if not os.path.exists(path):
        q = make_vectors(a.queries, a.dim, a.clusters, a.noise, a.seed, 1, a.superclusters, a.spread)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        emb = pa.ListArray.from_arrays(pa.array(range(0, q.size + 1, a.dim), pa.int32()), pa.array(q.reshape(-1)))
        t = pa.table({"query_id": pa.array([f"q{i:07d}" for i in range(a.queries)], pa.string()), "embedding": emb})
        pq.write_table(t, path + ".tmp", row_group_size=batch_size)
        os.replace(path + ".tmp", path)
    return path


def read_query_vectors(path: str) -> Any:
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    flat = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(np.asarray(flat, np.float32).reshape(t.num_rows, -1))


# --- the in-process baseline (own subprocess) ---------------------------------------------------------------


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import faiss
    import numpy as np

    from operators import faiss_shards as F
    from operators.storage import Storage

    q = read_query_vectors(spec["queries"])
    storage = Storage()
    manifest = spec["manifest"]
    t0 = time.perf_counter()
    index, _ids = F.load_shard(storage, spec["index_uri"], manifest["shards"][0])
    load_s = time.perf_counter() - t0
    rss_loaded = _vm(os.getpid(), "VmRSS") / 1024
    k = spec["k"]
    out: dict[str, Any] = {"threads": spec["threads"], "load_s": load_s, "index_bytes": manifest["shards"][0]["size"],
                           "rss_after_load_mb": rss_loaded, "settings": []}
    arrays: dict[str, Any] = {}
    for n, s in enumerate(spec["settings"]):
        F.set_search_params(index, F.SearchParams(k=k, nprobe=s.get("nprobe", 16), ef_search=s.get("ef_search", 64)))
        times: dict[int, list[float]] = {}
        cpu: dict[int, list[float]] = {}
        batched: dict[int, float] = {}
        for th in spec["threads"]:
            faiss.omp_set_num_threads(th)
            times[th], cpu[th] = [], []
            for _ in range(spec["repeats"]):
                c0, t = os.times(), time.perf_counter()
                D, I = index.search(q, k)  # noqa: E741
                times[th].append(time.perf_counter() - t)
                c1 = os.times()
                cpu[th].append(c1.user + c1.system - c0.user - c0.system)
            if spec["batched"]:
                bs = spec["batch_size"]
                t = time.perf_counter()
                for lo in range(0, len(q), bs):
                    index.search(q[lo:lo + bs], k)
                batched[th] = time.perf_counter() - t
        arrays[f"I{n}"], arrays[f"D{n}"] = I, D
        out["settings"].append({"setting": s, "search_s": times, "search_cpu_s": cpu, "batched_search_s": batched})
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec["exact"]:
        del index
        from operators.embedding_cache import part_uris, read_vectors

        cache = spec["cache"]
        vecs = [read_vectors(storage, part_uris(storage, cache, key))[2] for key in spec["corpus_keys"]]
        flat = faiss.IndexFlatIP(q.shape[1])
        for v in vecs:
            flat.add(v)
        del vecs
        t = time.perf_counter()
        _, exact = flat.search(q, k)
        out["exact_search_s"] = time.perf_counter() - t
        arrays["exact"] = exact
    if spec["out_npz"]:
        np.savez(spec["out_npz"], **arrays)
    return out


def _role(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "driver"
    if "ShardSearcher" in title:
        return "searchers"
    if "SearchRouter" in title:
        return "router"
    if title.startswith("ray::"):
        return "other_ray_workers"  # read / write tasks, idle pooled workers, Ray Data's helper actors
    return "ray_system"  # raylet, gcs_server, agents, log monitor


def _vm(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (0 when the process is gone)."""
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    tck = os.sysconf("SC_CLK_TCK")
    return busy / tck, (busy + v[3] + v[4]) / tck


# --- process sampler ----------------------------------------------------------------------------------------


class ProcSampler(threading.Thread):
    """Polls /proc for this process and its descendants: summed RSS peak, per-process HWM, CPU time."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.interval = interval
        self._stop_ev = threading.Event()
        self._lock = threading.Lock()
        self.procs: dict[int, dict[str, Any]] = {}
        self._window: dict[str, Any] | None = None

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.sample()
            self._stop_ev.wait(self.interval)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join()

    def sample(self) -> None:
        tck = os.sysconf("SC_CLK_TCK")
        total = 0
        seen: dict[int, dict[str, Any]] = {}
        for pid in descendants(os.getpid()):
            files = proc_files(pid)
            if files is None:
                continue
            status, stat, title = files
            f = {ln.split(":", 1)[0]: ln.split(":", 1)[1].split() for ln in status.splitlines() if ":" in ln}
            rss = int(f["VmRSS"][0]) if "VmRSS" in f else 0
            hwm = int(f["VmHWM"][0]) if "VmHWM" in f else 0
            total += rss
            seen[pid] = {"rss_kb": rss, "hwm_kb": hwm, "cpu_s": (int(stat[11]) + int(stat[12])) / tck,
                         "title": title.strip()[:100]}
        with self._lock:
            for pid, rec in seen.items():
                old = self.procs.get(pid)
                if old is not None and old["title"] and not rec["title"]:
                    rec["title"] = old["title"]
                self.procs[pid] = rec
            w = self._window
            if w is not None:
                w["peak_total_kb"] = max(w["peak_total_kb"], total)
                for pid, rec in seen.items():
                    p = w["procs"].setdefault(pid, {"rss_max_kb": 0})
                    p["title"] = rec["title"] or p.get("title", "")
                    p["hwm_kb"] = max(p.get("hwm_kb", 0), rec["hwm_kb"])  # a zombie reports none
                    p["cpu_s"] = max(p.get("cpu_s", 0.0), rec["cpu_s"])
                    p["rss_max_kb"] = max(p["rss_max_kb"], rec["rss_kb"])
                    if rec["rss_kb"]:
                        p["rss_last_kb"] = rec["rss_kb"]

    def begin(self) -> None:
        self.sample()
        with self._lock:
            self._window = {"peak_total_kb": 0, "procs": {},
                            "cpu0": {pid: r["cpu_s"] for pid, r in self.procs.items()},
                            "searchers0": {pid for pid, r in self.procs.items() if "ShardSearcher" in r["title"]},
                            "t0": time.perf_counter(), "m0": _machine_busy_s()}
        self.sample()

    def end(self) -> dict[str, Any]:
        self.sample()
        with self._lock:
            w, self._window = self._window, None
        assert w is not None
        m1 = _machine_busy_s()
        wall = time.perf_counter() - w["t0"]
        # searchers started in this window (those of the previous run may still be exiting)
        searchers = {pid: p for pid, p in w["procs"].items()
                     if "ShardSearcher" in p["title"] and pid not in w["searchers0"]}
        ours = sum(p["cpu_s"] - (w["cpu0"].get(pid, 0.0)) for pid, p in w["procs"].items())
        roles: dict[str, float] = {}
        counts: dict[str, int] = {}
        top: list[tuple[float, str]] = []
        for pid, p in w["procs"].items():
            r = _role(pid, p.get("title", ""))
            used = p["cpu_s"] - w["cpu0"].get(pid, 0.0)
            roles[r] = roles.get(r, 0.0) + used
            if pid not in w["cpu0"]:
                counts[r] = counts.get(r, 0) + 1
            top.append((used, f"{r}: {p.get('title', '')[:60]} (pid {pid})"))
        top.sort(reverse=True)
        busy = m1[0] - w["m0"][0]
        return {
            "peak_total_rss_mb": w["peak_total_kb"] / 1024,
            "searchers_peak_hwm_mb": sum(p["hwm_kb"] for p in searchers.values()) / 1024,
            "searchers_last_rss_mb": sum(p.get("rss_last_kb", 0) for p in searchers.values()) / 1024,
            "searchers_cpu_s": sum(p["cpu_s"] - w["cpu0"].get(pid, 0.0) for pid, p in searchers.items()),
            "searcher_processes": len(searchers),
            "driver_max_rss_mb": w["procs"].get(os.getpid(), {}).get("rss_max_kb", 0) / 1024,
            "cpu": {"wall_s": wall, "ours_s": ours, "machine_busy_s": busy, "by_role_s": roles,
                    "top_processes": [f"{c:7.1f} s  {t}" for c, t in top[:10]],
                    "processes_started_by_role": counts,
                    "others_cores": max(0.0, busy - ours) / wall if wall else 0.0,
                    "ours_cores": ours / wall if wall else 0.0},
        }


# --- the Ray side -------------------------------------------------------------------------------------------


def _traced_classes(events: str) -> tuple[type, type]:
    from operators import faiss_shards as F
    from operators.search_ops import SearchRouter, ShardSearcher

    class TracedShardSearcher(ShardSearcher):
        """The pipeline's ShardSearcher, plus timestamps of its load and of each search call.

        The bare faiss call is timed by wrapping ``faiss_shards.search`` in this actor's own process.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            t0 = time.time()
            super().__init__(*args, **kwargs)
            self._faiss_s = 0.0
            real = F.search

            def timed(*a: Any, **kw: Any) -> Any:
                t = time.time()
                out = real(*a, **kw)
                self._faiss_s = time.time() - t
                return out

            F.search = timed
            event(events, {"ev": "searcher_init", "pid": os.getpid(), "t0": t0, "t1": time.time(),
                           "ntotal": int(self.index.ntotal)})

        def search(self, queries: Any, k: int) -> Any:
            t0 = time.time()
            out = super().search(queries, k)
            event(events, {"ev": "search", "pid": os.getpid(), "t0": t0, "t1": time.time(),
                           "faiss_s": self._faiss_s, "method_s": time.time() - t0, "n": len(queries)})
            return out

    class TracedSearchRouter(SearchRouter):
        """The pipeline's SearchRouter, plus timestamps of its start-up, each batch and each fan-out."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            event(events, {"ev": "router_init", "pid": os.getpid(), "t1": time.time()})

        def _search_all(self, q: Any) -> Any:
            t0 = time.time()
            out = super()._search_all(q)
            event(events, {"ev": "fanout", "t0": t0, "t1": time.time(), "n": len(q)})
            return out

        def __call__(self, batch: Any) -> Any:
            t0 = time.time()
            out = super().__call__(batch)
            event(events, {"ev": "batch", "t0": t0, "t1": time.time(), "n": len(batch["id"])})
            return out

    return TracedShardSearcher, TracedSearchRouter


def _config(a: argparse.Namespace, root: str, shards: int, queries: str, setting: dict[str, int]) -> Any:
    from pipelines.config import parse_config

    data: dict[str, Any] = {
        "root": root,
        "corpus": os.path.join(root, "synthetic-corpus"),  # never read: the corpus is passed as an EmbedResult
        "ray": {"progress_bars": False},
        "index": {"factory": a.factory, "shards": shards},
        "search": {"k": a.k, "query_embeddings": queries, **setting},
    }
    return parse_config(apply_sets(data, a.set), "bench_search")


def _read_candidates(out: str, nq: int, k: int) -> Any:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    t = ds.dataset(os.path.join(out, "candidates"), format="parquet").to_table(
        columns=["query_id", "rank", "doc_id", "retrieval_score"])
    qi = pc.cast(pc.utf8_slice_codeunits(t.column("query_id"), 1), "int64").to_numpy()
    di = pc.cast(pc.utf8_slice_codeunits(t.column("doc_id"), 1), "int64").to_numpy()
    r = t.column("rank").to_numpy().astype(np.int64) - 1
    I = np.full((nq, k), -1, np.int64)  # noqa: E741
    D = np.full((nq, k), np.nan, np.float32)
    I[qi, r] = di
    D[qi, r] = t.column("retrieval_score").to_numpy()
    return D, I


def overlap(a: Any, b: Any) -> float:
    """Fraction of the ids in ``b`` (the reference) that ``a`` also returned for the same query; -1 = no id.

    Against exact search (always k ids per query) this is recall@k. An approximate reference may hold
    fewer than k ids (IVF probing few short lists): then only those count, so equal results give 1.0.
    """
    import numpy as np

    hits = total = 0
    for x, y in zip(a, b, strict=True):
        y = y[y >= 0]
        hits += len(np.intersect1d(x[x >= 0], y, assume_unique=True))
        total += len(y)
    return hits / total if total else 1.0


def _tie_agreement(D: Any, I: Any, Db: Any, Ib: Any) -> dict[str, Any]:  # noqa: E741
    """Flat: equal ids, or equal scores where ids differ (ties, or float-level reordering)."""
    import numpy as np

    same_ids = float((I == Ib).all(axis=1).mean())
    score_diff = float(np.nanmax(np.abs(D - Db)))
    differ = I != Ib
    return {"identical_rows": same_ids, "max_abs_score_diff": score_diff,
            "positions_differing": int(differ.sum()),
            "differing_positions_with_equal_scores": int((differ & (np.abs(D - Db) <= 1e-5)).sum())}


def _summarise(events: list[dict[str, Any]], t1: float, t_end: float) -> dict[str, Any]:
    ev = [e for e in events if e.get("t1", e.get("t0", 0)) >= t1 - 1e-3 and e.get("t0", t1) <= t_end + 1e-3]
    batches = sorted((e for e in ev if e["ev"] == "batch"), key=lambda e: e["t0"])
    fan = [e for e in ev if e["ev"] == "fanout"]
    srch = [e for e in ev if e["ev"] == "search"]
    router = [e for e in ev if e["ev"] == "router_init"]
    out: dict[str, Any] = {"batches": len(batches)}
    if router:
        out["router_ready_after_searchers_s"] = router[0]["t1"] - t1
    if batches:
        busy = sum(e["t1"] - e["t0"] for e in batches)
        fan_s = sum(e["t1"] - e["t0"] for e in fan)
        out.update({
            "first_batch_after_searchers_s": batches[0]["t0"] - t1,
            "batch_window_s": batches[-1]["t1"] - batches[0]["t0"],
            "router_busy_s": busy,
            "router_fanout_s": fan_s,
            "router_merge_and_map_s": busy - fan_s,
            "router_idle_in_window_s": (batches[-1]["t1"] - batches[0]["t0"]) - busy,
            "tail_after_last_batch_s": t_end - batches[-1]["t1"],
        })
    if srch:
        by_pid: dict[int, list[dict[str, Any]]] = {}
        for e in srch:
            by_pid.setdefault(e["pid"], []).append(e)
        # method_s: ShardSearcher.search (faiss + global ids -> doc ids); faiss_s: the faiss call in it
        out["searcher_faiss_s"] = [sum(e["faiss_s"] for e in v) for v in by_pid.values()]
        out["searcher_method_s"] = [sum(e["method_s"] for e in v) for v in by_pid.values()]
    return out


def run_ray(a: argparse.Namespace, root: str, corpus: Any, queries: str, index_by_s: dict[int, Any],
            base: dict[str, Any], base_arrays: Any, sampler: ProcSampler, batch_size: int) -> list[dict[str, Any]]:
    import pipelines.search as S
    from operators.storage import Storage

    storage = Storage()
    events = os.path.join(root, "bench_events.jsonl")
    traced_searcher, traced_router = _traced_classes(events)
    timing: dict[str, float] = {}
    real_start = S.start_searchers

    def timed_start(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = real_start(*args, **kwargs)
        timing["startup_s"] = time.perf_counter() - t
        timing["t_ready"] = time.time()
        return out

    S.start_searchers = timed_start
    real_classes = S.ShardSearcher, S.SearchRouter
    if a.trace:
        S.ShardSearcher, S.SearchRouter = traced_searcher, traced_router
    rows = []
    settings = _settings(a)
    exact = base_arrays["exact"] if "exact" in base_arrays else base_arrays["I0"]
    try:
        for shards in a.shards:
            index = index_by_s[shards]
            for n, setting in enumerate(settings):
                cfg = _config(a, root, shards, queries, setting)
                fit = _fit_cpus(a, cfg, shards)
                if fit:
                    cfg = _config(a, root, shards, queries, {**setting, **fit})
                for rep in range(a.repeats):
                    paired = None
                    if a.paired:
                        # the in-process reference again, just before this run: the machine may be shared
                        pb, _ = _baseline_subprocess(a, root, corpus, queries, index_by_s[1], batch_size,
                                                     [setting], [base["threads"][0]], full=False)
                        paired = {"search_s": next(iter(pb["settings"][0]["search_s"].values()))[0],
                                  "search_cpu_s": next(iter(pb["settings"][0]["search_cpu_s"].values()))[0],
                                  "machine_busy_cores": pb["machine_busy_cores_during_subprocess"]}
                        print(f"  paired in-process ({base['threads'][0]} threads) {_label(setting)}: "
                              f"{paired['search_s']:.2f}s -> {a.queries / paired['search_s']:.0f} q/s", flush=True)
                    Path(events).unlink(missing_ok=True)
                    run_id = f"bench-S{shards}-{n}-{rep}"
                    sampler.begin()
                    res = S.run_search(cfg, run_id=run_id, storage=storage, index=index)
                    t_end = time.time()
                    mem = sampler.end()
                    D, I = _read_candidates(res.out, a.queries, a.k)  # noqa: E741
                    if not a.keep:
                        storage.rm(res.out, recursive=True)
                    summ = _summarise(read_events(events), timing["t_ready"], t_end) if a.trace else {}
                    # run_search starts its clock after start_searchers: search_s is the steady part
                    steady = res.search_s
                    e2e = timing["startup_s"] + steady
                    bq, bbest = _inproc_qps(a, base["settings"][n])
                    bcpu, bcpu_best = _inproc_cpu(base["settings"][n])
                    if paired:
                        bq = a.queries / paired["search_s"]
                        bbest = max(bbest, bq)
                        bcpu = paired["search_cpu_s"]
                        bcpu_best = min(bcpu_best, bcpu)
                    window = summ.get("batch_window_s")
                    row = {
                        "shards": shards, "setting": setting, "repeat": rep, "queries": res.queries_in,
                        "rejected": res.queries_rejected, "candidates": res.candidates,
                        "searcher_threads": _threads_used(cfg, shards),
                        "startup_s": timing["startup_s"], "e2e_s": e2e, "steady_s": steady,
                        "run_search_wall_s": res.wall_s,
                        "steady_qps": a.queries / steady, "e2e_qps": a.queries / e2e,
                        "window_qps": a.queries / window if window else None,
                        "searcher_num_cpus": cfg.search.searcher_num_cpus, "batch_size": cfg.search.batch_size,
                        "inproc_qps": bq, "inproc_best_qps": bbest, "paired_inproc": paired,
                        "ratio_steady": a.queries / steady / bq, "ratio_e2e": a.queries / e2e / bq,
                        "ratio_steady_vs_best": a.queries / steady / bbest,
                        # CPU seconds (all our processes, whole run_search incl. start-up) against the
                        # in-process search's CPU seconds: robust to other load on a shared machine
                        "cpu_s_ray_total": mem["cpu"]["ours_s"], "cpu_s_ray_searchers": mem["searchers_cpu_s"],
                        "cpu_s_inproc": bcpu, "cpu_s_inproc_best": bcpu_best,
                        "cpu_ratio": bcpu / mem["cpu"]["ours_s"], "cpu_ratio_best": bcpu_best / mem["cpu"]["ours_s"],
                        "recall_vs_exact": overlap(I, exact),
                        "inproc_recall_vs_exact": overlap(base_arrays[f"I{n}"], exact),
                        "agreement_vs_inproc": overlap(I, base_arrays[f"I{n}"]),
                        "index_shard_bytes": [e["size"] for e in index.manifest["shards"]],
                        "memory": mem, "breakdown": summ,
                    }
                    if a.factory.upper() == "FLAT":
                        row["flat_ties"] = _tie_agreement(D, I, base_arrays[f"D{n}"], base_arrays[f"I{n}"])
                    rows.append(row)
                    _print_row(row)
    finally:
        S.start_searchers = real_start
        S.ShardSearcher, S.SearchRouter = real_classes
    return rows


def _inproc_qps(a: argparse.Namespace, s: dict[str, Any]) -> tuple[float, float]:
    """(reference, best) in-process q/s of one setting (median over runs): the first thread count, and the fastest."""
    qps = {th: a.queries / (median(ts) or float("nan")) for th, ts in s["search_s"].items()}
    return next(iter(qps.values())), max(qps.values())


def _inproc_cpu(s: dict[str, Any]) -> tuple[float, float]:
    """(reference, best) in-process CPU seconds of one setting's search (median over repeats)."""
    cpu = {th: median(cs) or float("nan") for th, cs in s["search_cpu_s"].items()}
    return next(iter(cpu.values())), min(cpu.values())


def _fit_cpus(a: argparse.Namespace, cfg: Any, shards: int) -> dict[str, Any]:
    """search.searcher_num_cpus that leaves the router actor + a read and a write task a CPU share.

    With the default 0.5, S=4 on a 2-CPU node would reserve every CPU for the (mostly idle) searchers
    (``start_searchers`` refuses it). Unless ``--set search.searcher_num_cpus=...`` was given, the
    benchmark lowers it for such S (printed, and recorded in the JSON).
    """
    import ray

    sc = cfg.search
    cpus = float(ray.cluster_resources().get("CPU", 1))
    room = cpus - 3 * sc.router_num_cpus
    if any(x.startswith("search.searcher_num_cpus=") for x in a.set) or shards * sc.searcher_num_cpus <= room:
        return {}
    fit = max(0.01, int(room / shards * 100) / 100)
    print(f"  note: S={shards} x search.searcher_num_cpus={sc.searcher_num_cpus} leaves no CPU for the router, read "
          f"and write tasks on {cpus:g} CPUs; using {fit}", flush=True)
    return {"searcher_num_cpus": fit}


def _threads_used(cfg: Any, shards: int) -> int:
    import ray

    import pipelines.search as S

    return S._threads(cfg, dict(ray.cluster_resources()), shards)


def _print_row(r: dict[str, Any]) -> None:
    m = r["memory"]
    b = r["breakdown"]
    print(f"  S={r['shards']} {_label(r['setting']):<14} rep {r['repeat']}: threads/searcher {r['searcher_threads']}, "
          f"startup {r['startup_s']:.2f}s, steady {r['steady_s']:.2f}s ({r['steady_qps']:.0f} q/s), "
          f"e2e {r['e2e_s']:.2f}s ({r['e2e_qps']:.0f} q/s), batch window {r['window_qps'] or 0:.0f} q/s; "
          f"ratio steady {r['ratio_steady']:.2f} (vs best in-process {r['ratio_steady_vs_best']:.2f}) "
          f"e2e {r['ratio_e2e']:.2f}; recall@k {r['recall_vs_exact']:.4f} (in-process "
          f"{r['inproc_recall_vs_exact']:.4f}), agreement with in-process {r['agreement_vs_inproc']:.4f}", flush=True)
    if b:
        print(f"      router ready +{b.get('router_ready_after_searchers_s', float('nan')):.2f}s, first batch "
              f"+{b.get('first_batch_after_searchers_s', float('nan')):.2f}s, {b['batches']} batches in "
              f"{b.get('batch_window_s', 0):.2f}s: fan-out {b.get('router_fanout_s', 0):.2f}s, merge+map "
              f"{b.get('router_merge_and_map_s', 0):.2f}s, router idle {b.get('router_idle_in_window_s', 0):.2f}s; "
              f"tail {b.get('tail_after_last_batch_s', 0):.2f}s; searcher faiss s "
              f"{[round(x, 2) for x in b.get('searcher_faiss_s', [])]}", flush=True)
    print(f"      memory: peak total RSS {m['peak_total_rss_mb']:.0f} MB (driver {m['driver_max_rss_mb']:.0f}), "
          f"searchers peak (load) {m['searchers_peak_hwm_mb']:.0f} MB / at the end {m['searchers_last_rss_mb']:.0f} MB "
          f"over {m['searcher_processes']} processes; CPU: ours {m['cpu']['ours_cores']:.2f} cores, others "
          f"{m['cpu']['others_cores']:.2f} cores", flush=True)
    roles = ", ".join(f"{k} {v:.1f}" for k, v in sorted(m["cpu"]["by_role_s"].items()))
    print(f"      CPU seconds: Ray {r['cpu_s_ray_total']:.1f} ({roles}), in-process "
          f"{r['cpu_s_inproc']:.1f} (best {r['cpu_s_inproc_best']:.1f}) -> CPU ratio {r['cpu_ratio']:.2f} "
          f"(vs best {r['cpu_ratio_best']:.2f})", flush=True)


# --- main ---------------------------------------------------------------------------------------------------


def _baseline_subprocess(a: argparse.Namespace, root: str, corpus: Any, queries: str, index1: Any,
                         batch_size: int, settings: list[dict[str, int]] | None = None,
                         threads: list[int] | None = None, full: bool = True) -> tuple[dict[str, Any], Any]:
    """The in-process search in a fresh subprocess. ``full``: every thread count, exact ground truth and
    the result arrays; otherwise only the timing of ``settings`` x ``threads`` (the paired re-runs)."""
    import numpy as np

    spec = {"threads": threads or a.baseline_threads or [os.cpu_count() or 1], "queries": queries,
            "index_uri": index1.uri, "manifest": index1.manifest, "k": a.k, "settings": settings or _settings(a),
            "repeats": a.repeats if full else 1, "batched": a.breakdown and full, "batch_size": batch_size,
            "exact": full and a.factory.upper() != "FLAT", "cache": corpus.cache,
            "corpus_keys": [s.key for s in corpus.shards],
            "out_npz": os.path.join(root, "bench_baseline.npz") if full else ""}
    spec_path = os.path.join(root, "bench_baseline_spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    m0, t0 = _machine_busy_s(), time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--baseline-worker", spec_path], capture_output=True, text=True)
    wall, m1 = time.perf_counter() - t0, _machine_busy_s()
    if p.returncode != 0:
        raise SystemExit(f"baseline subprocess failed:\n{p.stdout}\n{p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["machine_busy_cores_during_subprocess"] = (m1[0] - m0[0]) / wall
    return out, (np.load(spec["out_npz"]) if full else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--factory", default="Flat", help="faiss index_factory string (index.factory)")
    ap.add_argument("--shards", type=_ints, default=[1, 2, 4], help="index shard counts S, e.g. 1,2,4")
    ap.add_argument("--nprobe", type=_ints, default=[1, 8, 32], help="IVF settings (search.nprobe)")
    ap.add_argument("--ef-search", type=_ints, default=[16, 64, 128], help="HNSW settings (search.ef_search)")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--superclusters", type=int, default=50, help="groups of related clusters (0: none)")
    ap.add_argument("--spread", type=float, default=1.0, help="cluster centre offset norm from its super-centre")
    ap.add_argument("--noise", type=float, default=2.0, help="point offset norm from its (unit) cluster centre")
    ap.add_argument("--corpus-shards", type=int, default=8, help="embeddings-cache shards of the corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", "--rounds", dest="repeats", type=int, default=1,
                    help="alternating rounds per setting (paired: in-process reference, Ray run, reference, Ray "
                         "run, ...); the summary shows median [min, max] over them")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 5000 x 64 vectors, 200 queries, S=1,2")
    ap.add_argument("--baseline-threads", type=_ints, default=[],
                    help="faiss thread counts in-process, e.g. 2,1 (default: all cores); the first is the "
                         "reference of 'ratio', the fastest that of 'ratio_best'")
    add_set_arg(ap, "search.batch_size=1024, search.searcher_threads=2")
    ap.add_argument("--root", help="work directory (kept; data and indexes are reused); default: a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the candidates of every run")
    ap.add_argument("--no-trace", dest="trace", action="store_false",
                    help="do not swap in the timestamping router/searcher subclasses")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the in-process search in batches of search.batch_size")
    ap.add_argument("--no-paired", dest="paired", action="store_false",
                    help="do not re-run the in-process reference right before each Ray run (the ratio then "
                         "uses the first in-process timing)")
    ap.add_argument("--rss-interval", type=float, default=0.5, help="seconds between /proc samples (~3 ms each)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.baseline_worker:
        print(json.dumps(run_baseline(json.loads(Path(a.baseline_worker).read_text()))))
        return 0
    if a.quick:
        a.docs, a.dim, a.queries, a.k, a.shards, a.clusters, a.superclusters, a.corpus_shards = (
            5000, 64, 200, 10, [1, 2], 50, 5, 2)

    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = None
    root = a.root or (tmp := tempfile.mkdtemp(prefix="bench_search-"))
    os.makedirs(root, exist_ok=True)
    root = os.path.abspath(root)
    try:
        return _main(a, root)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _main(a: argparse.Namespace, root: str) -> int:
    import ray

    from pipelines.index import build_index
    from pipelines.ray_env import ensure_ray

    print(f"bench_search: {a.docs} x {a.dim} corpus ({a.clusters} clusters in {a.superclusters} groups, spread "
          f"{a.spread}, noise {a.noise}), {a.queries} queries, "
          f"k={a.k}, factory {a.factory}, S={a.shards}, {os.cpu_count()} cores, root {root}", flush=True)
    t = time.perf_counter()
    corpus = write_corpus(a, root)
    base_cfg = _config(a, root, 1, "", {})
    queries = write_queries(a, root, base_cfg.search.batch_size)
    data_s = time.perf_counter() - t
    print(f"data: {data_s:.1f}s (cache {corpus.cache})", flush=True)

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    ensure_ray(base_cfg.ray)  # one local Ray session for the builds and every search (not timed)
    index_by_s: dict[int, Any] = {}
    build: dict[int, dict[str, Any]] = {}
    for shards in sorted({1, *a.shards}):
        cfg = _config(a, root, shards, queries, {})
        sampler.begin()
        idx = build_index(cfg, corpus=corpus)
        mem = sampler.end()
        index_by_s[shards] = idx
        build[shards] = {"wall_s": idx.wall_s, "reused": idx.reused, "uri": idx.uri,
                         "shard_bytes": [e["size"] for e in idx.manifest["shards"]],
                         "shard_ntotal": [e["ntotal"] for e in idx.manifest["shards"]],
                         "peak_total_rss_mb": mem["peak_total_rss_mb"]}
        print(f"index S={shards}: {'reused' if idx.reused else 'built'} in {idx.wall_s:.1f}s, shards "
              f"{build[shards]['shard_ntotal']} vectors / {[round(b / MB) for b in build[shards]['shard_bytes']]} MB",
              flush=True)

    base, arrays = _baseline_subprocess(a, root, corpus, queries, index_by_s[1], base_cfg.search.batch_size)
    exact = arrays["exact"] if "exact" in arrays else arrays["I0"]
    print(f"in-process (faiss threads {base['threads']}, one index.search over all {a.queries} queries): "
          f"index load {base['load_s']:.1f}s, peak RSS {base['peak_rss_mb']:.0f} MB "
          f"(index {base['index_bytes'] / MB:.0f} MB); machine busy {base['machine_busy_cores_during_subprocess']:.2f} "
          f"cores during the subprocess", flush=True)
    for n, s in enumerate(base["settings"]):
        for th, ts in s["search_s"].items():
            bt = s["batched_search_s"].get(th)
            extra = f", in batches of {base_cfg.search.batch_size}: {bt:.2f}s" if bt is not None else ""
            print(f"  {_label(s['setting']):<14} threads {th}: search {median(ts):.2f}s (runs {[round(x, 2) for x in ts]})"
                  f" -> {a.queries / median(ts):.0f} q/s{extra}", flush=True)
        print(f"  {_label(s['setting']):<14} recall@{a.k} vs exact {overlap(arrays[f'I{n}'], exact):.4f}", flush=True)

    print("ray (run_search):", flush=True)
    rows = run_ray(a, root, corpus, queries, index_by_s, base, arrays, sampler, base_cfg.search.batch_size)
    sampler.stop()
    res = ray.cluster_resources()
    ray.shutdown()

    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["shards"], _label(r["setting"])), []).append(r)
    head = ["S", "setting", "threads/searcher", "steady q/s", "in-process q/s", "ratio steady", "ratio e2e",
            "start-up s", "recall@k", "agreement", "CPU ratio", "peak RSS MB", "others cores"]
    table = []
    for (shards, lab), rs in groups.items():
        table.append([shards, lab, rs[0]["searcher_threads"], spread([r["steady_qps"] for r in rs], 0),
                      spread([r["inproc_qps"] for r in rs], 0), spread([r["ratio_steady"] for r in rs], 2),
                      spread([r["ratio_e2e"] for r in rs], 2), spread([r["startup_s"] for r in rs], 2),
                      spread([r["recall_vs_exact"] for r in rs], 4), spread([r["agreement_vs_inproc"] for r in rs], 4),
                      spread([r["cpu_ratio"] for r in rs], 2),
                      spread([r["memory"]["peak_total_rss_mb"] for r in rs], 0),
                      spread([r["memory"]["cpu"]["others_cores"] for r in rs], 2)])
    ref = base["threads"][0]
    notes = [f"{a.docs} x {a.dim} clustered vectors, {a.queries} queries, k={a.k}, factory {a.factory}"
             + (f", overrides {a.set}" if a.set else "") + f"; in-process: one index.search, {ref} faiss threads"
             + (", timed again in a fresh subprocess right before each Ray run (the ratio of a round uses its own)"
                if a.paired else " (median of its runs)") + ".",
             "steady = run_search's search_s (after the searchers are up); e2e adds start_searchers. ratio = Ray q/s "
             "/ in-process q/s; CPU ratio = in-process search CPU s / all our processes' CPU s during run_search."]
    print("\n" + markdown_table("bench_search: Ray run_search against one in-process faiss search", head, table,
                                a.repeats, notes), flush=True)
    print(f"in-process peak RSS {base['peak_rss_mb']:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "args": {k: v for k, v in vars(a).items() if k != "baseline_worker"}, "cpu_count": os.cpu_count(),
            "ray_resources": res, "data_s": data_s, "index_build": build, "inprocess": base, "ray": rows,
        }, indent=2, default=str))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
