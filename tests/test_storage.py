"""operators/storage.py against local paths and two real S3 servers: moto (server mode) and SeaweedFS.

Every test that talks to S3 runs against both (``root_uri`` here, ``any_s3_server`` / ``any_s3_bucket`` from
conftest); the retry deadline's handler is checked without a server."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import operators.storage as storage_mod
from operators.storage import (
    DEADLINE_BACKOFF_MAX_S,
    Storage,
    StorageError,
    StorageOptions,
    arrow_filesystem,
    deadline_retry_delay,
    filesystem,
    join,
    normalize,
    redact,
    scheme_of,
    strip_scheme,
)
from tests.helpers import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, S3Server, clear_s3fs_caches, closed_port
from tests.seaweed import (
    OTHER_ACCESS_KEY_ID,
    OTHER_SECRET_ACCESS_KEY,
    S3_KINDS,
    SeaweedServer,
    fresh_bucket,
    s3_for,
)

pytestmark = pytest.mark.timeout(120)

# OTHER_*: explicit credentials that differ from the env sentinels (moto accepts any; SeaweedFS has them as a
# second identity).
ALL_SECRETS = (TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, OTHER_ACCESS_KEY_ID, OTHER_SECRET_ACCESS_KEY)


def _table(n: int = 100) -> pa.Table:
    return pa.table(
        {
            "doc_id": pa.array([f"d{i:05d}" for i in range(n)], pa.string()),
            "score": pa.array([i / 7 for i in range(n)], pa.float32()),
            "blob": pa.array([bytes([i % 256]) * (i % 13) for i in range(n)], pa.binary()),
        }
    )


def _bucket(s3_uri: str) -> str:
    return s3_uri.removeprefix("s3://").split("/", 1)[0]


def _assert_no_secrets(text: str) -> None:
    for s in ALL_SECRETS:
        assert s not in text, f"secret {s[:6]}... leaked into: {text!r}"


@pytest.fixture(params=["local", *S3_KINDS])
def root_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty root: a local directory, or ``s3://<fresh bucket>/root`` on moto or on SeaweedFS (the AWS
    environment pointed at it). Overrides conftest's (local and moto)."""
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        yield str(root)
        return
    with fresh_bucket(s3_for(request, request.param)) as bucket_uri:
        yield f"{bucket_uri}/root"


# ----------------------------------------------------------------------------------------------
# URI helpers (no server)
# ----------------------------------------------------------------------------------------------


def test_uri_helpers(tmp_path):
    assert scheme_of("s3://b/k") == "s3"
    assert scheme_of("S3A://b/k") == "s3a"
    assert scheme_of("/abs/path") == "file"
    assert scheme_of("file:///abs/path") == "file"
    assert strip_scheme("s3://b/k/x.parquet") == "b/k/x.parquet"
    assert strip_scheme(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert strip_scheme("rel/x") == os.path.abspath("rel/x")
    assert join("s3://b/root/", "/runs/", "r1") == "s3://b/root/runs/r1"
    assert normalize("s3://b/root/") == "s3://b/root"
    assert normalize(f"file://{tmp_path}") == str(tmp_path)


# ----------------------------------------------------------------------------------------------
# Storage against local paths and S3 (root_uri is parametrised over both)
# ----------------------------------------------------------------------------------------------


def test_bytes_and_json_roundtrip(root_uri):
    st = Storage()
    st.write_bytes(join(root_uri, "a/b/blob.bin"), b"\x00\x01payload")
    assert st.read_bytes(join(root_uri, "a/b/blob.bin")) == b"\x00\x01payload"

    obj = {"run_id": "r1", "files": [{"path": "x", "sha256": "00"}], "n": 3}
    st.write_json(join(root_uri, "stats.json"), obj)
    assert st.read_json(join(root_uri, "stats.json")) == obj

    # Overwrite replaces the content; a local write leaves no temporary file behind.
    st.write_bytes(join(root_uri, "a/b/blob.bin"), b"v2")
    assert st.read_bytes(join(root_uri, "a/b/blob.bin")) == b"v2"
    assert st.ls(join(root_uri, "a/b")) == [join(root_uri, "a/b/blob.bin")]


def test_file_scheme_uri_is_the_same_file(tmp_path):
    st = Storage()
    st.write_bytes(f"file://{tmp_path}/x/y.txt", b"hello")
    assert (tmp_path / "x" / "y.txt").read_bytes() == b"hello"
    assert st.read_bytes(str(tmp_path / "x" / "y.txt")) == b"hello"
    assert st.exists(f"file://{tmp_path}/x/y.txt")


def test_read_missing_raises_file_not_found(root_uri):
    st = Storage()
    with pytest.raises(FileNotFoundError):
        st.read_bytes(join(root_uri, "nope.bin"))
    with pytest.raises(FileNotFoundError):
        st.info(join(root_uri, "nope.bin"))


def test_ls_lists_files_only_with_pattern(root_uri):
    st = Storage()
    for name in ("b.json", "a.json", "c.txt", "sub/d.json"):
        st.write_bytes(join(root_uri, name), name.encode())

    assert st.ls(root_uri) == [join(root_uri, n) for n in ("a.json", "b.json", "c.txt")]
    assert st.ls(root_uri, pattern="*.json") == [join(root_uri, n) for n in ("a.json", "b.json")]
    assert st.ls(root_uri, pattern="*.parquet") == []
    assert st.ls(join(root_uri, "sub")) == [join(root_uri, "sub/d.json")]
    assert st.ls(join(root_uri, "does-not-exist")) == []
    # Listed URIs are readable as they are.
    assert [st.read_bytes(u) for u in st.ls(root_uri, pattern="*.txt")] == [b"c.txt"]


def test_exists(root_uri):
    st = Storage()
    st.write_bytes(join(root_uri, "dir/f.bin"), b"x")
    assert st.exists(join(root_uri, "dir/f.bin"))
    assert st.exists(join(root_uri, "dir"))
    assert not st.exists(join(root_uri, "dir/g.bin"))
    assert not st.exists(join(root_uri, "other"))


def test_rm_file_and_recursive(root_uri, request):
    st = Storage()
    for name in ("keep.txt", "tree/a.txt", "tree/deeper/b.txt", "single.txt"):
        st.write_bytes(join(root_uri, name), b"1")

    st.rm(join(root_uri, "single.txt"))
    assert not st.exists(join(root_uri, "single.txt"))

    st.rm(join(root_uri, "tree"), recursive=True)
    assert not st.exists(join(root_uri, "tree/a.txt"))
    assert not st.exists(join(root_uri, "tree/deeper/b.txt"))
    assert st.find(join(root_uri, "tree")) == []
    # SeaweedFS keeps an emptied prefix as an empty directory (seen > 40 s): exists() and listdir() may still name
    # it there (find() lists files only). The pipeline trusts files (markers, manifests), never a directory.
    if request.node.callspec.params["root_uri"] != "seaweedfs":
        assert not st.exists(join(root_uri, "tree"))
    assert st.ls(root_uri) == [join(root_uri, "keep.txt")]

    st.rm(join(root_uri, "never-existed"), recursive=True)  # no error


def test_sha256_matches_hashlib(root_uri):
    st = Storage()
    data = random.Random(0).randbytes(10_000)
    uri = join(root_uri, "data.bin")
    st.write_bytes(uri, data)
    expected = hashlib.sha256(data).hexdigest()
    assert st.sha256(uri) == expected
    assert st.sha256(uri, chunk=999) == expected  # several chunks, ragged last one
    st.write_bytes(join(root_uri, "empty.bin"), b"")
    assert st.sha256(join(root_uri, "empty.bin")) == hashlib.sha256(b"").hexdigest()


def test_sha256_missing_file_is_storage_error(root_uri):
    with pytest.raises(StorageError, match="nope.bin"):
        Storage().sha256(join(root_uri, "nope.bin"))


def test_table_roundtrip_and_columns(root_uri):
    st = Storage()
    table = _table(250)
    uri = join(root_uri, "results/part-00000.parquet")
    st.write_table(uri, table, row_group_size=100)

    assert st.read_table(uri).equals(table)
    assert st.read_table(uri, columns=["doc_id"]).equals(table.select(["doc_id"]))
    assert st.read_table(uri, columns=iter(["score", "doc_id"])).column_names == ["score", "doc_id"]


def test_parquet_file_metadata(root_uri):
    st = Storage()
    uri = join(root_uri, "t.parquet")
    st.write_table(uri, _table(250), row_group_size=100)

    pf = st.parquet_file(uri)
    md = pf.metadata
    assert md.num_rows == 250
    assert md.num_row_groups == 3
    assert pf.schema_arrow.names == ["doc_id", "score", "blob"]
    assert md.row_group(0).column(0).compression.lower() == "zstd"
    assert pf.read_row_group(2).num_rows == 50


def test_read_table_of_garbage_is_storage_error(root_uri):
    st = Storage()
    uri = join(root_uri, "not-parquet.parquet")
    st.write_bytes(uri, b"definitely not parquet")
    with pytest.raises(StorageError, match="not-parquet.parquet"):
        st.read_table(uri)


def test_arrow_filesystem_with_pyarrow(root_uri):
    st = Storage()
    table = _table(40)
    st.write_table(join(root_uri, "ds/part-0.parquet"), table.slice(0, 25))
    st.write_table(join(root_uri, "ds/part-1.parquet"), table.slice(25))

    fs, path = arrow_filesystem(join(root_uri, "ds/part-0.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table.slice(0, 25))

    # A directory of files through a pyarrow dataset.
    fs, path = arrow_filesystem(join(root_uri, "ds"))
    got = pq.read_table(path, filesystem=fs).sort_by("doc_id")
    assert got.equals(table)

    # Writes through the arrow filesystem are visible to Storage.
    fs, path = arrow_filesystem(join(root_uri, "via-arrow.parquet"))
    pq.write_table(table, path, filesystem=fs)
    assert st.read_table(join(root_uri, "via-arrow.parquet")).equals(table)


def test_arrow_filesystem_kind(s3_bucket, tmp_path):
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(f"{s3_bucket}/x/y.parquet")
    assert isinstance(fs, pafs.PyFileSystem)
    assert path == f"{_bucket(s3_bucket)}/x/y.parquet"
    fs, path = arrow_filesystem(f"file://{tmp_path}/y.parquet")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/y.parquet"


# ----------------------------------------------------------------------------------------------
# S3 only: reachability, settings from the environment, explicit options
# ----------------------------------------------------------------------------------------------


def test_env_settings_reach_the_test_server(any_s3_server: S3Server, any_s3_bucket):
    """With no explicit options, endpoint and credentials come from the AWS environment."""
    assert os.environ["AWS_ENDPOINT_URL"] == any_s3_server.endpoint_url
    Storage().write_bytes(f"{any_s3_bucket}/k/v.txt", b"through env")
    body = any_s3_server.client().get_object(Bucket=_bucket(any_s3_bucket), Key="k/v.txt")["Body"].read()
    assert body == b"through env"


def test_explicit_options_reach_the_test_server(any_s3_server: S3Server, any_s3_bucket):
    s3_bucket = any_s3_bucket
    opts = StorageOptions(
        endpoint_url=any_s3_server.endpoint_url,
        region="us-east-1",
        access_key_id=OTHER_ACCESS_KEY_ID,
        secret_access_key=OTHER_SECRET_ACCESS_KEY,
    )
    st = Storage(opts)
    st.write_json(f"{s3_bucket}/opts.json", {"ok": True})
    assert Storage().read_json(f"{s3_bucket}/opts.json") == {"ok": True}
    st.check_reachable(s3_bucket)


def test_check_reachable_ok(any_s3_bucket, tmp_path):
    st = Storage()
    st.check_reachable(any_s3_bucket)
    st.check_reachable(f"{any_s3_bucket}/some/prefix/that/does/not/exist/yet")
    st.check_reachable(str(tmp_path))


def test_check_reachable_missing_bucket(any_s3_server):
    with pytest.raises(StorageError) as ei:
        Storage().check_reachable("s3://mmr-no-such-bucket-7f3e/prefix")
    assert "mmr-no-such-bucket-7f3e" in str(ei.value)
    _assert_no_secrets(str(ei.value))


def test_error_with_explicit_other_credentials_has_no_secrets(any_s3_server):
    """Explicit credentials (different from the env ones) + a missing bucket: no secret in the error."""
    opts = StorageOptions(
        endpoint_url=any_s3_server.endpoint_url,
        access_key_id=OTHER_ACCESS_KEY_ID,
        secret_access_key=OTHER_SECRET_ACCESS_KEY,
        session_token="other-token-MMR-4242",
    )
    st = Storage(opts)
    for call in (
        lambda: st.check_reachable("s3://mmr-missing-bucket-a1b2"),
        lambda: st.read_table("s3://mmr-missing-bucket-a1b2/x.parquet"),
        lambda: st.write_bytes("s3://mmr-missing-bucket-a1b2/x.bin", b"x"),
        lambda: st.sha256("s3://mmr-missing-bucket-a1b2/x.bin"),
    ):
        with pytest.raises(StorageError) as ei:
            call()
        text = f"{ei.value} {ei.value!r} {ei.value.args}"
        _assert_no_secrets(text)
        assert "other-token-MMR-4242" not in text
        # The original exception is not chained as the cause (its text is not scrubbed).
        assert ei.value.__cause__ is None and ei.value.__suppress_context__


@pytest.mark.parametrize("secret", [TEST_SECRET_ACCESS_KEY, TEST_ACCESS_KEY_ID, OTHER_SECRET_ACCESS_KEY])
def test_secret_in_error_text_is_scrubbed(any_s3_bucket, secret):
    """A secret that does end up in an error message (here: in the path) is replaced by ***."""
    st = Storage(StorageOptions(access_key_id=OTHER_ACCESS_KEY_ID, secret_access_key=OTHER_SECRET_ACCESS_KEY))
    with pytest.raises(StorageError) as ei:
        st.read_table(f"{any_s3_bucket}/{secret}/missing.parquet")
    _assert_no_secrets(str(ei.value))
    assert "/***/missing.parquet" in str(ei.value)


# ----------------------------------------------------------------------------------------------
# redact / StorageOptions (no server)
# ----------------------------------------------------------------------------------------------


def test_redact_env_explicit_and_signed_urls(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token-MMR-0001")
    opts = StorageOptions(secret_access_key=OTHER_SECRET_ACCESS_KEY, session_token="opt-token-MMR-0002")
    text = (
        f"key={TEST_ACCESS_KEY_ID} secret={TEST_SECRET_ACCESS_KEY} tok=env-token-MMR-0001 "
        f"explicit={OTHER_SECRET_ACCESS_KEY} opt=opt-token-MMR-0002 "
        "url=https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAXYZ%2F2024&X-Amz-Signature=abcdef0123 "
        "X-Amz-Security-Token=FwoGZXIvYXdzEJr end"
    )
    out = redact(text, opts)
    _assert_no_secrets(out)
    for s in ("env-token-MMR-0001", "opt-token-MMR-0002", "AKIAXYZ", "abcdef0123", "FwoGZXIvYXdzEJr"):
        assert s not in out
    assert "X-Amz-Signature=***" in out and "X-Amz-Credential=***" in out
    assert out.endswith(" end")
    # Without options, the environment secrets are still removed.
    _assert_no_secrets(redact(f"{TEST_SECRET_ACCESS_KEY}/{TEST_ACCESS_KEY_ID}").replace("***", ""))


def test_redact_leaves_ordinary_text_alone(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    text = "s3://bucket/runs/r1/_MANIFEST.json: FileNotFoundError: nope"
    assert redact(text) == text
    # Very short values are not treated as secrets (they would shred ordinary text).
    assert redact("a b c", StorageOptions(secret_access_key="b")) == "a b c"


def test_storage_options_repr_hides_secrets():
    opts = StorageOptions(
        endpoint_url="http://127.0.0.1:1234",
        region="eu-west-1",
        access_key_id="AKIA-repr-MMR-1111",
        secret_access_key="xSecretValue-MMR-9999",
        session_token="tok-repr-MMR-2222",
    )
    for text in (repr(opts), str(opts), f"{opts}", repr(Storage(opts).options)):
        assert "xSecretValue-MMR-9999" not in text
        assert "AKIA-repr-MMR-1111" not in text
        assert "tok-repr-MMR-2222" not in text
    assert "http://127.0.0.1:1234" in repr(opts)


def test_storage_options_s3fs_kwargs():
    kw = StorageOptions(
        endpoint_url="http://h:1", region="us-east-1", access_key_id="kkkk", secret_access_key="ssss"
    ).s3fs_kwargs()
    assert kw["client_kwargs"] == {"endpoint_url": "http://h:1", "region_name": "us-east-1"}
    assert kw["key"] == "kkkk" and kw["secret"] == "ssss"
    assert "retries" in kw["config_kwargs"]
    assert StorageOptions(anon=True).s3fs_kwargs()["anon"] is True
    assert "client_kwargs" not in StorageOptions().s3fs_kwargs()


# ----------------------------------------------------------------------------------------------
# the retry deadline (no server): botocore's needs-retry handler, and the filesystem that registers it
# ----------------------------------------------------------------------------------------------

ENDPOINT = SimpleNamespace(host="http://127.0.0.1:9")


@pytest.fixture
def no_outages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's per-process outage record starts empty (and this test's stays its own)."""
    monkeypatch.setattr(storage_mod, "_OUTAGES", {})
    monkeypatch.setattr(storage_mod, "_WARNED", set())


def _refused() -> BaseException:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")


def _answer(status: int, code: str | None = None) -> tuple[Any, dict[str, Any]]:
    parsed: dict[str, Any] = {"ResponseMetadata": {"HTTPStatusCode": status}}
    if code:
        parsed["Error"] = {"Code": code}
    return SimpleNamespace(status_code=status), parsed


def _delay(now: float, request: dict[str, Any], attempts: int = 5, deadline: float = 10.0,
           **kw: Any) -> float | None:
    kw.setdefault("caught_exception", None if "response" in kw else _refused())
    return deadline_retry_delay(deadline, 5, attempts=attempts, request_dict=request, endpoint=ENDPOINT, now=now, **kw)


def test_deadline_handler_retries_transient_failures_until_the_budget(no_outages: None) -> None:
    a: dict[str, Any] = {"context": {}}
    first = _delay(100.0, a)
    assert first is not None and 0 < first <= DEADLINE_BACKOFF_MAX_S
    assert _delay(109.5, a) == pytest.approx(0.5)  # never sleeps past the budget
    assert _delay(110.0, a) is None  # spent: botocore raises the last error
    # A new request in the same outage does not get a new budget (a re-issue, the next call of a loop).
    assert _delay(110.5, {"context": {}}) is None
    # Any answer ends the outage: the next failure starts a new budget.
    assert _delay(111.0, {"context": {}}, response=_answer(200)) is None
    assert _delay(112.0, {"context": {}}) is not None
    # A request keeps its own budget even when others' answers end the endpoint's outage meanwhile.
    b: dict[str, Any] = {"context": {}}
    assert _delay(200.0, b) is not None
    assert _delay(201.0, {"context": {}}, response=_answer(200)) is None
    assert _delay(210.5, b) is None
    # Nobody retrying for longer than the quiet gap: a failure much later is a new outage.
    c: dict[str, Any] = {"context": {}}
    assert _delay(300.0, c) is not None
    assert _delay(300.0 + storage_mod._QUIET_GAP_S + 11, {"context": {}}) is not None


def test_deadline_handler_retries_only_endpoint_failures(no_outages: None) -> None:
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    for exc in (ConnectionClosedError(endpoint_url="u"), ReadTimeoutError(endpoint_url="u")):
        assert _delay(0.0, {"context": {}}, caught_exception=exc) is not None, exc
    for status, code in ((500, "InternalError"), (503, "SlowDown"), (400, "RequestTimeout"), (502, None)):
        assert _delay(0.0, {"context": {}}, response=_answer(status, code)) is not None, (status, code)
    for status, code in ((404, "NoSuchKey"), (403, "AccessDenied"), (412, "PreconditionFailed"), (501, None)):
        assert _delay(0.0, {"context": {}}, response=_answer(status, code)) is None, (status, code)
    assert _delay(0.0, {"context": {}}, caught_exception=ValueError("not the endpoint")) is None
    # Backoff: capped, so a recovered endpoint is noticed soon.
    assert all(_delay(0.0, {"context": {}}, attempts=n) <= DEADLINE_BACKOFF_MAX_S for n in (1, 8, 40, 400))


def test_deadline_filesystem_is_cached_per_budget_and_pickles_with_it() -> None:
    from operators.storage import S3FS_CALL_ATTEMPTS

    opts = StorageOptions(endpoint_url="http://127.0.0.1:9", retry_deadline_s=7)
    fs = filesystem("s3://b/k", opts)
    assert type(fs).__name__ == "DeadlineS3FileSystem"
    assert (fs.retry_deadline_s, fs.retries) == (7.0, S3FS_CALL_ATTEMPTS)
    assert filesystem("s3://b/k", opts) is fs  # fsspec's instance cache...
    assert filesystem("s3://b/k", StorageOptions(endpoint_url="http://127.0.0.1:9", retry_deadline_s=8)) is not fs
    back = pickle.loads(pickle.dumps(fs))  # as a Ray worker gets it (Ray Data readers and writers)
    assert type(back) is type(fs) and (back.retry_deadline_s, back.retries) == (7.0, S3FS_CALL_ATTEMPTS)
    arrow_fs, _ = arrow_filesystem("s3://b/k", opts)
    assert pickle.loads(pickle.dumps(arrow_fs)).handler.fs.retry_deadline_s == 7.0
    clear_s3fs_caches()  # ...is s3fs' own: the tests' clearing (after an environment change) reaches it
    assert filesystem("s3://b/k", opts) is not fs


def test_a_refused_request_is_retried_for_the_deadline_not_its_attempts(no_outages: None) -> None:
    """One botocore attempt per request, 1.5 s budget: the request keeps trying (the handler is registered on the
    filesystem's client) for the budget, then the error names it."""
    import time

    with closed_port() as port:
        st = Storage(StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", retries=1, retry_deadline_s=1.5,
                                    access_key_id=OTHER_ACCESS_KEY_ID, secret_access_key=OTHER_SECRET_ACCESS_KEY))
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            st.read_bytes("s3://mmr-bucket/x.bin")
        took = time.monotonic() - t0
    msg = str(ei.value)
    assert ei.value.transient and msg.startswith("s3://mmr-bucket/x.bin: "), msg
    assert f"endpoint http://127.0.0.1:{port}" in msg and "storage.retry_deadline_s=1.5s" in msg, msg
    _assert_no_secrets(msg)
    assert 1.5 <= took < 30, took  # not a timing claim beyond: it waited for the budget, and ended


# ----------------------------------------------------------------------------------------------
# Regression: a listings cache made exists/ls/rm blind to writes by other processes
# (fixed with use_listings_cache=False in StorageOptions.s3fs_kwargs)
# ----------------------------------------------------------------------------------------------


def test_sees_objects_written_by_another_process(any_s3_server: S3Server, any_s3_bucket):
    s3_server, s3_bucket = any_s3_server, any_s3_bucket
    st = Storage()
    bucket = _bucket(s3_bucket)
    root = f"{s3_bucket}/root"
    st.write_bytes(f"{root}/a.txt", b"a")
    assert st.ls(root) == [f"{root}/a.txt"]  # caches the listing of root/

    other = s3_server.client()  # stands in for a Ray worker / another job
    other.put_object(Bucket=bucket, Key="root/b.txt", Body=b"b")
    other.put_object(Bucket=bucket, Key="root/sub/c.txt", Body=b"c")
    other.delete_object(Bucket=bucket, Key="root/a.txt")

    problems = []
    if not st.exists(f"{root}/b.txt"):
        problems.append("exists() is False for a new object")
    if st.exists(f"{root}/a.txt"):
        problems.append("exists() is True for a deleted object")
    if st.ls(f"{root}/sub") != [f"{root}/sub/c.txt"]:
        problems.append("ls() of a new prefix is empty")
    other.put_object(Bucket=bucket, Key="root/d.txt", Body=b"d")
    st.rm(f"{root}/d.txt")
    if other.list_objects_v2(Bucket=bucket, Prefix="root/d.txt")["KeyCount"]:
        problems.append("rm() did not delete a new object")
    assert not problems, problems


# ----------------------------------------------------------------------------------------------
# Ray workers reach the test server: moto through the AWS_* the ray_local fixture forwards, SeaweedFS through
# explicit options (the workers' environment is moto's), as a config's storage section reaches them
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)  # a hang guard: Ray Data's first read on a loaded 2-core box
def test_ray_workers_read_s3(any_s3_server: S3Server, any_s3_bucket, ray_local):
    import ray

    s3_bucket = any_s3_bucket
    st = Storage()
    table = _table(60)
    st.write_table(f"{s3_bucket}/w/part-0.parquet", table.slice(0, 30))
    st.write_table(f"{s3_bucket}/w/part-1.parquet", table.slice(30))
    opts = StorageOptions(endpoint_url=any_s3_server.endpoint_url) if isinstance(any_s3_server, SeaweedServer) \
        else None

    @ray.remote
    def remote_read(uri: str, opts: StorageOptions | None) -> tuple[int, str, float, str]:
        from operators.storage import Storage

        s = Storage(opts)
        return (s.read_table(uri).num_rows, s.sha256(uri), s.fs(uri).retry_deadline_s,
                os.environ.get("AWS_ENDPOINT_URL", ""))

    rows, digest, deadline, env_endpoint = ray.get(remote_read.remote(f"{s3_bucket}/w/part-0.parquet", opts),
                                                   timeout=60)
    assert rows == 30
    assert digest == st.sha256(f"{s3_bucket}/w/part-0.parquet")
    assert deadline == StorageOptions().retry_deadline_s
    if opts is None:
        assert env_endpoint == any_s3_server.endpoint_url

    import ray.data

    fs, path = arrow_filesystem(f"{s3_bucket}/w", opts)
    ds = ray.data.read_parquet(path, filesystem=fs)
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).select(table.column_names).sort_by("doc_id")
    assert got.equals(table)
