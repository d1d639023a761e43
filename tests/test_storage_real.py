"""The nightly run on a real S3 server (SeaweedFS, ``tests/seaweed.py``) that freezes, crashes and comes back.

* A lean run on ``s3://`` (the config names the server's endpoint and credentials: driver, Ray Data readers and
  writers and actors reach it through ``storage``), during which the server is killed (SIGKILL) when the first
  corpus embedding part lands (typically while Ray Data tasks still read and write the other shard) and
  restarted on its data ~10 s later, and paused (SIGSTOP ~3 s, then SIGCONT) when the first candidates part
  lands: the run finishes (the default 60 s ``storage.retry_deadline_s``), its results equal the brute-force
  reference (``tests/reference.py``), its manifest verifies, no output holds a credential, ``LATEST`` names it.
* ``Storage`` and pyarrow through ``arrow_filesystem`` ride out a restart.
* A server that stays down, with a 2 s ``storage.retry_deadline_s``: the clear ``StorageError`` names the URI,
  the endpoint and the budget, and no credential.
* ``storage.retry_deadline_s`` <= 0 is refused, naming the field.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import Storage, StorageError, StorageOptions, arrow_filesystem, join, storage_error_of
from pipelines import publish as P
from pipelines.config import Config, ConfigError, parse_config
from pipelines.sample import SampleInfo, make_sample
from tests.helpers import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, bucket_keys
from tests.reference import (
    Reference,
    build_reference,
    check_against_reference,
    check_manifest,
    lean,
    run_cfg_dict,
)
from tests.seaweed import OTHER_ACCESS_KEY_ID, OTHER_SECRET_ACCESS_KEY, SeaweedServer, fresh_bucket

pytestmark = pytest.mark.timeout(600)  # a hang guard on a loaded 2-core box
log = logging.getLogger(__name__)

SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, OTHER_ACCESS_KEY_ID, OTHER_SECRET_ACCESS_KEY)
PAUSE_S = 3.0  # a frozen gateway (GC pause, a stopped container): requests wait, nothing fails
DOWN_S = 10.0  # a gateway restart: connections refused meanwhile


@pytest.fixture(scope="module")
def seaweed(seaweed_server: SeaweedServer) -> Iterator[SeaweedServer]:
    """The session's SeaweedFS, running before and after every test of the module (a test kills it)."""
    if not seaweed_server.running:
        seaweed_server.start()
    yield seaweed_server
    seaweed_server.resume()
    if not seaweed_server.running:
        seaweed_server.start()


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> Iterator[str]:
    with fresh_bucket(seaweed, prefix="mmr-real") as uri:
        yield uri


def _storage(server: SeaweedServer) -> dict[str, Any]:
    """A config's ``storage`` section for ``server``: named explicitly (the session's AWS environment, if any, is
    moto's), with the server's second identity (not the environment's credentials)."""
    return {"endpoint_url": server.endpoint_url, "region": server.region, "access_key_id": OTHER_ACCESS_KEY_ID,
            "secret_access_key": OTHER_SECRET_ACCESS_KEY}


def _options(server: SeaweedServer, **kw: Any) -> StorageOptions:
    return StorageOptions(**{**_storage(server), **kw})


@pytest.fixture(scope="module")
def sample(seaweed: SeaweedServer, bucket: str) -> SampleInfo:
    return make_sample(f"{bucket}/sample", docs=16, queries=4, shards=2, seed=5, bad_rows=True, image_size=32,
                       storage=Storage(_options(seaweed)))


def _cfg(server: SeaweedServer, root: str, sample: SampleInfo, **storage: Any) -> Config:
    d = lean(run_cfg_dict(root, sample.corpus, sample.queries))
    d["storage"] = {**_storage(server), **storage}
    return parse_config(d)


@pytest.fixture(scope="module")
def reference(seaweed: SeaweedServer, bucket: str, sample: SampleInfo) -> Reference:
    return build_reference(_cfg(seaweed, "/unused", sample), Storage(_options(seaweed)))


def _workers_that_waited(endpoint: str) -> list[str]:
    """Ray worker log files (this session's) holding storage's warning that ``endpoint`` failed beyond a request's
    botocore attempts: which processes rode the outage out on the deadline (the driver logs here, not there)."""
    import ray

    node = ray._private.worker._global_node  # no public API names the session's log directory
    logs = Path(node.get_logs_dir_path()) if node is not None else None
    if logs is None or not logs.is_dir():
        return []
    marker = f"S3 endpoint {endpoint} failing"
    return sorted(f.name for f in logs.glob("worker-*") if marker in f.read_text(errors="replace"))


def _no_secrets(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"secret {s[:6]}... in {text!r}"


class Faults:
    """A thread that watches the bucket (its own short-timeout client) and, when a key matching a trigger first
    appears, runs that trigger's action (pause then resume; kill, wait, restart), once each, in order."""

    def __init__(self, server: SeaweedServer, bucket: str, prefix: str,
                 triggers: list[tuple[str, Callable[[], None]]]) -> None:
        self.server, self.bucket, self.prefix = server, bucket.removeprefix("s3://"), prefix
        self.triggers = list(triggers)
        self.fired: list[tuple[str, float]] = []
        self.seen: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="seaweed-faults", daemon=True)

    def __enter__(self) -> Faults:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        client = self.server.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        while not self._stop.is_set() and self.triggers:
            try:
                keys = bucket_keys(client, self.bucket, self.prefix)
            except Exception:  # noqa: BLE001 - the server is down or frozen: look again
                time.sleep(0.05)
                continue
            now = time.monotonic() - self._t0
            for k in keys:
                self.seen.setdefault(k, now)
            marker, action = self.triggers[0]
            if any(marker in k for k in keys):
                self.triggers.pop(0)
                self.fired.append((marker, now))
                log.warning("fault at %.1fs (%s appeared)", now, marker)
                try:
                    action()
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(e)
                    return
                continue
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# no server needed
# ----------------------------------------------------------------------------------------------


def test_retry_deadline_must_be_positive() -> None:
    for bad in (0, -1.5):
        with pytest.raises(ConfigError, match=r"storage\.retry_deadline_s"):
            parse_config({"root": "/tmp/x", "corpus": "/tmp/c", "storage": {"retry_deadline_s": bad}})
        with pytest.raises(ValueError, match="retry_deadline_s"):
            StorageOptions(retry_deadline_s=bad)
    cfg = parse_config({"root": "/tmp/x", "corpus": "/tmp/c", "storage": {"retry_deadline_s": 12.5}})
    assert cfg.storage.options().retry_deadline_s == 12.5
    assert parse_config({"root": "/tmp/x", "corpus": "/tmp/c"}).storage.options().retry_deadline_s == \
        StorageOptions().retry_deadline_s == 60.0


# ----------------------------------------------------------------------------------------------
# Storage and pyarrow against a server that goes away
# ----------------------------------------------------------------------------------------------


def test_a_server_that_stays_down_fails_clearly_after_the_deadline(seaweed: SeaweedServer, bucket: str) -> None:
    uri = f"{bucket}/down/x.bin"
    st = Storage(_options(seaweed, retries=2, retry_deadline_s=2.0))
    st.write_bytes(uri, b"x")
    seaweed.kill()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            st.read_bytes(uri)
        took = time.monotonic() - t0
    finally:
        seaweed.start()
    msg = str(ei.value)
    log.warning("gave up after %.1fs: %s", took, msg)
    _no_secrets(f"{msg} {ei.value!r}")
    assert ei.value.transient and msg.startswith(f"{uri}: "), msg
    assert f"endpoint {seaweed.endpoint_url}" in msg and "storage.retry_deadline_s=2s" in msg, msg
    assert 2.0 <= took < 30, took  # it waited for the budget, and ended (not a timing claim beyond that)
    assert Storage(_options(seaweed)).read_bytes(uri) == b"x"  # the data survived the crash


def test_storage_and_pyarrow_ride_out_a_restart(seaweed: SeaweedServer, bucket: str) -> None:
    st = Storage(_options(seaweed))
    table = pa.table({"doc_id": [f"d{i}" for i in range(50)], "score": [i / 3 for i in range(50)]})
    st.write_table(f"{bucket}/ride/t.parquet", table)
    seaweed.kill()
    restart = threading.Timer(3.0, seaweed.start)
    restart.start()
    try:
        t0 = time.monotonic()
        assert st.read_table(f"{bucket}/ride/t.parquet").equals(table)  # refused until the restart
        took = time.monotonic() - t0
        fs, path = arrow_filesystem(f"{bucket}/ride/t.parquet", _options(seaweed))
        assert pq.read_table(path, filesystem=fs).equals(table)
        st.write_json(f"{bucket}/ride/after.json", {"ok": True})
    finally:
        restart.join()
    assert took >= 2.0, took  # it did wait for the server
    assert st.read_json(f"{bucket}/ride/after.json") == {"ok": True}


# ----------------------------------------------------------------------------------------------
# the nightly run rides out a frozen and a restarting gateway
# ----------------------------------------------------------------------------------------------


def test_run_rides_out_a_pause_and_a_restart(seaweed: SeaweedServer, bucket: str, sample: SampleInfo,
                                            reference: Reference, ray_local: None) -> None:
    from pipelines.run import run

    root = f"{bucket}/nightly"
    cfg = _cfg(seaweed, root, sample)
    st = Storage(cfg.storage.options())

    def pause() -> None:
        seaweed.pause()
        time.sleep(PAUSE_S)
        seaweed.resume()

    def crash() -> None:
        seaweed.kill()
        time.sleep(DOWN_S)
        seaweed.start()

    prefix = root.removeprefix(bucket).lstrip("/") + "/"
    t0 = time.monotonic()
    with Faults(seaweed, bucket, prefix, [("/corpus/", crash), ("/candidates/", pause)]) as faults:
        report = run(cfg)
    took = time.monotonic() - t0
    # Which side waited depends on timing (the kill lands while the other shard is read, embedded or written, or
    # while the driver records the stage): a diagnostic, not a check.
    log.warning("run %.1fs; faults fired at %s; worker logs with a wait beyond botocore's attempts: %s", took,
                faults.fired, _workers_that_waited(seaweed.endpoint_url))
    assert not faults.errors, faults.errors
    assert [m for m, _ in faults.fired] == ["/corpus/", "/candidates/"], (faults.fired, faults.triggers)
    assert report.published and not report.resumed
    latest, _ = P.read_latest(st, root)
    assert latest is not None and latest["run_id"] == report.run_id and latest["previous"] is None
    check_manifest(st, report.run_dir, report.run_id)
    check_against_reference(st, cfg, report.run_dir, report.run_id, reference)
    for rel in ("_RUN.json", "stats.json", P.MANIFEST):  # the config's credentials reach no output
        _no_secrets(st.read_bytes(join(report.run_dir, rel)).decode())


def test_a_run_stopped_by_an_outage_resumes_and_the_next_night_reuses_its_caches(
        seaweed: SeaweedServer, bucket: str, sample: SampleInfo, reference: Reference, ray_local: None) -> None:
    """The server goes down for good (2 s budget) once the rerank stage has candidates: the run fails with the
    clear ``StorageError``, nothing is published. Server back: the same config resumes that run and publishes
    it; the next night's run reuses every cached embedding and the index, and ``LATEST`` moves on. No object
    in the bucket holds a credential."""
    from pipelines import run as R

    root = f"{bucket}/nights"
    cfg = _cfg(seaweed, root, sample, retries=2, retry_deadline_s=2.0)
    st = Storage(_options(seaweed))
    prefix = root.removeprefix(bucket).lstrip("/") + "/"
    try:
        with Faults(seaweed, bucket, prefix, [("/candidates/", seaweed.kill)]) as faults, \
                pytest.raises(Exception) as ei:  # noqa: PT011 - the type is asserted below
            R.run(cfg)
    finally:
        if not seaweed.running:
            seaweed.start()
    assert not faults.errors and [m for m, _ in faults.fired] == ["/candidates/"], (faults.errors, faults.fired)
    err = storage_error_of(ei.value)
    assert err is not None, f"{type(ei.value).__name__}: {ei.value}"
    msg = str(err).splitlines()[0]
    assert msg.startswith(f"{root}/") and f"endpoint {seaweed.endpoint_url}" in msg, msg
    _no_secrets(f"{ei.value} {ei.value!r}")
    assert P.read_latest(st, root)[0] is None
    unfinished = R.find_unfinished(st, cfg)
    assert unfinished is not None

    # The server is back: the same job resumes (the retry budget is not part of the job's fingerprint: the
    # default one from here on, as a restarted server may still refuse a request or two).
    cfg = _cfg(seaweed, root, sample)
    first = R.run(cfg)
    assert first.resumed and first.published and first.run_id == unfinished
    check_manifest(st, first.run_dir, first.run_id)
    check_against_reference(st, cfg, first.run_dir, first.run_id, reference)

    second = R.run(cfg)  # the next night
    assert second.published and not second.resumed and second.run_id != first.run_id
    latest, _ = P.read_latest(st, root)
    assert latest is not None and (latest["run_id"], latest["previous"]) == (second.run_id, first.run_id)
    check_manifest(st, second.run_dir, second.run_id)
    check_against_reference(st, cfg, second.run_dir, second.run_id, reference)
    stages = st.read_json(join(second.run_dir, "stats.json"))["stages"]
    for name in ("embed_corpus", "embed_queries"):
        s = stages[name]
        assert (s["shards_reused"], s["rows_embedded"]) == (s["shards"], 0), (name, s)
    assert stages["index"]["reused"] is True, stages["index"]

    client = seaweed.client()
    name = bucket.removeprefix("s3://")
    keys = bucket_keys(client, name)
    assert any(k.startswith(f"{prefix}runs/{second.run_id}/") for k in keys)
    for key in keys:
        body = client.get_object(Bucket=name, Key=key)["Body"].read()
        for s in SECRETS:
            assert s.encode() not in body, f"secret {s[:6]}... in s3://{name}/{key}"
