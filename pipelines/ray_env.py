"""Connect to (or start) Ray for a pipeline run; the only place that calls ``ray.init``."""

from __future__ import annotations

import logging
import os
from typing import Any

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
