"""Ray Data source of candidate docs (content once, pairs as lists) for the reranker actors, each row group read once.

The only Ray-dependent part of the rerank stage's reading; the readers it schedules
(:func:`operators.rerank_ops.docs_for_shards`) live with the other rerank operators, which import
without Ray (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import functools

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators.contracts import GroupRange, Piece, ShardPairs
from operators.rerank_ops import docs_for_shards
from operators.storage import StorageOptions


class PairsSource(Datasource):
    """Read tasks over the corpus shards (each row group read once): their candidate docs, each with its content
    (or, clip backend, its cached vector) and its pairs.

    ``shards``: corpus shard key -> its :class:`operators.contracts.ShardPairs`. Blocks hold whole docs and at
    least ``block_rows`` pairs (the last of a task fewer).
    Consecutive shards with few pairs share a read task (at least ``TASK_BLOCKS`` blocks a task), so that a
    shard's last, short block does not give the actor a ragged batch per shard.

    ``task_rows`` (pools of several actors) also cuts shards, between row groups, into tasks of about that
    many pairs: Ray Data hands all of a read task's output to one actor (it merges the blocks a task
    yields), so with whole shards a small run kept one actor busy and the other idle. Each cut costs one
    short batch.
    """

    TASK_BLOCKS = 16

    def __init__(self, shards: dict[str, ShardPairs], storage_options: StorageOptions | None = None,
                 block_rows: int = 256, task_rows: int | None = None) -> None:
        self._shards = {k: ShardPairs(*v) for k, v in shards.items()}
        self._options, self._block, self._task_rows = storage_options, block_rows, task_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "CandidatePairs"

    def groups(self) -> list[list[GroupRange]]:
        """Per read task, in key order: the row-group ranges of its shards with pairs."""
        limit = self.TASK_BLOCKS * self._block
        cut = min(limit, self._task_rows) if self._task_rows else None
        out: list[list[GroupRange]] = []
        n = 0
        for key in sorted(self._shards):
            per_group = np.asarray(self._shards[key].pairs_per_group)
            if not out or n >= limit or (cut and n >= cut):
                out.append([])
                n = 0
            if not cut:  # the whole shard
                out[-1].append(GroupRange(key, 0, len(per_group)))
                n += int(per_group.sum())
                continue
            lo, last = 0, int(np.flatnonzero(per_group)[-1]) if per_group.any() else 0
            for g, c in enumerate(per_group.tolist()):
                n += c
                if n >= cut and g < last:  # pairs remain in the shard's later row groups
                    out[-1].append(GroupRange(key, lo, g + 1))
                    out.append([])
                    n, lo = 0, g + 1
            out[-1].append(GroupRange(key, lo, len(per_group)))
        return out

    def _piece(self, r: GroupRange) -> Piece:
        s = self._shards[r.key]
        # Rows outside the shard stay in its first / last piece (they become rejects there).
        return Piece(s.uri, s.payload, s.bucket_files, None if r.first == 0 else int(s.row_group_starts[r.first]),
                     None if r.end >= len(s.pairs_per_group) else int(s.row_group_starts[r.end]), s.vectors)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object | None = None) -> list[ReadTask]:
        tasks = []
        for ranges in self.groups():
            pieces = [self._piece(r) for r in ranges]
            read_fn = functools.partial(docs_for_shards, pieces, self._options, self._block)
            pairs = sum(int(np.asarray(self._shards[r.key].pairs_per_group)[r.first:r.end].sum()) for r in ranges)
            # Blocks are docs (with their pairs): the doc count is unknown before reading.
            tasks.append((pairs, ReadTask(read_fn, BlockMetadata(
                num_rows=None, size_bytes=None, exec_stats=None,
                input_files=tuple(self._shards[r.key].uri for r in ranges)))))
        if self._task_rows:  # biggest first: the actors' last tasks are the short ones, they finish together
            tasks.sort(key=lambda t: -t[0])
        return [t for _, t in tasks]
