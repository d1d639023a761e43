"""Embedding stage operators: decode+preprocess (CPU task), open_clip embedder actors, cache writer.

Each operator is a plain callable on a batch (a ``dict`` of numpy arrays or a pyarrow Table), so it
is tested directly without Ray; the pipeline wires them with ``map_batches``. Rows that fail keep
flowing with ``_err_type``/``_err_msg`` set, so every input row ends either embedded or rejected.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from operators import decode as R
from operators.models import Preprocess, ResolvedModel, build_model, image_transform, resolve_precision
from operators.schemas import REJECTS, embeddings_schema
from operators.shards import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE
from operators.storage import Storage, StorageOptions, join

log = logging.getLogger(__name__)

PIXELS = "pixels"
EMBEDDING = "embedding"
_PASS = (ID, ROW, SHARD, SOURCE)


@lru_cache(maxsize=4)
def _transform(pp: Preprocess) -> Any:
    return image_transform(pp)


@lru_cache(maxsize=2)
def _storage(options: StorageOptions | None) -> Storage:
    return Storage(options)


def _size(pp: Preprocess) -> tuple[int, int]:
    return (pp.size, pp.size) if isinstance(pp.size, int) else (int(pp.size[0]), int(pp.size[1]))


@dataclass(frozen=True)
class DecodeImages:
    """Batch fn: image bytes (or URIs fetched through storage) -> preprocessed float32 pixels."""

    preprocess: Preprocess
    max_pixels: int
    allowed_formats: tuple[str, ...]
    max_bytes: int | None = None
    storage_options: StorageOptions | None = None

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        h, w = _size(self.preprocess)
        pixels = np.zeros((n, 3, h, w), dtype=np.float32)
        err_type = batch.column(ERR_TYPE).to_pylist()
        err_msg = batch.column(ERR_MSG).to_pylist()
        col = "image" if "image" in batch.column_names else "image_uri"
        values = batch.column(col).to_pylist()
        tf = _transform(self.preprocess)
        for i in range(n):
            if err_type[i]:
                continue
            try:
                data = values[i]
                if col == "image_uri":
                    data = self._fetch(data)
                img = R.decode_image(data, self.max_pixels, self.allowed_formats, self.max_bytes)
                pixels[i] = tf(img).numpy()
            except R.RejectError as e:
                err_type[i], err_msg[i] = e.error_type, e.message
            except Exception as e:  # noqa: BLE001 - never lose a row to an unexpected error
                err_type[i], err_msg[i] = R.UNDECODABLE, f"{type(e).__name__}: {e}"
        out = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in _PASS}
        out[ERR_TYPE] = np.array(err_type, dtype=object)
        out[ERR_MSG] = np.array(err_msg, dtype=object)
        out[PIXELS] = pixels
        return out

    def _fetch(self, uri: str) -> bytes:
        try:
            return _storage(self.storage_options).read_bytes(uri)
        except Exception as e:  # noqa: BLE001
            raise R.RejectError(R.URI_UNREADABLE, f"cannot read {uri}: {type(e).__name__}: {e}") from None


class _Embedder(ABC):
    """Shared actor logic: build the model once, encode ok rows, isolate failures per row."""

    def __init__(self, model: ResolvedModel, device: str = "cpu", precision: str = "auto",
                 torch_threads: int | None = None, out_dtype: str = "float32",
                 storage_options: StorageOptions | None = None) -> None:
        import torch

        t0 = time.perf_counter()
        if device == "cpu":
            # Ray starts workers with OMP_NUM_THREADS=1; use the cores this actor is meant to have.
            torch.set_num_threads(torch_threads or max(1, len(os.sched_getaffinity(0))))
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.model, self.tokenizer = build_model(model, device, self.precision, storage_options)
        self.dim = model.embed_dim
        self.out_dtype = np.float16 if out_dtype == "float16" else np.float32
        self.autocast = device == "cuda" and self.precision in ("fp16", "bf16")
        log.info("embedder ready in %.1fs: %s on %s/%s threads=%d", time.perf_counter() - t0,
                 model.describe(), device, self.precision, torch.get_num_threads())

    @abstractmethod
    def _encode(self, items: Any) -> np.ndarray:
        """Encode a list of prepared inputs into normalised embeddings (one row each)."""

    def _run(self, batch: dict[str, np.ndarray], items: list[Any]) -> dict[str, np.ndarray]:
        import torch

        err_type = batch[ERR_TYPE].copy()
        err_msg = batch[ERR_MSG].copy()
        n = len(err_type)
        emb = np.zeros((n, self.dim), dtype=self.out_dtype)
        ok = np.array([not e for e in err_type], dtype=bool)
        idx = np.nonzero(ok)[0]
        if len(idx):
            with torch.inference_mode():
                try:
                    emb[idx] = self._encode([items[i] for i in idx])
                except Exception as e:  # noqa: BLE001 - retry one by one so one bad row costs one row
                    log.warning("batch encode failed (%s); retrying row by row", e)
                    for i in idx:
                        try:
                            emb[i] = self._encode([items[i]])[0]
                        except Exception as e1:  # noqa: BLE001
                            err_type[i], err_msg[i] = R.MODEL_ERROR, f"{type(e1).__name__}: {e1}"
        out = {c: batch[c] for c in _PASS}
        out[ERR_TYPE], out[ERR_MSG], out[EMBEDDING] = err_type, err_msg, emb
        return out

    def _finish(self, feats: Any) -> np.ndarray:
        import torch

        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        bad = ~torch.isfinite(feats).all(dim=-1)
        if bool(bad.any()):
            raise FloatingPointError(f"{int(bad.sum())} non-finite embeddings")
        return feats.cpu().numpy().astype(self.out_dtype)


class ImageEmbedder(_Embedder):
    """Actor: preprocessed pixels -> L2-normalised image embeddings."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch[PIXELS]
        return self._run(batch, list(pixels))

    def _encode(self, items: list[np.ndarray]) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.stack(items)).to(self.device)
        if self.autocast:
            x = x.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return self._finish(self.model.encode_image(x))


class TextEmbedder(_Embedder):
    """Actor: query text -> L2-normalised text embeddings (open_clip tokenizer of the same model)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(batch, list(batch["text"]))

    def _encode(self, items: list[str]) -> np.ndarray:
        tokens = self.tokenizer([str(t) for t in items]).to(self.device)
        return self._finish(self.model.encode_text(tokens))


def _part_name(prefix: str, first_row: int) -> str:
    # Named by the first input row it holds: a retried write overwrites, never duplicates.
    return f"{prefix}-{first_row:012d}.parquet"


class EmbeddingsSink:
    """Writes embedded rows and rejects into ``<cache>/<shard_key>/`` parts; returns what it wrote.

    Used as a Ray Data ``Datasink`` (see :func:`make_datasink`) and directly in tests.
    """

    def __init__(self, cache: str, dim: int, dtype: str, stage: str,
                 storage_options: StorageOptions | None = None) -> None:
        self.cache, self.dim, self.dtype, self.stage = cache, dim, dtype, stage
        self.storage_options = storage_options

    def write_batch(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Write one batch (numpy columns, possibly spanning shards); one record per shard touched."""
        storage = _storage(self.storage_options)
        out: list[dict[str, Any]] = []
        shards = np.asarray(batch[SHARD]).astype(str)
        if len(shards) == 0:
            return out
        okmask = np.array([not e for e in batch[ERR_TYPE]], dtype=bool)
        rows = np.asarray(batch[ROW], dtype=np.int64)
        schema = embeddings_schema(self.dim, self.dtype)
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        for key in sorted(set(shards.tolist())):
            sel = shards == key
            first = int(rows[sel].min())
            rec: dict[str, Any] = {"shard": key, "first_row": first, "rows_ok": 0, "rows_rejected": 0,
                                   "part": None, "rejects": None, "reject_types": {}}
            ok = sel & okmask
            if ok.any():
                emb = np.asarray(np.stack(batch[EMBEDDING][ok]), dtype=np_dtype)
                part = pa.Table.from_arrays(
                    [pa.array(batch[ID][ok].tolist(), pa.string()), pa.array(rows[ok]),
                     pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)],
                    schema=schema)
                name = _part_name("part", first)
                storage.write_table(join(self.cache, key, name), part)
                rec["part"], rec["rows_ok"] = name, int(ok.sum())
            bad = sel & ~okmask
            if bad.any():
                types = batch[ERR_TYPE][bad].tolist()
                rej = pa.Table.from_arrays(
                    [pa.array([self.stage] * int(bad.sum()), pa.string()),
                     pa.array(batch[SOURCE][bad].tolist(), pa.string()), pa.array(rows[bad]),
                     pa.array(batch[ID][bad].tolist(), pa.string()), pa.array(types, pa.string()),
                     pa.array(batch[ERR_MSG][bad].tolist(), pa.string())],
                    schema=REJECTS)
                name = _part_name("rejects", first)
                storage.write_table(join(self.cache, key, name), rej)
                rec["rejects"], rec["rows_rejected"] = name, int(bad.sum())
                rec["reject_types"] = {t: types.count(t) for t in sorted(set(types))}
            out.append(rec)
        return out


def make_datasink(sink: EmbeddingsSink, min_rows: int) -> Any:
    """Wrap :class:`EmbeddingsSink` as a Ray Data Datasink; results land in ``.results`` on the driver."""
    from ray.data import Datasink

    class _Sink(Datasink):
        def __init__(self) -> None:
            self.results: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return min_rows

        def get_name(self) -> str:
            return f"Write{sink.stage.title()}Embeddings"

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
            from ray.data.block import BlockAccessor

            # One write call may get several blocks; each shard's rows in it become one part file.
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return []
            merged = BlockAccessor.for_block(pa.concat_tables(tables)).to_batch_format("numpy")
            return sink.write_batch(merged)

        def on_write_complete(self, write_result: Any) -> None:
            for r in write_result.write_returns:
                self.results.extend(r)

    return _Sink()
