"""Connect to (or start) Ray for a pipeline run; the only place that calls ``ray.init``."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from pipelines.config import RayConfig

log = logging.getLogger(__name__)

# Non-secret settings forwarded to workers. Credentials are never put in runtime_env (Ray stores it
# in GCS and shows it in the dashboard): local workers inherit the driver's environment, cluster
# workers get theirs from the node (instance profile / IRSA / Kubernetes secret env).
_FORWARD = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MMR_FAULT_INJECT")


def ensure_ray(cfg: RayConfig) -> dict[str, float]:
    """Initialise Ray unless already connected; return the cluster's resources."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
        env.update(cfg.env_vars)
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
        if cfg.address:
            kwargs["address"] = cfg.address
        else:
            kwargs.update(include_dashboard=False, num_cpus=cfg.num_cpus)
            if cfg.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        log.info("starting Ray (%s)", cfg.address or "local")
        ray.init(**kwargs)
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


def actor_pool(cfg: PoolConfig, res: dict[str, float], section: str,
               other_tasks_cpus: float) -> tuple[str, int, dict[str, Any], int]:
    """Device, pool size, per-actor resources and torch threads, resolved once for the cluster.

    GPU clusters: one actor per GPU. CPU: ``num_actors`` (1 for auto), each holding ``actor_num_cpus``
    logical CPUs and using the node's cores split over the actors (Ray starts workers with
    OMP_NUM_THREADS=1). A pool that would leave no CPU for the stage's other tasks is refused: it hangs.
    """
    import ray

    gpus = int(res.get("GPU", 0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda":
        n = max(1, gpus if cfg.num_actors == "auto" else int(cfg.num_actors))
        if n > gpus:
            raise ValueError(f"{section}.num_actors: {n} GPU actors requested, cluster has {gpus} GPUs")
        return device, n, {"num_gpus": 1, "num_cpus": min(cfg.actor_num_cpus, 1.0)}, 1
    n = 1 if cfg.num_actors == "auto" else int(cfg.num_actors)
    cpus = res.get("CPU", 0)
    if n * cfg.actor_num_cpus + other_tasks_cpus > cpus:
        raise ValueError(
            f"{section}.actor_num_cpus: {n} actor(s) x {cfg.actor_num_cpus} CPU leave no CPU for the stage's "
            f"other tasks on a cluster with {cpus:g} CPUs; lower {section}.actor_num_cpus or {section}.num_actors")
    if cfg.torch_threads != "auto":
        threads = int(cfg.torch_threads)
    else:
        node_cpus = max(1, int(cpus) // max(1, len(ray.nodes())))
        threads = max(1, node_cpus // n)
    return device, n, {"num_cpus": cfg.actor_num_cpus}, threads
