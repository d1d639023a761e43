"""The explorer's doc side, run in the model replica next to the index and corpus it already holds.

:class:`Docs` maps a doc id to its ``(corpus shard, row)`` through the index shards' id tables, reads
content with the live path's own reader (``Live.contents``), makes thumbnails with the run's decode
limits, and fetches a doc's own embedding from the embeddings cache for "more like this".
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from operators import faiss_shards as F
from operators.decode import decode_image
from operators.layout import cache_dir

if TYPE_CHECKING:
    from operators.storage import Storage
    from pipelines.config import Config

log = logging.getLogger(__name__)

THUMB_MIN, THUMB_MAX, THUMB_DEFAULT = 16, 512, 160
JPEG_QUALITY = 85


class DocSource(Protocol):
    """What the explorer reads of the live path (:class:`pipelines.serve.live.Live` is one): the run's
    config and storage, the index shards' searchers (their ``docs`` id tables), each corpus shard's source
    uri and payload column, and content by ``(corpus shard, row)``."""

    cfg: Config
    storage: Storage
    searchers: Sequence[Any]
    corpus: dict[str, tuple[str, str]]

    def contents(self, locs: list[tuple[str, int]]) -> list[tuple[bytes | None, str | None, str | None]]: ...


class Docs:
    """Doc lookups of one loaded run (``live`` is the model replica's :class:`pipelines.serve.live.Live`)."""

    def __init__(self, live: DocSource, index_uri: str) -> None:
        self.live = live
        t = pa.concat_tables([s.docs for s in live.searchers])
        self.shard = t.column("doc_shard").to_pylist()
        self.row = t.column("doc_row").to_numpy()
        # One dict entry per indexed doc; a lookup must not scan (a corpus of millions).
        self.pos = {d: i for i, d in enumerate(t.column("doc_id").to_pylist())}
        fp = F.read_manifest(live.storage, index_uri)["model_fingerprint"]
        self.cache = cache_dir(live.cfg.root, fp, "corpus")
        self._parts: dict[str, list[tuple[int, int, str]]] = {}  # shard key -> [(first row, end row, part uri)]

    def _loc(self, doc_id: str) -> tuple[str, int] | None:
        i = self.pos.get(doc_id)
        return None if i is None else (self.shard[i], int(self.row[i]))

    def meta(self, doc_ids: list[str]) -> list[dict[str, Any] | None]:
        """Caption, corpus shard (its cache key and source file name) and row of each doc; None when unknown."""
        locs = [self._loc(d) for d in doc_ids]
        known = [(d, loc) for d, loc in zip(doc_ids, locs, strict=True) if loc is not None]
        got = iter(self.live.contents([loc for _, loc in known]))
        out: list[dict[str, Any] | None] = []
        for d, loc in zip(doc_ids, locs, strict=True):
            if loc is None:
                out.append(None)
                continue
            _data, _uri, caption = next(got)
            out.append({"doc_id": d, "caption": caption, "shard": loc[0],
                        "source": self.live.corpus[loc[0]][0].rsplit("/", 1)[-1], "row": loc[1]})
        return out

    def stored(self, doc_id: str) -> tuple[bytes | None, str | None] | None:
        """The doc's stored image bytes (or its image URI); None for an unknown id.

        Call it on the replica's event loop, like every other reader of ``Live``'s open Parquet files:
        those handles are not safe to read from several threads at once (concurrent reads crashed the
        replica), so only :func:`thumbnail` runs in a worker thread.
        """
        loc = self._loc(doc_id)
        if loc is None:
            return None
        (data, uri, _caption), = self.live.contents([loc])
        return data, uri

    def thumbnail(self, stored: tuple[bytes | None, str | None], size: int) -> bytes:
        """A JPEG at most ``size`` px on its longer side, from the image decoded with the run's limits.

        Never the stored bytes: whatever the corpus holds (a huge PNG, an SVG-looking blob, an EXIF-rotated
        JPEG) the browser gets a freshly encoded RGB JPEG. Raises :class:`operators.contracts.RejectError` when
        the stored image does not decode within the limits. Thread-safe (a URI is read with a new handle).
        """
        data, uri = stored
        emb = self.live.cfg.embed
        if data is None and uri is not None:
            data = self.live.storage.read_bytes(uri)
        img = decode_image(data, *emb.decode_limits)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def vector(self, doc_id: str) -> np.ndarray | None:
        """The doc's own embedding from the run's corpus embeddings cache (exact, whatever the index type)."""
        from operators.embedding_cache import part_uris, read_vectors

        loc = self._loc(doc_id)
        if loc is None:
            return None
        shard, row = loc
        if shard not in self._parts:
            spans = []
            for u in part_uris(self.live.storage, self.cache, shard):
                rows = self.live.storage.read_table(u, columns=["row_index"]).column("row_index").to_numpy()
                if len(rows):
                    spans.append((int(rows.min()), int(rows.max()) + 1, u))
            self._parts[shard] = spans
        for lo, hi, u in self._parts[shard]:
            if lo <= row < hi:
                ids, rows, vecs = read_vectors(self.live.storage, [u])
                hit = np.flatnonzero(rows == row)
                if len(hit) and ids[int(hit[0])] == doc_id:
                    return vecs[int(hit[0])]
        return None


def check_size(size: int | None) -> int:
    """The thumbnail size to use; ValueError (a 422) outside THUMB_MIN..THUMB_MAX."""
    if size is None:
        return THUMB_DEFAULT
    if not THUMB_MIN <= size <= THUMB_MAX:
        raise ValueError(f"size must be in {THUMB_MIN}..{THUMB_MAX}")
    return size

