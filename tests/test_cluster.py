"""Fault tolerance on a real multi-node Ray cluster on this host (``cluster/local_cluster.py``).

A head with no CPUs plus two 1-CPU worker nodes, each a separate ``ray start`` process tree. The test
process is the driver (``ray.address`` = the cluster). Each faulted run is compared with a clean run on
the same cluster: same candidates, same scores, same results.

* A worker node dies (its raylet SIGKILLed by PID) while embedding, and while reranking: the run
  completes on the surviving node; results equal the clean run's. A fresh node then replaces it.
* A reranker actor process exits mid-batch (``MMR_FAULT_INJECT=die:...``): Ray restarts it and retries
  the batch; results equal the clean run's.
* A stalled stage (``MMR_FAULT_INJECT=hang:...``): the watchdog fails the run with a clear message and
  ``LATEST`` does not move.
* The shipped RayService's ``serveConfigV2`` (``cluster/kuberay/rayservice.yaml``), with only the results root and
  the HTTP bind pointed at this host, deployed with the real ``serve deploy`` CLI through the head's dashboard;
  ``/healthz`` and a lookup over HTTP answer from the clean run. Its ``num_gpus: 1`` is met by a worker node that
  declares one GPU (a logical resource: no GPU here, the app falls back to CPU), stopped again afterwards.

Stages run with small CPU requests so that the whole pipeline fits on one surviving 1-CPU node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml

from cluster.local_cluster import LocalCluster, _free_port
from operators.storage import Storage, join
from operators.watchdog import StallError
from pipelines import publish as P
from pipelines.config import Config, parse_config
from pipelines.run import RunReport, run
from pipelines.sample import SampleInfo, make_sample
from tests.helpers import any_file, by_query, read_rows
from tests.reference import check_manifest, lean, run_cfg_dict

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

KILL_DEADLINE_S = 600.0  # a hang guard while waiting for the moment to kill, not a performance claim
RAYSERVICE = Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / "rayservice.yaml"
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    import ray

    if ray.is_initialized():  # runs here must find no local Ray: they connect to the cluster
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # this test's own cluster only; the shipped configs keep auth on
    mp.setenv("HF_HUB_OFFLINE", "1")
    # The GCS health-checks each raylet every second instead of every 3 s (5 misses in a row mark a node dead, each
    # check still given Ray's default 10 s to answer): a killed node is noticed in ~5 s, not ~15 s.
    # The dashboard (on loopback) is the address `serve deploy` talks to.
    c = LocalCluster(str(tmp_path_factory.mktemp("cluster")), workers=2, cpus_per_worker=1, dashboard=True,
                     env={"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000"})
    try:
        c.start()
        yield c
    finally:
        c.stop()
        mp.undo()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("cluster-sample") / "s"), docs=48, queries=6, shards=3,
                       seed=5, bad_rows=True, image_size=40)


def _cfg(cluster: LocalCluster, root: Path, sample: SampleInfo, **ray: Any) -> Config:
    d = lean(run_cfg_dict(str(root), sample.corpus, sample.queries), one_actor=False)
    d["ray"] = {"address": cluster.address, "progress_bars": False, **ray}
    # Everything must fit on one surviving 1-CPU node.
    d["embed"].update(actor_num_cpus=0.5, decode_num_cpus=0.25, write_num_cpus=0.25)
    d["rerank"].update(actor_num_cpus=0.5)
    return parse_config(d)


@contextlib.contextmanager
def _driver(monkeypatch: pytest.MonkeyPatch, fault: str | None) -> Iterator[None]:
    """One driver connection per run: the fault variable reaches workers through the job's runtime_env."""
    import ray

    if fault:
        monkeypatch.setenv("MMR_FAULT_INJECT", fault)
    else:
        monkeypatch.delenv("MMR_FAULT_INJECT", raising=False)
    try:
        yield
    finally:
        ray.shutdown()
        monkeypatch.delenv("MMR_FAULT_INJECT", raising=False)


def _results(report: RunReport) -> dict[str, list[dict[str, Any]]]:
    return by_query(read_rows(Storage(), join(report.run_dir, "results")))


def _assert_same_results(got: RunReport, want: RunReport) -> None:
    a, b = _results(got), _results(want)
    assert set(a) == set(b)
    for q in b:
        assert [r["doc_id"] for r in a[q]] == [r["doc_id"] for r in b[q]], q
        for col in ("retrieval_score", "rerank_score"):
            np.testing.assert_allclose([r[col] for r in a[q]], [r[col] for r in b[q]], atol=1e-5, err_msg=q)
    check_manifest(Storage(), got.run_dir, got.run_id)
    latest, _ = P.read_latest(Storage(), str(Path(got.run_dir).parent.parent))
    assert latest is not None and latest["run_id"] == got.run_id


@pytest.fixture(scope="module")
def clean(cluster: LocalCluster, sample: SampleInfo, tmp_path_factory: pytest.TempPathFactory) -> RunReport:
    mp = pytest.MonkeyPatch()
    try:
        with _driver(mp, None):
            rep = run(_cfg(cluster, tmp_path_factory.mktemp("clean") / "root", sample))
    finally:
        mp.undo()
    assert rep.published
    return rep


def _warm_copy(clean: RunReport, root: Path) -> None:
    """``root`` as a copy of the clean run's root without its runs: the embedding cache (content-addressed) and the
    index are found there, so a run embeds nothing; LATEST is left out too (a run here publishes first)."""
    src = Path(clean.run_dir).parent.parent
    shutil.copytree(src, root, ignore=lambda d, names: {"runs", P.LATEST} & set(names) if d == str(src) else set(),
                    dirs_exist_ok=True)


def _actor_pids(name: str) -> list[int]:
    """PIDs of live Ray actor processes whose title mentions ``name`` (e.g. ``ImageEmbedder``)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(name in part for part in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.info["pid"])
    return out


class NodeKiller(threading.Thread):
    """Waits until ``ready()`` and an actor named ``actor`` runs, then kills the raylet of its node."""

    def __init__(self, cluster: LocalCluster, actor: str, ready: Callable[[], bool]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.actor, self.ready = cluster, actor, ready
        self.killed: str | None = None
        self.error: str | None = None
        self._halt = threading.Event()

    def _ours(self, pid: int) -> bool:
        try:
            self.cluster.node_of(pid)
            return True
        except (LookupError, OSError):
            return False  # another Ray on this host (a parallel test worker's) runs the same actor class

    def run(self) -> None:
        deadline = time.monotonic() + KILL_DEADLINE_S
        while not self._halt.is_set() and time.monotonic() < deadline:
            pids = [p for p in _actor_pids(self.actor) if self._ours(p)]
            if pids and self.ready():
                try:
                    node = self.cluster.node_of(pids[0])
                    self.cluster.kill_raylet(node)
                    self.killed = node
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.error = f"{type(e).__name__}: {e}"
                return
            time.sleep(0.05)
        self.error = f"no {self.actor} actor with work done within {KILL_DEADLINE_S:.0f}s"

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)




@pytest.mark.parametrize("stage", ["embed", "rerank"])
def test_worker_node_killed_mid_stage(stage: str, cluster: LocalCluster, sample: SampleInfo, clean: RunReport,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    if stage == "rerank":  # the clean run's embedding cache and index: the run's work here is search and rerank
        _warm_copy(clean, root)
    if stage == "embed":
        # Slow batches widen the window: the kill lands after the first parts, long before the stage ends.
        actor, fault = "ImageEmbedder", "slow:embed_batch:1.0"
        ready = any_file(root, "embeddings/*/corpus/*/part-*.parquet")
        not_done = lambda: not any_file(root, "runs/*/_STAGES/embed_corpus.json")()  # noqa: E731
    else:
        actor, fault = "RerankPairs", "slow:rerank_batch:1.0"
        ready = lambda: any_file(root, "runs/*/_pairs/*/*.parquet")()  # noqa: E731
        not_done = lambda: not any_file(root, "runs/*/_STAGES/rerank.json")()  # noqa: E731
    killer = NodeKiller(cluster, actor, lambda: ready() and not_done())
    with _driver(monkeypatch, fault):
        killer.start()
        try:
            rep = run(_cfg(cluster, root, sample))
        finally:
            killer.stop()
    try:
        assert killer.error is None, killer.error
        assert killer.killed, "the node was never killed"
        _assert_same_results(rep, clean)
    finally:
        cluster.add_worker(f"{killer.killed or 'x'}-replacement-{stage}")


def test_reranker_actor_dies_mid_batch(cluster: LocalCluster, sample: SampleInfo, clean: RunReport,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "died-once"
    _warm_copy(clean, tmp_path / "root")  # the fault is in rerank: the embeddings and index are the clean run's
    with _driver(monkeypatch, f"die:rerank_batch:{marker}"):
        rep = run(_cfg(cluster, tmp_path / "root", sample))
    assert marker.exists(), "the fault never fired: no actor died"
    _assert_same_results(rep, clean)


def test_watchdog_fails_a_stalled_stage(cluster: LocalCluster, sample: SampleInfo, clean: RunReport,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    cfg = _cfg(cluster, root, sample, stall_timeout_s=6)
    with _driver(monkeypatch, "hang:embed_batch"), pytest.raises(StallError) as err:
        run(cfg)
    msg = str(err.value)
    assert "stage 'embed corpus' stalled" in msg and "stall_timeout_s=6" in msg, msg
    assert not (root / P.LATEST).exists()
    assert not list(root.glob(f"runs/*/{P.MANIFEST}"))
    # The cluster is usable again afterwards: the hung actor was torn down with the stage. The same root, with
    # the failed run's leftovers, gets the clean run's embedding cache and index (content-addressed): this run
    # checks the cluster and the resume over a failed run, not a second cold embedding.
    _warm_copy(clean, root)
    with _driver(monkeypatch, None):
        rep = run(_cfg(cluster, root, sample))
    _assert_same_results(rep, clean)


# --- the shipped RayService's Serve config on this cluster -----------------------------------------------------------

# Every leaf of the shipped serveConfigV2 the test changes, with its shipped value: only what points outside this host
# (the results bucket) or would bind where other things on a shared host listen (0.0.0.0:8000; Serve's proxies set
# SO_REUSEPORT, so another Serve on 8000 would silently share the port). A drift in the manifest fails here.
SERVE_OVERRIDES: dict[tuple[str | int, ...], Any] = {
    ("applications", 0, "runtime_env", "env_vars", "MMRERANK_ROOT"): "s3://my-bucket/mmrerank/out",
    ("http_options", "host"): "0.0.0.0",
    ("http_options", "port"): 8000,
}


def _leaves(d: Any, path: tuple[str | int, ...] = ()) -> dict[tuple[str | int, ...], Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _leaves(sub, (*path, key)).items()}
    if isinstance(d, list):
        return {k: v for i, sub in enumerate(d) for k, v in _leaves(sub, (*path, i)).items()}
    return {path: d}


def _set(d: Any, path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def _serve_details(dashboard: str) -> dict[str, Any]:
    r = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10)  # what `serve status` reads
    r.raise_for_status()
    return dict(r.json())


def _serve_cli(*args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).with_name("serve")), *args], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))  # the module's RAY_AUTH_MODE=disabled
    assert out.returncode == 0, f"serve {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _poll(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    """``check()``'s first truthy answer. LookupError (not there yet) and HTTP or JSON errors (the app is still
    coming up) mean try again; anything else (a failed deploy, a dead node) fails at once."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (LookupError, httpx.HTTPError, ValueError) as e:  # reported when the deadline passes
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s:.0f}s (last error: {last})")


def test_shipped_rayservice_serve_config_deploys_on_the_cluster(cluster: LocalCluster, clean: RunReport,
                                                                tmp_path: Path) -> None:
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    shipped = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    got = _leaves(shipped)
    assert {k: got.get(k) for k in SERVE_OVERRIDES} == SERVE_OVERRIDES, "the shipped serveConfigV2 moved a key"
    port = _free_port()
    root = str(Path(clean.run_dir).parent.parent)  # the clean run's published root (LATEST names it)
    cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for key, value in zip(SERVE_OVERRIDES, (root, "127.0.0.1", port), strict=True):
        _set(cfg, key, value)
    changed = {k for k, v in _leaves(cfg).items() if got.get(k, object()) != v} | set(got) - set(_leaves(cfg))
    assert changed == set(SERVE_OVERRIDES)
    assert "s3://" not in yaml.safe_dump(cfg), "the shipped config points at object storage somewhere else too"

    # A worker node with what one replica of each deployment asks, GPU included (shipped LiveModels: num_gpus 1).
    asks = [d["ray_actor_options"] for d in cfg["applications"][0]["deployments"]]
    gpus = sum(a.get("num_gpus", 0) for a in asks)
    assert gpus == 1
    gpu_node = cluster.add_worker("serve-gpu", num_cpus=sum(a.get("num_cpus", 1) for a in asks), num_gpus=gpus)
    try:
        path = tmp_path / "serve-config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        _serve_cli("deploy", str(path), "--address", cluster.dashboard_address)
        log.info("serve deploy %s: accepted", path)

        def running() -> dict[str, Any]:
            cluster.check_nodes()  # a node that died would otherwise look like a slow deploy
            app = _serve_details(cluster.dashboard_address)["applications"].get("mmrerank") or {}
            assert app.get("status") != "DEPLOY_FAILED", app.get("message")
            if app.get("status") != "RUNNING":  # reported by _poll if it never gets there
                raise LookupError(f"app {app.get('status')}: {app.get('message')}; deployments "
                                  f"{ {k: d.get('status') for k, d in (app.get('deployments') or {}).items()} }")
            return dict(app)

        app = _poll("the app RUNNING", running, 300)
        log.info("app RUNNING")
        (replica,) = app["deployments"]["LiveModels"]["replicas"]
        assert cluster.node_of(replica["pid"]) == gpu_node.name  # its GPU ask was met by the declared GPU

        base = f"http://127.0.0.1:{port}"

        def healthy() -> dict[str, Any]:
            h = dict(httpx.get(f"{base}/healthz", timeout=10).json())
            if h["status"] != "ok":
                raise LookupError(f"/healthz {h}")
            return h

        # "ok" once the Api replica loaded the run and LiveModels its models (on CPU: torch sees no CUDA here).
        health = _poll("/healthz ok", healthy, 300)
        log.info("/healthz: %s", health)
        assert health["run_id"] == clean.run_id, health
        want = _results(clean)
        qid = sorted(want)[0]
        r = httpx.get(f"{base}/v1/results/{qid}", timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query_id"] == qid and body["run_id"] == clean.run_id
        rows = want[qid]
        assert [x["doc_id"] for x in body["results"]] == [x["doc_id"] for x in rows]
        assert [x["rank"] for x in body["results"]] == [x["rank"] for x in rows]
        for col in ("retrieval_score", "rerank_score", "final_score"):  # the stored float32s, through JSON
            np.testing.assert_array_equal(np.float32([x[col] for x in body["results"]]),
                                          np.float32([x[col] for x in rows]), err_msg=col)
        log.info("served %s on the shipped serveConfigV2: %d rows for %s", clean.run_id, len(rows), qid)
    finally:
        # Serve down and the GPU node gone: the other tests' runs would otherwise see a GPU and ask for it.
        try:
            # What `serve shutdown -y` sends (without a second CLI process's start-up); asynchronous: wait for it.
            httpx.delete(f"{cluster.dashboard_address}/api/serve/applications/", timeout=60).raise_for_status()
            _poll("Serve shut down",
                  lambda: _serve_details(cluster.dashboard_address)["controller_info"].get("node_id") is None, 120)
        finally:
            cluster.stop_node(gpu_node.name)


def test_node_temp_dir_stays_short_whatever_the_node_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacement nodes get long names (a replacement of a replacement); Ray puts its plasma socket at
    <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store, which must fit AF_UNIX's 107 bytes."""
    import cluster.local_cluster as lc

    started: list[list[str]] = []

    class Proc:
        pid = 4_194_304

    monkeypatch.setattr(lc.subprocess, "Popen", lambda args, **kw: started.append(args) or Proc())
    c = LocalCluster(state=str(tmp_path))
    names = ["head", "worker1-replacement-embed-replacement-rerank", "w" * 200]
    nodes = []
    for name in names:
        nodes.append(c._start_node(name, []))
        c.nodes.append(nodes[-1])
    socket_tail = "/session_2026-11-30_07-13-07_004889_4194304/sockets/plasma_store"
    assert all(len(n.temp_dir) + len(socket_tail) <= 107 for n in nodes), [n.temp_dir for n in nodes]
    assert len({n.temp_dir for n in nodes}) == len(nodes)
    assert [f"--temp-dir={n.temp_dir}" in args for n, args in zip(nodes, started, strict=True)] == [True] * 3


@pytest.mark.parametrize("failures", [1, 2])
def test_a_worker_whose_start_fails_is_started_again_once(failures: int, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """`ray start` exits when its raylet does not register within Ray's fixed 30 s (a loaded host): the cluster
    starts that worker once more, and gives up with the error after that. Nodes here are plain processes (one
    that prints Ray's message and exits, or one that stays up); the cluster counts the ones that stay up."""
    import cluster.local_cluster as lc

    attempts: dict[str, int] = {}
    up: set[int] = set()

    def start_node(self: LocalCluster, name: str, args: list[str]) -> lc.Node:
        attempts[name] = attempts.get(name, 0) + 1
        fails = name == "worker1" and attempts[name] <= failures
        script = ("echo 'Exception: The current node timed out during startup.'; exit 1" if fails
                  else "exec sleep 600")
        with open(tmp_path / f"{name}.log", "wb") as logf:
            proc = subprocess.Popen(["sh", "-c", script], stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if not fails:
            up.add(proc.pid)
        return lc.Node(name, proc.pid, str(tmp_path / f"t{proc.pid}"))

    monkeypatch.setattr(LocalCluster, "_start_node", start_node)
    monkeypatch.setattr(LocalCluster, "_alive_nodes",
                        lambda self: sum(1 for n in self.nodes if n.pgid in up and lc._alive(n.pgid)))
    c = LocalCluster(state=str(tmp_path), workers=2)
    try:
        if failures == 1:
            c.start(timeout_s=60)
            assert attempts == {"head": 1, "worker0": 1, "worker1": 2}
            assert [(n.name, n.lost) for n in c.nodes] == \
                [("head", False), ("worker0", False), ("worker1", True), ("worker1", False)]
            c.check_nodes()  # the lost start does not count as a node that died
            assert "node worker1 failed to start (Exception: The current node timed out during startup.)" \
                in caplog.text
        else:
            with pytest.raises(RuntimeError, match="worker1 exited"):
                c.start(timeout_s=60)
            assert attempts["worker1"] == 2
    finally:
        c.stop()
    assert not any(lc._alive(pid) for pid in up)


def test_an_exited_node_leader_is_not_alive() -> None:
    """`ray start --block` is our child: once it exits it must not count as alive (as an unreaped zombie it
    did, and LocalCluster.stop sat out its whole SIGTERM grace for every node)."""
    from cluster.local_cluster import _alive

    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        assert _alive(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(proc.pid)
    finally:
        if proc.returncode is None and _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
