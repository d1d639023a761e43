"""Training data: the seeded split by query id, examples from qrels, negatives from a run's candidates.

Everything here is deterministic in (inputs, seeds): a rerun after a kill rebuilds exactly the same
examples, so a resumed Ray Train run continues the same schedule.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from operators.contracts import RejectError
from operators.decode import DecodeLimits, decode_image
from operators.shards import list_shards
from operators.storage import Storage

log = logging.getLogger(__name__)

# Validation of the clip target ranks the held-out queries against a pool of docs: their relevant docs,
# their candidates and a seeded sample of the corpus up to this size (the whole corpus when smaller).
VAL_POOL_DOCS = 4096

Negatives = Literal["none", "hard", "random"]


class TrainDataError(ValueError):
    """The training inputs cannot make a training set (no judged query, empty split, ...)."""


def heldout_score(query_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, query_id): a query's side of the split never depends on
    which other queries exist."""
    h = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_query_ids(query_ids: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` query ids, each sorted; held-out queries are never trained on."""
    ids = sorted(set(query_ids))
    heldout = [q for q in ids if heldout_score(q, seed) < heldout_fraction]
    train = [q for q in ids if heldout_score(q, seed) >= heldout_fraction]
    if not train or not heldout:
        raise TrainDataError(f"split of {len(ids)} judged queries with heldout_fraction {heldout_fraction} and "
                             f"split_seed {seed} leaves {len(train)} to train on and {len(heldout)} held out: "
                             "need at least one of each (more queries, or another fraction)")
    return train, heldout


def read_queries(uri: str, storage: Storage) -> dict[str, str]:
    out: dict[str, str] = {}
    for shard in list_shards(uri, storage):
        t = storage.read_table(shard, columns=["query_id", "text"])
        for q, text in zip(t.column("query_id").to_pylist(), t.column("text").to_pylist(), strict=True):
            if q is not None and isinstance(text, str) and text.strip() and q not in out:
                out[q] = text
    return out


def read_corpus(uri: str, storage: Storage, max_pixels: int, allowed_formats: tuple[str, ...],
                max_bytes: int | None = None) -> tuple[dict[str, tuple[bytes, str | None]], int]:
    """``doc_id -> (image bytes, caption)`` for every doc that decodes, and how many rows were skipped.

    The first occurrence of an id wins (as in the pipeline); rows the embedder would reject are skipped.
    """
    docs: dict[str, tuple[bytes, str | None]] = {}
    skipped = 0
    for shard in list_shards(uri, storage):
        names = storage.parquet_file(shard).schema_arrow.names
        payload = "image" if "image" in names else "image_uri"
        t = storage.read_table(shard, columns=["doc_id", payload] + (["text"] if "text" in names else []))
        captions = t.column("text").to_pylist() if "text" in names else [None] * t.num_rows
        for d, p, c in zip(t.column("doc_id").to_pylist(), t.column(payload).to_pylist(), captions, strict=True):
            if d is None or d in docs:
                skipped += 1
                continue
            try:
                data = p if payload == "image" else (storage.read_bytes(p) if p else None)
                decode_image(data, max_pixels, allowed_formats, max_bytes)
            except (RejectError, FileNotFoundError):
                skipped += 1
                continue
            docs[d] = (data, c)
    return docs, skipped


def read_candidates(run: str, storage: Storage) -> tuple[str, dict[str, list[str]]]:
    """``(run_dir, query_id -> doc ids by rank)`` of a verified run (a run directory or a root)."""
    import pyarrow as pa

    from operators import layout as L
    from operators.runs import read_stage, resolve_run

    run_dir, manifest = resolve_run(run, storage)
    t = read_stage(storage, run_dir, manifest, L.prefix(L.CANDIDATES),
                   {"query_id": pa.string(), "rank": pa.int64(), "doc_id": pa.string()})
    t = t.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    out: dict[str, list[str]] = {}
    for q, d in zip(t.column("query_id").to_pylist(), t.column("doc_id").to_pylist(), strict=True):
        out.setdefault(q, []).append(d)
    if not out:
        raise TrainDataError(f"{run_dir}: the run has no candidates")
    return run_dir, out


@dataclass
class TrainingSet:
    """What the workers get (plain data, through the object store)."""

    texts: dict[str, str]
    docs: dict[str, tuple[bytes, str | None]]
    qrels: dict[str, dict[str, int]]  # held-out queries' judgements (validation)
    train_ids: list[str]
    heldout_ids: list[str]
    examples: list[tuple[str, str, int]]  # (query_id, doc_id, label 1 relevant / 0 not)
    candidates: dict[str, list[str]] = field(default_factory=dict)  # held-out queries' (vlm validation)
    val_docs: list[str] = field(default_factory=list)  # the clip validation pool
    caption_docs: list[str] = field(default_factory=list)  # clip: (caption, image) pairs also trained on
    counts: dict[str, Any] = field(default_factory=dict)
    limits: DecodeLimits = DecodeLimits()  # the run's (EmbedConfig.decode_limits); defaults: the config's

    def image(self, doc_id: str) -> Any:
        """The doc's image decoded exactly as the pipeline decodes it (RGB, EXIF applied, alpha on white)."""
        return decode_image(self.docs[doc_id][0], *self.limits)


def build_training_set(texts: dict[str, str], docs: dict[str, tuple[bytes, str | None]],
                       qrels: dict[str, dict[str, int]], candidates: dict[str, list[str]] | None,
                       heldout_fraction: float, split_seed: int, seed: int, negatives: Negatives,
                       negatives_per_query: int, caption_pairs: bool = False) -> TrainingSet:
    """Split the judged queries by id, then list (query, doc, label) examples of the training side only.

    Positives: every judged relevant doc (relevance > 0) that exists. Negatives per training query, up to
    ``negatives_per_query``: ``hard``, the run's top-ranked candidates that are not judged relevant (RagVL:
    the retriever's own mistakes); ``random``, a seeded sample of the corpus' other docs; ``none``, none.
    ``caption_pairs`` adds every captioned doc that no held-out query judges as a (caption, image) pair.
    """
    judged = {q: {d: r for d, r in j.items() if r > 0 and d in docs}
              for q, j in qrels.items() if q in texts}
    judged = {q: j for q, j in judged.items() if j}
    if not judged:
        raise TrainDataError("no query has a relevant doc that exists in the corpus (check qrels vs corpus/queries)")
    train_ids, heldout_ids = split_query_ids(list(judged), heldout_fraction, split_seed)
    doc_ids = sorted(docs)
    rng = np.random.default_rng([seed, 7])
    examples: list[tuple[str, str, int]] = []
    missing_cands = 0
    for q in train_ids:
        pos = sorted(judged[q])
        examples += [(q, d, 1) for d in pos]
        if negatives == "none" or negatives_per_query == 0:
            continue
        relevant = set(qrels.get(q, {}))  # judged docs (any grade) are never negatives
        if negatives == "hard":
            ranked = (candidates or {}).get(q)
            if ranked is None:
                missing_cands += 1
                continue
            negs = [d for d in ranked if d not in relevant and d in docs][:negatives_per_query]
        else:
            pool = [d for d in doc_ids if d not in relevant]
            negs = [pool[int(i)] for i in rng.choice(len(pool), size=min(negatives_per_query, len(pool)),
                                                     replace=False)]
        examples += [(q, d, 0) for d in negs]
    if missing_cands:
        log.warning("%d training queries have no candidates in the run: no hard negatives for them", missing_cands)
    held_cands = {q: [d for d in (candidates or {}).get(q, []) if d in docs] for q in heldout_ids}
    pool = set().union(*(judged[q] for q in heldout_ids), *held_cands.values())
    rest = [d for d in doc_ids if d not in pool]
    room = max(0, VAL_POOL_DOCS - len(pool))
    if rest and room:
        pool |= {rest[int(i)] for i in rng.choice(len(rest), size=min(room, len(rest)), replace=False)}
    held_judged = set().union(*(qrels[q] for q in heldout_ids))
    caption_docs = [d for d in doc_ids if caption_pairs and d not in held_judged and docs[d][1]]
    counts = {"judged_queries": len(judged), "train_queries": len(train_ids), "heldout_queries": len(heldout_ids),
              "examples": len(examples), "positives": sum(1 for e in examples if e[2] == 1),
              "negatives": sum(1 for e in examples if e[2] == 0), "corpus_docs": len(docs),
              "validation_docs": len(pool), "caption_pairs": len(caption_docs)}
    return TrainingSet(texts={q: texts[q] for q in judged}, docs=docs,
                       qrels={q: dict(qrels[q]) for q in heldout_ids}, train_ids=train_ids,
                       heldout_ids=heldout_ids, examples=examples, candidates=held_cands,
                       val_docs=sorted(pool), caption_docs=caption_docs, counts=counts)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: fixed by (seed, epoch), so resuming at epoch e repeats nothing."""
    return np.random.default_rng([seed, 11, epoch]).permutation(n)


def global_batches(order: np.ndarray, batch_size: int, world: int) -> list[np.ndarray]:
    """Full batches of ``batch_size`` (a multiple of ``world``) from ``order``; a short last batch is dropped
    unless it is the only one (then it is cut to a multiple of ``world``)."""
    if batch_size % world:
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of train.num_workers {world}")
    full = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if not full:
        cut = len(order) - len(order) % world
        full = [order[:cut]] if cut else []
    return full
