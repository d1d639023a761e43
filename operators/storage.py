"""URI-addressed storage: one fsspec filesystem per URI, credentials kept out of every message.

Every path in mmrerank is a URI: a local path, ``file://...`` or ``s3://bucket/prefix``. S3 settings
come from the standard AWS environment/profile (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)
or from an explicit :class:`StorageOptions`; secrets are never logged, put in stats or manifests, and
are scrubbed from error messages raised here.

Transient endpoint failures (connection refused or reset, timeouts, HTTP 5xx, throttling) are retried
a bounded number of times with exponential backoff: botocore's ``standard`` retry mode makes up to
``StorageOptions.retries`` attempts per request (full jitter, ``rand * 2**i`` seconds, at most 20 s
apart) with ``connect_timeout`` / ``read_timeout`` per attempt, and s3fs re-issues a request once more
when botocore cannot retry it itself (a response body cut mid-read). Ray Data workers use the same
settings: every reader/writer goes through :func:`filesystem` (``arrow_filesystem`` wraps it too, so
pyarrow never opens its own S3 client). When the attempts are used up the :class:`StorageError` names
the URI, the endpoint and the retry budget, never a credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
DEFAULT_RETRIES = 5  # attempts per S3 request, the first one included
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0
# s3fs' own retry loop around each call: one re-issue for what botocore cannot retry (a body cut
# mid-read). Kept at 2 so that the two layers multiply to 2 x retries, not retries**2.
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
    # Bounded retries for transient endpoint failures (see the module docstring).
    retries: int = DEFAULT_RETRIES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 1:
            raise ValueError(f"storage retries must be an integer >= 1, got {self.retries!r}")
        for name in ("connect_timeout", "read_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
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
        # Bounded retries with backoff: a flaky endpoint is ridden out, a dead one fails the run (never
        # hangs it). botocore: `retries` attempts per request; s3fs: S3FS_CALL_ATTEMPTS per call (an
        # attribute, not a constructor argument: set by `filesystem`).
        kw["config_kwargs"] = {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                               "retries": {"total_max_attempts": self.retries, "mode": "standard"}}
        return kw

    def resolved_endpoint(self) -> str:
        """The S3 endpoint requests go to (for messages): config, then AWS env, else AWS's default."""
        ep = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not ep:
            region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            return f"the AWS default endpoint{f' ({region})' if region else ''}"
        return re.sub(r"(://)[^/@]*@", r"\1***@", ep)  # never userinfo

    def retry_note(self) -> str:
        return (f"endpoint {self.resolved_endpoint()}; gave up after retrying with exponential backoff: "
                f"storage.retries={self.retries} attempts per request (at most {S3FS_CALL_ATTEMPTS * self.retries} "
                f"per operation), connect_timeout={self.connect_timeout:g}s, read_timeout={self.read_timeout:g}s")

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
    """The fsspec filesystem for ``uri`` (s3fs for s3://, local otherwise)."""
    scheme = scheme_of(uri)
    opts = options or StorageOptions()
    if scheme in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", **opts.s3fs_kwargs())
        fs.retries = S3FS_CALL_ATTEMPTS  # s3fs' loop around each call (class default: 5)
        return fs
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
            return sorted(self._u(uri, f) for f in fs.find(p))
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
