"""The storage layout under an output root: every directory, file and marker name the stages write and the
readers (Serve, the explorer, eval, notebooks, training data) look for. Nothing else spells them.

::

    <root>/LATEST                                      the published run (compare-and-swap, pipelines.publish)
    <root>/runs/<run_id>/_RUN.json                     a started run (its config and fingerprint)
    <root>/runs/<run_id>/_STAGES/<stage>.json          a finished stage (its stats; a resume skips it)
    <root>/runs/<run_id>/candidates/  scored/b<bucket>/  results/  rejects/  _pairs/ (scratch, unpublished)
    <root>/runs/<run_id>/stats.json, <stage>_stats.json
    <root>/runs/<run_id>/_MANIFEST.json                every file of the run with size and sha256, written last
    <root>/embeddings/<model-fp16>/model.json
    <root>/embeddings/<model-fp16>/<kind>/<shard-key>/part-*.parquet, rejects-*.parquet, _SUCCESS.json
    <root>/embeddings/<model-fp16>/<kind>/sets/<set-key>.json
    <root>/indexes/<index-fp16>/shard-*.faiss, shard-*.ids.parquet, manifest.json (written last)
    <root>/training/<name>/checkpoint_*/   <root>/models/<name>/   (a checkpoint's own files and its
                                       whole-checkpoint list: operators.training.common, Ray-worker side)

Pure string functions (no I/O): URIs are joined with :func:`operators.storage.join`, so ``s3://`` roots work.
"""

from __future__ import annotations

from operators.storage import join

# --- names ----------------------------------------------------------------------------------------------
RUNS, EMBEDDINGS, INDEXES, TRAINING, MODELS = "runs", "embeddings", "indexes", "training", "models"
LATEST = "LATEST"  # the published run's id and manifest path
MANIFEST = "_MANIFEST.json"  # a run's manifest (written last: the run is complete once it exists)
RUN_MARKER = "_RUN.json"  # a started run: run id, config fingerprint, redacted config, start time
STAGES_DIR = "_STAGES"  # <stage>.json per finished stage
STATS = "stats.json"  # the run's stats (a row per stage)
SHARD_MARKER = "_SUCCESS.json"  # a complete embedding-cache entry (lists its parts and rejects)
MODEL_JSON = "model.json"  # the embedding model of an embeddings/<fp> directory
SETS = "sets"  # embeddings/<fp>/<kind>/sets/<set-key>.json: the shards of one input, in order
INDEX_MANIFEST = "manifest.json"  # a complete index (written last by the builder)

# A run's stage outputs (directories under the run; ``read_stage`` prefixes are ``<name>/``).
CANDIDATES, SCORED, RESULTS, REJECTS, PAIRS = "candidates", "scored", "results", "rejects", "_pairs"

# Written into a run after publishing (not in its manifest): ``mmrerank eval`` / ``export-trec``.
METRICS, TREC = "metrics.json", "trec"

FP_CHARS = 16  # fingerprint characters in a cache or index directory name


# --- a root ---------------------------------------------------------------------------------------------
def latest_uri(root: str) -> str:
    return join(root, LATEST)


def runs_dir(root: str) -> str:
    return join(root, RUNS)


def run_dir(root: str, run_id: str) -> str:
    return join(root, RUNS, run_id)


def root_of(run: str) -> str:
    """``<root>`` of ``<root>/runs/<run_id>`` (``run`` itself when it is not under a ``runs`` directory)."""
    head, sep, _ = run.rstrip("/").rpartition(f"/{RUNS}/")
    return head if sep else run


def embeddings_dir(root: str, model_fingerprint: str) -> str:
    return join(root, EMBEDDINGS, model_fingerprint[:FP_CHARS])


def cache_dir(root: str, model_fingerprint: str, kind: str) -> str:
    """The embedding cache of one model and input kind (``corpus`` | ``queries``)."""
    return join(embeddings_dir(root, model_fingerprint), kind)


def any_model_cache_dir(root: str, kind: str) -> str:
    """A glob over every model's cache of ``kind``."""
    return join(root, EMBEDDINGS, "*", kind)


def model_json(root: str, model_fingerprint: str) -> str:
    return join(embeddings_dir(root, model_fingerprint), MODEL_JSON)


def index_dir(root: str, index_fingerprint: str) -> str:
    return join(root, INDEXES, index_fingerprint[:FP_CHARS])


def index_manifest(index_uri: str) -> str:
    return join(index_uri, INDEX_MANIFEST)


def training_dir(root: str, name: str) -> str:
    return join(root, TRAINING, name)


def model_dir(root: str, name: str) -> str:
    return join(root, MODELS, name)


# --- a run ----------------------------------------------------------------------------------------------
def manifest_uri(run: str) -> str:
    return join(run, MANIFEST)


def run_marker(run: str) -> str:
    return join(run, RUN_MARKER)


def stage_marker(run: str, stage: str) -> str:
    return join(run, STAGES_DIR, f"{stage}.json")


def stats_uri(run: str) -> str:
    return join(run, STATS)


def stage_stats(run: str, stage: str) -> str:
    """``<run>/<stage>_stats.json``: a stage's whole result (``StageResult.to_json``)."""
    return join(run, f"{stage}_stats.json")


def stage_dir(run: str, name: str) -> str:
    """One of the run's output directories (:data:`CANDIDATES`, :data:`SCORED`, ...)."""
    return join(run, name)


def prefix(*names: str) -> str:
    """The manifest key prefix of a run's output directory (``candidates/``, ``scored/b00003/``)."""
    return "".join(f"{n}/" for n in names)


def candidates_part(run: str, key: str, first_row: int) -> str:
    return join(run, CANDIDATES, f"part-{key}-{first_row:012d}.parquet")


def stage_reject(run: str, stage: str, key: str, first_row: int) -> str:
    return join(run, REJECTS, f"{stage}-{key}-{first_row:012d}.parquet")


def bucket_name(bucket: int | str) -> str:
    """``b00003``: a ``scored`` bucket's directory (a bucket number, or its zero-padded key as the sink's shard
    key holds it)."""
    return f"b{bucket:05d}" if isinstance(bucket, int) else f"b{bucket}"


def scored_bucket(scored: str, bucket: int | str) -> str:
    """``<run>/scored/b<bucket>`` of the run's ``scored`` directory."""
    return join(scored, bucket_name(bucket))


def results_part(run: str, bucket: int) -> str:
    return join(run, RESULTS, f"part-b{bucket:05d}.parquet")


# --- an embedding-cache entry ---------------------------------------------------------------------------
def cache_entry(cache: str, key: str) -> str:
    return join(cache, key)


def shard_marker(cache: str, key: str) -> str:
    return join(cache, key, SHARD_MARKER)


def cache_set(cache: str, set_key: str) -> str:
    return join(cache, SETS, f"{set_key}.json")
