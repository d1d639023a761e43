"""Connect to (or start) Ray for a pipeline run; the only place that calls ``ray.init``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from pipelines.config import RayConfig

log = logging.getLogger(__name__)

# Non-secret settings forwarded to workers. Credentials are never put in runtime_env (Ray stores it
# in GCS and shows it in the dashboard): local workers inherit the driver's environment, cluster
# workers get theirs from the node (instance profile / IRSA / Kubernetes secret env).
_FORWARD = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MMR_FAULT_INJECT")

_SINGLE_NODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Quiet console (the CLI without -v): workers' lines other than our loggers' are dropped and Ray's own
# console loggers show warnings only; their log files under the session directory keep everything.
_QUIET: dict[str, bool | None] = {"on": None}  # None: not the CLI (tests, notebooks): Ray's defaults
_RAY_CONSOLE_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune")


def set_quiet_console(quiet: bool) -> None:
    """Set by the CLI before any Ray work: applies to the Ray instance ``ensure_ray`` starts or joins next."""
    _QUIET["on"] = quiet


def _forward_marked(data: dict[str, Any]) -> None:
    """Ray's worker-log callback in quiet mode: re-log our loggers' lines on the driver, drop the rest."""
    from operators.worker_logs import parse_marked

    for line in data.get("lines", ()):
        parsed = parse_marked(line)
        if parsed is not None:
            level, name, msg = parsed
            logging.getLogger(name).log(level, "%s", msg)


def _quiet_ray_loggers() -> None:
    for name in _RAY_CONSOLE_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
                h.setLevel(max(h.level, logging.WARNING))


def _filter_worker_logs() -> None:
    from ray._private import worker as ray_worker  # no public hook filters forwarded worker lines

    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(dispatcher, "remove_handler"):
        log.debug("this Ray has no worker-log dispatcher: worker logs are not filtered")
    else:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("mmr_worker_logs", _forward_marked)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray on 127.0.0.1 only (Ray's single-node mode).

    Left alone, a local Ray takes the machine's routable IP as node IP and its GCS, raylet and worker
    gRPC servers listen beyond loopback. Single-node mode uses the loopback IP; the processes ray.init
    spawns inherit the variable. Both are restored afterwards so a later connection to a real cluster
    from this process is unaffected.
    """
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(_SINGLE_NODE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(_SINGLE_NODE_VAR, None)
        else:
            os.environ[_SINGLE_NODE_VAR] = old_env


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep a SIGTERM handler the caller installed (the CLI's clean stop) across ``ray.init``.

    ``ray.init`` on the main thread replaces it with ``sys.exit(15)``; a process without a Python handler of
    its own keeps Ray's (it still runs ``finally`` blocks and Ray's atexit shutdown).
    """
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


# Ray ends a task worker idle for 1 s beyond the node's CPU count (its default). A run's stages follow one another
# with short gaps and run their tasks at num_cpus < 1, so on a small node every stage started its task workers
# anew (~1.6 CPU-s each on a 2-core machine). Kept for 5 min, they serve the next stage: a CLI run of the test
# suite's config takes 0.89 of the CPU and wall time of Ray's default (benchmarks/bench_local_ray.py, 3 rounds).
# Applied to the local instances this project starts (ensure_ray, cluster/local_cluster.py, the tests' own);
# a cluster's own settings are left alone.
LOCAL_SYSTEM_CONFIG: dict[str, Any] = {"idle_worker_killing_time_threshold_ms": 300_000}

# Ray waits a fixed 30 s for a new local raylet to register with its GCS (ray/_private/node.py); on a loaded
# host (the raylet waits for its agents, Python processes that import a lot) that can run out. A second start
# then usually succeeds: the local start is tried this many times.
LOCAL_START_ATTEMPTS = 2
_START_TIMEOUT = "timed out during startup"


def _stop_partial_start() -> None:
    """End the Ray processes a failed local start left behind (children of this process from the ray package:
    GCS, raylet, agents, monitors), by PID; no other child of this process is touched."""
    import psutil
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(ray_dir in part for part in [child.exe(), *child.cmdline()]):
                child.kill()


def _init_local(kwargs: dict[str, Any]) -> None:
    """``ray.init`` of a new local instance, started again once when Ray's registration wait runs out."""
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            with _loopback_only():
                ray.init(address="local", **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this timeout
            if _START_TIMEOUT not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("the local Ray did not come up within Ray's 30 s registration wait (a loaded machine?): "
                        "starting it again (attempt %d of %d)", attempt + 1, LOCAL_START_ATTEMPTS)
            _stop_partial_start()
            with contextlib.suppress(Exception):
                ray.shutdown()


def ensure_ray(cfg: RayConfig) -> dict[str, float]:
    """Initialise Ray unless already connected; return the cluster's resources."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
        env.update(cfg.env_vars)
        if _QUIET["on"] is not None:
            from operators.worker_logs import MARK_ENV

            env[MARK_ENV] = "1" if _QUIET["on"] else "info"
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
        if cfg.address:
            kwargs["address"] = cfg.address
        else:
            kwargs.update(include_dashboard=False, num_cpus=cfg.num_cpus, _system_config=LOCAL_SYSTEM_CONFIG)
            if cfg.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        log.info("starting Ray (%s)", cfg.address or "local")
        if _QUIET["on"]:
            _quiet_ray_loggers()
        with _keep_sigterm_handler():
            if cfg.address or os.environ.get("RAY_ADDRESS", "") not in ("", "local"):
                ray.init(**kwargs)  # a cluster: the config's address, else RAY_ADDRESS (set inside a Ray job)
            else:
                # A new local instance, also when a `ray start` cluster runs on this machine (ray.init()
                # alone would attach to it): `ray.address: null` means local.
                _init_local(kwargs)
        if _QUIET["on"]:
            _filter_worker_logs()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # Keep Ray Data's default: the first errored block fails the job. Bad rows never raise; they
    # become reject rows inside the operators, so an errored block means a real bug or outage.
    ctx.max_errored_blocks = 0
    return dict(ray.cluster_resources())


class PoolConfig(Protocol):
    """The fields an actor-pool stage config has (embed, rerank)."""

    device: str
    num_actors: int | str
    actor_num_cpus: float
    torch_threads: int | str


# A cap on "auto" torch threads per process, read from the driver's environment (see auto_threads).
MAX_THREADS_ENV = "MMR_MAX_TORCH_THREADS"


def auto_threads(n: int) -> int:
    """Torch threads per process for an "auto" setting: ``n``, capped by ``MMR_MAX_TORCH_THREADS`` when the
    driver's environment sets it: how an operator (or a test session running two pytest workers on two cores)
    says how many cores each process may use. More threads than cores given make every OpenMP barrier wait for a
    preempted thread (a 2-thread training epoch ran 0.7 s alone and 23 s beside another pytest worker). Not
    ``OMP_NUM_THREADS``: Ray sets that in its worker processes (1 for an actor holding no CPU, such as the job
    supervisor that starts a submitted job's entrypoint, which inherits it) and the cluster launcher's commands."""
    cap = os.environ.get(MAX_THREADS_ENV, "").strip()
    return max(1, min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n)


def actor_pool(cfg: PoolConfig, res: dict[str, float], section: str, other_tasks_cpus: float,
               auto_cpu_actors: int = 1, auto_pool_share: float = 1.0) -> tuple[str, int, dict[str, Any], int]:
    """Device, pool size, per-actor resources and torch threads, resolved once for the cluster.

    GPU clusters: one actor per GPU. CPU: ``num_actors`` ("auto": ``auto_cpu_actors``, at most the biggest
    node's CPUs), each using that node's cores split over the actors as torch threads (Ray starts
    workers with OMP_NUM_THREADS=1) and holding ``actor_num_cpus`` logical CPUs ("auto" pools: at most
    what leaves ``other_tasks_cpus`` free for the stage's read or write task, also of the CPUs free now,
    and at most ``auto_pool_share`` of the node's CPUs in all). A pool that would leave no CPU for those tasks is
    refused: it would hang.

    Why the embed and rerank stages ask for two on CPU: one actor's OpenMP threads meet at a barrier after every op,
    so any other process taking one core stalls both (bench_embed on 2 cores: the actor used 1.70 of them
    with the machine 6% idle); two actors with half the threads each do not wait for each other (steady
    16.8 against 15.9 img/s, benchmarks/README.md). It costs one more model copy in memory.
    """
    import ray

    gpus = int(res.get("GPU", 0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda":
        n = max(1, gpus if cfg.num_actors == "auto" else int(cfg.num_actors))
        if n > gpus:
            raise ValueError(f"{section}.num_actors: {n} GPU actors requested, cluster has {gpus} GPUs")
        return device, n, {"num_gpus": 1, "num_cpus": min(cfg.actor_num_cpus, 1.0)}, 1
    cpus = res.get("CPU", 0)
    # The biggest CPU node (a head started with num_cpus=0 has none to give).
    per_node = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    node_cpus = max(1, int(max(per_node, default=cpus)))
    per_actor = cfg.actor_num_cpus
    if cfg.num_actors == "auto":
        n = max(1, min(auto_cpu_actors, node_cpus))
        # Also fit what is free now: CPUs held outside this job (a Serve app's replicas on the same
        # cluster) would otherwise leave the stage's read tasks unscheduled behind the pool (a hang). At
        # least 0.25 each: resources of the previous stage's actors may still be on their way back.
        free = min(cpus, node_cpus, ray.available_resources().get("CPU", cpus))
        per_actor = min(per_actor, (min(cpus, node_cpus) - other_tasks_cpus) / n, auto_pool_share * node_cpus / n,
                        max(0.25, (free - other_tasks_cpus) / n))
    else:
        n = int(cfg.num_actors)
    if per_actor <= 0 or n * per_actor + other_tasks_cpus > cpus:
        raise ValueError(
            f"{section}.actor_num_cpus: {n} actor(s) x {cfg.actor_num_cpus} CPU leave no CPU for the stage's "
            f"other tasks ({other_tasks_cpus:g} CPU) on a cluster with {cpus:g} CPUs; lower "
            f"{section}.actor_num_cpus or {section}.num_actors")
    threads = int(cfg.torch_threads) if cfg.torch_threads != "auto" else auto_threads(node_cpus // n)
    return device, n, {"num_cpus": per_actor}, threads
