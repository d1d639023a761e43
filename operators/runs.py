"""Reading a published run: ``LATEST``, the manifest check, a run's stage output.

A run is published by :mod:`pipelines.publish` (manifest written last, then ``LATEST`` advanced by
compare-and-swap); readers (Serve, notebooks, eval, training data) trust a run only through
:func:`read_latest` / :func:`verify_run` / :func:`latest_run` / :func:`resolve_run` here: ``LATEST`` names a
run whose ``_MANIFEST.json`` exists, and every file the manifest lists has the recorded size (and sha256
when asked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from operators.storage import (
    S3FS_CALL_ATTEMPTS,
    Storage,
    StorageError,
    describe_failure,
    is_transient,
    join,
    scheme_of,
    strip_scheme,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
LATEST = "LATEST"


class PublishError(RuntimeError):
    """A run cannot be published, or a published run does not check out."""


def verify_run(storage: Storage, run_dir: str, deep: bool = False) -> dict[str, Any]:
    """The run's manifest, after checking that every listed file is there (sizes; sha256 if ``deep``)."""
    try:
        manifest = storage.read_json(join(run_dir, MANIFEST))
    except FileNotFoundError:
        raise PublishError(f"{run_dir}: no {MANIFEST}: the run is incomplete") from None
    for rel, e in manifest["files"].items():
        uri = join(run_dir, rel)
        try:
            size = int(storage.info(uri)["size"])
        except FileNotFoundError:
            raise PublishError(f"{run_dir}: {rel} is listed in the manifest but missing") from None
        if size != e["size"]:
            raise PublishError(f"{run_dir}: {rel} has {size} bytes, the manifest says {e['size']}")
        if deep and storage.sha256(uri) != e["sha256"]:
            raise PublishError(f"{run_dir}: {rel} does not match its sha256")
    return manifest


def read_latest(storage: Storage, root: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(LATEST content, version token)``; ``(None, None)`` when nothing was published yet."""
    uri = join(root, LATEST)
    if scheme_of(root) in ("s3", "s3a"):
        fs = storage.fs(uri)
        bucket, key = strip_scheme(uri).split("/", 1)
        for attempt in range(1, S3FS_CALL_ATTEMPTS + 1):
            try:
                r = fs.call_s3("get_object", Bucket=bucket, Key=key)  # retried by botocore
                body = _sync_read(fs, r["Body"])  # a body cut mid-read: retried here
                return json.loads(body), r["ETag"]
            except FileNotFoundError:
                return None, None
            except Exception as e:  # noqa: BLE001 - re-raised without secrets
                if attempt < S3FS_CALL_ATTEMPTS and is_transient(e):
                    time.sleep(0.1 * attempt)
                    continue
                raise StorageError(describe_failure(uri, e, storage.options), transient=is_transient(e)) from None
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None, None
    return json.loads(data), hashlib.sha256(data).hexdigest()


def _sync_read(fs: Any, body: Any) -> bytes:
    from fsspec.asyn import sync

    async def _read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, _read)


def latest_run(storage: Storage, root: str) -> tuple[str, dict[str, Any]] | None:
    """``(run_dir, manifest)`` of the published run, verified; ``None`` when nothing is published."""
    current, _ = read_latest(storage, root)
    if current is None:
        return None
    run_dir = join(root, "runs", current["run_id"])
    return run_dir, verify_run(storage, run_dir)


def resolve_run(run: str, storage: Storage) -> tuple[str, dict[str, Any]]:
    """``(run_dir, manifest)`` for a run directory or a root (its published ``LATEST``), verified."""
    run = run.rstrip("/")
    if not storage.exists(run):
        raise FileNotFoundError(f"{run}: no such run directory or root")
    if not storage.exists(join(run, MANIFEST)) and storage.exists(join(run, LATEST)):
        found = latest_run(storage, run)
        if found is None:  # pragma: no cover - LATEST vanished between the two calls
            raise PublishError(f"{run}: nothing published (no {LATEST})")
        log.info("%s is a root: evaluating its published run %s", run, found[0])
        return found
    if not storage.exists(join(run, MANIFEST)) and storage.exists(join(run, "runs")):
        raise PublishError(f"{run}: looks like a root but has no {LATEST}: nothing was published yet")
    return run, verify_run(storage, run)


def read_stage(storage: Storage, run_dir: str, manifest: dict[str, Any], prefix: str,
               columns: dict[str, pa.DataType], optional: Iterable[str] = ()) -> pa.Table:
    """Concatenate the Parquet files the manifest lists under ``prefix`` (only those: they verified)."""
    import pyarrow as pa

    opt = set(optional)
    parts = []
    for rel in sorted(r for r in manifest["files"] if r.startswith(prefix) and r.endswith(".parquet")):
        t = storage.read_table(join(run_dir, rel))
        missing = [c for c in columns if c not in t.column_names and c not in opt]
        if missing:
            raise ValueError(f"{join(run_dir, rel)}: required columns {missing} are missing (has {t.column_names})")
        cols = {c: (t.column(c).cast(typ) if c in t.column_names else pa.nulls(t.num_rows, typ))
                for c, typ in columns.items()}
        parts.append(pa.table(cols))
    if not parts:
        return pa.schema(list(columns.items())).empty_table()
    return pa.concat_tables(parts)
