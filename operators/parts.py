"""Writing stage outputs as deterministic part files, grouped by input shard, plus reject rows.

A part is named by its input shard and the first input row it holds, so a retried write task
overwrites its own file instead of adding a duplicate. Rows with ``_err_type`` set go to the
rejects contract; the others to the stage's own table (:meth:`PartsSink.ok_table`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from operators.contracts import ERR_MSG, ERR_TYPE, ID, REJECTS, ROW, SHARD, SOURCE
from operators.storage import Storage, StorageOptions
from operators.watchdog import beat


def part_name(prefix: str, first_row: int) -> str:
    return f"{prefix}-{first_row:012d}.parquet"


@lru_cache(maxsize=2)
def cached_storage(options: StorageOptions | None) -> Storage:
    return Storage(options)


def row_ranges(rows: np.ndarray) -> list[list[int]]:
    """The row indexes as sorted half-open ``[start, end)`` runs; a repeated row starts a run of its own, so
    duplicates stay visible (the embed stage checks that a shard's runs tile ``[0, rows)`` exactly)."""
    r = np.sort(np.asarray(rows, dtype=np.int64))
    if r.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(r) != 1) + 1
    starts = r[np.r_[0, breaks]]
    ends = r[np.r_[breaks - 1, r.size - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends, strict=True)]


def tiling_errors(ranges: list[list[int]], num_rows: int) -> tuple[int, int]:
    """``(missing, repeated)`` row counts of ``ranges`` against exactly ``[0, num_rows)`` once each."""
    missing = repeated = 0
    pos = 0
    for a, b in sorted(ranges):
        if a > pos:
            missing += a - pos
        elif a < pos:
            repeated += min(b, pos) - a
        pos = max(pos, b)
    missing += max(0, num_rows - pos)
    repeated += max(0, pos - num_rows)
    return missing, repeated


class PartsSink(ABC):
    """Write one batch (numpy columns, possibly spanning shards): one record per shard touched."""

    def __init__(self, stage: str, storage_options: StorageOptions | None = None) -> None:
        self.stage = stage
        self.storage_options = storage_options

    @abstractmethod
    def path(self, what: str, key: str, first_row: int) -> str:
        """URI of the ``"ok"`` or ``"rejects"`` part for this shard and first row."""

    @abstractmethod
    def ok_table(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
        """The stage's output table for the rows selected by ``mask``."""

    def count_ok(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> int:
        return int(mask.sum())

    def write_batch(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        storage = cached_storage(self.storage_options)
        out: list[dict[str, Any]] = []
        shards = np.asarray(batch[SHARD]).astype(str)
        if len(shards) == 0:
            return out
        okmask = np.array([not e for e in batch[ERR_TYPE]], dtype=bool)
        rows = np.asarray(batch[ROW], dtype=np.int64)
        for key in sorted(set(shards.tolist())):
            sel = shards == key
            first = int(rows[sel].min())
            rec: dict[str, Any] = {"shard": key, "first_row": first, "rows_ok": 0, "rows_rejected": 0,
                                   "part": None, "rejects": None, "reject_types": {},
                                   "row_ranges": row_ranges(rows[sel])}
            ok = sel & okmask
            if ok.any():
                uri = self.path("ok", key, first)
                storage.write_table(uri, self.ok_table(batch, ok))
                rec["part"], rec["rows_ok"] = uri.rsplit("/", 1)[-1], self.count_ok(batch, ok)
            bad = sel & ~okmask
            if bad.any():
                types = [str(t) for t in batch[ERR_TYPE][bad].tolist()]
                n = len(types)
                rej = pa.Table.from_arrays(
                    [pa.array([self.stage] * n, pa.string()), pa.array(batch[SOURCE][bad].tolist(), pa.string()),
                     pa.array(rows[bad]), pa.array(batch[ID][bad].tolist(), pa.string()),
                     pa.array(types, pa.string()), pa.array(batch[ERR_MSG][bad].tolist(), pa.string())],
                    schema=REJECTS)
                uri = self.path("rejects", key, first)
                storage.write_table(uri, rej)
                rec["rejects"], rec["rows_rejected"] = uri.rsplit("/", 1)[-1], n
                rec["reject_types"] = {t: types.count(t) for t in sorted(set(types))}
            out.append(rec)
        return out


def make_datasink(sink: Any, min_rows: int, name: str) -> Any:
    """Wrap a sink as a Ray Data Datasink; write records land in ``.results`` on the driver.

    ``sink`` has ``write_arrow(table)`` or, like :class:`PartsSink`, ``write_batch(numpy columns)``.
    """
    from ray.data import Datasink

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.results: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return min_rows

        def get_name(self) -> str:
            return name

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
            from ray.data.block import BlockAccessor

            # One write call may get several blocks; each shard's rows in it become one part file.
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return []
            # A block whose column is all null is typed null: promote instead of failing.
            table = pa.concat_tables(tables, promote_options="default")
            if hasattr(sink, "write_arrow"):
                out = sink.write_arrow(table)
            else:
                out = sink.write_batch(BlockAccessor.for_block(table).to_batch_format("numpy"))
            beat(f"write {name}")
            return out

        def on_write_complete(self, write_result: Any) -> None:
            for r in write_result.write_returns:
                self.results.extend(r)

    return _Sink()
