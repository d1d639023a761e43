"""URI-addressed storage: one fsspec filesystem per URI, credentials kept out of every message.

Every path in mmrerank is a URI: a local path, ``file://...`` or ``s3://bucket/prefix``. S3 settings
come from the standard AWS environment/profile (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
or from an explicit :class:`StorageOptions`; secrets are never logged, put in stats or manifests, and
are scrubbed from error messages raised here.

Transient endpoint failures (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried
with backoff for a time budget, so that a gateway restart is ridden out. Two layers inside each request:
botocore's ``standard`` retry mode makes its ``StorageOptions.retries`` attempts (full jitter,
``rand * 2**i`` seconds, at most 20 s apart) with ``connect_timeout`` / ``read_timeout`` per attempt;
then a ``needs-retry`` handler registered after it (:class:`DeadlineS3FileSystem`) keeps retrying
(backoff up to ``DEADLINE_BACKOFF_MAX_S``) until ``retry_deadline_s`` has passed since the request's
first failure, or since the endpoint started failing when that came first (an endpoint that has been
failing longer than the budget is not waited for again by the next request). s3fs re-issues a call once
more when botocore cannot retry it itself (a response body cut mid-read). Ray Data workers use the same
settings: every reader/writer goes through :func:`filesystem` (``arrow_filesystem`` wraps it too, so
pyarrow never opens its own S3 client; a pickled filesystem is rebuilt with its deadline). When the
budget is spent the :class:`StorageError` names the URI, the endpoint and the budget, never a credential.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

# Retry defaults (also the config defaults: pipelines/config.py StorageConfig).
DEFAULT_RETRIES = 5  # botocore's attempts per S3 request, the first one included
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0
# Seconds a transient failure is retried, from the first failure: rides out a gateway restart (~10 s).
DEFAULT_RETRY_DEADLINE_S = 60.0
# Backoff once botocore's attempts are spent: base * 2**attempt, capped, times uniform(0.5, 1). The cap
# bounds how long after an endpoint comes back a waiting request notices.
DEADLINE_BACKOFF_BASE_S = 0.25
DEADLINE_BACKOFF_MAX_S = 4.0
# s3fs' own retry loop around each call: one re-issue for what botocore cannot retry (a body cut
# mid-read). Kept at 2 so that the layers multiply to 2 x retries attempts, not retries**2 (and the
# re-issue of a request that spent its deadline gives up after its attempts: the endpoint's outage clock).
S3FS_CALL_ATTEMPTS = 2


class StorageError(RuntimeError):
    """A storage operation failed; the message never contains credentials.

    ``transient`` is True when the endpoint failed (unreachable, reset, timed out, 5xx, throttled)
    after the bounded retries, rather than the request itself (missing key, access denied).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:  # keeps `transient` across pickling (Ray workers)
        return (type(self), (str(self), self.transient))


@dataclass(frozen=True)
class StorageOptions:
    """Explicit S3 settings; every field is optional and falls back to the AWS environment/profile.

    ``repr`` hides the secrets so the object can be logged or shipped to workers safely.
    """

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anon: bool = False
    # Retries of transient endpoint failures (see the module docstring).
    retries: int = DEFAULT_RETRIES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 1:
            raise ValueError(f"storage retries must be an integer >= 1, got {self.retries!r}")
        for name in ("connect_timeout", "read_timeout", "retry_deadline_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"storage {name} must be > 0 seconds, got {v!r}")

    def s3fs_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            kw["client_kwargs"] = client
        if self.profile:
            kw["profile"] = self.profile
        if self.access_key_id:
            kw["key"] = self.access_key_id
        if self.secret_access_key:
            kw["secret"] = self.secret_access_key
        if self.session_token:
            kw["token"] = self.session_token
        if self.anon:
            kw["anon"] = True
        # Other processes (Ray workers) write and delete objects: never answer from a stale listing.
        kw["use_listings_cache"] = False
        # Retries with backoff: a flaky or restarting endpoint is ridden out, a dead one fails the run after
        # retry_deadline_s (never hangs it). botocore: `retries` attempts per request, then the deadline
        # handler of DeadlineS3FileSystem (a constructor argument: part of fsspec's instance-cache key).
        kw["config_kwargs"] = {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                               "retries": {"total_max_attempts": self.retries, "mode": "standard"}}
        kw["retry_deadline_s"] = float(self.retry_deadline_s)
        return kw

    def resolved_endpoint(self) -> str:
        """The S3 endpoint requests go to (for messages): config, then AWS env, else AWS's default."""
        ep = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not ep:
            region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            return f"the AWS default endpoint{f' ({region})' if region else ''}"
        return re.sub(r"(://)[^/@]*@", r"\1***@", ep)  # never userinfo

    def retry_note(self) -> str:
        return (f"endpoint {self.resolved_endpoint()}; gave up after retrying with backoff for "
                f"storage.retry_deadline_s={self.retry_deadline_s:g}s since the first failure "
                f"(storage.retries={self.retries} attempts per request first, "
                f"connect_timeout={self.connect_timeout:g}s, read_timeout={self.read_timeout:g}s)")

    def secrets(self) -> list[str]:
        vals = [self.access_key_id, self.secret_access_key, self.session_token]
        vals += [os.environ.get(k) for k in _SECRET_ENV]
        return [v for v in vals if v and len(v) >= 4]


def redact(text: str, options: StorageOptions | None = None) -> str:
    """Remove every known secret (explicit or from the environment) from ``text``."""
    opts = options or StorageOptions()
    for s in opts.secrets():
        text = text.replace(s, "***")
    # Signed-URL style query parameters, whatever their values.
    return re.sub(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s]+", r"\1***", text)


def scheme_of(uri: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return m.group(1).lower() if m else "file"


def strip_scheme(uri: str) -> str:
    if scheme_of(uri) == "file":
        return os.path.abspath(uri[7:] if uri.startswith("file://") else uri)
    return uri.split("://", 1)[1]


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def normalize(uri: str) -> str:
    """Canonical form: absolute local path without ``file://``; other schemes unchanged."""
    if scheme_of(uri) == "file":
        return strip_scheme(uri)
    return uri.rstrip("/")


def filesystem(uri: str, options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (:class:`DeadlineS3FileSystem` for s3://, local otherwise)."""
    scheme = scheme_of(uri)
    opts = options or StorageOptions()
    if scheme in ("s3", "s3a"):
        return _deadline_s3_class()(**opts.s3fs_kwargs())
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    return fsspec.filesystem(scheme)


def arrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem + path for ``uri`` (used by Ray Data readers/writers and pyarrow datasets)."""
    fs = filesystem(uri, options)
    if scheme_of(uri) == "file":
        return pafs.LocalFileSystem(), strip_scheme(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), strip_scheme(uri)


_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
                    "InternalError"}
_TRANSIENT_NAMES = {"ConnectionError", "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError",
                    "ConnectTimeoutError", "ReadTimeoutError", "ProxyConnectionError", "FSTimeoutError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                    "IncompleteRead", "ResponseParserError", "TimeoutError", "ConnectionResetError",
                    "ConnectionRefusedError", "ConnectionAbortedError", "BrokenPipeError"}


def is_transient(exc: BaseException) -> bool:
    """A failure of the endpoint (unreachable, reset, timed out, 5xx, throttled), not of the request."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if resp.get("Error", {}).get("Code") in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return True
        e = e.__cause__ or e.__context__
    return False


# ----------------------------------------------------------------------------------------------
# the retry deadline: a botocore needs-retry handler that takes over after the standard one
# ----------------------------------------------------------------------------------------------

_RETRY_STATUS = {500, 502, 503, 504}
# endpoint -> [first, last] transient failure of its current outage (time.monotonic). Any answer ends it, and
# so does a quiet gap (nobody retrying) longer than the budget and _QUIET_GAP_S (more than botocore's 20 s
# backoff plus an attempt's timeout). Shared by every client of the process, so a request that arrives late
# in a long outage (or re-issues one that gave up) does not wait a whole budget again.
_OUTAGES: dict[str, list[float]] = {}
_QUIET_GAP_S = 60.0
_WARNED: set[str] = set()  # endpoints whose current outage was logged


def _failed_transiently(response: Any, caught_exception: BaseException | None) -> bool:
    if caught_exception is not None:
        return is_transient(caught_exception)
    parsed = response[1] if isinstance(response, tuple) and len(response) > 1 else None
    if not isinstance(parsed, dict):
        return False
    status = parsed.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return parsed.get("Error", {}).get("Code") in _TRANSIENT_CODES or status in _RETRY_STATUS


def deadline_retry_delay(deadline_s: float, max_attempts: int, attempts: int, request_dict: dict[str, Any],
                         response: Any = None, caught_exception: BaseException | None = None,
                         endpoint: Any = None, now: float | None = None, **_: Any) -> float | None:
    """botocore ``needs-retry`` handler: seconds to sleep before the next attempt, or None (do not retry).

    Registered after botocore's standard handler, whose delay wins while it still retries; this one decides
    once that handler declines (its attempts or its retry quota spent). A transient failure is retried until
    ``deadline_s`` has passed since the request's first failure or since the endpoint started failing,
    whichever came first; anything else (a success, a 404, a denied request) is not retried and ends the
    endpoint's outage.
    """
    host = re.sub(r"(://)[^/@]*@", r"\1***@", str(getattr(endpoint, "host", "") or ""))
    now = time.monotonic() if now is None else now
    if not _failed_transiently(response, caught_exception):
        outage = _OUTAGES.pop(host, None)
        if host in _WARNED:
            _WARNED.discard(host)
            if outage is not None:
                log.info("S3 endpoint %s answers again, %.1fs after it started failing", host, now - outage[0])
        return None
    context = request_dict.get("context")
    if not isinstance(context, dict):
        context = {}
    first = context.setdefault("mmr_first_failure", now)
    outage = _OUTAGES.get(host)
    if outage is None or now - outage[1] > max(deadline_s, _QUIET_GAP_S):
        outage = _OUTAGES[host] = [now, now]
        _WARNED.discard(host)
    outage[1] = now
    left = deadline_s - (now - min(first, outage[0]))
    if left <= 0:
        return None  # botocore raises the last error: a StorageError naming the budget, further up
    if attempts >= max_attempts and host not in _WARNED:
        _WARNED.add(host)
        kind = type(caught_exception).__name__ if caught_exception is not None else "a 5xx or throttling answer"
        log.warning("S3 endpoint %s failing (%s): retrying with backoff for up to %gs from the first failure "
                    "(storage.retry_deadline_s)", host, kind, deadline_s)
    backoff = min(DEADLINE_BACKOFF_MAX_S, DEADLINE_BACKOFF_BASE_S * 2.0 ** min(attempts, 16))
    return min(left, backoff * random.uniform(0.5, 1.0))


_CLASS_LOCK = threading.Lock()


def _deadline_s3_class() -> type[fsspec.AbstractFileSystem]:
    """:class:`DeadlineS3FileSystem`, defined on first use: s3fs (botocore) is a slow import that local-only
    runs never need."""
    with _CLASS_LOCK:
        cls = globals().get("DeadlineS3FileSystem")
        if cls is not None:
            return cls
        import s3fs
        from fsspec.asyn import sync_wrapper

        class DeadlineS3FileSystem(s3fs.S3FileSystem):
            """s3fs whose clients retry transient failures until ``retry_deadline_s`` (module docstring)."""

            # s3fs' own loop around a call (its default: 5): one re-issue for a body cut mid-read. A class
            # attribute, so a filesystem unpickled in a Ray worker has it too.
            retries = S3FS_CALL_ATTEMPTS

            def __init__(self, *args: Any, retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
                         **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.retry_deadline_s = float(retry_deadline_s)
                self._deadline_client: Any = None

            async def set_session(self, refresh: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
                s3 = await super().set_session(refresh=refresh, kwargs=kwargs or {})
                if s3 is not self._deadline_client:  # a new client (first use, or refreshed)
                    retries = (self.config_kwargs or {}).get("retries") or {}
                    handler = functools.partial(deadline_retry_delay, self.retry_deadline_s,
                                                int(retries.get("total_max_attempts") or 1))
                    s3.meta.events.register_last("needs-retry.s3", handler, unique_id="mmr-retry-deadline")
                    self._deadline_client = s3
                return s3

            _connect = set_session
            connect = sync_wrapper(set_session)

        # Picklable by reference (a Ray worker rebuilds it through the module's __getattr__).
        DeadlineS3FileSystem.__module__, DeadlineS3FileSystem.__qualname__ = __name__, "DeadlineS3FileSystem"
        # One instance cache with s3fs': clearing S3FileSystem's (after an environment change) clears ours too.
        DeadlineS3FileSystem._cache = s3fs.S3FileSystem._cache
        globals()["DeadlineS3FileSystem"] = DeadlineS3FileSystem
        return DeadlineS3FileSystem


def __getattr__(name: str) -> Any:  # unpickling a filesystem (a Ray worker) looks the class up by name
    if name == "DeadlineS3FileSystem":
        return _deadline_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe_failure(uri: str, exc: BaseException, options: StorageOptions | None = None) -> str:
    """``"<uri>: <Type>: <message>"`` (+ endpoint and retry budget for an endpoint failure), scrubbed."""
    opts = options or StorageOptions()
    msg = f"{uri}: {type(exc).__name__}: {exc}"
    if scheme_of(uri) in ("s3", "s3a") and is_transient(exc):
        msg += f" [{opts.retry_note()}]"
    return redact(msg, opts)


def storage_error_of(exc: BaseException) -> StorageError | None:
    """The :class:`StorageError` behind ``exc``, for a one-line report.

    A StorageError raised in a Ray worker reaches the driver as ``RayTaskError(StorageError)``: still an
    instance of StorageError, but its ``str`` is the remote traceback. Ray keeps the worker's own exception
    in ``.cause``; this follows that and the ``__cause__`` / ``__context__`` chain.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, StorageError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _wrap(uri: str, options: StorageOptions | None, exc: BaseException) -> StorageError:
    return StorageError(describe_failure(uri, exc, options), transient=is_transient(exc))


class Storage:
    """Small facade over fsspec for the handful of operations the pipeline needs."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        scheme = scheme_of(uri)
        if scheme not in self._fs:
            self._fs[scheme] = filesystem(uri, self.options)
        return self._fs[scheme]

    def _p(self, uri: str) -> str:
        return strip_scheme(uri)

    def _u(self, like: str, path: str) -> str:
        scheme = scheme_of(like)
        return path if scheme == "file" else f"{scheme}://{path}"

    def exists(self, uri: str) -> bool:
        try:
            return bool(self.fs(uri).exists(self._p(uri)))
        except Exception as e:  # noqa: BLE001 - re-raised as StorageError without secrets
            raise _wrap(uri, self.options, e) from None

    def read_bytes(self, uri: str) -> bytes:
        try:
            with self.fs(uri).open(self._p(uri), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        try:
            fs = self.fs(uri)
            path = self._p(uri)
            if scheme_of(uri) == "file":
                # Local: write-then-rename so a reader never sees a half-written file.
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                with fs.open(path, "wb") as f:  # S3 PUT is atomic per object
                    f.write(data)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())

    def ls(self, uri: str, pattern: str | None = None) -> list[str]:
        """Files directly under ``uri`` (sorted URIs); ``pattern`` is a glob on the file name."""
        import fnmatch

        try:
            fs = self.fs(uri)
            p = self._p(uri)
            if not fs.exists(p):
                return []
            fs.invalidate_cache(p)
            entries = fs.ls(p, detail=True)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None
        out = []
        for e in entries:
            if e.get("type") != "file":
                continue
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if pattern is None or fnmatch.fnmatch(name, pattern):
                out.append(self._u(uri, e["name"]))
        return sorted(out)

    def find(self, uri: str) -> list[str]:
        """Every file under ``uri``, recursively (sorted URIs); ``[]`` when there is none."""
        try:
            fs = self.fs(uri)
            p = self._p(uri)
            if not fs.exists(p):
                return []
            # Files only: a gateway with directory entries (SeaweedFS; a "folder" marker on AWS) makes s3fs
            # return an emptied prefix itself.
            entries = fs.find(p, detail=True)
            return sorted(self._u(uri, f) for f, e in entries.items() if e.get("type") != "directory")
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def listdir(self, uri: str) -> list[str]:
        """Names of the entries (files and "directories") directly under ``uri``, sorted."""
        try:
            fs = self.fs(uri)
            p = self._p(uri)
            if not fs.exists(p):
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def info(self, uri: str) -> dict[str, Any]:
        try:
            return self.fs(uri).info(self._p(uri))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def rm(self, uri: str, recursive: bool = False) -> None:
        try:
            fs = self.fs(uri)
            p = self._p(uri)
            if fs.exists(p):
                fs.rm(p, recursive=recursive)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def sha256(self, uri: str, chunk: int = 1 << 20) -> str:
        h = hashlib.sha256()
        try:
            with self.fs(uri).open(self._p(uri), "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None
        return h.hexdigest()

    def parquet_file(self, uri: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.fs(uri).open(self._p(uri), "rb"))
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def read_table(self, uri: str, columns: Iterable[str] | None = None) -> pa.Table:
        try:
            with self.fs(uri).open(self._p(uri), "rb") as f:
                return pq.read_table(f, columns=list(columns) if columns is not None else None)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None

    def write_table(self, uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
        self.write_bytes(uri, sink.getvalue().to_pybytes())

    def check_reachable(self, uri: str) -> None:
        """Fail fast (before work) when the bucket/prefix cannot be reached or credentials are wrong."""
        try:
            fs = self.fs(uri)
            if scheme_of(uri) in ("s3", "s3a"):
                bucket = self._p(uri).split("/", 1)[0]
                fs.ls(bucket, refresh=True)
        except Exception as e:  # noqa: BLE001
            raise _wrap(uri, self.options, e) from None
