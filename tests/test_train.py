"""``mmrerank train``: the seeded split, the binding sample, Ray Train for clip and vlm_yesno, checkpoints that
load through the users' code paths, quality that a regression would break, 2 workers = 1 worker, resume.

The trained models come from the session's ``trained_models`` (tests/conftest.py: trained once per session,
in a directory named by the content hash of sample settings + training configs): the binding sample, the
tiny retriever trained on its training queries, a nightly run with it (retrieval only), the tiny yes/no
reranker trained on that run's candidates and a nightly run with both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from operators.storage import Storage
from operators.training.data import build_training_set, read_corpus, read_queries, split_query_ids
from pipelines.config import ConfigError, parse_config
from tests.helpers import CLI_DEADLINE_S, kill_tree, log_tail, spawn, wait_until
from tests.trained import TrainedModels

# How much better than the retriever the fine-tuned reranker alone must rank the session's held-out queries
# (nDCG@10), and how much a broken input must take away; benchmarks/bench_quality.py measures it over seeds.
RERANK_MARGIN = 0.10


@pytest.fixture(scope="module")
def trained(ray_local: Any, trained_models: TrainedModels) -> TrainedModels:
    """The session's trained models (trained on this module's Ray when no earlier module asked for them)."""
    return trained_models


# One small data-parallel training setting, shared: its 1-worker run is the reference of both the 2-worker run
# (test_two_workers_match_one) and the killed-and-resumed CLI training (test_kill_9_...), trained once.
SMALL_TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.002, "worker_num_cpus": 0.5}


@pytest.fixture(scope="module")
def one_worker(trained: TrainedModels, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``SMALL_TRAIN`` on one Ray Train worker, uninterrupted (a ``TrainReport``)."""
    from pipelines.quickstart import TRAIN_CLIP_CONFIG
    from pipelines.train import run_train

    out = tmp_path_factory.mktemp("one-worker")
    return run_train(trained.config(TRAIN_CLIP_CONFIG, root=str(out / "root"), train={
        **SMALL_TRAIN, "num_workers": 1, "name": "dp-1", "output": str(out / "dp-1")}))


# --- no Ray -------------------------------------------------------------------------------------------


def test_split_is_seeded_by_query_id_and_stable() -> None:
    ids = [f"q-{i:05d}" for i in range(200)]
    train, held = split_query_ids(ids, 0.3, seed=0)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(ids)
    assert 40 <= len(held) <= 80
    assert split_query_ids(list(reversed(ids)), 0.3, 0) == (train, held)
    # A query's side does not depend on which other queries exist.
    train2, held2 = split_query_ids(ids[:120], 0.3, 0)
    assert set(held2) == set(held) & set(ids[:120])
    assert split_query_ids(ids, 0.3, seed=1)[1] != held


def test_split_refuses_an_empty_side() -> None:
    from operators.training.data import TrainDataError

    with pytest.raises(TrainDataError, match="at least one of each"):
        split_query_ids(["q-1"], 0.3, 0)


def test_binding_sample_has_swapped_distractors(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from pipelines.sample import COLORS, SHAPES, make_sample

    info = make_sample(str(tmp_path / "s"), docs=40, queries=10, shards=2, binding=True)
    captions = {}
    for shard in info.shard_uris:
        t = pq.read_table(shard)
        captions.update(zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist(), strict=True))
    qrels = pq.read_table(info.qrels).to_pylist()
    texts = dict(zip(*(pq.read_table(info.queries).column(c).to_pylist() for c in ("query_id", "text")), strict=True))
    for q in texts:
        rel = {r["doc_id"]: r["relevance"] for r in qrels if r["query_id"] == q}
        exact = [d for d, r in rel.items() if r == 2]
        assert len(exact) == 1
        group = int(exact[0][4:]) // 4
        swapped = f"doc-{group * 4 + 1:06d}"
        assert swapped not in rel  # the same words bound the other way round: not relevant

        def words(caption: str) -> list[str]:
            return sorted(w for w in caption.replace(",", "").split() if w in COLORS or w in SHAPES)

        assert words(captions[swapped]) == words(captions[exact[0]])
        assert captions[swapped].split(" on ")[0] != captions[exact[0]].split(" on ")[0]
        assert f"doc-{group * 4 + 2:06d}" in rel  # the concept plus a third shape


def test_training_set_never_contains_heldout_queries(tmp_path: Path) -> None:
    from pipelines.evaluate import load_qrels
    from pipelines.sample import make_sample

    info = make_sample(str(tmp_path / "s"), docs=80, queries=20, shards=2, binding=True)
    st = Storage()
    docs, skipped = read_corpus(info.corpus, st, 10**8, ("PNG", "JPEG"))
    assert skipped == 0 and len(docs) == 80
    qrels = load_qrels(info.qrels, st)
    ts = build_training_set(read_queries(info.queries, st), docs, qrels, None, 0.3, 0, 0, "random", 3,
                            caption_pairs=True)
    held = set(ts.heldout_ids)
    assert held and not held & {q for q, _d, _l in ts.examples}
    held_docs = {d for q in held for d in qrels[q]}
    assert not held_docs & set(ts.caption_docs)  # no caption of a held-out query's judged doc is trained on
    for q, d, label in ts.examples:
        assert (label == 1) == (qrels[q].get(d, 0) > 0)
    assert set(ts.qrels) == held


def test_resume_skips_a_checkpoint_killed_while_being_copied(tmp_path: Path) -> None:
    """A kill -9 during Ray Train's copy of a checkpoint can leave any of its files missing or cut (CI saw a cut
    state file, then a cut optimizer file): resume takes the newest whole checkpoint instead of failing on it."""
    from operators.training.common import MANIFEST_FILE, write_manifest
    from pipelines.train import _last_checkpoint

    def make(name: str, step: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "train_state.json").write_text(json.dumps({"epoch": step // 5 - 1, "step": step}))
        (d / "optimizer.pt").write_bytes(bytes(range(256)) * 8)
        (d / "model").mkdir()
        (d / "model" / "weights.safetensors").write_bytes(b"w" * 999)
        write_manifest(d)
        return d

    # Ray Train's own file beside the checkpoints (a kill after it was written failed the resume once)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    make("checkpoint_a", 5)
    assert _last_checkpoint(Storage(), str(tmp_path)) == "checkpoint_a"
    make("checkpoint_b", 10).joinpath("optimizer.pt").write_bytes(bytes(range(256)) * 3)  # cut short
    make("checkpoint_c", 15).joinpath("train_state.json").write_text('{"epoch": 2, "st')  # cut, and size differs
    make("checkpoint_d", 20).joinpath("model", "weights.safetensors").unlink()  # not yet copied
    make("checkpoint_e", 25).joinpath(MANIFEST_FILE).write_text('{"optimizer.pt": {"by')  # the manifest cut
    make("checkpoint_f", 30).joinpath(MANIFEST_FILE).unlink()  # the manifest not yet copied
    changed = make("checkpoint_g", 35).joinpath("optimizer.pt")  # same size, other bytes
    changed.write_bytes(changed.read_bytes()[::-1])
    assert _last_checkpoint(Storage(), str(tmp_path)) == "checkpoint_a"
    make("checkpoint_h", 40)
    assert _last_checkpoint(Storage(), str(tmp_path)) == "checkpoint_h"


def test_train_config_is_validated_before_any_work() -> None:
    base = {"root": "/tmp/x", "corpus": "/tmp/c", "queries": "/tmp/q", "qrels": "/tmp/r"}
    with pytest.raises(ConfigError, match="train.target"):
        parse_config({**base, "train": {"target": "bert"}})
    with pytest.raises(ConfigError, match="needs candidates"):
        parse_config({**base, "train": {"target": "vlm_yesno", "negatives": "hard"}})
    with pytest.raises(ConfigError, match="train.batch_size"):
        parse_config({**base, "train": {"target": "clip", "batch_size": 0}})
    with pytest.raises(ConfigError, match="train.lora.unknown"):
        parse_config({**base, "train": {"target": "clip", "lora": {"unknown": 1}}})
    with pytest.raises(ConfigError, match="train.loss"):
        parse_config({**base, "train": {"target": "vlm_yesno", "candidates": "/tmp/r", "negatives": "hard",
                                        "loss": "pairwise"}})
    with pytest.raises(ConfigError, match="listwise is for target vlm_yesno"):
        parse_config({**base, "train": {"target": "clip", "loss": "listwise"}})


def test_pixel_cache_gives_the_transforms_pixels_within_its_budget(tmp_path: Path) -> None:
    import torch

    from operators.models import ModelSpec, image_transform, resolve_model
    from operators.training.clip import PixelCache, _pixels
    from pipelines.evaluate import load_qrels
    from pipelines.sample import make_sample

    s = make_sample(str(tmp_path / "s"), docs=12, queries=3, shards=1, binding=True)
    st = Storage()
    docs, _ = read_corpus(s.corpus, st, 10**8, ("PNG", "JPEG"))
    ts = build_training_set(read_queries(s.queries, st), docs, load_qrels(s.qrels, st), None, 0.5, 0, 0, "none", 0)
    tf = image_transform(resolve_model(ModelSpec(name="mmr-tiny")).preprocess)
    ids = sorted(docs)[:6]
    one = tf(ts.image(ids[0]))
    cache = PixelCache(ts, tf, max_bytes=3 * one.element_size() * one.nelement())
    for _ in range(2):  # the second pass reads the cache
        assert torch.equal(_pixels(ts, ids, cache), _pixels(ts, ids, tf))
    assert sorted(cache.cache) == ids[:3] and cache.room == 0  # the budget holds: 3 of 6 kept


def test_listwise_loss_equals_a_brute_force_reference() -> None:
    """LCE: each positive's margin logit(Yes) - logit(No) in a softmax against its own query's negatives."""
    import math

    import numpy as np
    import torch

    from operators.training.vlm import lce_loss, query_groups

    rng = np.random.default_rng(0)
    sizes = [(2, 4), (1, 3), (3, 1)]
    logits = rng.normal(size=(sum(p + n for p, n in sizes), 2))
    want, i = 0.0, 0
    for n_pos, n_neg in sizes:
        margin = [a - b for a, b in logits[i:i + n_pos + n_neg].tolist()]
        negs = margin[n_pos:]
        for s in margin[:n_pos]:
            want -= s - math.log(math.exp(s) + sum(math.exp(x) for x in negs))
        i += n_pos + n_neg
    got = lce_loss(torch.tensor(logits), sizes)
    assert float(got) == pytest.approx(want, rel=1e-9)
    # A ranking loss: a query's margins shifted together leave it unchanged; the negatives of another query
    # never enter a positive's softmax.
    shifted = torch.tensor(logits)
    shifted[:6, 0] += 3.0
    assert float(lce_loss(shifted, sizes)) == pytest.approx(want, rel=1e-9)
    # Data parallel: two workers' scaled shares, gradients averaged as DDP does, equal one worker's batch mean.
    from operators.training.vlm import lce_worker_loss

    w = torch.tensor(logits, requires_grad=True)
    lce_worker_loss(w, sizes, 6, 1).backward()
    whole = w.grad.clone()
    w.grad = None
    halves = [(slice(0, 10), sizes[:2]), (slice(10, 14), sizes[2:])]  # worker 0: queries 1-2, worker 1: query 3
    grads = []
    for rows, part in halves:
        local = torch.tensor(logits[rows], requires_grad=True)
        lce_worker_loss(local, part, 6, 2).backward()
        grads.append(local.grad)
    dp = torch.cat(grads) / 2  # DDP's all-reduce mean, each worker's rows then the other's
    torch.testing.assert_close(dp, whole, rtol=1e-12, atol=1e-12)
    examples = [("q2", "a", 1), ("q1", "b", 0), ("q1", "c", 1), ("q3", "d", 1), ("q2", "e", 0), ("q1", "f", 0)]
    assert query_groups(examples) == [("q1", ["c"], ["b", "f"]), ("q2", ["a"], ["e"])]  # q3: no negative


def test_train_without_section_or_qrels_is_a_clear_error() -> None:
    from pipelines.train import run_train

    with pytest.raises(ConfigError, match="no train section"):
        run_train(parse_config({"root": "/tmp/x", "corpus": "/tmp/c"}))
    with pytest.raises(ConfigError, match="qrels"):
        run_train(parse_config({"root": "/tmp/x", "corpus": "/tmp/c", "queries": "/tmp/q",
                                "train": {"target": "clip"}}))


# --- trained models -----------------------------------------------------------------------------------


def _heldout_recall(trained: TrainedModels, spec: Any, mix_channels: bool = False) -> dict[str, float]:
    """Held-out retrieval metrics of an open_clip spec, loaded the way the pipeline loads it."""
    from operators.models import build_model, image_transform, resolve_model
    from operators.training.clip import _validate
    from pipelines.evaluate import load_qrels

    st = Storage()
    s = trained.sample
    docs, _ = read_corpus(s.corpus, st, 10**8, ("PNG", "JPEG"))
    ts = build_training_set(read_queries(s.queries, st), docs, load_qrels(s.qrels, st), None, 0.3, 0, 0, "none", 0)
    rm = resolve_model(spec)
    model, tok = build_model(rm)
    import torch

    tf = image_transform(rm.preprocess)
    transform = (lambda im: tf(im)[[2, 1, 0]]) if mix_channels else tf  # a BGR/RGB mix-up
    return _validate(model, tok, transform, ts, torch.device("cpu"))


def test_trained_retriever_beats_random_and_a_preprocessing_mismatch_breaks_it(trained: TrainedModels) -> None:
    from operators.models import ModelSpec

    spec = ModelSpec(name="mmr-tiny", pretrained=trained.clip.weights)
    good = _heldout_recall(trained, spec)
    rand = _heldout_recall(trained, ModelSpec(name="mmr-tiny", seed=0))
    assert good["recall@10"] >= rand["recall@10"] + 0.15, (good, rand)
    # The card's held-out metrics are those of the checkpoint users load.
    assert good["recall@10"] == pytest.approx(trained.clip.card["validation"]["recall@10"], abs=1e-6)
    # A preprocessing mismatch (channels in BGR order): red shapes read as blue, the ranking collapses.
    bad = _heldout_recall(trained, spec, mix_channels=True)
    assert bad["ndcg@10"] < good["ndcg@10"] - 0.05, (good, bad)


def test_model_card_and_weights(trained: TrainedModels) -> None:
    out = Path(trained.clip.output)
    card = json.loads((out / "model_card.json").read_text())
    assert card["target"] == "clip" and card["base_model"]["name"] == "mmr-tiny"
    assert card["training"]["library"] == "ray.train.torch.TorchTrainer"
    assert card["training"]["steps"] > 0 and len(card["history"]) == card["training"]["epochs"]
    for name, sha in card["weights"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    assert set(card["weights"]) == {"model.safetensors"}
    held = set(card["split"]["heldout_query_ids"])
    assert held and card["data"]["counts"]["heldout_queries"] == len(held)
    assert {line.split()[0] for line in (out / "heldout_qrels.txt").read_text().splitlines()} == held
    vcard = trained.vlm.card
    assert vcard["split"]["heldout_query_ids"] == card["split"]["heldout_query_ids"]
    assert vcard["training"]["lora"] is False  # tiny base: full fine-tuning
    vfiles = {p.name for p in Path(trained.vlm.output).iterdir()}
    assert "model.safetensors" in vfiles and "config.json" in vfiles
    assert not [f for f in vfiles if f.endswith((".bin", ".pt", ".pth"))]


def test_checkpoint_for_another_architecture_is_a_clear_error(trained: TrainedModels, tmp_path: Path) -> None:
    from operators.models import ModelLoadError, ModelSpec, build_model, resolve_model

    cfg = json.loads((Path(__file__).parent.parent / "operators" / "model_configs" / "mmr-tiny.json").read_text())
    cfg["embed_dim"] = 32
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    rm = resolve_model(ModelSpec(name=str(tmp_path / "other.json"), pretrained=trained.clip.weights))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        build_model(rm)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model(ModelSpec(name="mmr-tiny", pretrained=str(tmp_path / "missing.safetensors")))


def test_rerank_uses_the_trained_reranker_as_is_and_matches_its_validation(trained: TrainedModels) -> None:
    """The nightly run with the trained directory as rerank.model scores the held-out queries exactly as the
    training's validation did: same prompt, processor and preprocessing on both paths."""
    from pipelines.evaluate import evaluate

    report = trained.run_b  # rerank.model: the trained directory as is
    m = evaluate(report.run_dir, str(Path(trained.vlm.output) / "heldout_qrels.txt"))
    val = trained.vlm.card["validation"]
    # Every metric of the card, to the digits it prints (6 decimals, so half a unit of the last one).
    assert set(val) <= set(m["rerank"]) and {"recall@10", "mrr@10", "ndcg@10"} <= set(val), (val, m["rerank"])
    for k, v in val.items():
        assert m["rerank"][k] == pytest.approx(v, abs=5e-7), (k, m["rerank"], val)
    # Same retriever as the candidates run: the retrieval stage equals the run the reranker was trained on.
    a = evaluate(trained.run_a.run_dir, str(Path(trained.vlm.output) / "heldout_qrels.txt"))
    assert m["retrieval"] == a["retrieval"]


def _reranked_heldout(trained: TrainedModels, captions: str = "own", image_position: str = "first") -> dict[str, float]:
    """Held-out metrics of the fine-tuned reranker alone over the retriever's candidates, scored in process
    with the backend's own prompt; ``captions="shuffled"`` gives each doc another doc's caption,
    ``image_position="last"`` puts the image after the prompt (the model was trained with it first)."""
    import numpy as np

    from operators.rerankers.base import RerankerSpec
    from operators.rerankers.vlm_yesno import VlmYesNoReranker
    from operators.training.data import read_candidates
    from operators.training.vlm import _validate
    from pipelines.evaluate import load_qrels

    st = Storage()
    s = trained.sample
    docs, _ = read_corpus(s.corpus, st, 10**8, ("PNG", "JPEG"))
    if captions == "shuffled":
        ids = sorted(docs)
        moved = np.random.default_rng(0).permutation(len(ids))
        docs = {d: (docs[d][0], docs[ids[int(j)]][1]) for d, j in zip(ids, moved, strict=True)}
    _run, cands = read_candidates(trained.run_a.run_dir, st)
    ts = build_training_set(read_queries(s.queries, st), docs, load_qrels(s.qrels, st), cands, 0.3, 0, 0, "hard", 4)
    rr = VlmYesNoReranker(RerankerSpec(backend="vlm_yesno", model=trained.vlm.output,
                                       extra={"image_position": image_position}))
    return _validate(rr, rr.model, ts, 32)


def test_finetuned_reranker_beats_the_retriever_and_broken_inputs_break_it(trained: TrainedModels) -> None:
    """The thesis on held-out queries (never trained on): the fine-tuned reranker alone ranks the retriever's
    candidates clearly better than the retriever; and it does so by reading what it is given, so a caption
    of another doc, or the image moved after the prompt, takes that gain away."""
    from pipelines.evaluate import evaluate

    m = evaluate(trained.run_b.run_dir, trained.heldout_qrels)
    gain = m["rerank"]["ndcg@10"] - m["retrieval"]["ndcg@10"]
    assert gain >= RERANK_MARGIN, (m["retrieval"], m["rerank"])
    own = _reranked_heldout(trained)
    assert own["ndcg@10"] == pytest.approx(m["rerank"]["ndcg@10"], abs=5e-7)  # the run's scores, in process
    for broken in (_reranked_heldout(trained, captions="shuffled"), _reranked_heldout(trained, image_position="last")):
        assert broken["ndcg@10"] <= own["ndcg@10"] - RERANK_MARGIN, (own, broken)


def test_two_workers_match_one(trained: TrainedModels, one_worker: Any, tmp_path: Path) -> None:
    """Data parallel correctness: same data, same global batch, 2 workers -> the same weights as 1."""
    import torch
    from safetensors.torch import load_file

    from pipelines.quickstart import TRAIN_CLIP_CONFIG
    from pipelines.train import run_train

    two = run_train(trained.config(TRAIN_CLIP_CONFIG, root=str(tmp_path / "root"), train={
        **SMALL_TRAIN, "num_workers": 2, "name": "dp-2", "output": str(tmp_path / "dp-2")}))
    weights, cards = {}, {}
    for n, r in ((1, one_worker), (2, two)):
        weights[n] = load_file(str(Path(r.output) / "model.safetensors"))
        cards[n] = r.card
        assert r.card["training"]["num_workers"] == n
    assert weights[1].keys() == weights[2].keys()
    for a, b in zip(cards[1]["history"], cards[2]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert {k: v for k, v in a.items() if "@" in k} == {k: v for k, v in b.items() if "@" in k}

    def comparable(name: str, t: Any) -> Any:
        # The key part of an attention in_proj_bias has no effect on any output (softmax is invariant to a
        # per-query constant), so its gradient is float noise that Adam scales up to lr-sized steps.
        if name.endswith("attn.in_proj_bias"):
            d = t.shape[0] // 3
            return torch.cat([t[:d], t[2 * d:]])
        return t

    diffs = {k: float((comparable(k, weights[1][k]) - comparable(k, weights[2][k])).abs().max()) for k in weights[1]}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda x: -x[1])[:3]


@pytest.mark.timeout(1800)
def test_kill_9_of_train_resumes_from_its_last_checkpoint(trained: TrainedModels, one_worker: Any,
                                                          tmp_path: Path) -> None:
    """``mmrerank train`` SIGKILLed with its whole Ray (driver, GCS, raylet, workers) once an epoch checkpoint
    exists; the same command resumes from that checkpoint and ends with the weights and history of an
    uninterrupted training of the same config (``one_worker``)."""
    import yaml
    from safetensors.torch import load_file

    from pipelines.quickstart import TRAIN_CLIP_CONFIG, _paths
    from pipelines.train import _last_checkpoint

    # SMALL_TRAIN: the kill lands after epoch 1 of 2, epoch 2 is resumed
    train = {**SMALL_TRAIN, "num_workers": 1}
    ref = one_worker

    root = tmp_path / "root"
    data = yaml.safe_load(TRAIN_CLIP_CONFIG.read_text())
    data.update(_paths(str(trained.out)), root=str(root), ray={"progress_bars": False, "num_cpus": 2})
    data["train"] = {**data["train"], **train, "name": "kill9"}
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    states = root / "training" / "kill9"

    def first_epoch_saved() -> bool:  # a whole checkpoint: one cut by the kill is what resume must skip
        return _last_checkpoint(Storage(), str(states)) is not None if states.exists() else False

    log1 = tmp_path / "killed.log"
    proc = spawn(["train", str(cfg_path)], log1, tmp_path)
    try:
        wait_until(proc, first_epoch_saved, "a checkpoint of the first epoch", log1)
    finally:
        kill_tree(proc)
    out = root / "models" / "kill9"
    assert not (out / "model_card.json").exists(), "killed, yet the training finished"

    log2 = tmp_path / "resumed.log"
    proc = spawn(["train", str(cfg_path)], log2, tmp_path)
    try:
        rc = proc.wait(timeout=CLI_DEADLINE_S)
    finally:
        kill_tree(proc)
    assert rc == 0, log_tail(log2)
    text = log2.read_text(errors="replace")
    assert "resuming from the checkpoint of epoch" in text, log_tail(log2)
    card = json.loads((out / "model_card.json").read_text())
    assert [h["epoch"] for h in card["history"]] == [h["epoch"] for h in ref.card["history"]]
    assert card["training"]["steps"] == ref.card["training"]["steps"]
    for a, b in zip(card["history"], ref.card["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(Path(ref.output) / "model.safetensors"))
    assert got.keys() == want.keys()
    diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in got)
    assert diff < 1e-5, diff
