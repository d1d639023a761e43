"""Helpers shared by the test modules: ports, waits, processes, the CLI as a subprocess, local Ray, results.

Test modules import from here (and from ``tests.reference``), never from each other or from conftest.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.ray_env import LOCAL_SYSTEM_CONFIG

# Sentinel credentials: never valid anywhere, easy to grep for in messages that must not contain them.
TEST_ACCESS_KEY_ID = "testing-key-id-MMR"
TEST_SECRET_ACCESS_KEY = "testing-secret-MMR-9f3a"
TEST_REGION = "us-east-1"

# Hang guards on a loaded 2-core box, not performance claims.
CLI_DEADLINE_S = 1200.0  # a CLI subprocess
HEALTH_DEADLINE_S = 240.0  # a Serve app becoming healthy
RELOAD_DEADLINE_S = 240.0  # a Serve app picking up a new LATEST

# What every Ray worker of the tests gets, and what the Serve apps need (nothing is downloaded in tests).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------
# ports, logs, waits, processes
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def bucket_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every object key of an S3 bucket (under ``prefix``), through a boto3 client."""
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def log_tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


def answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (urllib.error.URLError, OSError):
        return False


def wait_for(pred: Callable[[], Any], deadline_s: float, what: str, interval: float = 0.25,
             errors: tuple[type[BaseException], ...] = (OSError,)) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); ``errors`` raised meanwhile count as no."""
    import httpx

    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        try:
            last = pred()
        except (httpx.HTTPError, *errors) as e:
            last = repr(e)
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {deadline_s:.0f}s waiting for {what}; last: {last!r}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started in its own session and every process it started (its Ray: gcs, raylet,
    workers)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is exactly what it started
    proc.wait(timeout=60)
    for p in family:  # anything that left the group
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"processes survived SIGKILL: {alive}"


# ----------------------------------------------------------------------------------------------
# the CLI as a subprocess
# ----------------------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               # A fresh local Ray for the child, never a cluster some other process started on this host.
               RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def spawn(args: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``mmrerank ARGS`` in its own session, its output into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cli_cmd(*args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or cli_env(), cwd=cwd, start_new_session=True)


def wait_until(proc: subprocess.Popen[bytes], cond: Callable[[], bool], what: str, log_path: Path) -> None:
    """Poll ``cond`` while ``proc`` runs; fail with its log tail if it exits or hangs first."""
    deadline = time.monotonic() + CLI_DEADLINE_S
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"mmrerank exited with {proc.returncode} before {what}; log tail:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"no {what} after {CLI_DEADLINE_S:.0f}s (hang?); log tail:\n{log_tail(log_path)}")
        time.sleep(0.05)


def any_file(root: Path, pattern: str) -> Callable[[], bool]:
    return lambda: next(root.glob(pattern), None) is not None


def write_yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------------------------
# S3 (moto server mode) and Ray
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    port: int
    pid: int
    log_path: Path
    access_key_id: str = TEST_ACCESS_KEY_ID
    secret_access_key: str = TEST_SECRET_ACCESS_KEY
    region: str = TEST_REGION

    def client(self) -> Any:
        """A boto3 S3 client talking to this server with the test credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


def clear_s3fs_caches() -> None:
    """Forget cached s3fs instances (they hold clients built from an older env) and listings."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _forwarded_env() -> dict[str, str]:
    """AWS_* variables workers need to reach the test S3 server (only while it runs)."""
    if "AWS_ENDPOINT_URL" not in os.environ:
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


@contextlib.contextmanager
def ray_init_local(
    num_cpus: int = 2,
    object_store_memory: int = 300 * 1024**2,
    env_vars: dict[str, str] | None = None,
    **init_kwargs: Any,
) -> Iterator[Any]:
    """Start a small local Ray instance, yield its context, shut it down and restore the env.

    ``RAY_AUTH_MODE=disabled`` is set only while this instance lives. When ``AWS_ENDPOINT_URL``
    is set (the ``s3_server`` fixture is active), ``AWS_*`` variables are forwarded to workers.
    """
    import ray

    worker_env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **_forwarded_env(), **(env_vars or {})}
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**worker_env, **runtime_env.get("env_vars", {})}

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        if ray.is_initialized():
            ray.shutdown()
        ctx = ray.init(
            # A new local instance even when a `ray start` cluster runs on this host (test_cluster's).
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=runtime_env,
            **{"_system_config": LOCAL_SYSTEM_CONFIG, **init_kwargs},
        )
        from ray.data import DataContext

        data_ctx = DataContext.get_current()
        mp.setattr(data_ctx, "enable_progress_bars", False)
        try:
            yield ctx
        finally:
            ray.shutdown()
    finally:
        mp.undo()


# ----------------------------------------------------------------------------------------------
# a Serve app over real HTTP
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_app(root: str, healthy: Callable[[dict[str, Any]], bool] | None = None, **settings: Any) -> Iterator[Any]:
    """``mmrerank serve`` on ``root`` (on the current Ray) at a free loopback port; yields its settings once
    ``/healthz`` is ok (and ``healthy(body)``); shuts Serve down after."""
    import httpx
    from ray import serve

    from pipelines.serve import ServeSettings, start

    s = ServeSettings(root=root, port=free_port(), device="cpu", **{"reload_interval_s": 1.0, **settings})
    start(s)
    try:
        def ok() -> bool:
            body = httpx.get(f"http://{s.host}:{s.port}/healthz", timeout=30).json()
            return body.get("status") == "ok" and (healthy is None or healthy(body))

        wait_for(ok, HEALTH_DEADLINE_S, f"/healthz ok on {root}", errors=(OSError, ValueError))
        yield s
    finally:
        serve.shutdown()


def cas_latest(root: str, run_id: str) -> None:
    """What a broken writer does: point LATEST at a run without verifying it (still compare-and-swap)."""
    import json

    from operators.storage import Storage
    from pipelines import publish as P

    storage = Storage()
    for _ in range(20):
        current, token = P.read_latest(storage, root)
        data = json.dumps({"run_id": run_id, "manifest": f"runs/{run_id}/{P.MANIFEST}", "created": "x",
                           "published": "x", "previous": current["run_id"] if current else None}).encode()
        if P._cas_local(os.path.join(root, P.LATEST), data, token):
            return
        time.sleep(0.05)
    raise AssertionError("could not CAS LATEST")


# ----------------------------------------------------------------------------------------------
# the session's random-weight quickstart
# ----------------------------------------------------------------------------------------------

QUICKSTART_SAMPLE: dict[str, int] = {"docs": 40, "queries": 6, "shards": 2}


@dataclass(frozen=True)
class QuickstartRun:
    """A quickstart directory: ``sample/`` (corpus, queries, qrels) and ``out/`` (the root, one published run)."""

    out: Path
    run_id: str

    @property
    def root(self) -> str:
        return str(self.out / "out")

    @property
    def run_dir(self) -> str:
        return str(self.out / "out" / "runs" / self.run_id)

    @property
    def qrels(self) -> str:
        return str(self.out / "sample" / "qrels.parquet")

    @property
    def queries(self) -> str:
        return str(self.out / "sample" / "queries")

    def copy(self, dest: Path) -> QuickstartRun:
        """A copy of the whole directory at ``dest`` (a test may change its root). The run's own record of its
        config still names the original sample, which holds the same bytes."""
        import shutil

        shutil.copytree(self.out, dest)
        return QuickstartRun(dest, self.run_id)


# ----------------------------------------------------------------------------------------------
# results on storage
# ----------------------------------------------------------------------------------------------


def read_rows(storage: Any, dir_uri: str, pattern: str = "*.parquet") -> list[dict[str, Any]]:
    """Every row of the Parquet files under ``dir_uri`` whose name matches ``pattern``, files in name order."""
    from operators.storage import scheme_of, strip_scheme

    fs = storage.fs(dir_uri)
    base = strip_scheme(dir_uri)
    if not fs.exists(base):
        return []
    prefix = "" if scheme_of(dir_uri) == "file" else f"{scheme_of(dir_uri)}://"
    files = sorted(prefix + f for f in fs.find(base) if fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern))
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += storage.read_table(f).to_pylist()
    return rows


def by_query(rows: Any) -> dict[str, list[dict[str, Any]]]:
    """Rows (a list of dicts or an Arrow table) grouped by query id, each group in rank order."""
    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["query_id"], []).append(r)
    return {q: sorted(v, key=lambda r: r["rank"]) for q, v in sorted(out.items())}
