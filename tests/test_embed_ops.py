"""Embedding operators called directly on dict batches, without Ray (as Ray Data would call them)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from operators import contracts as R
from operators.contracts import ERR_MSG, ERR_TYPE, ID, ROW, SHARD, SOURCE
from operators.embedders import EMBEDDING, PIXELS, DecodeImages, EmbeddingsSink, ImageEmbedder, TextEmbedder
from operators.models import ModelSpec, build_model, image_transform, resolve_model

FORMATS = ("JPEG", "PNG")


def _png(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _input(images: list[bytes | None], errs: list[str] | None = None) -> pa.Table:
    n = len(images)
    return pa.table({
        ID: [f"d{i}" for i in range(n)], "image": pa.array(images, pa.binary()), ROW: list(range(n)),
        SHARD: ["k"] * n, SOURCE: ["s.parquet"] * n, ERR_TYPE: errs or [""] * n, ERR_MSG: [""] * n,
    })


@pytest.fixture(scope="module")
def tiny():
    return resolve_model(ModelSpec())


def test_decode_batch_keeps_every_row(tiny) -> None:
    batch = _input([_png((255, 0, 0)), b"", b"garbage", _png((0, 0, 255)), _png((0, 255, 0))],
                   errs=["", "", "", "", R.DUPLICATE_ID])
    out = DecodeImages(tiny.preprocess, 10**6, FORMATS)(batch)
    assert list(out[ERR_TYPE]) == ["", R.EMPTY_IMAGE, R.UNDECODABLE, "", R.DUPLICATE_ID]
    assert out[PIXELS].shape == (5, 3, 32, 32)
    ref = image_transform(tiny.preprocess)(Image.open(io.BytesIO(_png((255, 0, 0))))).numpy()
    np.testing.assert_array_equal(out[PIXELS][0], ref)
    assert not out[PIXELS][1].any()  # rejected rows carry zeros, not stale pixels
    assert list(out[ROW]) == [0, 1, 2, 3, 4]


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
def test_image_and_text_embedder_match_direct_model(tiny, device: str) -> None:
    batch = DecodeImages(tiny.preprocess, 10**6, FORMATS)(_input([_png((200, 10, 10)), b"", _png((1, 2, 3))]))
    out = ImageEmbedder(tiny, device=device, precision="auto", torch_threads=1)(batch)
    assert out[EMBEDDING].shape == (3, 64)
    assert list(out[ERR_TYPE]) == ["", R.EMPTY_IMAGE, ""]
    model, tok = build_model(tiny)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(batch[PIXELS][[0, 2]])), dim=-1)
    atol = 1e-5 if device == "cpu" else 2e-2  # fp16/bf16 on GPU
    np.testing.assert_allclose(out[EMBEDDING][[0, 2]], ref.numpy(), atol=atol)
    assert not out[EMBEDDING][1].any()

    texts = {ID: np.array(["q0", "q1"], object), "text": np.array(["a red circle", "a blue square"], object),
             ROW: np.array([0, 1]), SHARD: np.array(["k", "k"], object), SOURCE: np.array(["s", "s"], object),
             ERR_TYPE: np.array(["", ""], object), ERR_MSG: np.array(["", ""], object)}
    tout = TextEmbedder(tiny, device=device, precision="auto", torch_threads=1)(texts)
    with torch.no_grad():
        tref = torch.nn.functional.normalize(model.encode_text(tok(["a red circle", "a blue square"])), dim=-1)
    np.testing.assert_allclose(tout[EMBEDDING], tref.numpy(), atol=atol)


def test_model_failure_rejects_only_the_failing_row(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = DecodeImages(tiny.preprocess, 10**6, FORMATS)(_input([_png((9, 9, 9)), _png((255, 255, 255)),
                                                                  _png((5, 50, 200))]))
    emb = ImageEmbedder(tiny, torch_threads=1)
    real = emb.model.encode_image

    def flaky(x: torch.Tensor) -> torch.Tensor:
        # Fails whenever the all-white image is in the batch (like a kernel error on one input).
        if bool((x.amax(dim=(1, 2, 3)) > 1.9).any()):
            raise RuntimeError("simulated CUDA error")
        return real(x)

    monkeypatch.setattr(emb.model, "encode_image", flaky)
    out = emb(batch)
    assert list(out[ERR_TYPE]) == ["", R.MODEL_ERROR, ""]
    assert "simulated" in out[ERR_MSG][1]
    assert np.abs(np.linalg.norm(out[EMBEDDING][[0, 2]], axis=1) - 1).max() < 1e-5


def test_sink_writes_parts_and_rejects_per_shard(tmp_path: Path) -> None:
    sink = EmbeddingsSink(str(tmp_path), dim=4, dtype="float16", stage="embed_corpus")
    emb = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    batch = {ID: np.array(["a", "b", None, "d", "e"], object), ROW: np.array([7, 3, 4, 10, 11]),
             SHARD: np.array(["s1", "s2", "s2", "s1", "s1"], object), SOURCE: np.array(["x", "y", "y", "x", "x"], object),
             ERR_TYPE: np.array(["", "", R.NULL_ID, R.EMPTY_IMAGE, ""], object),
             ERR_MSG: np.array(["", "", "doc_id is null", "zero bytes", ""], object), EMBEDDING: emb}
    recs = {r["shard"]: r for r in sink.write_batch(batch)}
    assert recs["s1"] == {"shard": "s1", "first_row": 7, "rows_ok": 2, "rows_rejected": 1,
                          "part": "part-000000000007.parquet", "rejects": "rejects-000000000007.parquet",
                          "reject_types": {R.EMPTY_IMAGE: 1}, "row_ranges": [[7, 8], [10, 12]]}
    t = pq.read_table(tmp_path / "s1" / "part-000000000007.parquet")
    assert t.column("id").to_pylist() == ["a", "e"] and t.column("row_index").to_pylist() == [7, 11]
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    rej = pq.read_table(tmp_path / "s2" / "rejects-000000000003.parquet").to_pylist()
    assert rej == [{"stage": "embed_corpus", "source": "y", "row_index": 4, "id": None,
                    "error_type": R.NULL_ID, "error_message": "doc_id is null"}]
    # Writing the same batch again (a retried task) overwrites: still exactly these files.
    sink.write_batch(batch)
    assert sorted(p.name for p in (tmp_path / "s1").iterdir()) == ["part-000000000007.parquet",
                                                                  "rejects-000000000007.parquet"]


def test_row_ranges_keep_gaps_and_repeats_visible() -> None:
    from operators.parts import row_ranges, tiling_errors

    assert row_ranges(np.array([3, 0, 1, 2, 5])) == [[0, 4], [5, 6]]
    assert row_ranges(np.array([0, 1, 1, 2])) == [[0, 2], [1, 3]]  # the repeated row opens a run of its own
    assert row_ranges(np.array([], np.int64)) == []
    assert tiling_errors([[3, 6], [0, 3]], 6) == (0, 0)
    assert tiling_errors([[0, 4], [5, 6]], 6) == (1, 0)
    assert tiling_errors([[0, 2], [1, 3]], 4) == (1, 1)
    assert tiling_errors([[0, 7]], 6) == (0, 1)


def test_embed_refuses_a_shard_whose_rows_add_up_but_one_was_dropped_and_one_duplicated(tmp_path: Path) -> None:
    """"Nothing is lost" row by row: 4 rows in; the writes cover rows 0, 1, 1, 2 (3 ok + 1 reject: the right
    count). The shard is refused with EmbedIntegrityError and no _SUCCESS.json; the true rows pass."""
    from types import SimpleNamespace

    from operators.storage import Storage
    from pipelines.embed import EmbedIntegrityError, _finalize

    plan = SimpleNamespace(uri="s3://b/corpus/shard-0.parquet", num_rows=4, fingerprint="f", kind="corpus")
    rm, cfg = SimpleNamespace(fingerprint="m", embed_dim=4), SimpleNamespace(embed=SimpleNamespace(dtype="float16"))
    cache = str(tmp_path / "cache")

    def rec(ranges: list[list[int]]) -> dict[str, object]:
        return {"shard": "k", "first_row": 0, "rows_ok": 3, "rows_rejected": 1, "reject_types": {"decode_error": 1},
                "part": "part-0.parquet", "rejects": "rejects-0.parquet", "row_ranges": ranges}

    with pytest.raises(EmbedIntegrityError, match="1 rows missing, 1 written more than once"):
        _finalize(Storage(), cache, [(plan, "k")], [rec([[0, 2], [1, 3]])], {}, rm, cfg)
    assert not (tmp_path / "cache" / "k" / "_SUCCESS.json").exists()
    stats: dict[str, object] = {}
    _finalize(Storage(), cache, [(plan, "k")], [rec([[0, 4]])], stats, rm, cfg)
    assert (tmp_path / "cache" / "k" / "_SUCCESS.json").exists() and "k" in stats
