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
