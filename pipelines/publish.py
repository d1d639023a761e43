"""Publishing a run: a manifest written last, then ``<root>/LATEST`` advanced by compare-and-swap.

A reader (Serve, notebooks, eval) trusts a run only through :func:`read_latest` / :func:`verify_run`
(the read side lives in :mod:`operators.runs`, so operators can read a run too; this module re-exports it):
``LATEST`` names a run whose ``_MANIFEST.json`` exists, and every file the manifest lists has the
recorded size (and sha256 when asked). ``LATEST`` is replaced atomically: on S3 with a conditional PUT
(``If-Match`` the ETag we read, or ``If-None-Match: *`` when there is none), locally under an
exclusive lock with write-then-rename, so two runs racing can never corrupt it.

A flaky endpoint can make a conditional write ambiguous: the server applied the PUT but the response
was lost, botocore retried it and got ``412`` (the ETag moved, to our own write). :func:`advance_latest`
remembers what it sent; when the next round reads exactly that back, the write landed and it stops,
instead of advancing a second time (which would make ``previous`` name the run itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Any

from operators import layout as L

# The layout's names and the read side of a published run; re-exported (the ``as`` names) for the callers
# that use them from here.
from operators.layout import LATEST as LATEST
from operators.layout import MANIFEST as MANIFEST
from operators.runs import PublishError as PublishError
from operators.runs import latest_run as latest_run
from operators.runs import read_latest as read_latest
from operators.runs import verify_run as verify_run
from operators.storage import (
    Storage,
    StorageError,
    describe_failure,
    is_transient,
    join,
    scheme_of,
    strip_scheme,
)

log = logging.getLogger(__name__)

TMP = re.compile(r"\.tmp(-\d+)?$")  # Storage.write_bytes' local write-then-rename leftovers


def _rel(base: str, uri: str) -> str:
    return strip_scheme(uri)[len(strip_scheme(base)) + 1:]


def list_files(storage: Storage, run_dir: str) -> list[str]:
    return storage.find(run_dir)


def write_manifest(storage: Storage, run_dir: str, run_id: str, extra: dict[str, Any]) -> dict[str, Any]:
    """List every file of the run with size, sha256 and (Parquet) row count; written last."""
    entries: dict[str, Any] = {}
    for uri in list_files(storage, run_dir):
        rel = _rel(run_dir, uri)
        if rel == MANIFEST or rel.startswith(L.prefix(L.PAIRS)) or TMP.search(rel):
            continue
        data = storage.read_bytes(uri)
        e: dict[str, Any] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if rel.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            e["rows"] = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        entries[rel] = e
    manifest = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": entries, **extra}
    storage.write_json(L.manifest_uri(run_dir), manifest)
    return manifest


def _cas_s3(storage: Storage, uri: str, data: bytes, token: str | None) -> bool:
    fs = storage.fs(uri)
    bucket, key = strip_scheme(uri).split("/", 1)
    cond = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, ContentType="application/json", **cond)
        return True
    except Exception as e:  # noqa: BLE001 - 412 PreconditionFailed / 409 ConditionalRequestConflict
        # s3fs re-raises botocore's ClientError as FileExistsError/OSError: look at the response itself.
        resp = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
        code = resp.get("Error", {}).get("Code")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        # Retries are used up (or the request was refused): whether the endpoint applied the write is
        # unknown here; advance_latest's next read of LATEST (if the endpoint answers) tells.
        raise StorageError(describe_failure(uri, e, storage.options), transient=is_transient(e)) from None


def _cas_local(path: str, data: bytes, token: str | None) -> bool:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = open(path, "rb").read() if os.path.exists(path) else None
            now = hashlib.sha256(current).hexdigest() if current is not None else None
            if now != token:
                return False
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def advance_latest(storage: Storage, root: str, run_id: str, retries: int = 10) -> dict[str, Any]:
    """Point ``LATEST`` at ``run_id`` (which must verify) with compare-and-swap; returns the new content.

    A conditional write whose outcome is unknown (refused with 412 after a retry, or failed on the
    endpoint) is checked on the next round: when ``LATEST`` holds exactly what we sent, it landed and is
    returned, never written twice. ``retries`` bounds these rounds (concurrent publishers, endpoint
    failures); every storage request inside has its own retry budget (``StorageOptions.retries`` attempts, then
    until ``retry_deadline_s`` has passed).
    """
    run_dir = L.run_dir(root, run_id)
    manifest = verify_run(storage, run_dir)
    uri = L.latest_uri(root)
    sent: list[dict[str, Any]] = []  # contents of our conditional writes that did not report success
    last_error: StorageError | None = None
    for attempt in range(retries):
        current, token = read_latest(storage, root)
        if current is not None and current in sent:
            log.info("published: LATEST -> %s (was %s; the write landed although its response was lost)",
                     run_id, current.get("previous"))
            return current
        new = {"run_id": run_id, "manifest": join(L.RUNS, run_id, MANIFEST), "created": manifest["created"],
               "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "previous": current.get("run_id") if current else None}
        data = json.dumps(new, indent=2, sort_keys=True).encode()
        try:
            ok = _cas_s3(storage, uri, data, token) if scheme_of(root) in ("s3", "s3a") else \
                _cas_local(strip_scheme(uri), data, token)
        except StorageError as e:
            if not e.transient:
                raise
            # The endpoint failed after its own retries: the write may or may not have landed.
            log.warning("conditional write of LATEST failed (attempt %d): %s", attempt + 1, e)
            ok, last_error = False, e
        if ok:
            log.info("published: LATEST -> %s (was %s)", run_id, new["previous"])
            return new
        sent.append(new)
        log.info("LATEST changed while publishing (attempt %d); retrying", attempt + 1)
        time.sleep(0.05 * (attempt + 1))
    if last_error is not None:
        raise PublishError(f"{uri}: could not advance LATEST to {run_id} after {retries} attempts; "
                           f"last error: {last_error}")
    raise PublishError(f"{uri}: could not advance LATEST after {retries} attempts (concurrent publishers)")
