"""Embedding stage on local Ray: fidelity against direct open_clip calls, rejects, cache, local + s3."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from operators.contracts import SchemaError
from operators.models import SHIPPED_CONFIGS
from operators.storage import Storage, join
from pipelines.config import parse_config
from pipelines.embed import EmbedResult, embed_kind, run_embed
from pipelines.sample import SampleInfo, make_sample

pytestmark = pytest.mark.usefixtures("ray_local")


def _cfg(root: str, sample: SampleInfo, **embed: Any) -> Any:
    return parse_config({
        "root": root, "corpus": sample.corpus, "queries": sample.queries,
        "ray": {"progress_bars": False},
        "embed": {"batch_size": 16, "rows_per_read_task": 32, **embed},
    })


def _read_embeddings(res: EmbedResult, storage: Storage) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for s in res.shards:
        marker = storage.read_json(join(res.cache, s.key, "_SUCCESS.json"))
        for part in marker["parts"]:
            t = storage.read_table(join(res.cache, s.key, part))
            vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
            for i, v in zip(t.column("id").to_pylist(), vecs, strict=True):
                assert i not in out, f"duplicate id {i} in the cache"
                out[i] = v
    return out


def _read_rejects(res: EmbedResult, storage: Storage) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s in res.shards:
        marker = storage.read_json(join(res.cache, s.key, "_SUCCESS.json"))
        for name in marker["rejects"]:
            rows += storage.read_table(join(res.cache, s.key, name)).to_pylist()
    return rows


def _reference_model() -> Any:
    """The tiny model built directly with open_clip (no mmrerank code), same seed as the pipeline."""
    if "mmr-tiny" not in open_clip.list_models():
        open_clip.add_model_config(SHIPPED_CONFIGS)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("mmr-tiny", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("mmr-tiny")


def _check_counts(res: EmbedResult) -> None:
    for s in res.shards:
        assert s.rows_in == s.rows_ok + s.rows_rejected, s
    assert res.rows_in == res.rows_ok + res.rows_rejected


@pytest.fixture(scope="module")
def bad_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    return make_sample(str(tmp_path_factory.mktemp("sample") / "s"), docs=40, queries=6, shards=3, seed=3,
                       bad_rows=True, image_size=48)


# On CPU "auto" decodes inside the embedder actor; False is the GPU clusters' layout (decode tasks feed the actor).
@pytest.mark.parametrize("decode_in_actor", ["auto", False], ids=["decode-in-actor", "decode-tasks"])
def test_embed_fidelity_rejects_and_cache(bad_sample: SampleInfo, tmp_path: Path, decode_in_actor: Any) -> None:
    cfg = _cfg(str(tmp_path / "out"), bad_sample, decode_in_actor=decode_in_actor)
    storage = Storage()
    corpus, queries = run_embed(cfg)
    _check_counts(corpus)
    _check_counts(queries)

    # Every documented bad row is rejected with the documented reason, every odd-mode row accepted.
    rejects = _read_rejects(corpus, storage)
    got = {(r["source"], r["row_index"]): r["error_type"] for r in rejects}
    expected_rej = {(b["shard"], b["row_index"]): b["error_type"] for b in bad_sample.bad_rows
                    if b["expect"] == "reject"}
    assert got == expected_rej
    assert all(r["stage"] == "embed_corpus" and r["error_message"] for r in rejects)
    emb = _read_embeddings(corpus, storage)
    accepted = [b["doc_id"] for b in bad_sample.bad_rows if b["expect"] == "accept"]
    assert accepted and all(d in emb for d in accepted)
    assert len(emb) == corpus.rows_ok == bad_sample.docs + len(accepted)
    assert corpus.rows_in == bad_sample.rows

    # Fidelity: same images, same seed, plain open_clip, no Ray: allclose in fp32.
    model, preprocess, tokenizer = _reference_model()
    table = pa.concat_tables([pq.read_table(u) for u in bad_sample.shard_uris])
    bad_ids = {b["doc_id"] for b in bad_sample.bad_rows}
    ids, imgs = [], []
    for d, img in zip(table.column("doc_id").to_pylist(), table.column("image").to_pylist(), strict=True):
        if d is not None and d not in bad_ids:
            ids.append(d)
            imgs.append(preprocess(Image.open(io.BytesIO(img)).convert("RGB")))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(torch.stack(imgs)), dim=-1).numpy()
    pipe = np.stack([emb[d] for d in ids])
    np.testing.assert_allclose(pipe, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pipe, axis=1), 1.0, atol=1e-5)

    qt = pq.read_table(bad_sample.queries)
    qemb = _read_embeddings(queries, storage)
    with torch.no_grad():
        qref = torch.nn.functional.normalize(model.encode_text(tokenizer(qt.column("text").to_pylist())), dim=-1)
    np.testing.assert_allclose(np.stack([qemb[q] for q in qt.column("query_id").to_pylist()]),
                               qref.numpy(), atol=1e-5)

    # Re-run: no embedding work, same numbers.
    again = embed_kind(cfg, "corpus")
    assert all(s.reused for s in again.shards) and again.embed_s == 0.0
    assert (again.rows_ok, again.rows_rejected) == (corpus.rows_ok, corpus.rows_rejected)


def test_changed_added_removed_shards(tmp_path: Path) -> None:
    sample = make_sample(str(tmp_path / "s"), docs=24, queries=3, shards=3, seed=5, image_size=32)
    cfg = _cfg(str(tmp_path / "out"), sample)
    first = embed_kind(cfg, "corpus")
    assert not any(s.reused for s in first.shards)
    before = _read_embeddings(first, Storage())

    # Change shard 1 (drop its last row), add a new shard, remove shard 2.
    s1 = pq.read_table(sample.shard_uris[1])
    pq.write_table(s1.slice(0, s1.num_rows - 1), sample.shard_uris[1])
    extra = pq.read_table(sample.shard_uris[2])
    extra = extra.set_column(0, "doc_id", pa.array([f"new-{i}" for i in range(extra.num_rows)]))
    pq.write_table(extra, str(Path(sample.corpus) / "shard-00009.parquet"))
    Path(sample.shard_uris[2]).unlink()

    second = embed_kind(cfg, "corpus")
    by_src = {Path(s.source).name: s for s in second.shards}
    assert sorted(by_src) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00009.parquet"]
    assert by_src["shard-00000.parquet"].reused
    assert not by_src["shard-00001.parquet"].reused and by_src["shard-00001.parquet"].rows_in == s1.num_rows - 1
    assert not by_src["shard-00009.parquet"].reused
    assert second.rows_embedded_now == (s1.num_rows - 1) + extra.num_rows
    after = _read_embeddings(second, Storage())
    # The new shard holds the same images as the removed one: identical vectors under new ids.
    old_ids = pq.read_table(sample.shard_uris[0]).column("doc_id").to_pylist()
    for d in old_ids:
        np.testing.assert_array_equal(after[d], before[d])
    assert not set(extra.column("doc_id").to_pylist()) - set(after)
    _check_counts(second)


def test_bad_shard_schema_fails_before_work(tmp_path: Path) -> None:
    sample = make_sample(str(tmp_path / "s"), docs=8, queries=2, shards=2, seed=1, image_size=32)
    t = pq.read_table(sample.shard_uris[1]).rename_columns(["id", "image", "text"])
    pq.write_table(t, sample.shard_uris[1])
    cfg = _cfg(str(tmp_path / "out"), sample)
    with pytest.raises(SchemaError, match=r"shard-00001\.parquet.*'doc_id'"):
        run_embed(cfg)
    assert not (tmp_path / "out" / "embeddings").exists()

    t = pq.read_table(sample.shard_uris[0])
    t = t.set_column(1, "image", pa.array([str(i) for i in range(t.num_rows)]))
    pq.write_table(t, sample.shard_uris[0])
    with pytest.raises(SchemaError, match=r"shard-00000\.parquet.*'image'"):
        run_embed(cfg)


def test_s3_and_image_uri_with_bad_rows(s3_bucket: str, tmp_path: Path) -> None:
    """Inputs and cache on the S3-compatible server; images referenced by URI, one of them missing."""
    sample = make_sample(f"{s3_bucket}/sample", docs=16, queries=3, shards=2, seed=7, bad_rows=True,
                         image_size=32, image_uri=True)
    cfg = _cfg(f"{s3_bucket}/out", sample)
    corpus, queries = run_embed(cfg)
    _check_counts(corpus)
    storage = Storage()
    got = {(r["source"], r["row_index"]): r["error_type"] for r in _read_rejects(corpus, storage)}
    expected = {(b["shard"], b["row_index"]): b["error_type"] for b in sample.bad_rows if b["expect"] == "reject"}
    assert got == expected
    assert "uri_unreadable" in got.values()
    assert queries.rows_ok == 3
    assert storage.exists(corpus.set_uri) and corpus.cache.startswith("s3://")

    # Embeddings read back from s3 equal a direct call on the images fetched from s3.
    model, preprocess, _ = _reference_model()
    emb = _read_embeddings(corpus, storage)
    table = storage.read_table(sample.shard_uris[0])
    bad_ids = {b["doc_id"] for b in sample.bad_rows}
    pairs = [(d, u) for d, u in zip(table.column("doc_id").to_pylist(), table.column("image_uri").to_pylist(),
                                    strict=True) if d is not None and d not in bad_ids][:4]
    assert pairs
    x = torch.stack([preprocess(Image.open(io.BytesIO(storage.read_bytes(u))).convert("RGB")) for _, u in pairs])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(np.stack([emb[d] for d, _ in pairs]), ref, atol=1e-5)

    again = embed_kind(cfg, "corpus")
    assert all(s.reused for s in again.shards)


def test_cpu_pool_auto_is_two_actors_that_leave_room_for_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """``embed.num_actors: auto`` on CPU: two one-thread actors on 2 CPUs, each leaving a read task room."""
    import ray

    from pipelines.ray_env import actor_pool

    def nodes(cpus: float, free: float | None = None) -> None:
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": cpus}}])
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": cpus if free is None else free})

    monkeypatch.delenv("MMR_MAX_TORCH_THREADS", raising=False)  # the suite's pytest-xdist cap (conftest): checked last
    e = parse_config({"root": "r", "corpus": "c"}).embed
    nodes(2.0)
    assert actor_pool(e, {"CPU": 2.0}, "embed", 0.5, auto_cpu_actors=2) == ("cpu", 2, {"num_cpus": 0.75}, 1)
    # One actor with both cores (the queries' text pool).
    assert actor_pool(e, {"CPU": 2.0}, "embed", 0.5) == ("cpu", 1, {"num_cpus": 1.0}, 2)
    # The reranker's: two actors holding half the node in all (Ray Data then starts the writes promptly).
    assert actor_pool(e, {"CPU": 2.0}, "rerank", 0.5, auto_cpu_actors=2, auto_pool_share=0.5) == (
        "cpu", 2, {"num_cpus": 0.5}, 1)
    nodes(16.0)
    assert actor_pool(e, {"CPU": 16.0}, "embed", 0.5, auto_cpu_actors=2) == ("cpu", 2, {"num_cpus": 1.0}, 8)
    assert actor_pool(e, {"CPU": 16.0}, "rerank", 0.5, auto_cpu_actors=2, auto_pool_share=0.5) == (
        "cpu", 2, {"num_cpus": 1.0}, 8)
    # CPUs held outside the job (two Serve replicas of 1 CPU on a 4-CPU node): the pool fits what is free,
    # leaving the read task room (1.0 each would have left it none: a hang).
    nodes(4.0, free=2.0)
    assert actor_pool(e, {"CPU": 4.0}, "rerank", 0.5, auto_cpu_actors=2, auto_pool_share=0.5) == (
        "cpu", 2, {"num_cpus": 0.75}, 2)
    nodes(1.0)
    assert actor_pool(e, {"CPU": 1.0}, "embed", 0.5, auto_cpu_actors=2) == ("cpu", 1, {"num_cpus": 0.5}, 1)
    assert actor_pool(e, {"CPU": 1.0}, "rerank", 0.5, auto_cpu_actors=2, auto_pool_share=0.5) == (
        "cpu", 1, {"num_cpus": 0.5}, 1)
    assert actor_pool(e, {"CPU": 8.0, "GPU": 2.0}, "embed", 0.5, auto_cpu_actors=2)[:2] == ("cuda", 2)
    # MMR_MAX_TORCH_THREADS in the driver's environment caps "auto" threads; an explicit torch_threads is kept;
    # OMP_NUM_THREADS (Ray sets it in its processes; a submitted job's entrypoint inherits it) does not cap them.
    nodes(16.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert actor_pool(e, {"CPU": 16.0}, "embed", 0.5, auto_cpu_actors=2)[3] == 8
    monkeypatch.setenv("MMR_MAX_TORCH_THREADS", "3")
    assert actor_pool(e, {"CPU": 16.0}, "embed", 0.5, auto_cpu_actors=2)[3] == 3
    assert actor_pool(e.model_copy(update={"torch_threads": 6}), {"CPU": 16.0}, "embed", 0.5, auto_cpu_actors=2)[3] == 6
    monkeypatch.setenv("MMR_MAX_TORCH_THREADS", "0")  # not a cap
    assert actor_pool(e, {"CPU": 16.0}, "embed", 0.5, auto_cpu_actors=2)[3] == 8
    monkeypatch.delenv("MMR_MAX_TORCH_THREADS")
    # An explicit pool that leaves no room for the read task would hang: refused, naming the field.
    nodes(2.0)
    tight = parse_config({"root": "r", "corpus": "c", "embed": {"num_actors": 1, "actor_num_cpus": 1.75}}).embed
    with pytest.raises(ValueError, match=r"embed\.actor_num_cpus"):
        actor_pool(tight, {"CPU": 2.0}, "embed", 0.5)
