"""Fault tolerance of the object store: the S3 endpoint fails transiently or for good.

A TCP fault proxy (``tests/fault_proxy.py``) sits between every S3 client (this process and the Ray
workers: ``AWS_ENDPOINT_URL`` points at the proxy while the module's Ray instance starts) and the moto
server. The properties:

* transient faults (connections reset at accept, requests reset before forwarding, responses lost
  after the server applied the request) during a whole run on an s3:// root: the run succeeds, its
  results equal a clean run's, ``LATEST`` names it and its manifest verifies (sha256 too);
* per-connection delays: the run succeeds, same results;
* the endpoint going down partway (when rerank starts; or right before LATEST moves): the run fails
  with a ``StorageError`` naming the URI and the endpoint, no credential, without hanging; ``LATEST``
  still names the previous good run; once the endpoint is back, the same config resumes and publishes;
* one request against a dead or hung endpoint gives up after a bounded number of attempts;
* the conditional write of ``LATEST`` whose response is lost after the server applied it is not
  retried into a second advance (``previous`` stays right, one new version of ``LATEST``).

Module layout (2 cores): one clean run (the baseline), two full faulty runs, the rest reuses caches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from operators.storage import Storage, StorageError, StorageOptions, join, storage_error_of
from pipelines import publish as P
from pipelines.config import Config, ConfigError, parse_config
from pipelines.sample import SampleInfo, make_sample
from tests.fault_proxy import FaultProxy
from tests.helpers import (
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    S3Server,
    clear_s3fs_caches,
    ray_init_local,
)

pytestmark = pytest.mark.timeout(300)
log = logging.getLogger(__name__)

SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
SEED = 20260907
K = 6
TOP_N = 4
ATOL = 1e-5
# Transient faults: a new connection is reset with p=0.2, a request is reset (not applied) with p=0.05, a
# response lost (applied) with p=0.05. A retry needs a new connection, so an attempt fails with ~0.28: with 10
# attempts a request fails for good with ~0.1 * 0.28**9 = 1e-6, and a run makes ~1000 requests (~0.1% flake).
FAULTS = {"drop_p": 0.2, "req_drop_p": 0.05, "resp_drop_p": 0.05}
TRANSIENT_RETRIES = 10
# moto's server answers `Connection: close`: every request is a new connection, so this delays every request
# (~250 in a warm run; kept short for the 2-core budget).
CONNECT_DELAY_S = 0.05


# ----------------------------------------------------------------------------------------------
# fixtures: proxy in front of moto, AWS_ENDPOINT_URL -> proxy, one Ray instance for the module
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.port, seed=SEED) as p:
        yield p


@pytest.fixture(scope="module")
def via_proxy(s3_server: S3Server, proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Driver and (forwarded at ray.init) workers reach S3 through the proxy only."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    clear_s3fs_caches()
    try:
        yield proxy
    finally:
        mp.undo()
        clear_s3fs_caches()


@pytest.fixture(scope="module")
def ray_proxied(via_proxy: FaultProxy) -> Iterator[Any]:
    with ray_init_local() as ctx:
        yield ctx


@pytest.fixture(autouse=True)
def _proxy_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts and ends with a healthy endpoint (a failed test must not poison the next)."""
    p = request.getfixturevalue("proxy") if "proxy" in request.fixturenames else None
    if p is not None:
        p.passthrough()
    yield
    if p is not None:
        p.passthrough()


def direct(s3_server: S3Server) -> Storage:
    """Storage that bypasses the proxy (to set up and inspect state while the proxy misbehaves)."""
    return Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> Iterator[str]:
    client = s3_server.client()
    name = f"mmr-faults-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
                objs = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                        for o in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                if objs:
                    client.delete_objects(Bucket=name, Delete={"Objects": objs})
            client.delete_bucket(Bucket=name)


@pytest.fixture(scope="module")
def sample(s3_server: S3Server, bucket: str) -> SampleInfo:
    return make_sample(f"s3://{bucket}/sample", docs=16, queries=4, shards=2, seed=5, bad_rows=True,
                       image_size=32, storage=direct(s3_server))


def _cfg(root: str, sample: SampleInfo, **storage: Any) -> Config:
    return parse_config({
        "root": root, "corpus": sample.corpus, "queries": sample.queries,
        "storage": storage,
        "ray": {"num_cpus": 2, "progress_bars": False},
        "embed": {"batch_size": 8, "rows_per_read_task": 16, "write_batch_size": 16, "num_actors": 1},
        "index": {"factory": "Flat", "shards": 2},
        "search": {"k": K, "searcher_num_cpus": 0.25},
        # The retriever's own model reranks (its vectors reused, no second embedding), one actor per pool: the
        # faults are what this module checks (tests.reference.lean).
        "rerank": {"backend": "clip", "batch_size": 8, "select_buckets": 2, "num_actors": 1,
                   "clip_model": {"name": "mmr-tiny", "seed": 0},
                   "fusion": {"method": "weighted", "weight": 0.7},
                   "selection": {"mode": "top_n", "top_n": TOP_N}},
    })


def _results(storage: Storage, run_dir: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for uri in storage.find(join(run_dir, "results")):
        if uri.endswith(".parquet"):
            rows += storage.read_table(uri).to_pylist()
    return sorted(rows, key=lambda r: (r["query_id"], r["rank"]))


def assert_same_results(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Same (query_id, rank, doc_id) rows; scores equal within float tolerance."""
    assert [(r["query_id"], r["rank"], r["doc_id"]) for r in got] == \
           [(r["query_id"], r["rank"], r["doc_id"]) for r in want]
    for col in ("retrieval_score", "rerank_score"):
        np.testing.assert_allclose([r[col] for r in got], [r[col] for r in want], atol=ATOL, err_msg=col)
    assert {r["reranker"] for r in got} == {r["reranker"] for r in want}


def check_published(storage: Storage, root: str, run_id: str) -> dict[str, Any]:
    """``LATEST`` names ``run_id`` and the run verifies (every listed file, sizes and sha256)."""
    latest, _ = P.read_latest(storage, root)
    assert latest is not None and latest["run_id"] == run_id, latest
    run_dir = join(root, "runs", run_id)
    manifest = P.verify_run(storage, run_dir, deep=True)
    listed = {rel for rel in manifest["files"]}
    assert any(rel.startswith("results/") for rel in listed), listed
    assert "stats.json" in listed
    return latest


def _no_secrets(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"secret {s[:6]}... in {text!r}"


@pytest.fixture(scope="module")
def clean(bucket: str, sample: SampleInfo, ray_proxied: Any, s3_server: S3Server) -> dict[str, Any]:
    """The baseline: one run through a healthy proxy."""
    from pipelines.run import run

    root = f"s3://{bucket}/clean"
    report = run(_cfg(root, sample))
    st = direct(s3_server)
    check_published(st, root, report.run_id)
    return {"root": root, "report": report, "results": _results(st, report.run_dir)}


# ----------------------------------------------------------------------------------------------
# no Ray: configuration, one request against a dead / hung endpoint
# ----------------------------------------------------------------------------------------------


def test_retry_settings_are_validated_and_reach_botocore() -> None:
    for bad, field in (({"retries": 0}, "storage.retries"), ({"connect_timeout": 0}, "storage.connect_timeout"),
                       ({"read_timeout": -1}, "storage.read_timeout")):
        with pytest.raises(ConfigError, match=field):
            parse_config({"root": "/tmp/x", "corpus": "/tmp/c", "storage": bad})
    cfg = parse_config({"root": "/tmp/x", "corpus": "/tmp/c",
                        "storage": {"retries": 3, "connect_timeout": 2, "read_timeout": 7.5}})
    kw = cfg.storage.options().s3fs_kwargs()
    assert kw["config_kwargs"] == {"connect_timeout": 2.0, "read_timeout": 7.5,
                                   "retries": {"total_max_attempts": 3, "mode": "standard"}}
    defaults = parse_config({"root": "/tmp/x", "corpus": "/tmp/c"}).storage.options()
    assert (defaults.retries, defaults.connect_timeout, defaults.read_timeout) == (5, 10.0, 30.0)
    with pytest.raises(ValueError, match="retries"):
        StorageOptions(retries=0)


@pytest.mark.parametrize("fault", ["down", "reset", "hung"])
def test_one_request_gives_up_after_bounded_attempts(fault: str, s3_server: S3Server, bucket: str,
                                                     via_proxy: FaultProxy) -> None:
    proxy = via_proxy
    uri = f"s3://{bucket}/probe/{fault}.bin"
    direct(s3_server).write_bytes(uri, b"x" * 100)
    retries = 3
    # retry_deadline_s: no waiting past botocore's attempts (the outage budget is test_storage_real's)
    st = Storage(StorageOptions(retries=retries, connect_timeout=1, read_timeout=0.5, retry_deadline_s=0.01))
    assert st.read_bytes(uri) == b"x" * 100  # healthy: one connection, kept alive
    before = proxy.stats.connections
    if fault == "down":
        proxy.down()
    elif fault == "reset":
        proxy.drop(n=10**6)
    else:
        proxy.reset_live()
        proxy.delay(request=60.0)  # accepted, forwarded never: every attempt hits read_timeout
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        st.read_bytes(uri)
    took = time.monotonic() - t0
    msg = str(ei.value)
    _no_secrets(msg)
    assert ei.value.transient
    assert msg.startswith(f"{uri}: "), msg
    assert f"endpoint {proxy.endpoint_url}" in msg and f"storage.retries={retries}" in msg, msg
    attempts = proxy.stats.connections - before
    if fault == "down":
        assert attempts == 0 and "Could not connect" in msg, msg
    else:
        # botocore: `retries` attempts per request; s3fs re-issues a failed call at most once more.
        assert 1 <= attempts <= 2 * retries, attempts
    if fault == "hung":
        assert "timeout" in msg.lower(), msg
    # Not a timing claim: only that the bounded retries end (a hang would run into pytest's timeout).
    assert took < 120, took


# ----------------------------------------------------------------------------------------------
# publish: the LATEST conditional write whose response is lost
# ----------------------------------------------------------------------------------------------


def _fake_run(storage: Storage, root: str, run_id: str) -> None:
    import pyarrow as pa

    run_dir = join(root, "runs", run_id)
    storage.write_table(join(run_dir, "results", "part-b00000.parquet"),
                        pa.table({"query_id": ["q1"], "doc_id": [f"doc-{run_id}"], "rank": pa.array([1], pa.int32())}))
    storage.write_json(join(run_dir, "stats.json"), {"run_id": run_id})
    P.write_manifest(storage, run_dir, run_id, {})


def _latest_versions(s3_server: S3Server, bucket: str, key: str) -> list[dict[str, Any]]:
    client = s3_server.client()
    out = []
    for v in client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", []):
        if v["Key"] == key:
            body = client.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Body"].read()
            out.append(json.loads(body))
    return out


@pytest.mark.parametrize("existing", [False, True], ids=["if-none-match", "if-match"])
def test_lost_response_of_the_latest_write_is_not_a_second_advance(existing: bool, s3_server: S3Server,
                                                                  via_proxy: FaultProxy) -> None:
    proxy = via_proxy
    name = f"mmr-cas-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    root = f"s3://{name}/root"
    st = Storage()
    _fake_run(st, root, "run-a")
    _fake_run(st, root, "run-b")
    if existing:
        assert P.advance_latest(st, root, "run-a")["previous"] is None
    before = len(_latest_versions(s3_server, name, "root/LATEST"))

    # The server applies the PUT of LATEST; the proxy resets the connection instead of answering.
    proxy.drop_responses(n=1, match=rf"^PUT /{name}/root/LATEST".encode())
    seen = len(proxy.stats.request_lines)
    out = P.advance_latest(st, root, "run-b")
    proxy.passthrough()
    assert proxy.stats.dropped_responses >= 1
    puts = [line for line in proxy.stats.request_lines[seen:] if line.startswith(f"PUT /{name}/root/LATEST")]
    assert len(puts) >= 2, puts  # the lost one and its retry (refused: 412, the ETag moved to our write)

    want_prev = "run-a" if existing else None
    assert out["run_id"] == "run-b" and out["previous"] == want_prev, out
    latest, _ = P.read_latest(direct(s3_server), root)
    assert latest == out
    versions = _latest_versions(s3_server, name, "root/LATEST")
    assert len(versions) == before + 1, versions  # written exactly once
    assert [v["run_id"] for v in versions].count("run-b") == 1
    assert P.latest_run(st, root)[0] == join(root, "runs", "run-b")


def test_publish_against_a_dead_endpoint_fails_clearly_and_leaves_latest(s3_server: S3Server,
                                                                       via_proxy: FaultProxy) -> None:
    proxy = via_proxy
    name = f"mmr-cas-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    root = f"s3://{name}/root"
    st = Storage(StorageOptions(retries=2, retry_deadline_s=0.01))
    _fake_run(st, root, "run-a")
    _fake_run(st, root, "run-b")
    P.advance_latest(st, root, "run-a")
    proxy.down()
    with pytest.raises((StorageError, P.PublishError)) as ei:
        P.advance_latest(st, root, "run-b")
    proxy.passthrough()
    msg = str(ei.value)
    _no_secrets(msg)
    assert f"s3://{name}/root/" in msg and proxy.endpoint_url in msg, msg
    latest, _ = P.read_latest(direct(s3_server), root)
    assert latest is not None and latest["run_id"] == "run-a"


# ----------------------------------------------------------------------------------------------
# whole runs through the proxy (local Ray, workers reach S3 through the proxy too)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transient_faults_during_a_run_give_the_clean_results(clean: dict[str, Any], bucket: str,
                                                              sample: SampleInfo, s3_server: S3Server,
                                                              via_proxy: FaultProxy) -> None:
    from pipelines.run import run

    proxy = via_proxy
    root = f"s3://{bucket}/transient"
    before = {k: v for k, v in vars(proxy.stats).items() if isinstance(v, int)}
    # New connections reset at accept, requests reset before the server sees them, responses lost after
    # the server applied the request (seeded; which request draws which number depends on thread order).
    proxy.reset_live()
    proxy.configure(**FAULTS)
    report = run(_cfg(root, sample, retries=TRANSIENT_RETRIES))
    proxy.passthrough()
    stats = {k: v - before[k] for k, v in vars(proxy.stats).items() if isinstance(v, int)}
    log.warning("proxy during the faulty run: %s", stats)
    assert stats["dropped_connections"] >= 3 and stats["dropped_requests"] >= 3 and stats["dropped_responses"] >= 3, \
        stats

    st = direct(s3_server)
    assert report.published and not report.resumed
    check_published(st, root, report.run_id)
    assert_same_results(_results(st, report.run_dir), clean["results"])
    got = st.read_json(join(report.run_dir, "stats.json"))["stages"]
    want = st.read_json(join(clean["report"].run_dir, "stats.json"))["stages"]
    for stage in ("embed_corpus", "embed_queries", "search", "rerank"):
        assert (got[stage]["rows_in"], got[stage]["rows_ok"], got[stage]["rows_rejected"]) == \
               (want[stage]["rows_in"], want[stage]["rows_ok"], want[stage]["rows_rejected"]), stage


@pytest.mark.slow
def test_delayed_connections_still_give_the_clean_results(clean: dict[str, Any], sample: SampleInfo,
                                                          s3_server: S3Server, via_proxy: FaultProxy) -> None:
    """Every new connection waits CONNECT_DELAY_S before it is forwarded. On the clean root (caches warm, so the run is
    short): the cache checks, index reads by the searcher actors, search, rerank and publish all go slow."""
    from pipelines.run import run

    proxy = via_proxy
    root = clean["root"]
    st = direct(s3_server)
    latest_before, _ = P.read_latest(st, root)
    assert latest_before is not None
    proxy.reset_live()
    delayed0 = proxy.stats.delayed
    proxy.delay(connect=CONNECT_DELAY_S)
    report = run(_cfg(root, sample))
    proxy.passthrough()
    log.warning("delayed connections: %d", proxy.stats.delayed - delayed0)
    assert proxy.stats.delayed > delayed0
    assert report.published and not report.resumed
    latest = check_published(st, root, report.run_id)
    assert latest["previous"] == latest_before["run_id"]
    assert_same_results(_results(st, report.run_dir), clean["results"])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["driver", "worker"])
def test_endpoint_down_partway_fails_clearly_and_latest_stays(where: str, clean: dict[str, Any],
                                                              sample: SampleInfo, s3_server: S3Server,
                                                              via_proxy: FaultProxy,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint goes down in the rerank stage (embeddings, index, search done): when the stage starts
    (the driver's first request fails), or at the first scored part a Ray worker writes. The run fails with a
    clear error, LATEST stays; once the endpoint is back, the same config resumes the run and publishes it
    (checked for the worker case).
    (Down right before publishing: test_publish_against_a_dead_endpoint_fails_clearly_and_leaves_latest.)"""
    import pipelines.run as R

    proxy = via_proxy
    root = clean["root"]  # caches are warm: the run gets to the fault quickly
    st = direct(s3_server)
    latest_before, _ = P.read_latest(st, root)
    assert latest_before is not None
    runs_before = set(st.listdir(join(root, "runs")))
    # Its own retry budget per variant, to see it in the message. (Retry settings are not part of the config
    # fingerprint: both variants are the same job, so the driver variant removes its failed run when it is done.)
    retries = {"driver": 2, "worker": 3}[where]
    cfg = _cfg(root, sample, retries=retries, connect_timeout=2, read_timeout=5, retry_deadline_s=0.01)
    assert R.find_unfinished(st, cfg) is None, "a failed run of this config is left over: this run would resume it"

    original = R.run_rerank

    def down_then(*a: Any, **kw: Any) -> Any:
        if where == "driver":
            proxy.down()
        else:
            proxy.down_on(rb"^PUT /[^ ]+/scored/")
        return original(*a, **kw)

    monkeypatch.setattr(R, "run_rerank", down_then)
    with pytest.raises(Exception) as ei:  # noqa: PT011 - the type is asserted below
        R.run(cfg)
    went_down = proxy.went_down
    proxy.passthrough()
    monkeypatch.setattr(R, "run_rerank", original)
    if where == "worker":
        assert went_down is not None and "/scored/" in went_down, went_down

    err = ei.value
    _no_secrets(str(err))  # with a worker's failure: the whole remote traceback
    # A StorageError, also when a Ray worker raised it (RayTaskError(StorageError)); its own message is one
    # line: the URI first, then the endpoint and the retry budget.
    assert isinstance(err, StorageError), (type(err), str(err))
    clear = storage_error_of(err)
    assert clear is not None, str(err)
    # (Ray Data appends lines about its own UDF retries to a worker's exception: the first line is ours.)
    msg = str(clear).splitlines()[0]
    log.warning("the run failed with %s: %s", type(err).__name__, msg)
    assert msg.startswith(f"{root}/runs/"), msg
    if where == "worker":
        assert "/scored/" in msg.split(":", 2)[1], msg
    assert f"endpoint {proxy.endpoint_url}" in msg and f"storage.retries={retries}" in msg, msg

    # LATEST never moved; the failed run is there, without a manifest: it can never be published.
    latest_after, _ = P.read_latest(st, root)
    assert latest_after == latest_before
    new = sorted(set(st.listdir(join(root, "runs"))) - runs_before)
    assert len(new) == 1, new
    run_id = new[0]
    assert not st.exists(join(root, "runs", run_id, P.MANIFEST))
    with pytest.raises(P.PublishError, match="incomplete"):
        P.advance_latest(st, root, run_id)

    if where == "driver":
        # (Resuming is the same as below; once is enough for the time budget.)
        st.rm(join(root, "runs", run_id), recursive=True)
        return
    # Endpoint back: the same config resumes the failed run and publishes it, with the clean results.
    report = R.run(cfg)
    assert report.resumed and report.run_id == run_id and report.published
    latest = check_published(st, root, run_id)
    assert latest["previous"] == latest_before["run_id"]
    assert_same_results(_results(st, report.run_dir), clean["results"])
