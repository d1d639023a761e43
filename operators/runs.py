"""Reading a published run: ``LATEST``, the manifest check, a run's stage output.

A run is published by :mod:`pipelines.publish` (manifest written last, then ``LATEST`` advanced by
compare-and-swap); readers (Serve, notebooks, eval, training data) trust a run only through
:func:`read_latest` / :func:`verify_run` / :func:`latest_run` / :func:`resolve_run` here: ``LATEST`` names a
run whose ``_MANIFEST.json`` exists, and every file the manifest lists has the recorded size (and sha256
when asked). A run's files are read only through its manifest (:func:`run_files`, :func:`read_run_json`,
:func:`read_stage`, :func:`run_config`): files it does not list (``_pairs/``, ``metrics.json``, anything written
after publishing) are never read. Paths and names come from :mod:`operators.layout`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from operators import layout as L
from operators.layout import LATEST as LATEST
from operators.layout import MANIFEST as MANIFEST
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


class PublishError(RuntimeError):
    """A run cannot be published, or a published run does not check out."""


def read_manifest(storage: Storage, run_dir: str) -> dict[str, Any]:
    """The run's manifest as written (unchecked: :func:`verify_run` checks it); PublishError when absent."""
    try:
        return storage.read_json(L.manifest_uri(run_dir))
    except FileNotFoundError:
        raise PublishError(f"{run_dir}: no {MANIFEST}: the run is incomplete") from None


def verify_run(storage: Storage, run_dir: str, deep: bool = False) -> dict[str, Any]:
    """The run's manifest, after checking that every listed file is there (sizes; sha256 if ``deep``)."""
    manifest = read_manifest(storage, run_dir)
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
    uri = L.latest_uri(root)
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
    run_dir = L.run_dir(root, current["run_id"])
    return run_dir, verify_run(storage, run_dir)


def resolve_run(run: str, storage: Storage) -> tuple[str, dict[str, Any]]:
    """``(run_dir, manifest)`` for a run directory or a root (its published ``LATEST``), verified."""
    run = run.rstrip("/")
    if not storage.exists(run):
        raise FileNotFoundError(f"{run}: no such run directory or root")
    if not storage.exists(L.manifest_uri(run)) and storage.exists(L.latest_uri(run)):
        found = latest_run(storage, run)
        if found is None:  # pragma: no cover - LATEST vanished between the two calls
            raise PublishError(f"{run}: nothing published (no {LATEST})")
        log.info("%s is a root: evaluating its published run %s", run, found[0])
        return found
    if not storage.exists(L.manifest_uri(run)) and storage.exists(L.runs_dir(run)):
        raise PublishError(f"{run}: looks like a root but has no {LATEST}: nothing was published yet")
    return run, verify_run(storage, run)


def read_stage(storage: Storage, run_dir: str, manifest: dict[str, Any], prefix: str,
               columns: dict[str, pa.DataType], optional: Iterable[str] = ()) -> pa.Table:
    """Concatenate the Parquet files the manifest lists under ``prefix`` (only those: they verified)."""
    import pyarrow as pa

    opt = set(optional)
    parts = []
    for uri in run_files(run_dir, manifest, prefix):
        t = storage.read_table(uri)
        missing = [c for c in columns if c not in t.column_names and c not in opt]
        if missing:
            raise ValueError(f"{uri}: required columns {missing} are missing (has {t.column_names})")
        cols = {c: (t.column(c).cast(typ) if c in t.column_names else pa.nulls(t.num_rows, typ))
                for c, typ in columns.items()}
        parts.append(pa.table(cols))
    if not parts:
        return pa.schema(list(columns.items())).empty_table()
    return pa.concat_tables(parts)


def run_files(run_dir: str, manifest: dict[str, Any], prefix: str, suffix: str = ".parquet") -> list[str]:
    """URIs of the files the manifest lists under ``prefix`` (e.g. ``layout.prefix(layout.RESULTS)``) ending in
    ``suffix``, sorted."""
    return [join(run_dir, rel) for rel in sorted(manifest["files"]) if rel.startswith(prefix) and rel.endswith(suffix)]


def read_run_json(storage: Storage, run_dir: str, manifest: dict[str, Any], rel: str) -> Any:
    """A JSON file of the run (``layout.STATS``, ``layout.RUN_MARKER``, ...), only if the manifest lists it."""
    if rel not in manifest["files"]:
        raise FileNotFoundError(f"{run_dir}: {rel} is not listed in the run's manifest")
    return storage.read_json(join(run_dir, rel))


def run_config(storage: Storage, run_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The (redacted) config the run was started with (its ``_RUN.json``); {} when the manifest has none."""
    try:
        return read_run_json(storage, run_dir, manifest, L.RUN_MARKER).get("config", {})
    except FileNotFoundError:
        return {}
