"""Input shards: discovery, contract checks, fingerprints and the row reader that keeps row positions.

Ray Data's ``read_parquet`` does not expose a row's position in its file, and later stages need
``(shard, row_index)`` both for reject rows and to fetch a candidate's content without a join, so
:class:`operators.shard_source.ShardSource` reads row groups itself (pyarrow, streaming ``iter_batches``,
:func:`read_rows` here) and adds them.
Problems found per row at read time (null/duplicate id, null payload, empty text) become reject
columns that flow down the pipeline with the row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import contracts as C
from operators.contracts import (
    ERR_MSG,
    ERR_TYPE,
    ID,
    ROW,
    SHARD,
    SOURCE,
    InputKind,
    SchemaError,
    check_shard_schema,
)
from operators.layout import cache_dir as cache_dir  # re-exported: the cache's home is operators.layout
from operators.storage import Storage, StorageOptions, scheme_of

if TYPE_CHECKING:  # Ray only where a Dataset is built: the UDF modules import this one without Ray
    from ray.data import Dataset
    from ray.data.datasource import Datasource

log = logging.getLogger(__name__)

class InputError(ValueError):
    """An input path is missing or holds no usable shards."""


@dataclass(frozen=True)
class ShardPlan:
    """One input Parquet file and what the pipeline needs to know about it before reading."""

    uri: str
    kind: str  # "corpus" | "queries"
    payload: str  # "image" | "image_uri" | "text"
    num_rows: int
    row_groups: tuple[int, ...]  # rows per row group
    fingerprint: str  # content identity of the file
    # Rows whose id is null or repeats an earlier one (in shard order): rejected at read time.
    bad_ids: tuple[tuple[int, str], ...] = field(default=())

    def key(self, extra: str = "") -> str:
        """Cache key: content + the read-time rejections that depend on other shards + ``extra``."""
        h = hashlib.sha256(f"{self.kind}|{self.payload}|{self.fingerprint}|{self.bad_ids}|{extra}".encode())
        return h.hexdigest()[:32]


def list_shards(uri: str, storage: Storage) -> list[str]:
    """Parquet shards at ``uri``: a file, a directory (``*.parquet``, sorted) or a glob."""
    if any(ch in uri for ch in "*?["):
        fs = storage.fs(uri)
        prefix = "" if scheme_of(uri) == "file" else f"{scheme_of(uri)}://"
        found = sorted(prefix + p for p in fs.glob(uri.split("://", 1)[-1]))
        if not found:
            raise InputError(f"no files match {uri}")
        return found
    if not storage.exists(uri):
        raise InputError(f"input path does not exist: {uri}")
    info = storage.info(uri)
    if info.get("type") == "file":
        return [uri]
    shards = storage.ls(uri, "*.parquet")
    if not shards:
        raise InputError(f"no *.parquet shards under {uri}")
    return shards


def fingerprint(uri: str, storage: Storage) -> str:
    """Content identity: S3's ETag+size where the store gives one, else sha256 of the bytes."""
    info = storage.info(uri)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{info.get('size')}"
    return "sha256:" + storage.sha256(uri)


def plan_shards(uris: list[str], kind: InputKind, storage: Storage) -> list[ShardPlan]:
    """Check every shard's schema (before any work) and find null/duplicate ids across all shards.

    The first occurrence of an id (shard order, then row order) wins; later ones are rejected.
    """
    plans: list[ShardPlan] = []
    seen: set[str] = set()
    for uri in uris:
        try:
            pf = storage.parquet_file(uri)
        except Exception as e:  # noqa: BLE001
            raise SchemaError(f"{uri}: not a readable Parquet file ({e})") from None
        payload = check_shard_schema(pf.schema_arrow, kind, uri)
        md = pf.metadata
        rgs = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        ids = pf.read(columns=[kind.id_column]).column(0) if md.num_rows else pa.chunked_array([], pa.string())
        bad: list[tuple[int, str]] = []
        for i, v in enumerate(ids.to_pylist()):
            if v is None:
                bad.append((i, C.NULL_ID))
            elif not kind.unique_ids:
                continue
            elif v in seen:
                bad.append((i, C.DUPLICATE_ID))
            else:
                seen.add(v)
        plans.append(
            ShardPlan(uri=uri, kind=kind.name, payload=payload, num_rows=md.num_rows, row_groups=rgs,
                      fingerprint=fingerprint(uri, storage), bad_ids=tuple(bad))
        )
    return plans


def read_rows(plan: ShardPlan, shard_key: str, row_groups: list[int], first_row: int,
              id_column: str, options: StorageOptions | None, batch_rows: int,
              extra: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    storage = Storage(options)
    pf = storage.parquet_file(plan.uri)
    bad = dict(plan.bad_ids)
    start = first_row
    for rb in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups,
                              columns=[id_column, plan.payload, *extra]):
        n = rb.num_rows
        rows = np.arange(start, start + n, dtype=np.int64)
        # "" means "no error": an all-null column would change type between blocks.
        err_type: list[str] = [bad.get(int(r), "") for r in rows]
        payload = rb.column(1)
        nulls = pc.is_null(payload).to_numpy(zero_copy_only=False)
        empty = np.zeros(n, dtype=bool)
        if plan.payload == "text":
            empty = (pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(payload, ""))).to_numpy() == 0) & ~nulls
        msgs: list[str] = []
        for i in range(n):
            if err_type[i] == C.NULL_ID:
                msgs.append(f"{id_column} is null")
            elif err_type[i] == C.DUPLICATE_ID:
                msgs.append(f"{id_column} {rb.column(0)[i].as_py()!r} already used by an earlier row")
            elif nulls[i]:
                err_type[i] = C.NULL_PAYLOAD
                msgs.append(f"{plan.payload} is null")
            elif empty[i]:
                err_type[i] = C.EMPTY_TEXT
                msgs.append("text is empty")
            else:
                msgs.append("")
        yield pa.table(
            {
                ID: rb.column(0).cast(pa.string()),
                plan.payload: payload,
                **{c: rb.column(c) for c in extra},
                ROW: pa.array(rows),
                SHARD: pa.array([shard_key] * n, pa.string()),
                SOURCE: pa.array([plan.uri] * n, pa.string()),
                ERR_TYPE: pa.array(err_type, pa.string()),
                ERR_MSG: pa.array(msgs, pa.string()),
            }
        )
        start += n


def read_source(source: Datasource, num_cpus: float) -> Dataset:
    """``ray.data.read_datasource`` with exactly one output stream per read task of ``source``.

    Our sources size their own blocks (whole batches). With fewer read tasks than Ray Data's minimum block
    count (``DataContext.read_op_min_num_blocks``, 200) it would split every task's output into
    ceil(200 / tasks) pieces: the actor downstream then gets ragged small batches (measured in
    bench_rerank: sizes 1-3 among the 16s) and a split read is never fused with the map after it.
    """
    import ray

    n = max(1, len(source.get_read_tasks(1)))
    return ray.data.read_datasource(source, override_num_blocks=n, num_cpus=num_cpus)
