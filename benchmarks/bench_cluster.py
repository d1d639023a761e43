"""Scaling benchmark: the nightly ``pipelines.run.run`` on a multi-node Ray cluster on this host, W worker nodes.

    export HF_HUB_OFFLINE=1
    .venv/bin/python benchmarks/bench_cluster.py                          # W = 1 and 2, 240 docs, mmr-tiny
    .venv/bin/python benchmarks/bench_cluster.py --docs 48 --queries 6 --shards 2     # smoke
    .venv/bin/python benchmarks/bench_cluster.py --embed-model ViT-B-32 --json /tmp/bench-cluster/out.json
    .venv/bin/python benchmarks/bench_cluster.py --workers "" --micro    # only the host micro-measurements

What it measures
    For each W in ``--workers`` (default ``1,2``), in a fresh subprocess: ``cluster.local_cluster.LocalCluster``
    starts a head with 0 CPUs plus W worker nodes of 1 logical CPU each (``RAY_AUTH_MODE=disabled``: this
    local benchmark cluster only), the config's ``ray.address`` points at it, and ``run(cfg)`` runs the
    whole nightly job on one ``make_sample`` data set (made once, not timed) into a fresh root (no cache
    hits). Embed and rerank get ``num_actors = W`` (one actor per worker node if Ray spreads them; where
    they landed is recorded) and the small CPU requests the cluster tests use, so a stage fits on one
    1-CPU node. Reported per W: each stage's ``wall_s`` from the run's ``stats.json``, rows/s per stage
    (rows_in / wall_s; rerank rows are (query, candidate) pairs), ``run()`` wall, cluster start / stop and
    the subprocess wall; then the speed-up W=max vs W=min per stage (wall ratio, > 1 = faster).
    The cluster is stopped by PID (``LocalCluster.stop``) in a ``finally``.

Host facts and contention
    nproc, CPU model, memory, hypervisor flag; during each run the whole machine's /proc/stat deltas
    (busy share, hypervisor steal share), the approximate CPU time of this run's own process tree
    (sampled every second) and any pytest process seen on the host. A run that saw pytest, or where
    other processes took > 5% of the machine, is marked CONTENDED: not a clean measurement.

``--micro`` adds single-process figures used by benchmarks/SCALING.md: decode (+ preprocess) time per
image on one core (the sample's images and a synthetic ~100 KB 640x480 JPEG), FAISS Flat inner-product
search rate and PQ64 code-scan rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import LOG_FORMAT, REPO, fmt

log = logging.getLogger("bench_cluster")

STAGES = ("embed_corpus", "index", "embed_queries", "search", "rerank", "rejects")
ACTOR_NAMES = ("ImageEmbedder", "TextEmbedder", "RerankPairs")
OTHERS_MAX_SHARE = 0.05


# --- host facts and sampling -----------------------------------------------------------------------------


def _proc_stat() -> dict[str, int]:
    """Whole-machine CPU ticks since boot (first line of /proc/stat)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return dict(zip(names, v, strict=True))


def host_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
            "hypervisor": " hypervisor" in cpuinfo, "mem_total_gib": round(mem_kb / 2**20, 1),
            "python": sys.version.split()[0]}


class Sampler(threading.Thread):
    """Every ``interval`` s: CPU time of this process tree, pytest processes on the host, actor placement."""

    def __init__(self, interval: float = 1.0, cluster: Any = None) -> None:
        super().__init__(daemon=True)
        self.interval, self.cluster = interval, cluster
        self._halt = threading.Event()
        self.cpu_by_pid: dict[int, float] = {}
        self.pytest: dict[int, str] = {}
        self.placement: dict[str, set[str]] = {}
        self.own_cpu_s = 0.0

    def run(self) -> None:
        n = 0
        while not self._halt.wait(self.interval):
            self.sample(pytest_too=n % 5 == 0)
            n += 1

    def sample(self, pytest_too: bool = True) -> None:
        import psutil

        me = psutil.Process()
        tree = [me]
        try:
            tree += me.children(recursive=True)
        except psutil.Error:
            pass
        for p in tree:
            try:
                t = p.cpu_times()
                self.cpu_by_pid[p.pid] = max(self.cpu_by_pid.get(p.pid, 0.0), t.user + t.system)
                if self.cluster is not None and p.pid != me.pid:
                    cmd = " ".join(p.cmdline())
                    for name in ACTOR_NAMES:
                        if name in cmd:
                            self.placement.setdefault(name, set()).add(self.cluster.node_of(p.pid))
            except (psutil.Error, LookupError, OSError):
                continue
        if pytest_too:
            own = {p.pid for p in tree}
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] not in own and "pytest" in cmd:
                    self.pytest.setdefault(p.info["pid"], cmd[:160])

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        import psutil

        self.sample()
        t = psutil.Process().cpu_times()
        self.own_cpu_s = sum(self.cpu_by_pid.values()) + t.children_user + t.children_system


def machine_share(before: dict[str, int], after: dict[str, int], own_cpu_s: float, wall_s: float) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in before}
    total = sum(d.values()) or 1
    tck = os.sysconf("SC_CLK_TCK")
    busy_s = (d["user"] + d["nice"] + d["system"] + d["irq"] + d["softirq"]) / tck
    cpus = os.cpu_count() or 1
    others_s = max(0.0, busy_s - own_cpu_s)
    return {"busy_share": round((total - d["idle"] - d["iowait"] - d["steal"]) / total, 3),
            "steal_share": round(d["steal"] / total, 4), "machine_busy_cpu_s": round(busy_s, 1),
            "own_tree_cpu_s": round(own_cpu_s, 1), "others_cpu_s": round(others_s, 1),
            "others_share": round(others_s / (wall_s * cpus), 3) if wall_s else None}


# --- one W (runs in its own subprocess) ------------------------------------------------------------------


def config_dict(a: argparse.Namespace, root: str, corpus: str, queries: str, address: str, w: int) -> dict[str, Any]:
    from pipelines.config import apply_overrides

    d: dict[str, Any] = {
        "root": root, "corpus": corpus, "queries": queries,
        "ray": {"address": address, "progress_bars": False},
        # One actor per worker node; CPU requests small enough that a stage fits on one 1-CPU node
        # (as tests/test_cluster.py): actor 0.5 + decode 0.25 + write 0.25.
        "embed": {"model": {"name": a.embed_model, "pretrained": None, "seed": 0}, "batch_size": a.batch_size,
                  "num_actors": w, "actor_num_cpus": 0.5, "decode_num_cpus": 0.25, "write_num_cpus": 0.25},
        "index": {"factory": "Flat", "shards": a.index_shards},
        "search": {"k": a.k, "searcher_num_cpus": 0.25},
        "rerank": {"backend": "clip", "clip_model": {"name": a.rerank_model, "pretrained": None, "seed": 1},
                   "num_actors": w, "actor_num_cpus": 0.5},
    }
    return apply_overrides(d, a.set)  # the same parsing as `mmrerank run --set`


def run_one(a: argparse.Namespace, w: int, out: Path) -> None:
    """Start a W-worker cluster, run the nightly job once, stop the cluster; write the figures to ``out``."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this benchmark's own local cluster only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cluster.local_cluster import LocalCluster

    base = Path(a.workdir) / f"w{w}-r{a.rep}"
    shutil.rmtree(base, ignore_errors=True)  # a fresh root: nothing is a cache hit
    base.mkdir(parents=True)
    sample = json.loads((Path(a.workdir) / "sample" / "paths.json").read_text())
    cluster = LocalCluster(str(base / "cluster"), workers=w, cpus_per_worker=1, object_store_mb=a.object_store_mb,
                           env={"RAY_AUTH_MODE": "disabled"})
    res: dict[str, Any] = {"workers": w, "rep": a.rep}
    stat0 = _proc_stat()
    t_all = time.perf_counter()
    sampler = Sampler(cluster=cluster)
    sampler.start()
    try:
        t = time.perf_counter()
        cluster.start()
        res["cluster_start_s"] = time.perf_counter() - t
        import ray

        from pipelines.config import parse_config
        from pipelines.run import run

        cfg = parse_config(config_dict(a, str(base / "root"), sample["corpus"], sample["queries"], cluster.address, w))
        t = time.perf_counter()
        rep = run(cfg, run_id="bench")
        res["run_call_s"] = time.perf_counter() - t
        stats = json.loads((Path(rep.run_dir) / "stats.json").read_text())
        res["run_wall_s"] = stats["wall_s"]
        res["stages"] = {k: {"wall_s": v.get("wall_s"), "rows_in": v.get("rows_in"), "rows_ok": v.get("rows_ok"),
                             "note": v.get("note", "")} for k, v in stats["stages"].items()}
        res["cluster_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        t = time.perf_counter()
        ray.shutdown()
        res["ray_shutdown_s"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        cluster.stop()
        res["cluster_stop_s"] = time.perf_counter() - t
        sampler.stop()
    wall = time.perf_counter() - t_all
    res["wall_in_child_s"] = wall
    res["actor_nodes"] = {k: sorted(v) for k, v in sampler.placement.items()}
    res["machine"] = machine_share(stat0, _proc_stat(), sampler.own_cpu_s, wall)
    res["pytest_seen"] = sorted(sampler.pytest.values())
    out.write_text(json.dumps(res, indent=2))


# --- micro-measurements (one process, no Ray) --------------------------------------------------------------


def _photo_like_jpeg(w: int = 640, h: int = 480, target_kb: int = 100) -> bytes:
    """A synthetic JPEG of about ``target_kb`` (smooth gradients plus noise; quality 90)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 23 - c) for c in (0.0, 1.0, 2.0)], -1)
    data = b""
    for sigma in (4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32):
        img = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        if len(data) >= target_kb * 1000:
            break
    return data


def _time_decode(images: list[bytes], pp: Any, reps: int) -> dict[str, float]:
    from operators import decode as R
    from operators.models import image_transform

    tf = image_transform(pp)
    t_dec = t_all = 0.0
    n = 0
    for _ in range(reps):
        for data in images:
            t0 = time.perf_counter()
            img = R.decode_image(data, 89_478_485, ("JPEG", "PNG"), None)
            t1 = time.perf_counter()
            tf(img)
            t2 = time.perf_counter()
            t_dec += t1 - t0
            t_all += t2 - t0
            n += 1
    return {"images": n, "decode_ms": 1e3 * t_dec / n, "decode_preprocess_ms": 1e3 * t_all / n}


def micro(a: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from operators.models import ModelSpec, resolve_model

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    sample = json.loads((Path(a.workdir) / "sample" / "paths.json").read_text())
    shard = sorted(Path(sample["corpus"].removeprefix("file://")).glob("*.parquet"))[0]
    imgs = [b for b in pq.read_table(shard, columns=["image"]).column(0).to_pylist() if b][:64]
    jpeg = _photo_like_jpeg()
    for name in sorted({a.embed_model, "ViT-B-32"}):
        pp = resolve_model(ModelSpec(name=name, pretrained=None)).preprocess
        out[f"decode_sample_{a.image_size}px_{name}"] = _time_decode(imgs, pp, 3)
        out[f"decode_jpeg640x480_{len(jpeg) // 1000}KB_{name}"] = _time_decode([jpeg], pp, 60)
    log.info("decode: %s", out)

    rng = np.random.default_rng(0)
    d, nb, nq, k = 512, a.micro_nb, 500, 100
    xb = rng.standard_normal((nb, d), dtype=np.float32)
    xq = rng.standard_normal((nq, d), dtype=np.float32)
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        faiss.omp_set_num_threads(threads)
        flat = faiss.IndexFlatIP(d)
        flat.add(xb)
        flat.search(xq[:10], k)
        t0 = time.perf_counter()
        flat.search(xq, k)
        dt = time.perf_counter() - t0
        out[f"faiss_flat_ip_threads{threads}"] = {
            "nb": nb, "nq": nq, "d": d, "k": k, "s": dt, "gflop_per_s": 2 * nq * nb * d / dt / 1e9,
            "vectors_scanned_per_s": nq * nb / dt}
        pqi = faiss.IndexPQ(d, 64, 8, faiss.METRIC_INNER_PRODUCT)
        pqi.train(xb[:20_000])
        pqi.add(xb)
        t0 = time.perf_counter()
        pqi.search(xq, k)
        dt = time.perf_counter() - t0
        out[f"faiss_pq64_scan_threads{threads}"] = {"nb": nb, "nq": nq, "k": k, "s": dt,
                                                    "codes_scanned_per_s": nq * nb / dt}
    log.info("faiss: %s", {k: v for k, v in out.items() if k.startswith("faiss")})
    return out


# --- orchestration -------------------------------------------------------------------------------------------


def make_sample_once(a: argparse.Namespace) -> None:
    from pipelines.sample import make_sample

    d = Path(a.workdir) / "sample"
    params = {"docs": a.docs, "queries": a.queries, "shards": a.shards, "image_size": a.image_size, "seed": 3}
    paths = d / "paths.json"
    if paths.exists() and json.loads(paths.read_text()).get("params") == params:
        return
    shutil.rmtree(d, ignore_errors=True)
    info = make_sample(str(d / "s"), **params)
    paths.write_text(json.dumps({"params": params, "corpus": info.corpus, "queries": info.queries}))


def table(runs: list[dict[str, Any]]) -> list[str]:
    ws = sorted({r["workers"] for r in runs})
    by_w = {w: [r for r in runs if r["workers"] == w] for w in ws}

    def med(w: int, f: Any) -> float | None:
        vals = [x for x in (f(r) for r in by_w[w]) if x is not None]
        return statistics.median(vals) if vals else None

    head = f"{'stage':<14} {'rows_in':>8}" + "".join(f" {'W=' + str(w) + ' s':>9} {'rows/s':>8}" for w in ws)
    if len(ws) > 1:
        head += f" {'speed-up W=' + str(ws[-1]) + '/W=' + str(ws[0]):>16}"
    lines = [head]
    rows: list[tuple[str, Any]] = [(s, lambda r, s=s: (r.get("stages", {}).get(s) or {}).get("wall_s")) for s in STAGES]
    rows += [("run() total", lambda r: r.get("run_wall_s")), ("cluster start", lambda r: r.get("cluster_start_s")),
             ("cluster stop", lambda r: r.get("cluster_stop_s")), ("subprocess", lambda r: r.get("subprocess_wall_s"))]
    for name, f in rows:
        n = (runs[0].get("stages", {}).get(name) or {}).get("rows_in") if name in STAGES else None
        line = f"{name:<14} {fmt(n):>8}"
        for w in ws:
            v = med(w, f)
            rate = n / v if (n and v) else None
            line += f" {fmt(v, 2):>9} {fmt(rate, 1):>8}"
        if len(ws) > 1:
            lo, hi = med(ws[0], f), med(ws[-1], f)
            line += f" {fmt(lo / hi if lo and hi else None, 2):>16}"
        lines.append(line)
    for r in runs:
        m = r.get("machine", {})
        flag = " CONTENDED" if r.get("contended") else ""
        lines.append(f"W={r['workers']} rep {r['rep']}: busy {m.get('busy_share')}, steal {m.get('steal_share')}, "
                     f"own tree {m.get('own_tree_cpu_s')} CPU-s, others {m.get('others_cpu_s')} CPU-s "
                     f"({m.get('others_share')}), actors on {r.get('actor_nodes')}, "
                     f"pytest seen: {len(r.get('pytest_seen', []))}{flag}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma-separated worker-node counts (\"\" = none)")
    p.add_argument("--repeats", type=int, default=1, help="run the whole --workers sequence this many times")
    p.add_argument("--docs", type=int, default=240)
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--shards", type=int, default=4, help="corpus shard files in the sample")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--embed-model", default="mmr-tiny", help="open_clip name (random weights), e.g. ViT-B-32")
    p.add_argument("--rerank-model", default="mmr-tiny", help="clip reranker model (random weights)")
    p.add_argument("--batch-size", type=int, default=32, help="embed.batch_size")
    p.add_argument("--k", type=int, default=20, help="search.k: candidates reranked per query")
    p.add_argument("--index-shards", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=200, help="per node")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    p.add_argument("--micro", action="store_true", help="also the decode and FAISS micro-measurements")
    p.add_argument("--micro-nb", type=int, default=100_000, help="vectors in the FAISS micro-measurement")
    p.add_argument("--workdir", default=None, help="default: a new temp dir (kept)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    if a.one is not None:
        run_one(a, a.one, Path(a.out))
        return 0

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench-cluster-")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    workers = [int(x) for x in a.workers.split(",") if x.strip()]
    facts = host_facts()
    log.info("host: %s; workdir %s", facts, a.workdir)
    make_sample_once(a)
    runs: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        for w in workers:
            out = Path(a.workdir) / f"result-w{w}-r{rep}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(w), "--rep", str(rep), "--out", str(out),
                   "--workdir", a.workdir]
            for flag in ("docs", "queries", "shards", "image_size", "embed_model", "rerank_model", "batch_size", "k",
                         "index_shards", "object_store_mb"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
            for s in a.set:
                cmd += ["--set", s]
            log.info("W=%d rep %d: %s", w, rep, " ".join(cmd))
            load0 = os.getloadavg()
            t = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO).returncode
            wall = time.perf_counter() - t
            if rc != 0 or not out.exists():
                log.error("W=%d rep %d failed (rc %d); cluster logs under %s", w, rep, rc, Path(a.workdir) / f"w{w}-r{rep}")
                _stop_leftover(Path(a.workdir) / f"w{w}-r{rep}" / "cluster")
                runs.append({"workers": w, "rep": rep, "failed": rc})
                continue
            r = json.loads(out.read_text())
            r["subprocess_wall_s"] = wall
            r["loadavg_before"], r["loadavg_after"] = list(load0), list(os.getloadavg())
            others = r["machine"].get("others_share") or 0.0
            r["contended"] = bool(r["pytest_seen"]) or others > OTHERS_MAX_SHARE
            if r["contended"]:
                log.warning("W=%d rep %d was CONTENDED: pytest %s, others took %.0f%% of the machine",
                            w, rep, r["pytest_seen"][:3], 100 * others)
            runs.append(r)
    ok = [r for r in runs if "failed" not in r]
    result: dict[str, Any] = {"host": facts, "args": {k: v for k, v in vars(a).items() if k not in ("one", "out", "rep")},
                              "argv": sys.argv, "runs": runs}
    if a.micro:
        result["micro"] = micro(a)
    if ok:
        lines = table(ok)
        result["table"] = lines
        print(f"host: nproc {facts['nproc']}, {facts['cpu_model']}, {facts['mem_total_gib']} GiB, "
              f"hypervisor {facts['hypervisor']}")
        print(f"data: {a.docs} docs x {a.image_size} px in {a.shards} shards, {a.queries} queries, k={a.k}; "
              f"embed {a.embed_model}, rerank clip {a.rerank_model}; medians over {a.repeats} repeat(s)")
        print("\n".join(lines))
    if a.micro:
        for k, v in result["micro"].items():
            print(k, json.dumps({kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        log.info("wrote %s", a.json)
    return 0 if len(ok) == len(runs) else 1


def _stop_leftover(state: Path) -> None:
    """A child that died without its ``finally`` leaves cluster.json: stop those nodes by their PIDs."""
    if (state / "cluster.json").exists():
        from cluster.local_cluster import LocalCluster

        log.warning("stopping the leftover cluster recorded in %s", state)
        LocalCluster.load(str(state)).stop()


if __name__ == "__main__":
    sys.exit(main())
