"""Shared fixtures: a real S3-compatible server (moto server mode), fresh buckets, a local Ray instance.

Nothing here touches the process environment at import time (``pytest_configure`` sets ``OMP_NUM_THREADS`` and
``MMR_MAX_TORCH_THREADS`` under pytest-xdist only): AWS settings exist only while the
``s3_server`` fixture is alive, ``RAY_AUTH_MODE`` only while a local Ray instance started by
:func:`ray_init_local` is alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    OFFLINE_ENV,
    QUICKSTART_SAMPLE,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    QuickstartRun,
    S3Server,
    answers_http,
    clear_s3fs_caches,
    free_port,
    log_tail,
    ray_init_local,
    stop_process,
)
from tests.trained import TrainedModels, cached, train_models, trained_key

for _name in ("werkzeug", "botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "moto"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Ray Data's usage collector asks Prometheus (absent here) for counters from background threads and logs each
# failure at DEBUG with its traceback. Formatting a traceback runs ast.parse on Python 3.11, and one racing
# pytest's assert rewriting in the main thread failed a run with "AST constructor recursion depth mismatch"
# (CPython gh-106905).
logging.getLogger("ray.data._internal.usage").setLevel(logging.INFO)

_SERVER_START_TIMEOUT_S = 60.0

# Every AWS variable that could leak settings from the developer's machine into the tests.
_AWS_ENV_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


# ----------------------------------------------------------------------------------------------
# markers
# ----------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001 - no torch means no CUDA
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker process and everything it starts (CLI children, their Ray workers, the
    "auto" thread counts of ``pipelines.ray_env.auto_threads``) gets its share of the cores as OpenMP threads:
    two workers each running 2-thread torch on 2 cores made every OpenMP barrier wait on a preempted thread (a
    training epoch of the kill -9 test: 0.7 s alone, 23 s in the suite). Set before torch is imported; a value
    the caller set is kept."""
    from pipelines.ray_env import MAX_THREADS_ENV

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    for var in ("OMP_NUM_THREADS", MAX_THREADS_ENV):  # torch's own default; the pipeline's "auto" threads
        if workers > 1 and var not in os.environ:
            os.environ[var] = share


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_module_rank)  # stable: modules keep their order within a rank, tests theirs within a module
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# Seconds of setup + call + teardown per (xdist worker, test module), as the controller receives the reports: the
# summary shows how the README's two workers were loaded, so `_FIRST` below is ordered by measurement.
_MODULE_SECONDS: dict[tuple[str, str], float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    gateway = getattr(getattr(report, "node", None), "gateway", None)
    key = (gateway.id if gateway is not None else "main", report.nodeid.split("::", 1)[0])
    _MODULE_SECONDS[key] = _MODULE_SECONDS.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not _MODULE_SECONDS:  # an xdist worker: the controller prints it
        return
    per_worker: dict[str, float] = {}
    for (worker, _mod), t in _MODULE_SECONDS.items():
        per_worker[worker] = per_worker.get(worker, 0.0) + t
    tr = terminalreporter
    tr.write_sep("-", "test seconds per worker and module (setup + call + teardown)")
    tr.write_line("  ".join(f"{w} {t:.0f} s" for w, t in sorted(per_worker.items())))
    for (worker, mod), t in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1])[:20]:
        tr.write_line(f"{t:8.1f} s  {worker:5}  {mod}")


# ----------------------------------------------------------------------------------------------
# S3: moto server mode on 127.0.0.1
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _cli_console_mode_restored() -> Iterator[None]:
    """A test calling the CLI's main() in-process sets the quiet console for the next Ray it starts; keep
    that from leaking into later tests (which start Ray with its defaults)."""
    from pipelines import ray_env

    saved = ray_env._QUIET["on"]
    try:
        yield
    finally:
        ray_env._QUIET["on"] = saved


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess on 127.0.0.1:<free port>; AWS env points at it meanwhile."""
    log_dir = tmp_path_factory.mktemp("moto-server")
    log_path = log_dir / "moto.log"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=log_dir,
        )
    try:
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while not answers_http(f"{endpoint}/moto-api/"):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with code {proc.returncode} before answering on {endpoint}; "
                    f"log tail ({log_path}):\n{log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not answer on {endpoint} within {_SERVER_START_TIMEOUT_S:.0f}s; "
                    f"log tail ({log_path}):\n{log_tail(log_path)}"
                )
            time.sleep(0.1)

        mp = pytest.MonkeyPatch()
        try:
            for k in _AWS_ENV_CLEARED:
                mp.delenv(k, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
            mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
            mp.setenv("AWS_DEFAULT_REGION", TEST_REGION)
            # No profile/config from the developer's home directory.
            mp.setenv("AWS_CONFIG_FILE", str(log_dir / "no-aws-config"))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log_dir / "no-aws-credentials"))
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            clear_s3fs_caches()
            yield S3Server(endpoint_url=endpoint, port=port, pid=proc.pid, log_path=log_path)
        finally:
            mp.undo()
            clear_s3fs_caches()
    finally:
        stop_process(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty, uniquely named bucket; yields ``s3://<bucket>``; emptied and deleted after."""
    from tests.seaweed import fresh_bucket

    with fresh_bucket(s3_server) as uri:
        yield uri


@pytest.fixture(params=["local", "s3"])
def root_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root: a local directory, or ``s3://<fresh bucket>/root`` (starts moto lazily)."""
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        return str(root)
    bucket_uri = request.getfixturevalue("s3_bucket")
    return f"{bucket_uri}/root"


# ----------------------------------------------------------------------------------------------
# Ray: one local instance at a time, shared by the modules that can share it
# ----------------------------------------------------------------------------------------------

# The order modules start in, longest first (measured: `--durations` in every CI log): the README's command runs
# them on two pytest-xdist workers, whole modules each (`--dist loadfile --no-loadscope-reorder` keeps this order),
# so the long ones start early and the short ones fill in at the end. test_live_batch comes early because its setup
# builds the session's trained models, which later modules (train, serve, notebooks) then find in the cache. The
# modules not named follow in alphabetical order: all of them short. The tail matters because xdist hands a worker
# its next module while the worker still has two tests to go; a long module there leaves the other worker idle
# (ci13: test_storage_real, 124 s, was the second-to-last module and the two workers ended 76 s apart).
_FIRST = ("test_cluster", "test_live_batch", "test_faults_s3", "test_run", "test_rerank_scale", "test_train",
          "test_stop", "test_serve", "test_rerank", "test_storage_real", "test_security", "test_index_search",
          "test_embed", "test_storage", "test_notebooks", "test_serve_clients", "test_explorer", "test_console",
          "test_gpu_check")


def _module_rank(item: pytest.Item) -> int:
    name = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    return _FIRST.index(name) if name in _FIRST else len(_FIRST)


# The shared local Rays: "cpu" as the pipeline meets it on this 2-core machine; "serve" with 4 logical CPUs on
# the 2 cores, since a Serve app's two replicas hold one each and a pipeline run beside it needs its own.
RAY_KINDS: dict[str, dict[str, Any]] = {"cpu": {"num_cpus": 2}, "serve": {"num_cpus": 4}}


class SharedRay:
    """One local Ray at a time for the whole session, started again only when another kind is asked for or when
    something else (a module's own Ray, a test making room for a CLI child) shut it down."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self._cm: contextlib.AbstractContextManager[Any] | None = None
        self._gcs: str | None = None

    def _up(self, kind: str) -> bool:
        import ray

        if self._cm is None or self.kind != kind or not ray.is_initialized():
            return False
        return ray.get_runtime_context().gcs_address == self._gcs

    def use(self, kind: str, request: pytest.FixtureRequest) -> None:
        import ray

        if self._up(kind):
            return
        self.release()
        if ray.is_initialized():
            ray.shutdown()
        request.getfixturevalue("s3_server")  # first: workers get its AWS_* settings when Ray starts
        cm = ray_init_local(env_vars=OFFLINE_ENV, **RAY_KINDS[kind])
        cm.__enter__()
        self._cm, self.kind, self._gcs = cm, kind, ray.get_runtime_context().gcs_address

    def release(self) -> None:
        cm, self._cm, self.kind, self._gcs = self._cm, None, None, None
        if cm is not None:  # shuts down whatever Ray is up (callers want none) and restores the env
            cm.__exit__(None, None, None)


_SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[SharedRay]:
    try:
        yield _SHARED_RAY
    finally:
        _SHARED_RAY.release()


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest, shared_ray: SharedRay) -> None:
    """The session's shared local Ray (2 CPUs, 300 MiB object store, the S3 server's ``AWS_*`` settings and
    offline Hugging Face settings forwarded to workers), started if it is not up."""
    shared_ray.use("cpu", request)


@pytest.fixture(scope="module")
def ray_serve(request: pytest.FixtureRequest, shared_ray: SharedRay) -> Iterator[None]:
    """The session's shared local Ray for Serve apps (4 logical CPUs on the 2 cores), started if it is not up;
    Hugging Face offline in this process too while the module runs (the app's live path loads models here)."""
    shared_ray.use("serve", request)
    mp = pytest.MonkeyPatch()
    for k, v in OFFLINE_ENV.items():
        mp.setenv(k, v)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _shared_ray_still_up(request: pytest.FixtureRequest) -> None:
    """A test of a module on a shared Ray finds it up, whatever an earlier test of the module shut down."""
    for kind, fixture in (("cpu", "ray_local"), ("serve", "ray_serve")):
        if fixture in request.fixturenames and "no_ray_in_this_process" not in request.fixturenames:
            _SHARED_RAY.use(kind, request)


@pytest.fixture
def no_ray_in_this_process() -> None:
    """A CLI child starts its own Ray on the 2 cores: this process must not hold one meanwhile."""
    import ray

    _SHARED_RAY.release()
    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------------------------
# trained tiny models: once per test session
# ----------------------------------------------------------------------------------------------

def _ray_up(request: pytest.FixtureRequest) -> None:
    """A session build runs on the Ray that is up, else on the shared one."""
    import ray

    if not ray.is_initialized():
        request.getfixturevalue("shared_ray").use("cpu", request)


@pytest.fixture(scope="session")
def trained_models(request: pytest.FixtureRequest) -> TrainedModels:
    """The trained tiny models: from the test cache when nothing they depend on changed, else trained now (see
    ``tests/trained.py``), on the Ray that is up, or on the shared one."""

    def build(out: Path) -> TrainedModels:
        _ray_up(request)
        return train_models(out, trained_key())

    return cached("trained", build)


# ----------------------------------------------------------------------------------------------
# the random-weight quickstart: once per session, copied where a module needs a root of its own
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def quickstart_run(request: pytest.FixtureRequest) -> QuickstartRun:
    """``quickstart(docs=40, queries=6, shards=2)`` (random weights: the sample, a published run, its qrels), from
    the test cache (``tests/trained.py`` :func:`cached`) or run now on the Ray that is up (else the shared one).
    Read-only: modules take a :meth:`QuickstartRun.copy`."""
    from pipelines.quickstart import quickstart

    def build(out: Path) -> QuickstartRun:
        _ray_up(request)
        return QuickstartRun(out / "qs", quickstart(str(out / "qs"), **QUICKSTART_SAMPLE).run_id)

    return cached("quickstart", build)


# ----------------------------------------------------------------------------------------------
# S3: SeaweedFS (`weed mini`, tests/seaweed.py) on 127.0.0.1, beside moto
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SeaweedFS server (master, volume server, filer and S3 gateway in one process) with its own data directory
    and the test credentials. The session's AWS environment stays moto's: a test gets SeaweedFS through
    ``any_s3_server`` / ``tests.seaweed.s3_for``, or names its endpoint in the config."""
    from tests.seaweed import SeaweedServer

    with SeaweedServer(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(params=["moto", "seaweedfs"])
def any_s3_server(request: pytest.FixtureRequest) -> Any:
    """Each S3 server in turn (``S3Server`` interface), the AWS environment pointed at it during the test."""
    from tests.seaweed import s3_for

    return s3_for(request, request.param)


@pytest.fixture
def any_s3_bucket(any_s3_server: Any) -> Iterator[str]:
    """A fresh, empty bucket on ``any_s3_server``; yields ``s3://<bucket>``; emptied and deleted after."""
    from tests.seaweed import fresh_bucket

    with fresh_bucket(any_s3_server) as uri:
        yield uri
