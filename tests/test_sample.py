"""Unit tests for the synthetic sample generator (no Ray)."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from operators.contracts import ALLOWED_FORMATS, CORPUS_IMAGE_BYTES, CORPUS_IMAGE_URI, QRELS, QUERIES
from pipelines.sample import (
    MARKUP_CASES,
    XSS_FLAG,
    SampleInfo,
    load_sample_info,
    make_sample,
)

KW = {"docs": 24, "queries": 6, "shards": 3, "seed": 7, "image_size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("bad")), bad_rows=True, **KW)


def _row(info: SampleInfo, entry: dict) -> dict:
    rows = pq.read_table(entry["shard"]).to_pylist()
    return rows[entry["row_index"]]


def _image_bytes(info: SampleInfo, entry: dict) -> bytes:
    row = _row(info, entry)
    if info.image_uri:
        return Path(row["image_uri"]).read_bytes()
    return row["image"]


def test_deterministic_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_sample(str(a), bad_rows=True, **KW)
    make_sample(str(b), bad_rows=True, **KW)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert "sample.json" in fa and "qrels.txt" in fa
    for name in fa:
        assert fa[name] == fb[name], name
    c = tmp_path / "c"
    make_sample(str(c), bad_rows=True, **{**KW, "seed": 8})
    assert _files(c)["corpus/shard-00000.parquet"] != fa["corpus/shard-00000.parquet"]


def test_deterministic_image_uri(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ia = make_sample(str(a), bad_rows=True, image_uri=True, **KW)
    ib = make_sample(str(b), bad_rows=True, image_uri=True, **KW)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name.startswith("images/") or not name.startswith("corpus/"):
            assert fa[name] == fb[name], name
    for ua, ub in zip(ia.shard_uris, ib.shard_uris, strict=True):
        ta, tb = pq.read_table(ua).to_pylist(), pq.read_table(ub).to_pylist()
        for ra, rb in zip(ta, tb, strict=True):
            assert ra["image_uri"].startswith(str(a) + "/images/")
            assert ra["image_uri"][len(str(a)):] == rb["image_uri"][len(str(b)):]
            assert (ra["doc_id"], ra["text"]) == (rb["doc_id"], rb["text"])


def test_clean_sample_contracts(tmp_path: Path) -> None:
    info = make_sample(str(tmp_path / "s"), **KW)
    assert info.shards == 3 and info.docs == 24 and info.rows == 24 and info.queries_n == 6
    assert info.bad_rows == [] and info.empty_shard is None
    assert sorted(os.listdir(tmp_path / "s" / "corpus")) == [f"shard-{i:05d}.parquet" for i in range(3)]
    ids = []
    for uri in info.shard_uris:
        t = pq.read_table(uri)
        assert t.schema.equals(CORPUS_IMAGE_BYTES)
        ids += t.column("doc_id").to_pylist()
        for row in t.to_pylist():
            im = Image.open(io.BytesIO(row["image"]))
            im.load()
            assert im.format in ("PNG", "JPEG") and im.size == (48, 48)
            assert row["text"].endswith("background")
    assert ids == [f"doc-{i:06d}" for i in range(24)]  # contiguous blocks, in order
    q = pq.read_table(info.queries)
    assert q.schema.equals(QUERIES) and q.num_rows == 6
    assert q.column("query_id").to_pylist() == [f"q-{i:05d}" for i in range(6)]
    qr = pq.read_table(info.qrels)
    assert qr.schema.equals(QRELS) and qr.num_rows == info.qrels_n
    rows = qr.to_pylist()
    assert {r["query_id"] for r in rows} == set(q.column("query_id").to_pylist())
    assert {r["doc_id"] for r in rows} <= set(ids)
    assert {r["relevance"] for r in rows} <= {1, 2}
    trec = Path(info.qrels_trec).read_text().splitlines()
    assert trec == [f"{r['query_id']} 0 {r['doc_id']} {r['relevance']}" for r in rows]
    # Prefix-stable: fewer docs give the same first docs.
    small = make_sample(str(tmp_path / "small"), **{**KW, "docs": 6})
    assert pq.read_table(small.shard_uris[0]).to_pylist()[:2] == pq.read_table(info.shard_uris[0]).to_pylist()[:2]


def test_qrels_match_captions(tmp_path: Path) -> None:
    info = make_sample(str(tmp_path / "s"), **KW)
    captions = {r["doc_id"]: r["text"] for u in info.shard_uris for r in pq.read_table(u).to_pylist()}
    texts = dict(zip(*pq.read_table(info.queries).to_pydict().values(), strict=True))
    for r in pq.read_table(info.qrels).to_pylist():
        q = texts[r["query_id"]]
        for word in ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"):
            if word in q.split():
                assert word in captions[r["doc_id"]], (q, captions[r["doc_id"]])


def test_bad_rows_listed_match_shards(bad: SampleInfo) -> None:
    assert bad.shards == 4 and bad.empty_shard == bad.shard_uris[-1]
    assert bad.empty_shard.endswith("shard-00003.parquet")
    empty = pq.read_table(bad.empty_shard)
    assert empty.num_rows == 0 and empty.schema.equals(CORPUS_IMAGE_BYTES)
    assert bad.rows == bad.docs + len(bad.bad_rows)
    assert sum(pq.read_table(u).num_rows for u in bad.shard_uris) == bad.rows
    reject_types = sorted(b["error_type"] for b in bad.expected_rejects)
    assert reject_types == sorted(["empty_image", "undecodable", "truncated_image", "decompression_bomb",
                                   "unsupported_format", "null_id", "duplicate_id", "duplicate_id"])
    assert len(bad.expected_accepts) == 6 + len(MARKUP_CASES)
    assert {b["shard"] for b in bad.bad_rows} == set(bad.shard_uris[:-1])  # spread over the shards
    for b in bad.bad_rows:
        assert set(b) >= {"shard", "row_index", "doc_id", "expect", "error_type", "why"}
        assert _row(bad, b)["doc_id"] == b["doc_id"]
        assert (b["expect"] == "accept") == (b["error_type"] is None)
    assert load_sample_info(bad.root) == bad


def test_duplicates_are_later_occurrences(bad: SampleInfo) -> None:
    first: dict[str, tuple[int, int]] = {}
    later: set[tuple[int, int]] = set()
    for s, uri in enumerate(bad.shard_uris):
        for i, doc_id in enumerate(pq.read_table(uri).column("doc_id").to_pylist()):
            if doc_id is None:
                continue
            if doc_id in first:
                later.add((s, i))
            else:
                first[doc_id] = (s, i)
    dups = [b for b in bad.bad_rows if b["error_type"] == "duplicate_id"]
    assert {(bad.shard_uris.index(b["shard"]), b["row_index"]) for b in dups} == later
    same = [b for b in dups if first[b["doc_id"]][0] == bad.shard_uris.index(b["shard"])]
    assert len(same) == 1 and len(dups) == 2
    nulls = [b for b in bad.bad_rows if b["error_type"] == "null_id"]
    assert len(nulls) == 1 and _row(bad, nulls[0])["doc_id"] is None


def test_rejects_fail_as_described(bad: SampleInfo) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    by = {b["case"]: b for b in bad.bad_rows}
    assert _image_bytes(bad, by["empty_image"]) == b""
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(_image_bytes(bad, by["undecodable"])))
    trunc = Image.open(io.BytesIO(_image_bytes(bad, by["truncated_image"])))
    assert trunc.format == "JPEG"
    with pytest.raises(OSError):
        trunc.load()
    bomb = _image_bytes(bad, by["decompression_bomb"])
    assert len(bomb) < 200_000 and bomb[:8] == b"\x89PNG\r\n\x1a\n" and bomb[12:16] == b"IHDR"
    w, h = struct.unpack(">II", bomb[16:24])
    assert w * h > 100_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    ppm = Image.open(io.BytesIO(_image_bytes(bad, by["unsupported_format"])))
    ppm.load()
    assert ppm.format not in ALLOWED_FORMATS
    for case in ("null_id", "duplicate_id_same_shard", "duplicate_id_cross_shard"):
        im = Image.open(io.BytesIO(_image_bytes(bad, by[case])))
        im.load()
        assert im.format in ALLOWED_FORMATS


def test_accepted_odd_rows_open(bad: SampleInfo) -> None:
    modes = {"cmyk_jpeg": "CMYK", "gray16_png": "I;16", "palette_png_trns": "P", "exif_rotated_jpeg": "RGB",
             "rgba_png": "RGBA", "gray_l_png": "L"}
    by = {b["case"]: b for b in bad.expected_accepts if b["case"] not in MARKUP_CASES}
    assert set(by) == set(modes)
    for case, mode in modes.items():
        b = by[case]
        im = Image.open(io.BytesIO(_image_bytes(bad, b)))
        im.load()
        assert im.mode == mode == b["image_mode"], case
        assert im.format in ALLOWED_FORMATS and im.format == b["image_format"]
        assert b["doc_id"].startswith("doc-") and _row(bad, b)["text"].endswith("background")
        assert np.asarray(im.convert("RGB")).std() > 0, case  # something is drawn
    pal = Image.open(io.BytesIO(_image_bytes(bad, by["palette_png_trns"])))
    assert "transparency" in pal.info
    rot = Image.open(io.BytesIO(_image_bytes(bad, by["exif_rotated_jpeg"])))
    assert rot.getexif().get(0x0112) == 6
    assert ImageOps.exif_transpose(rot).size == rot.size[::-1] != rot.size
    qrel_docs = set(pq.read_table(bad.qrels).column("doc_id").to_pylist())
    rejected_slots = {b["slot"] for b in bad.expected_rejects}
    assert not qrel_docs & rejected_slots


def test_markup_rows_hold_markup(bad: SampleInfo) -> None:
    by = {b["case"]: b for b in bad.expected_accepts if b["case"] in MARKUP_CASES}
    assert set(by) == set(MARKUP_CASES)
    script, img = _row(bad, by["markup_caption_script"]), _row(bad, by["markup_id_img"])
    assert script["text"].startswith("<script>") and XSS_FLAG in script["text"]
    assert script["doc_id"] == by["markup_caption_script"]["slot"]
    assert img["doc_id"].startswith("<img") and "onerror" in img["doc_id"] and not any(c.isspace() for c in img["doc_id"])
    assert img["text"].startswith("<img ") and "onerror" in img["text"]
    for row in (script, img):
        assert Image.open(io.BytesIO(row["image"])).format == "PNG"


def test_image_uri_mode(tmp_path: Path) -> None:
    info = make_sample(str(tmp_path / "u"), bad_rows=True, image_uri=True, **KW)
    for uri in info.shard_uris:
        assert pq.read_table(uri).schema.equals(CORPUS_IMAGE_URI)
    missing = [b for b in info.bad_rows if b["error_type"] == "uri_unreadable"]
    assert len(missing) == 1
    assert not Path(_row(info, missing[0])["image_uri"]).exists()
    assert Path(_row(info, [b for b in info.bad_rows if b["case"] == "empty_image"][0])["image_uri"]).stat().st_size == 0
    clean = {f"doc-{i:06d}" for i in range(info.docs)}
    for r in pq.read_table(info.shard_uris[0]).to_pylist():
        path = Path(r["image_uri"])
        if path.stem in clean:  # clean docs: files named after their doc_id
            assert r["doc_id"] == path.stem and path.suffix in (".png", ".jpg")
            Image.open(path).load()


def test_single_shard_and_validation(tmp_path: Path) -> None:
    info = make_sample(str(tmp_path / "one"), **{**KW, "shards": 1}, bad_rows=True)
    assert [b["error_type"] for b in info.bad_rows].count("duplicate_id") == 1
    with pytest.raises(ValueError):
        make_sample(str(tmp_path / "x"), docs=2, shards=3)
