"""Data contracts: the tables each stage reads and writes, the internal columns and reject reasons that
travel between stages, the decode limits' defaults, and the input-shard checks run before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa

if TYPE_CHECKING:
    import numpy as np

# --- internal columns ---------------------------------------------------------------------------------
# They travel with every row through the stages (reader -> decode/embed/search/rerank -> sinks).
ID, ROW, SHARD, SOURCE, ERR_TYPE, ERR_MSG = "id", "_row", "_shard", "_source", "_err_type", "_err_msg"
# A rerank pair's identity (candidates part, row in it): names scored part files; the live path sets them too.
PAIR_KEY, PAIR_ROW = "_cand_key", "_cand_row"

# --- the rerank stage's records: pipelines.rerank -> operators.pair_source -> operators.rerank_ops ----------
# Named tuples: built and unpacked positionally as well (a plain tuple in that order is accepted too).


class CacheEntry(NamedTuple):
    """One corpus shard's entry in an embedding cache (the clip reranker's vectors)."""

    cache: str  # the cache directory (``operators.layout.cache_dir``)
    key: str  # the shard key inside it


class CorpusShard(NamedTuple):
    """A corpus shard as the rerank stage reads it (from its footer)."""

    uri: str
    payload: str  # "image" | "image_uri"
    row_group_starts: list[int]  # first row of each row group, then the row count


class ShardPairs(NamedTuple):
    """One corpus shard's candidate pairs, as the rerank stage hands them to ``PairsSource``."""

    uri: str
    payload: str
    bucket_files: list[str]  # the shard's regrouped candidates (``<run>/_pairs/<shard key>/*.parquet``)
    row_group_starts: list[int]
    pairs_per_group: np.ndarray  # candidate pairs per corpus row group
    vectors: CacheEntry | None  # clip backend: the shard's cached vectors (the corpus is then not read)


class GroupRange(NamedTuple):
    """Row groups ``[first, end)`` of one corpus shard in a read task."""

    key: str
    first: int
    end: int


class Piece(NamedTuple):
    """A read task's piece of a corpus shard: its rows ``[rows_from, rows_to)`` (None: unbounded)."""

    uri: str
    payload: str
    bucket_files: list[str]
    rows_from: int | None
    rows_to: int | None
    vectors: CacheEntry | None


# --- reject reasons: the error_type values written to the rejects tables --------------------------------
# Read time (operators.shards)
NULL_ID = "null_id"
DUPLICATE_ID = "duplicate_id"
NULL_PAYLOAD = "null_payload"
EMPTY_TEXT = "empty_text"
# Image decode (operators.decode) and fetch
EMPTY_IMAGE = "empty_image"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated_image"
BOMB = "decompression_bomb"
UNSUPPORTED = "unsupported_format"
TOO_LARGE = "file_too_large"
URI_UNREADABLE = "uri_unreadable"
# Embedding
MODEL_ERROR = "model_error"
# Search (query vectors)
BAD_DIMENSION = "bad_dimension"
NON_FINITE = "non_finite_vector"
# Rerank
CONTENT_MISSING = "doc_content_missing"
QUERY_MISSING = "query_text_missing"
RERANK_ERROR = "rerank_error"


class RejectError(Exception):
    """A row cannot be processed; ``error_type`` is one of the reject reasons above."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


# --- decode limits (defaults of embed.allowed_formats / max_image_pixels / max_image_bytes) --------------
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default cap
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

# --- inputs -------------------------------------------------------------------------------------
CORPUS_IMAGE_BYTES = pa.schema([("doc_id", pa.string()), ("image", pa.binary()), ("text", pa.string())])
CORPUS_IMAGE_URI = pa.schema([("doc_id", pa.string()), ("image_uri", pa.string()), ("text", pa.string())])
QUERIES = pa.schema([("query_id", pa.string()), ("text", pa.string())])
QRELS = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("relevance", pa.int32())])

# --- outputs ------------------------------------------------------------------------------------
REJECTS = pa.schema(
    [
        ("stage", pa.string()),
        ("source", pa.string()),
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
    ]
)


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Embeddings cache rows: id, where it came from (row in its source shard), unit-norm vector."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [("id", pa.string()), ("row_index", pa.int64()), ("embedding", pa.list_(value, dim))]
    )


# Search output: k rows per query.
CANDIDATES = pa.schema([
    ("query_id", pa.string()),
    ("rank", pa.int32()),
    ("doc_id", pa.string()),
    ("retrieval_score", pa.float32()),
    ("doc_shard", pa.string()),  # embeddings-cache key of the corpus shard holding the doc
    ("doc_row", pa.int64()),  # row of the doc in that corpus shard: content is fetched from here
])

# Rerank output: every scored pair, then what each query keeps.
SCORED = pa.schema([
    ("query_id", pa.string()), ("doc_id", pa.string()), ("retrieval_rank", pa.int32()),
    ("retrieval_score", pa.float32()), ("rerank_score", pa.float32()),
    ("doc_shard", pa.string()), ("doc_row", pa.int64()),
])

RESULTS = pa.schema([
    ("query_id", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
    ("retrieval_score", pa.float32()), ("rerank_score", pa.float32()), ("final_score", pa.float32()),
    ("reranker", pa.string()), ("run_id", pa.string()),
])


class SchemaError(ValueError):
    """An input shard does not follow its contract (names the shard and the column)."""


_STRING = (pa.string(), pa.large_string())
_BINARY = (pa.binary(), pa.large_binary())


@dataclass(frozen=True)
class InputKind:
    """What a shard of a given kind must contain."""

    name: str  # "corpus" | "queries"
    id_column: str
    payload_columns: tuple[str, ...]  # exactly one of these must be present
    unique_ids: bool = True  # a repeated id is a reject (duplicate_id)
    extra_columns: tuple[str, ...] = ()  # read and passed along as they are


CORPUS = InputKind("corpus", "doc_id", ("image", "image_uri"))
QUERY = InputKind("queries", "query_id", ("text",))
# Vectors: the embeddings cache's parts, or user-supplied precomputed query vectors.
CACHED_VECTORS = InputKind("vectors", "id", ("embedding",))
QUERY_VECTORS = InputKind("query_vectors", "query_id", ("embedding",))
# Search output read back for reranking: one row per (query, candidate), so ids repeat.
CANDIDATE_ROWS = InputKind("candidates", "query_id", ("doc_id",), unique_ids=False,
                           extra_columns=("rank", "retrieval_score", "doc_shard", "doc_row"))


def check_shard_schema(schema: pa.Schema, kind: InputKind, shard: str) -> str:
    """Validate one shard's schema; return the payload column it uses.

    Raises :class:`SchemaError` naming the shard and the offending column.
    """
    names = set(schema.names)
    if kind.id_column not in names:
        raise SchemaError(f"{shard}: required column '{kind.id_column}' is missing (has {sorted(names)})")
    if schema.field(kind.id_column).type not in _STRING:
        raise SchemaError(
            f"{shard}: column '{kind.id_column}' must be string, got {schema.field(kind.id_column).type}"
        )
    present = [c for c in kind.payload_columns if c in names]
    if kind is CORPUS:
        if len(present) != 1:
            raise SchemaError(
                f"{shard}: needs exactly one of columns 'image' (binary) or 'image_uri' (string), "
                f"found {present or 'neither'}"
            )
        col = present[0]
        want = _BINARY if col == "image" else _STRING
        if schema.field(col).type not in want:
            raise SchemaError(f"{shard}: column '{col}' has type {schema.field(col).type}, expected {want[0]}")
        if "text" in names and schema.field("text").type not in _STRING:
            raise SchemaError(f"{shard}: column 'text' must be string, got {schema.field('text').type}")
        return col
    missing = [c for c in kind.extra_columns if c not in names]
    if missing:
        raise SchemaError(f"{shard}: required columns {missing} are missing (has {sorted(names)})")
    if kind is CANDIDATE_ROWS:
        return "doc_id"
    if kind.payload_columns == ("embedding",):
        if not present:
            raise SchemaError(f"{shard}: required column 'embedding' is missing (has {sorted(names)})")
        t = schema.field("embedding").type
        if not (pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)) or not (
                pa.types.is_floating(t.value_type)):
            raise SchemaError(f"{shard}: column 'embedding' must be a list of floats, got {t}")
        return "embedding"
    if not present:
        raise SchemaError(f"{shard}: required column 'text' is missing (has {sorted(names)})")
    if schema.field("text").type not in _STRING:
        raise SchemaError(f"{shard}: column 'text' must be string, got {schema.field('text').type}")
    return "text"
