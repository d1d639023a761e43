"""Ray Data source over planned input shards: row-group ranges, every row tagged with shard, source and row.

The only Ray-dependent part of reading shards; planning, contract checks and the row reader itself live
in :mod:`operators.shards` so that the UDF modules import without Ray (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators.shards import ShardPlan, read_rows
from operators.storage import StorageOptions
from operators.watchdog import beat


class ShardSource(Datasource):
    """Reads planned shards as row-group ranges; every row carries shard key, source and row index."""

    def __init__(self, plans: list[tuple[ShardPlan, str]], id_column: str,
                 storage_options: StorageOptions | None, rows_per_task: int = 256,
                 extra_columns: tuple[str, ...] = ()) -> None:
        self._plans = plans
        self._extra = extra_columns
        self._id_column = id_column
        self._options = storage_options
        self._rows_per_task = rows_per_task

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "ShardSource"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object | None = None) -> list[ReadTask]:
        tasks: list[ReadTask] = []
        for plan, key in self._plans:
            first = 0
            group: list[int] = []
            rows = 0
            for i, n in enumerate(plan.row_groups):
                group.append(i)
                rows += n
                last = i == len(plan.row_groups) - 1
                if rows >= self._rows_per_task or last:
                    tasks.append(self._task(plan, key, group, first, rows))
                    first += rows
                    group, rows = [], 0
        return tasks

    def _task(self, plan: ShardPlan, key: str, groups: list[int], first: int, rows: int) -> ReadTask:
        groups = list(groups)
        opts, idc, batch, extra = self._options, self._id_column, self._rows_per_task, self._extra

        def read_fn() -> Iterator[pa.Table]:
            for block in read_rows(plan, key, groups, first, idc, opts, batch, extra):
                beat("read")
                yield block

        meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=(plan.uri,))
        return ReadTask(read_fn, meta)
