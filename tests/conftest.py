"""Shared fixtures: a real S3-compatible server (moto server mode), fresh buckets, a local Ray instance.

Nothing here touches the process environment at import time: AWS settings exist only while the
``s3_server`` fixture is alive, ``RAY_AUTH_MODE`` only while a local Ray instance started by
:func:`ray_init_local` is alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

for _name in ("werkzeug", "botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "moto"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Ray Data's usage collector asks Prometheus (absent here) for counters from background threads and logs each
# failure at DEBUG with its traceback. Formatting a traceback runs ast.parse on Python 3.11, and one racing
# pytest's assert rewriting in the main thread failed a run with "AST constructor recursion depth mismatch"
# (CPython gh-106905).
logging.getLogger("ray.data._internal.usage").setLevel(logging.INFO)

# Sentinel credentials: never valid anywhere, easy to grep for in messages that must not contain them.
TEST_ACCESS_KEY_ID = "testing-key-id-MMR"
TEST_SECRET_ACCESS_KEY = "testing-secret-MMR-9f3a"
TEST_REGION = "us-east-1"

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

_SERVER_START_TIMEOUT_S = 60.0


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# S3: moto server mode on 127.0.0.1
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (urllib.error.URLError, OSError):
        return False


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def clear_s3fs_caches() -> None:
    """Forget cached s3fs instances (they hold clients built from an older env) and listings."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


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
    port = _free_port()
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
        while not _answers_http(f"{endpoint}/moto-api/"):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with code {proc.returncode} before answering on {endpoint}; "
                    f"log tail ({log_path}):\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not answer on {endpoint} within {_SERVER_START_TIMEOUT_S:.0f}s; "
                    f"log tail ({log_path}):\n{_log_tail(log_path)}"
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
        _stop_process(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty, uniquely named bucket; yields ``s3://<bucket>``; emptied and deleted after."""
    client = s3_server.client()
    bucket = f"mmr-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    clear_s3fs_caches()
    try:
        yield f"s3://{bucket}"
    finally:
        clear_s3fs_caches()
        with contextlib.suppress(Exception):
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)


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
# Ray: one small local instance per module
# ----------------------------------------------------------------------------------------------

_FORWARDED_ENV_PREFIXES = ("AWS_",)


def _forwarded_env() -> dict[str, str]:
    """AWS_* variables workers need to reach the test S3 server (only while it runs)."""
    if "AWS_ENDPOINT_URL" not in os.environ:
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}


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
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=runtime_env,
            **init_kwargs,
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


_S3_FIXTURES = frozenset({"s3_server", "s3_bucket", "root_uri"})


def _module_uses_s3(request: pytest.FixtureRequest) -> bool:
    module = request.module
    for item in request.session.items:
        if getattr(item, "module", None) is module and _S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            return True
    return False


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One local Ray instance (2 CPUs, 300 MiB object store) for the whole test module.

    When any test of the module uses S3 fixtures, the S3 server is started first so that the
    workers get its ``AWS_*`` settings (they are fixed when Ray starts).
    """
    if _module_uses_s3(request):
        request.getfixturevalue("s3_server")
    with ray_init_local() as ctx:
        yield ctx


# ----------------------------------------------------------------------------------------------
# trained tiny models: once per test session
# ----------------------------------------------------------------------------------------------

# The binding sample and the training settings of the session's trained models: the quickstart's training
# configs as shipped, on a quarter of its sample (the quality tests need a trained ranking, not the best one).
TRAINED_SAMPLE: dict[str, Any] = {"docs": 160, "queries": 40, "shards": 2, "binding": True}
TRAINED_CLIP: dict[str, Any] = {}
TRAINED_VLM: dict[str, Any] = {}


@dataclass
class TrainedModels:
    """The binding sample, the tiny retriever trained on its training queries, a retrieval-only run with it
    (the reranker's hard negatives), the tiny yes/no reranker trained on that run's candidates, and a
    published nightly run with both (``root``'s LATEST)."""

    out: Path
    sample: Any  # SampleInfo
    clip: Any  # TrainReport
    run_a: Any  # RunReport: trained retriever, retrieval only (not published)
    vlm: Any  # TrainReport
    run_b: Any  # RunReport: trained retriever + trained reranker, published
    key: str  # content hash of sample settings + training configs

    @property
    def root(self) -> str:
        return str(self.out / "out")

    @property
    def retriever(self) -> dict[str, Any]:
        return {"name": "mmr-tiny", "pretrained": self.clip.weights}

    @property
    def reranker(self) -> dict[str, Any]:
        return {"backend": "vlm_yesno", "model": self.vlm.output, "batch_size": 16}

    @property
    def heldout_qrels(self) -> str:
        from pipelines.train import HELDOUT_QRELS

        return str(Path(self.vlm.output) / HELDOUT_QRELS)

    def config(self, path: Path, root: str | None = None, **sections: Any) -> Any:
        """The shipped config at ``path`` on this sample and root (or ``root``), ``sections`` merged over its
        own."""
        import yaml

        from pipelines.config import parse_config
        from pipelines.quickstart import _paths

        data = yaml.safe_load(path.read_text())
        data.update(_paths(str(self.out)))
        if root is not None:
            data["root"] = root
        data["ray"] = {"progress_bars": False}
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value}
        return parse_config(data, str(path))


def trained_key() -> str:
    """What the trained models depend on besides the code: sample settings and every training config."""
    import hashlib
    import json

    from pipelines.quickstart import DEFAULT_CONFIG, TRAIN_CLIP_CONFIG, TRAIN_VLM_CONFIG

    texts = [p.read_text() for p in (DEFAULT_CONFIG, TRAIN_CLIP_CONFIG, TRAIN_VLM_CONFIG)]
    blob = json.dumps([TRAINED_SAMPLE, TRAINED_CLIP, TRAINED_VLM, texts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_models(out: Path, key: str) -> TrainedModels:
    from operators.training.tiny_vlm import save_tiny_vlm
    from pipelines.quickstart import DEFAULT_CONFIG, TRAIN_CLIP_CONFIG, TRAIN_VLM_CONFIG
    from pipelines.run import run
    from pipelines.sample import make_sample
    from pipelines.train import run_train

    sample = make_sample(str(out / "sample"), **TRAINED_SAMPLE)
    t = TrainedModels(out, sample, None, None, None, None, key)
    t.clip = run_train(t.config(TRAIN_CLIP_CONFIG, train=TRAINED_CLIP))
    t.run_a = run(t.config(DEFAULT_CONFIG, embed={"model": t.retriever}, rerank={"backend": "none"}), publish=False)
    base = out / "out" / "models" / "tiny-vlm-base"
    save_tiny_vlm(base)
    t.vlm = run_train(t.config(TRAIN_VLM_CONFIG, rerank={"model": str(base)},
                               train={**TRAINED_VLM, "candidates": t.run_a.run_dir}))
    t.run_b = run(t.config(DEFAULT_CONFIG, embed={"model": t.retriever}, rerank=t.reranker))
    return t


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    """The trained tiny models, trained once per session in a directory named by :func:`trained_key`.

    On the Ray instance of the module that asks first when one is up, else on a local one of its own that is
    shut down again (modules start their own Ray with their own settings)."""
    import ray

    key = trained_key()
    out = tmp_path_factory.mktemp(f"trained-{key}")
    if ray.is_initialized():
        return _train_models(out, key)
    with ray_init_local():
        return _train_models(out, key)
