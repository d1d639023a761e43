"""Deterministic synthetic multimodal corpus (shapes on plain backgrounds) with queries, qrels and bad rows.

Used by tests, benchmarks and the quickstart: ``make_sample(out)`` writes a small corpus that follows the
data contracts in :mod:`operators.contracts`, with known relevance judgements and, on request, a documented
mix of broken and odd rows. ``python -m pipelines.sample OUT`` (``mmrerank make-sample``) does the same from
a shell. The pictures are drawn by :mod:`pipelines.sample_images`, the broken and odd rows come from
:mod:`pipelines.bad_rows`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from operators.contracts import CORPUS_IMAGE_BYTES, CORPUS_IMAGE_URI, QRELS, QUERIES
from operators.storage import Storage, join, scheme_of, strip_scheme
from pipelines.bad_rows import BOMB_SIZE, MARKUP_CASES, XSS_FLAG  # noqa: F401 - part of the sample's description
from pipelines.bad_rows import bad_rows as adversarial_rows
from pipelines.sample_images import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Pair,
    encode,
    phrase,
    place,
    random_scene,
    render,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_GROUP_SIZE = 32

# Independent random streams (numpy SeedSequence keys), so adding bad rows never changes clean docs.
_STREAM_DOC, _STREAM_QUERY, _STREAM_BINDING = 0, 1, 3  # 2: the bad rows' (pipelines/bad_rows.py)
# Binding mode: docs come in groups of BINDING_GROUP around one (color, shape) x 2 concept; see make_sample.
BINDING_GROUP = 4

QUERY_TEMPLATES = ("a photo of {a}", "{bare}", "a picture with {a}", "an image showing {a}")
# Seeds from here on belong to the pretraining stream of the shipped bases (pipelines/pretrain.py):
# make_sample refuses them, so no sample a test, the quickstart or a benchmark evaluates on was pretrained on.
PRETRAIN_SEEDS_FROM = 1_000_000
_STREAM_PRETRAIN = 4

@dataclass(frozen=True)
class SampleInfo:
    """Where a sample lives and what it contains. All paths are URIs under ``root``.

    ``docs`` / ``queries_n`` count the clean docs / queries; ``rows`` counts every corpus row (clean docs
    plus bad rows). ``shards`` is the number of shard files in ``corpus`` (the empty shard included).
    """

    root: str
    corpus: str
    queries: str
    qrels: str
    qrels_trec: str
    manifest: str
    docs: int
    queries_n: int
    qrels_n: int
    shards: int
    rows: int
    seed: int
    image_uri: bool
    shard_uris: list[str] = field(default_factory=list)
    empty_shard: str | None = None
    bad_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def expected_rejects(self) -> list[dict[str, Any]]:
        return [b for b in self.bad_rows if b["expect"] == "reject"]

    @property
    def expected_accepts(self) -> list[dict[str, Any]]:
        return [b for b in self.bad_rows if b["expect"] == "accept"]


@dataclass
class _Row:
    slot: str  # file-name id: unique per row even when doc_id is null or duplicated
    doc_id: str | None
    data: bytes | None  # None: no file behind the URI (uri_unreadable)
    ext: str
    text: str
    pairs: frozenset[Pair] | None = None  # set for rows that count in qrels
    bad: dict[str, Any] | None = None


# --- layout helpers -----------------------------------------------------------------------------------


def _root_uri(out: str) -> str:
    if scheme_of(out) == "file":
        path = strip_scheme(out)
        return f"file://{path}" if out.startswith("file://") else path
    return out.rstrip("/")


def _doc_id(i: int) -> str:
    return f"doc-{i:06d}"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _block_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    return [(s * n // shards, (s + 1) * n // shards) for s in range(shards)]


def _relative(root: str, uri: str) -> str:
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else uri


# --- clean corpus, queries, qrels ---------------------------------------------------------------------


def _clean_docs(seed: int, docs: int, image_size: int) -> list[_Row]:
    rows = []
    for i in range(docs):
        rng = np.random.default_rng([seed, _STREAM_DOC, i])  # doc i does not depend on `docs`
        scene = random_scene(rng, (image_size, image_size))
        fmt = "JPEG" if i % 2 else "PNG"
        data = encode(render(scene, (image_size, image_size)), fmt)
        rows.append(_Row(_doc_id(i), _doc_id(i), data, ".jpg" if fmt == "JPEG" else ".png", scene.caption,
                         frozenset(scene.pairs)))
    return rows


def _binding_concept(seed: int, group: int) -> tuple[Pair, Pair]:
    """Group ``group``'s two (color, shape) pairs: distinct colors and distinct shapes."""
    rng = np.random.default_rng([seed, _STREAM_BINDING, group])
    c = rng.permutation(len(COLORS))[:2]
    s = rng.permutation(len(SHAPES))[:2]
    colors = list(COLORS)
    return (colors[int(c[0])], SHAPES[int(s[0])]), (colors[int(c[1])], SHAPES[int(s[1])])


def _binding_pairs(seed: int, i: int) -> list[Pair]:
    """Doc ``i``'s pairs in binding mode: variant ``i % BINDING_GROUP`` of its group's concept.

    0: both pairs; 1: colors swapped between the shapes (same words, wrong binding); 2: both pairs plus a
    third of another color; 3: one pair plus the other shape in a third color.
    """
    (c1, s1), (c2, s2) = _binding_concept(seed, i // BINDING_GROUP)
    rng = np.random.default_rng([seed, _STREAM_BINDING, i, 1])
    others = [c for c in COLORS if c not in (c1, c2)]
    c3 = others[int(rng.integers(len(others)))]
    variant = i % BINDING_GROUP
    if variant == 0:
        return [(c1, s1), (c2, s2)]
    if variant == 1:
        return [(c1, s2), (c2, s1)]
    if variant == 2:
        return [(c1, s1), (c2, s2), (c3, SHAPES[int(rng.integers(len(SHAPES)))])]
    return [(c1, s1), (c3, s2)]


def _binding_docs(seed: int, docs: int, image_size: int) -> list[_Row]:
    rows = []
    size = (image_size, image_size)
    for i in range(docs):
        pairs = _binding_pairs(seed, i)
        rng = np.random.default_rng([seed, _STREAM_DOC, i])
        order = [pairs[int(j)] for j in rng.permutation(len(pairs))]  # the caption's order is no clue
        scene = place(rng, size, order)
        fmt = "JPEG" if i % 2 else "PNG"
        data = encode(render(scene, size), fmt)
        rows.append(_Row(_doc_id(i), _doc_id(i), data, ".jpg" if fmt == "JPEG" else ".png", scene.caption,
                         frozenset(scene.pairs)))
    return rows


def _binding_queries(seed: int, n: int, docs: int) -> list[tuple[str, str, frozenset[Pair]]]:
    """One query per group (groups in seeded order) naming its two pairs, e.g. "a cyan cross and a yellow square"."""
    groups = -(-docs // BINDING_GROUP)
    if n > groups:
        raise ValueError(f"binding sample: at most one query per group of {BINDING_GROUP} docs: "
                         f"{n} queries need docs >= {n * BINDING_GROUP}, got {docs}")
    rng = np.random.default_rng([seed, _STREAM_QUERY])
    out: list[tuple[str, str, frozenset[Pair]]] = []
    for g in rng.permutation(groups)[:n]:
        pairs = list(_binding_concept(seed, int(g)))
        if rng.integers(2):
            pairs.reverse()
        out.append((f"q-{len(out):05d}", _query_text(rng, pairs), frozenset(pairs)))
    return out


def _make_queries(seed: int, n: int, clean: list[_Row]) -> list[tuple[str, str, frozenset[Pair]]]:
    """Each query names 1-2 (color, shape) pairs taken from one clean doc, so it has >= 1 relevant doc."""
    rng = np.random.default_rng([seed, _STREAM_QUERY])
    out: list[tuple[str, str, frozenset[Pair]]] = []
    seen: set[frozenset[Pair]] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        row = clean[int(rng.integers(len(clean)))]
        pairs = sorted(row.pairs or ())
        k = int(rng.integers(1, min(2, len(pairs)) + 1))
        chosen = [pairs[int(j)] for j in sorted(rng.permutation(len(pairs))[:k])]
        key = frozenset(chosen)
        tmpl = QUERY_TEMPLATES[int(rng.integers(len(QUERY_TEMPLATES)))]
        if key in seen and attempts < 50 * max(1, n):  # prefer distinct queries; allow repeats if exhausted
            continue
        seen.add(key)
        text = tmpl.format(a=phrase(chosen), bare=phrase(chosen, articles=False))
        out.append((f"q-{len(out):05d}", text, key))
    return out


def _query_text(rng: np.random.Generator, pairs: Sequence[Pair]) -> str:
    tmpl = QUERY_TEMPLATES[int(rng.integers(len(QUERY_TEMPLATES)))]
    return tmpl.format(a=phrase(pairs), bare=phrase(pairs, articles=False))


@dataclass(frozen=True)
class PretrainGroup:
    """One query of the pretraining stream and its docs: ``docs[i] = (image, caption, relevant)``;
    ``query_pairs`` in the order the query names them, ``doc_pairs[i]`` what doc ``i`` shows."""

    query: str
    docs: list[tuple[Image.Image, str, bool]]
    query_pairs: tuple[Pair, ...]
    doc_pairs: list[frozenset[Pair]]


def pretrain_group(seed: int, g: int, image_size: int = 64) -> PretrainGroup:
    """Group ``g`` of the pretraining stream ``seed`` (>= PRETRAIN_SEEDS_FROM), the binding task with its
    shortcuts taken away.

    Even ``g``: a two-pair query (as the binding sample's) against 6 docs: the concept, the concept plus a
    third shape (relevant); the colors swapped, swapped plus a third shape, one pair plus the other shape
    in a third color, that plus a third shape (not relevant). Unlike the binding sample, where the only
    three-shape doc is relevant, the number of shapes says nothing here: a model must read the query.
    Odd ``g``: a one-pair query against 4 docs: the pair alone, the pair plus another (relevant); both
    colors swapped, the shape in the other color (not relevant).
    """
    if seed < PRETRAIN_SEEDS_FROM:
        raise ValueError(f"pretraining seeds start at {PRETRAIN_SEEDS_FROM}, got {seed}")
    rng = np.random.default_rng([seed, _STREAM_PRETRAIN, g])
    colors = list(COLORS)
    c1, c2, c3 = (colors[int(i)] for i in rng.permutation(len(colors))[:3])
    s1, s2, s3 = (SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:3])
    if g % 2 == 0:
        query = [(c1, s1), (c2, s2)]
        extra = (c3, s3)
        variants = [([(c1, s1), (c2, s2)], True), ([(c1, s1), (c2, s2), extra], True),
                    ([(c1, s2), (c2, s1)], False), ([(c1, s2), (c2, s1), extra], False),
                    ([(c1, s1), (c3, s2)], False), ([(c1, s1), (c3, s2), (c2, s3)], False)]
    else:
        query = [(c1, s1)]
        variants = [([(c1, s1)], True), ([(c1, s1), (c2, s2)], True),
                    ([(c1, s2), (c2, s1)], False), ([(c2, s1)], False)]
    if rng.integers(2):
        query.reverse()
    size = (image_size, image_size)
    docs = []
    for pairs, relevant in variants:
        scene = place(rng, size, [pairs[int(j)] for j in rng.permutation(len(pairs))])
        docs.append((render(scene, size), scene.caption, relevant))
    return PretrainGroup(_query_text(rng, query), docs, tuple(query), [frozenset(p) for p, _r in variants])


def _qrels(queries: list[tuple[str, str, frozenset[Pair]]], judged: list[_Row]) -> list[tuple[str, str, int]]:
    rows = []
    for qid, _text, qpairs in queries:
        for r in judged:
            if r.pairs is not None and r.doc_id is not None and qpairs <= r.pairs:
                rows.append((qid, r.doc_id, 2 if r.pairs == qpairs else 1))
    return rows


# --- entry points -------------------------------------------------------------------------------------


def make_sample(
    out: str,
    docs: int = 200,
    queries: int = 20,
    shards: int = 4,
    seed: int = 0,
    bad_rows: bool = False,
    image_size: int = 64,
    image_uri: bool = False,
    storage: Storage | None = None,
    binding: bool = False,
) -> SampleInfo:
    """Write a synthetic corpus, queries and qrels under ``out`` (any storage URI) and describe it.

    Layout::

        corpus/shard-00000.parquet ...   doc_id, image (or image_uri), text; contiguous blocks of docs,
                                         row groups of 32 rows
        images/doc-000123.png|.jpg|...   only with image_uri=True (one file per row)
        queries/queries.parquet          query_id, text
        qrels.parquet, qrels.txt         query_id, doc_id, relevance (int32) / TREC "qid 0 docid rel"
        sample.json                      params, counts, bad rows; paths relative to ``out``

    Images are ``image_size`` squared, 1-3 distinct (color, shape) pairs on a plain background, each shape
    in its own quadrant; even docs are PNG, odd docs JPEG. Captions say what is drawn, e.g. "a red circle
    and a blue square on a white background". A query names 1-2 pairs of one doc; a doc is relevant when
    it contains all of them: relevance 2 when its pair set equals the query's, else 1.

    Same arguments give byte-identical files; doc ``i`` depends only on (``seed``, ``i``, ``image_size``).

    With ``binding=True`` (what ``mmrerank train`` and the quickstart use) the docs come in groups of
    ``BINDING_GROUP`` = 4 around one concept of two (color, shape) pairs with distinct colors and shapes:
    the concept itself, the same words bound the other way round (a hard negative for bag-of-words
    models), the concept plus a third shape, and one pair plus the other shape in a third color. Each
    query names one group's concept ("a cyan cross and a yellow square"; at most ``docs // 4`` queries),
    so its relevant docs are variants 0 and 2 of its group and its hardest negatives share every word.

    With ``bad_rows=True`` the rows below are inserted at seeded positions in the shards (bad row ``k``
    goes to shard ``k % shards``), each with its own slot id ``doc-{docs + k:06d}`` (the row's doc_id
    unless stated otherwise), and an extra empty shard ``shard-{shards:05d}.parquet`` (0 rows) is written.
    Expected REJECTED (``error_type``):

    - ``empty_image``: zero bytes (an empty file in image_uri mode).
    - ``undecodable``: random bytes, no image signature (PIL: UnidentifiedImageError).
    - ``truncated_image``: a JPEG cut halfway through its scan data; ``Image.open`` works, ``load()``
      raises OSError.
    - ``decompression_bomb``: a valid ~50 KB mode-"1" PNG whose IHDR declares 20000x20000 (400M) pixels;
      detectable from the header (PIL's own check raises DecompressionBombError on open).
    - ``unsupported_format``: a PPM image (PIL opens it; PPM is outside JPEG/PNG/WEBP/GIF/BMP/TIFF).
    - ``null_id``: valid image, doc_id null.
    - ``duplicate_id`` (twice): valid image whose doc_id repeats a clean doc earlier in the same shard,
      and one in an earlier shard (omitted when ``shards == 1``); this later occurrence is the reject.
    - ``uri_unreadable`` (image_uri mode only): the URI names a file that does not exist.

    Expected ACCEPTED (``error_type`` None; real ids and captions, judged in qrels like clean docs):
    a CMYK JPEG, a 16-bit grayscale PNG (mode I;16), a palette PNG with tRNS transparency (mode P), a
    non-square JPEG stored rotated with EXIF orientation 6, an RGBA PNG, and an 8-bit grayscale PNG
    (mode L). The grayscale ones show white shapes on black, a colour no query asks for. Two valid PNGs
    carry markup (``MARKUP_CASES``): ``markup_caption_script`` has a caption starting with
    ``<script>window.mmrXss="caption"</script>``, ``markup_id_img`` a doc_id
    ``<img/src/onerror=window.mmrXss=1>doc-...`` and a caption starting with ``<img src=x onerror=...>``
    (untrusted text that every consumer must render as text).

    Each ``SampleInfo.bad_rows`` entry: ``shard`` (shard URI), ``row_index`` (row in that shard),
    ``doc_id``, ``expect``, ``error_type``, ``why``, plus ``case`` (unique name), ``slot``,
    ``image_format`` and ``image_mode`` (what PIL reports for the stored bytes, None when it cannot).
    """
    if docs < 1 or shards < 1 or docs < shards:
        raise ValueError(f"need docs >= shards >= 1, got docs={docs}, shards={shards}")
    if queries < 0:
        raise ValueError(f"queries must be >= 0, got {queries}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if seed >= PRETRAIN_SEEDS_FROM:
        raise ValueError(f"seed {seed} is reserved for the pretraining stream (seeds >= {PRETRAIN_SEEDS_FROM}): "
                         "a sample must never overlap what the shipped bases were pretrained on")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    st = storage or Storage()
    root = _root_uri(out)
    corpus_dir = join(root, "corpus")

    clean = _binding_docs(seed, docs, image_size) if binding else _clean_docs(seed, docs, image_size)
    blocks = [clean[a:b] for a, b in _block_bounds(docs, shards)]
    shard_rows: list[list[_Row]] = [list(b) for b in blocks]
    judged = list(clean)
    if bad_rows:
        extras = [(shard, pos, _Row(**vars(r))) for shard, pos, r in
                  adversarial_rows(seed, docs, image_size, shards, image_uri, blocks, _doc_id)]
        for s in range(shards):
            mine = sorted((pos, k) for k, (sh, pos, _r) in enumerate(extras) if sh == s)
            merged = list(blocks[s])
            for offset, (pos, k) in enumerate(mine):
                merged.insert(pos + offset, extras[k][2])
            shard_rows[s] = merged
        judged += [r for _s, _p, r in extras if r.pairs is not None]
        judged.sort(key=lambda r: r.slot)
        shard_rows.append([])  # the empty shard

    q = _binding_queries(seed, queries, docs) if binding else _make_queries(seed, queries, clean)
    qrels = _qrels(q, judged)

    schema = CORPUS_IMAGE_URI if image_uri else CORPUS_IMAGE_BYTES
    shard_uris: list[str] = []
    bad_list: list[dict[str, Any]] = []
    for s, rows in enumerate(shard_rows):
        uri = join(corpus_dir, _shard_name(s))
        shard_uris.append(uri)
        if image_uri:
            payload: list[Any] = []
            for r in rows:
                if r.data is None:  # uri_unreadable: make sure nothing (say from an older run) is there
                    img_uri = join(root, "images", f"{r.slot}-missing{r.ext}")
                    st.rm(img_uri)
                else:
                    img_uri = join(root, "images", r.slot + r.ext)
                    st.write_bytes(img_uri, r.data)
                payload.append(img_uri)
        else:
            payload = [r.data for r in rows]
        cols = [[r.doc_id for r in rows], payload, [r.text for r in rows]]
        st.write_table(uri, pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema, strict=True)],
                                                 schema=schema), row_group_size=ROW_GROUP_SIZE)
        for i, r in enumerate(rows):
            if r.bad is not None:
                bad_list.append({"shard": uri, "row_index": i, "slot": r.slot, **r.bad})

    bad_list.sort(key=lambda b: b["slot"])  # the documented order, whatever shard each went to

    queries_uri = join(root, "queries", "queries.parquet")
    st.write_table(queries_uri, pa.Table.from_arrays(
        [pa.array([x[0] for x in q], pa.string()), pa.array([x[1] for x in q], pa.string())], schema=QUERIES))
    qrels_uri, trec_uri = join(root, "qrels.parquet"), join(root, "qrels.txt")
    st.write_table(qrels_uri, pa.Table.from_arrays(
        [pa.array([x[0] for x in qrels], pa.string()), pa.array([x[1] for x in qrels], pa.string()),
         pa.array([x[2] for x in qrels], pa.int32())], schema=QRELS))
    st.write_bytes(trec_uri, "".join(f"{a} 0 {b} {c}\n" for a, b, c in qrels).encode())

    rows_total = sum(len(r) for r in shard_rows)
    manifest_uri = join(root, "sample.json")
    st.write_json(manifest_uri, {
        "format_version": FORMAT_VERSION,
        "paths": "relative to the directory holding this file",
        "params": {"docs": docs, "queries": queries, "shards": shards, "seed": seed, "bad_rows": bad_rows,
                   "image_size": image_size, "image_uri": image_uri, **({"binding": True} if binding else {})},
        "counts": {"docs": docs, "queries": len(q), "qrels": len(qrels), "rows": rows_total,
                   "shards": len(shard_uris), "bad_rows": len(bad_list)},
        "corpus": "corpus", "queries": "queries/queries.parquet", "qrels": "qrels.parquet",
        "qrels_trec": "qrels.txt",
        "shard_files": [_relative(root, u) for u in shard_uris],
        "empty_shard": _relative(root, shard_uris[-1]) if bad_rows else None,
        "vocabulary": {"colors": list(COLORS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS)},
        "bad_rows": [{**b, "shard": _relative(root, b["shard"])} for b in bad_list],
    })
    log.info("sample written to %s: %d docs + %d bad rows in %d shards, %d queries, %d qrels",
             root, docs, len(bad_list), len(shard_uris), len(q), len(qrels))
    return SampleInfo(
        root=root, corpus=corpus_dir, queries=queries_uri, qrels=qrels_uri, qrels_trec=trec_uri,
        manifest=manifest_uri, docs=docs, queries_n=len(q), qrels_n=len(qrels), shards=len(shard_uris),
        rows=rows_total, seed=seed, image_uri=image_uri, shard_uris=shard_uris,
        empty_shard=shard_uris[-1] if bad_rows else None, bad_rows=bad_list,
    )


def load_sample_info(out: str, storage: Storage | None = None) -> SampleInfo:
    """Read ``sample.json`` under ``out`` back into a :class:`SampleInfo` with full URIs."""
    st = storage or Storage()
    root = _root_uri(out)
    m = st.read_json(join(root, "sample.json"))
    p, c = m["params"], m["counts"]
    return SampleInfo(
        root=root, corpus=join(root, m["corpus"]), queries=join(root, m["queries"]),
        qrels=join(root, m["qrels"]), qrels_trec=join(root, m["qrels_trec"]),
        manifest=join(root, "sample.json"), docs=c["docs"], queries_n=c["queries"], qrels_n=c["qrels"],
        shards=c["shards"], rows=c["rows"], seed=p["seed"], image_uri=p["image_uri"],
        shard_uris=[join(root, s) for s in m["shard_files"]],
        empty_shard=join(root, m["empty_shard"]) if m["empty_shard"] else None,
        bad_rows=[{**b, "shard": join(root, b["shard"])} for b in m["bad_rows"]],
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.sample", description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad-rows", action="store_true")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--image-uri", action="store_true")
    ap.add_argument("--binding", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_sample(a.out, docs=a.docs, queries=a.queries, shards=a.shards, seed=a.seed, bad_rows=a.bad_rows,
                image_size=a.image_size, image_uri=a.image_uri, binding=a.binding)


if __name__ == "__main__":
    main()
