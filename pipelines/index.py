"""``mmrerank index``: build FAISS index shards in parallel (Ray tasks) from the embeddings cache.

Layout::

    <root>/indexes/<index-fp>/shard-00000.faiss, shard-00000.ids.parquet, ..., manifest.json (last)

The index fingerprint covers the corpus set (shard keys in order), the model fingerprint, the factory
string, the shard count and the training sample settings: an unchanged input reuses the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators import faiss_shards as F
from operators import layout as L
from operators.embedding_cache import shard_marker
from operators.faiss_shards import IndexMismatchError
from operators.index_ops import build_shard, train_index
from operators.storage import Storage, join
from pipelines.config import Config
from pipelines.embed import EmbedResult, embed_kind
from pipelines.ray_env import ensure_ray
from pipelines.stage import StageResult

log = logging.getLogger(__name__)

@dataclass
class IndexResult(StageResult):
    uri: str
    fingerprint: str
    manifest: dict[str, Any]
    reused: bool
    wall_s: float

    @property
    def ntotal(self) -> int:
        return sum(s["ntotal"] for s in self.manifest["shards"])

    def counts(self) -> tuple[int, int, int]:
        return self.ntotal, self.ntotal, 0  # every embedded corpus row is indexed (build_index checks it)

    def note(self) -> str:
        return f"{self.manifest['factory']} x{len(self.manifest['shards'])}{' (reused)' if self.reused else ''}"

    def extra(self) -> dict[str, Any]:
        return {"reused": self.reused, "uri": self.uri}


def index_fingerprint(cfg: Config, corpus: EmbedResult) -> str:
    ic = cfg.index
    spec = {"model": corpus.model_fingerprint, "shards": [s.key for s in corpus.shards], "factory": ic.factory,
            "num_shards": ic.shards, "train_sample": ic.train_sample, "seed": ic.seed, "metric": "ip"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _check_embeddings(storage: Storage, corpus: EmbedResult) -> None:
    """Refuse to build when any shard's embeddings come from another model or dimension."""
    for s in corpus.shards:
        m = shard_marker(storage, corpus.cache, s.key)
        if m["model_fingerprint"] != corpus.model_fingerprint or int(m["dim"]) != corpus.dim:
            raise IndexMismatchError(
                f"{s.source}: embeddings are from model {m['model_fingerprint'][:12]} dim {m['dim']}, "
                f"the index is for model {corpus.model_fingerprint[:12]} dim {corpus.dim}")


def _manifest_ok(storage: Storage, uri: str) -> dict[str, Any] | None:
    try:
        m = storage.read_json(L.index_manifest(uri))
    except FileNotFoundError:
        return None
    for s in m["shards"]:
        for f, size in ((s["file"], s["size"]), (s["ids_file"], s["ids_size"])):
            try:
                if int(storage.info(join(uri, f))["size"]) != size:
                    return None
            except FileNotFoundError:
                return None
    return m


def build_index(cfg: Config, corpus: EmbedResult | None = None, storage: Storage | None = None) -> IndexResult:
    """Build (or reuse) the sharded index for the corpus embeddings."""
    import ray

    t0 = time.perf_counter()
    storage = storage or Storage(cfg.storage.options())
    opts = cfg.storage.options()
    ic = cfg.index
    corpus = corpus or embed_kind(cfg, "corpus", storage=storage)
    _check_embeddings(storage, corpus)
    F.check_factory(ic.factory, corpus.dim)
    fp = index_fingerprint(cfg, corpus)
    uri = L.index_dir(cfg.root, fp)
    existing = _manifest_ok(storage, uri)
    if existing is not None:
        log.info("index: reusing %s (%d vectors in %d shards, unchanged input)", uri,
                 sum(s["ntotal"] for s in existing["shards"]), len(existing["shards"]))
        return IndexResult(uri, fp, existing, True, time.perf_counter() - t0)

    storage.rm(uri, recursive=True)
    total = corpus.rows_ok
    if F.needs_training(ic.factory, corpus.dim) and min(ic.train_sample, total) < F.min_training_vectors(ic.factory):
        raise F.IndexConfigError(
            f"index.factory: {ic.factory!r} needs at least {F.min_training_vectors(ic.factory)} training vectors,"
            f" the corpus has {total} (index.train_sample={ic.train_sample})")
    ensure_ray(cfg.ray)
    threads = max(1, int(ic.build_num_cpus))
    if F.needs_training(ic.factory, corpus.dim):
        log.info("index: training %s on up to %d of %d vectors (seed %d)", ic.factory, ic.train_sample, total,
                 ic.seed)
        shards = [(s.key, s.rows_ok) for s in corpus.shards]
        trained = ray.get(ray.remote(train_index).options(num_cpus=ic.build_num_cpus).remote(
            ic.factory, corpus.dim, corpus.cache, shards, ic.train_sample, ic.seed, threads, opts))
    else:
        trained = F.train(ic.factory, corpus.dim, np.zeros((0, corpus.dim), np.float32), ic.seed)
    assignment = F.assign_shards([s.rows_ok for s in corpus.shards], ic.shards)
    trained_ref = ray.put(trained)
    build = ray.remote(build_shard).options(num_cpus=ic.build_num_cpus)
    refs = [build.remote(trained_ref, corpus.dim, corpus.cache, [corpus.shards[j].key for j in js], uri, i, threads, opts)
            for i, js in enumerate(assignment)]
    entries = sorted(ray.get(refs), key=lambda e: e["shard"])
    offset = 0
    for e in entries:
        e["offset"] = offset
        offset += e["ntotal"]
    manifest = {"fingerprint": fp, "factory": ic.factory, "dim": corpus.dim, "metric": "inner_product",
                "model_fingerprint": corpus.model_fingerprint, "corpus_set": corpus.set_uri, "ntotal": offset,
                "train_sample": ic.train_sample, "seed": ic.seed, "shards": entries,
                "faiss_version": F.faiss_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(L.index_manifest(uri), manifest)  # last: the index exists only once this does
    log.info("index: built %s: %d vectors in %d shards (%s) in %.1fs", uri, offset, len(entries),
             "/".join(str(e["ntotal"]) for e in entries), time.perf_counter() - t0)
    return IndexResult(uri, fp, manifest, False, time.perf_counter() - t0)
