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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from operators import decode as R
from operators import layout as L
from operators.contracts import (
    ERR_MSG,
    ERR_TYPE,
    ID,
    MODEL_ERROR,
    ROW,
    SHARD,
    SOURCE,
    UNDECODABLE,
    URI_UNREADABLE,
    RejectError,
    embeddings_schema,
)
from operators.models import Preprocess, ResolvedModel, build_model, image_transform, resolve_precision
from operators.parts import PartsSink, cached_storage, part_name
from operators.storage import StorageOptions, join
from operators.watchdog import beat, maybe_fail

log = logging.getLogger(__name__)

PIXELS = "pixels"
EMBEDDING = "embedding"
_PASS = (ID, ROW, SHARD, SOURCE)


@lru_cache(maxsize=4)
def _transform(pp: Preprocess) -> Any:
    return image_transform(pp)


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
            except RejectError as e:
                err_type[i], err_msg[i] = e.error_type, e.message
            except Exception as e:  # noqa: BLE001 - never lose a row to an unexpected error
                err_type[i], err_msg[i] = UNDECODABLE, f"{type(e).__name__}: {e}"
        out = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in _PASS}
        out[ERR_TYPE] = np.array(err_type, dtype=object)
        out[ERR_MSG] = np.array(err_msg, dtype=object)
        out[PIXELS] = pixels
        beat("decode")
        return out

    def _fetch(self, uri: str) -> bytes:
        try:
            return cached_storage(self.storage_options).read_bytes(uri)
        except Exception as e:  # noqa: BLE001
            raise RejectError(URI_UNREADABLE, f"cannot read {uri}: {type(e).__name__}: {e}") from None


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

    def encode(self, items: list[Any]) -> np.ndarray:
        """:meth:`_encode` outside a batch (the live path: one request's texts), failures raised."""
        import torch

        with torch.inference_mode():
            return self._encode(items)

    def _run(self, batch: dict[str, np.ndarray], items: list[Any]) -> dict[str, np.ndarray]:
        import torch

        maybe_fail("embed_batch")

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
                            err_type[i], err_msg[i] = MODEL_ERROR, f"{type(e1).__name__}: {e1}"
        out = {c: batch[c] for c in _PASS}
        out[ERR_TYPE], out[ERR_MSG], out[EMBEDDING] = err_type, err_msg, emb
        beat("embed")
        return out

    def _finish(self, feats: Any) -> np.ndarray:
        import torch

        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        bad = ~torch.isfinite(feats).all(dim=-1)
        if bool(bad.any()):
            raise FloatingPointError(f"{int(bad.sum())} non-finite embeddings")
        return feats.cpu().numpy().astype(self.out_dtype)


class ImageEmbedder(_Embedder):
    """Actor: preprocessed pixels -> L2-normalised image embeddings.

    With ``decoder`` set, a batch arrives as the read's table (image bytes) and is decoded here, right
    before the model runs, instead of in separate tasks.
    """

    def __init__(self, model: ResolvedModel, device: str = "cpu", precision: str = "auto",
                 torch_threads: int | None = None, out_dtype: str = "float32",
                 storage_options: StorageOptions | None = None, decoder: DecodeImages | None = None) -> None:
        super().__init__(model, device, precision, torch_threads, out_dtype, storage_options)
        self.decoder = decoder

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> dict[str, np.ndarray]:
        if self.decoder is not None:
            batch = self.decoder(batch)
        return self._run(batch, list(batch[PIXELS]))

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


class EmbeddingsSink(PartsSink):
    """Embedded rows and rejects into ``<cache>/<shard_key>/part-*.parquet`` / ``rejects-*.parquet``."""

    def __init__(self, cache: str, dim: int, dtype: str, stage: str,
                 storage_options: StorageOptions | None = None) -> None:
        super().__init__(stage, storage_options)
        self.cache, self.dim, self.dtype = cache, dim, dtype

    def path(self, what: str, key: str, first_row: int) -> str:
        return join(L.cache_entry(self.cache, key), part_name("part" if what == "ok" else "rejects", first_row))

    def ok_table(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> pa.Table:
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        emb = np.asarray(np.stack(batch[EMBEDDING][mask]), dtype=np_dtype)
        return pa.Table.from_arrays(
            [pa.array(batch[ID][mask].tolist(), pa.string()), pa.array(np.asarray(batch[ROW])[mask]),
             pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim)],
            schema=embeddings_schema(self.dim, self.dtype))
