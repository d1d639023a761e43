"""Serve benchmark: lookup and live-search latency of the Ray Serve app (``pipelines.serve``) over real HTTP.

Sets itself up unless told otherwise::

    python benchmarks/bench_serve.py                                  # quickstart sample + run in a tmp dir, then serve it
    python benchmarks/bench_serve.py --root /tmp/qs/out               # serve an existing published root
    python benchmarks/bench_serve.py --root /tmp/qs/out --url http://127.0.0.1:8000   # an app already running
    python benchmarks/bench_serve.py --json /tmp/bench-serve.json --lookups 500 --concurrency 1,8,32 --searches 60

What is measured (client side: ``time.perf_counter`` around each request, keep-alive ``http.client`` connections,
one per client thread; the client threads run on the same machine and their CPU counts against the server):

lookup
    ``GET /v1/results/<query_id>`` (query ids of the served run, round-robin) at each concurrency level:
    ``--lookups`` requests split over C threads; p50 / p90 / p99 / max latency and requests/s (= requests /
    wall time of the level). Preceded by ``--warmup`` untimed requests.
floor (``--floor``, on by default when the script starts the app)
    the same load against (a) ``GET /healthz`` of the app (same ingress, no results work) and (b) a trivial
    FastAPI ingress deployment (``/floor/ping``, returns a constant) deployed next to the app: what Serve's HTTP
    proxy -> replica path costs by itself. Plus the in-process cost of ``ResultsStore.lookup`` (no HTTP).
live search
    ``POST /v1/search`` (rerank on, ``top_k`` = the run's ``search.k``) sequentially (``--search-concurrency``)
    over the run's query texts and a few unseen ones: client latency and the response's own breakdown
    (embed_ms, search_ms, fetch_ms, rerank_ms, total_ms), p50 / p99.

The machine may be shared: the load average and the machine-wide CPU busy fraction (``/proc/stat``) are
recorded for every phase and printed; figures taken while other processes kept the CPUs busy are noisy.
A/B of a fix (``--ab-async``): a second copy of the app is deployed under ``/variant`` whose GET endpoints
(``/healthz``, ``/v1/runs/current``, ``/v1/results/{id}``) are ``async def`` instead of ``def`` (generated from
``pipelines/serve.py`` by rewriting those three ``def`` lines, nothing else), serving the same root; then
``--ab-rounds`` rounds alternate the same lookup load (each concurrency level) between the two, so both
sides see the same machine noise. ``--ab-module FILE.py`` does the same with any patched copy of
``pipelines/serve.py`` (its ``build_app``).
``--ray-env KEY=VALUE`` (repeatable) sets environment variables before Ray starts (e.g. Serve's proxy flags).
``--ingress direct|proxy`` (default: the app's default, direct): whether the app's ingress replica listens on
the port itself or Serve's HTTP proxy does; the floor apps and the A/B variant are routed by the proxy, so
they need ``--ingress proxy`` (with ``direct`` the floor is ``/healthz`` alone).
Nothing is asserted; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
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

UNSEEN = ["a green hexagon next to a violet moon", "two blue circles", "a black square on white", "red"]


# --- machine load -------------------------------------------------------------------------------------------


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals), idle


def _label(p: Any) -> str:
    if p.pid == os.getpid():
        return "client+driver"
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return "other"
    if "ServeReplica:" in cmd:
        return cmd.split("ServeReplica:", 1)[1].split()[0].split(".")[0]  # app:Deployment
    for key in ("ProxyActor", "ServeController", "raylet", "gcs_server"):
        if key in cmd:
            return key
    return "other ray"


def _proc_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds) for this process and its descendants (a local Ray started here included)."""
    try:
        import psutil
    except ImportError:
        return {}
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (_label(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


class Load:
    """Load average, machine-wide CPU busy fraction, our share of it, and our CPU time by process kind."""

    def __enter__(self) -> Load:
        self.t0 = _cpu_times()
        self.p0 = _proc_cpu()
        self.w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        total, idle = _cpu_times()
        p1 = _proc_cpu()
        self.wall = time.perf_counter() - self.w0
        self.by: dict[str, float] = {}
        for pid, (label, cpu) in p1.items():
            self.by[label] = self.by.get(label, 0.0) + cpu - (self.p0[pid][1] if pid in self.p0 else 0.0)
        own = sum(self.by.values()) if p1 else float("nan")
        dt, di = total - self.t0[0], idle - self.t0[1]
        self.busy = 1.0 - di / dt if dt > 0 else 0.0
        busy_s = (dt - di) / os.sysconf("SC_CLK_TCK")
        # > 1 is possible: rounding in /proc/stat; processes that exited meanwhile are not counted
        self.own_share = own / busy_s if busy_s > 0 else float("nan")
        self.own_cpu_s = own
        self.loadavg = os.getloadavg()[0]

    def as_dict(self) -> dict[str, Any]:
        return {"cpu_busy": round(self.busy, 3), "own_share": round(self.own_share, 3),
                "loadavg_1m": round(self.loadavg, 2), "own_cpu_s_by": {k: round(v, 4) for k, v in self.by.items()}}


def idle_cpu(seconds: float = 5.0) -> dict[str, float]:
    """CPU ms per second of our processes with no traffic (Ray's background work, the reload poller)."""
    with Load() as load:
        time.sleep(seconds)
    return {k: 1000 * v / load.wall for k, v in load.by.items()}


# --- stats ------------------------------------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(lat_s: list[float]) -> dict[str, float]:
    ms = [1000.0 * x for x in lat_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else float("nan"), "mean_ms": statistics.fmean(ms) if ms else float("nan")}


# --- HTTP load ------------------------------------------------------------------------------------------------


def _conn(url: str) -> http.client.HTTPConnection:
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
    c.connect()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _request(c: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read()


def run_timed(threads: list[threading.Thread], barrier: threading.Barrier) -> tuple[Load, float]:
    """Start the client threads, release them together (they wait on ``barrier``), join them: the CPU load
    and the wall time of the measured phase."""
    for t in threads:
        t.start()
    with Load() as load:
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return load, wall


def load_test(url: str, paths: list[str], n: int, concurrency: int, warmup: int = 0) -> dict[str, Any]:
    """``n`` GETs over ``concurrency`` keep-alive connections (one thread each); latency + throughput."""
    if warmup:
        c = _conn(url)
        for i in range(warmup):
            _request(c, "GET", paths[i % len(paths)])
        c.close()
    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    barrier = threading.Barrier(concurrency + 1)

    def worker(w: int) -> None:
        c = _conn(url)
        barrier.wait()
        for i in range(per[w]):
            path = paths[(w * 7919 + i) % len(paths)]
            t0 = time.perf_counter()
            try:
                status, _ = _request(c, "GET", path)
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{type(e).__name__}: {e}")
                c.close()
                c = _conn(url)
                continue
            dt = time.perf_counter() - t0
            if status == 200:
                lat[w].append(dt)
            else:  # not a latency sample: a 503 answered in 1 ms would flatter the figures
                errors.append(f"HTTP {status} for {path}")
        c.close()

    load, wall = run_timed([threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)],
                           barrier)
    all_lat = [x for xs in lat for x in xs]
    return {"concurrency": concurrency, **summary(all_lat), "rps": len(all_lat) / wall if wall > 0 else 0.0,
            "wall_s": wall, "errors": len(errors), "error_examples": errors[:3], **load.as_dict(),
            # CPU of client + proxy + replicas per request: what the machine's load does not change much
            "cpu_ms_per_req": 1000 * load.own_cpu_s / max(1, len(all_lat) + len(errors))}


def search_test(url: str, texts: list[str], k: int, n: int, concurrency: int = 1) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]

    def worker(w: int) -> None:
        c = _conn(url)
        for i in range(per[w]):
            body = json.dumps({"text": texts[(w + i * concurrency) % len(texts)], "top_k": k}).encode()
            t0 = time.perf_counter()
            status, data = _request(c, "POST", "/v1/search", body)
            dt = time.perf_counter() - t0
            if status != 200:
                errors.append(f"HTTP {status}: {data[:200]!r}")
                continue
            timing = json.loads(data)["timing"]
            with lock:
                rows.append({"client_ms": 1000 * dt, **timing})
        c.close()

    # one untimed request per text: the first call of a text pays nothing special, but the first call
    # of the app pays lazy parquet opens and allocator warm-up
    c = _conn(url)
    _request(c, "POST", "/v1/search", json.dumps({"text": texts[0], "top_k": k}).encode())
    c.close()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    with Load() as load:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    keys = ["client_ms", "total_ms", "embed_ms", "search_ms", "fetch_ms", "rerank_ms"]
    out: dict[str, Any] = {"n": len(rows), "concurrency": concurrency, "k": k, "rps": len(rows) / wall,
                           "errors": len(errors), "error_examples": errors[:3], **load.as_dict()}
    for key in keys:
        xs = [r[key] for r in rows if key in r]
        out[key] = {"p50": pct(xs, 50), "p99": pct(xs, 99), "mean": statistics.fmean(xs) if xs else float("nan")}
    return out


# --- setup ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ok(url: str, deadline_s: float = 600.0) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        try:
            c = _conn(url)
            status, data = _request(c, "GET", "/healthz")
            c.close()
            last = json.loads(data) if status == 200 else status
            if isinstance(last, dict) and last.get("status") in ("ok", "degraded"):  # degraded still serves
                return last
        except (OSError, http.client.HTTPException, ValueError) as e:
            last = repr(e)
        time.sleep(0.5)
    raise SystemExit(f"the app at {url} did not become healthy in {deadline_s:.0f}s: {last!r}")


def deploy_floor() -> None:
    """A trivial FastAPI ingress under /floor: the proxy -> replica -> FastAPI path with no work in it."""
    from fastapi import FastAPI
    from ray import serve

    floor_api = FastAPI()

    @serve.deployment(logging_config={"enable_access_log": False}, max_ongoing_requests=64)
    @serve.ingress(floor_api)
    class Floor:
        @floor_api.get("/ping")
        def ping(self) -> dict[str, str]:
            return {"ok": "yes"}

        @floor_api.get("/aping")
        async def aping(self) -> dict[str, str]:
            return {"ok": "yes"}

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")


ASYNC_ENDPOINTS = ("healthz", "current", "results")


def write_async_variant(dest: Path) -> Path:
    """``pipelines/serve.py`` with the lookup-path GET endpoints made ``async def``: ``dest/mmr_serve_async.py``."""
    src = (REPO / "pipelines" / "serve.py").read_text()
    for name in ASYNC_ENDPOINTS:
        old = f"    def {name}(self"
        if old not in src:
            raise SystemExit(f"--ab-async: `def {name}(self` not found in pipelines/serve.py (already async?)")
        src = src.replace(old, f"    async def {name}(self", 1)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "mmr_serve_async.py").write_text(src)
    return dest / "mmr_serve_async.py"


def deploy_variant(module_file: Path, settings: Any) -> None:
    """``build_app`` of a patched copy of pipelines/serve.py, as app "variant" under /variant."""
    import importlib

    from ray import serve

    mod = importlib.import_module(module_file.stem)
    serve.run(mod.build_app(settings), name="variant", route_prefix="/variant")


def run_info(root: str) -> tuple[str, list[str], list[str], int]:
    """(run_id, query ids with results, query texts, search.k) of the run LATEST names."""
    import pyarrow.dataset as ds

    from operators.storage import Storage, join
    from pipelines.publish import latest_run

    storage = Storage()
    found = latest_run(storage, root)
    if found is None:
        raise SystemExit(f"{root}: nothing published (no LATEST)")
    run_dir, manifest = found
    cfg = storage.read_json(join(run_dir, "_RUN.json"))["config"]
    qids = sorted(set(ds.dataset(join(run_dir, "results")).to_table(columns=["query_id"])
                      .column("query_id").to_pylist()))
    texts = ds.dataset(cfg["queries"]).to_table(columns=["text"]).column("text").to_pylist()
    return manifest["run_id"], qids, [t for t in texts if t], int(cfg["search"]["k"])


def inprocess_lookup_us(root: str, qids: list[str], n: int = 20000) -> float:
    from operators.storage import Storage
    from pipelines.serve import load_store

    store = load_store(Storage(), root)
    t0 = time.perf_counter()
    for i in range(n):
        store.lookup(qids[i % len(qids)], None)
    return 1e6 * (time.perf_counter() - t0) / n


def ab_rounds(url: str, paths: list[str], levels: list[int], n: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Alternate the same lookup load between the app as is and the variant under /variant, ``rounds`` times."""
    sides = {"as is": paths, "variant": ["/variant" + p for p in paths]}
    out: dict[str, Any] = {side: {str(c): [] for c in levels} for side in sides}
    for r in range(rounds):
        for c in levels:
            order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
            for side, ps in order:
                res = load_test(url, ps, n, c, warmup=warmup)
                out[side][str(c)].append(res)
                print(f"A/B round {r + 1} {side} c={c}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                      f"{res['rps']:.0f} req/s (load {res['loadavg_1m']:.1f})", flush=True)
    return out


# --- report -----------------------------------------------------------------------------------------------------


def print_report(res: dict[str, Any]) -> None:
    p = print
    p("")
    p(f"run {res['run_id']} ({res['queries']} queries with results), app {res['url']} "
      f"({res.get('ingress', '?')} ingress)")
    p(f"machine: {os.cpu_count()} CPUs; load average at start {res['loadavg_start']:.2f}. 'cpu busy' = machine-wide "
      "busy fraction during the level, 'ours' = the share of that busy time spent by this script and the Ray "
      "instance it started (client threads, proxy, replicas); with an external --url only the client counts; "
      "'cpu ms/req' = that CPU time per request (2 cores / it = the most req/s this machine can give idle)")
    p("")
    p(f"{'target':<22} {'conc':>4} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
      f"{'req/s':>8} {'err':>4} {'cpu busy':>8} {'ours':>5} {'load1':>6} {'cpu ms/req':>10}")
    for name, levels in res["lookup"].items():
        for r in levels:
            p(f"{name:<22} {r['concurrency']:>4} {r['n']:>5} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['rps']:>8.1f} {r['errors']:>4} "
              f"{100 * r['cpu_busy']:>7.0f}% {100 * r['own_share']:>4.0f}% {r['loadavg_1m']:>6.2f} "
              f"{r['cpu_ms_per_req']:>10.2f}")
    idle = res.get("idle_cpu_ms_per_s") or {}
    rows = [(name, r) for name, levels in res["lookup"].items() for r in levels]
    rows += [(f"A/B {side}", r) for side, per in (res.get("ab") or {}).items() for rs in per.values() for r in rs[-1:]]
    labels = sorted({k for _, r in rows for k in r.get("own_cpu_s_by", {})} | set(idle))
    if labels and rows:
        p("")
        p("our CPU per request by process, ms (net of the idle background measured first, in ms per second: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(idle.items())) + ")")
        p(f"{'target':<22} {'conc':>4} " + " ".join(f"{k[:19]:>19}" for k in labels))
        for name, r in rows:
            n = max(1, r["n"] + r["errors"])
            cells = [(r.get("own_cpu_s_by", {}).get(k, 0.0) - idle.get(k, 0.0) / 1000 * r["wall_s"]) * 1000 / n
                     for k in labels]
            p(f"{name[:22]:<22} {r['concurrency']:>4} " + " ".join(f"{c:>19.2f}" for c in cells))
    if res.get("inprocess_lookup_us") is not None:
        p(f"in-process ResultsStore.lookup: {res['inprocess_lookup_us']:.1f} us per call (no HTTP)")
    s = res.get("search")
    if s:
        p("")
        p(f"live search (POST /v1/search, rerank on, top_k={s['k']}, concurrency {s['concurrency']}, n={s['n']}, "
          f"{s['rps']:.1f} req/s, errors {s['errors']}, cpu busy {100 * s['cpu_busy']:.0f}% "
          f"({100 * s['own_share']:.0f}% of it ours), "
          f"load1 {s['loadavg_1m']:.2f})")
        p(f"{'':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for key in ("client_ms", "total_ms", "embed_ms", "search_ms", "fetch_ms", "rerank_ms"):
            v = s[key]
            p(f"{key:<10} {v['p50']:>8.2f} {v['p99']:>8.2f} {v['mean']:>8.2f}")
    ab = res.get("ab")
    if ab:
        p("")
        p(f"A/B lookup, the app as is vs {res['variant']}, alternating rounds: median over rounds [min..max]")
        p(f"{'side':<14} {'conc':>4} {'p50 ms':>22} {'p99 ms':>22} {'req/s':>22} {'cpu ms/req':>22}")
        for side, per in ab.items():
            for c, rs in per.items():
                cells = []
                for key in ("p50_ms", "p99_ms", "rps", "cpu_ms_per_req"):
                    xs = [r[key] for r in rs]
                    cells.append(f"{statistics.median(xs):8.1f} [{min(xs):.1f}..{max(xs):.1f}]")
                p(f"{side:<14} {c:>4} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {cells[3]:>22}")
    p("")
    target = [r for r in res["lookup"].get("lookup", []) if r["concurrency"] == 8]
    if target:
        t = target[0]
        p(f"target lookup p99 < 20 ms at concurrency 8: {t['p99_ms']:.2f} ms -> "
          f"{'met' if t['p99_ms'] < 20 else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--root", help="a published root (LATEST) to serve; default: a fresh quickstart in --workdir")
    ap.add_argument("--url", help="benchmark an app already running at this URL (needs --root for query ids)")
    ap.add_argument("--workdir", help="where the quickstart goes (default: a tmp dir)")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--lookups", type=int, default=500, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--searches", type=int, default=60, help="live searches (0: skip)")
    ap.add_argument("--search-concurrency", type=int, default=1)
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure /healthz and a trivial Serve app (default: on unless --url)")
    ap.add_argument("--num-cpus", type=int, default=8,
                    help="logical CPUs of the serving Ray instance (replicas reserve 1 each; the quickstart, if any, "
                         "runs first in its own 2-CPU instance)")
    ap.add_argument("--ab-async", action="store_true", help="A/B the async-GET-endpoints fix (see above)")
    ap.add_argument("--ab-module", type=Path, metavar="FILE.py",
                    help="A/B against any patched copy of pipelines/serve.py (its build_app), instead of --ab-async")
    ap.add_argument("--ab-rounds", type=int, default=3)
    ap.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                    help="the app's ingress (ServeSettings.ingress); floor apps and A/B need proxy")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)

    for kv in args.ray_env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    floor = args.floor if args.floor is not None else args.url is None
    if args.url and not args.root:
        ap.error("--url needs --root (to know the run's query ids and texts)")
    if args.ingress == "direct" and (args.ab_async or args.ab_module):
        ap.error("--ab-async / --ab-module deploy a second app behind Serve's proxy: use --ingress proxy")
    loadavg_start = os.getloadavg()[0]

    started_ray = False
    root = args.root
    url = args.url
    if url is None:
        import logging

        import ray

        logging.basicConfig(level=logging.WARNING)
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ}
        if root is None:
            from pipelines.quickstart import quickstart

            work = args.workdir or tempfile.mkdtemp(prefix="bench-serve-")
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            t = time.perf_counter()
            rep = quickstart(work, docs=args.docs, queries=args.queries, shards=args.shards)
            print(f"quickstart: run {rep.run_id} in {time.perf_counter() - t:.0f}s under {work}", flush=True)
            ray.shutdown()
            root = str(Path(work) / "out")
        variant = None
        if args.ab_module:
            variant = args.ab_module.resolve()
        elif args.ab_async:
            variant = write_async_variant(Path(tempfile.mkdtemp(prefix="bench-serve-ab-")))
        if variant is not None:
            mod_dir = variant.parent
            sys.path.insert(0, str(mod_dir))
            # local workers inherit the driver's environment: they can import the variant too
            os.environ["PYTHONPATH"] = os.pathsep.join([str(mod_dir), str(REPO), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        started_ray = True
        from pipelines.serve import ServeSettings, start

        settings = ServeSettings(root=root, port=_free_port(), device="cpu", ingress=args.ingress)
        start(settings)
        url = f"http://{settings.host}:{settings.port}"
        if floor and args.ingress == "proxy":
            deploy_floor()
        if variant is not None:
            deploy_variant(variant, settings)
    assert root is not None
    _wait_ok(url)
    ab = (args.ab_async or args.ab_module is not None) and started_ray
    if ab:
        _wait_ok(url + "/variant")
    run_id, qids, texts, k = run_info(root)
    res: dict[str, Any] = {"url": url, "root": root, "run_id": run_id, "queries": len(qids), "ingress": args.ingress,
                           "variant": str(args.ab_module) if args.ab_module else "async GET endpoints",
                           "loadavg_start": loadavg_start, "args": vars(args), "lookup": {}}
    paths = [f"/v1/results/{urllib.parse.quote(q, safe='')}" for q in qids]
    time.sleep(5.0)  # let replicas finish starting (model loads) before the idle baseline
    res["idle_cpu_ms_per_s"] = idle_cpu()
    targets = {"lookup": paths}
    if floor:
        targets["healthz"] = ["/healthz"]
        if started_ray and args.ingress == "proxy":
            targets["floor (trivial app)"] = ["/floor/ping"]
            targets["floor async"] = ["/floor/aping"]
    try:
        for name, ps in targets.items():
            res["lookup"][name] = []
            for c in levels:
                r = load_test(url, ps, args.lookups, c, warmup=args.warmup)
                res["lookup"][name].append(r)
                print(f"{name} c={c}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['rps']:.0f} req/s "
                      f"(errors {r['errors']}, cpu busy {100 * r['cpu_busy']:.0f}%, load {r['loadavg_1m']:.1f})",
                      flush=True)
        if ab:
            res["ab"] = ab_rounds(url, paths, levels, args.lookups, args.ab_rounds, args.warmup)
        res["inprocess_lookup_us"] = inprocess_lookup_us(root, qids)
        if args.searches:
            res["search"] = search_test(url, texts + UNSEEN, k, args.searches, args.search_concurrency)
    finally:
        if started_ray:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
