"""``mmrerank train CONFIG``: fine-tune the retriever (``clip``) or the reranker (``vlm_yesno``) on qrels with
Ray Train's ``TorchTrainer`` (data-parallel workers: one per GPU on clusters, CPU workers locally).

The driver checks the config and inputs, builds the training set (seeded split by query id, negatives
from a run's candidates), runs the trainer with a checkpoint per epoch under ``<root>/training/<name>``
(a killed ``train`` run again resumes from the last one: same name, Ray Train restores its run) and
writes the output directory: the weights (safetensors), ``model_card.json`` and the held-out qrels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from operators import layout as L
from operators.models import ModelLoadError, resolve_model
from operators.storage import Storage, arrow_filesystem, join, scheme_of
from operators.training.common import OUTPUT_DIR, STATE_FILE, checkpoint_problem
from operators.training.data import (
    build_training_set,
    read_candidates,
    read_corpus,
    read_queries,
)
from pipelines.config import Config, ConfigError

log = logging.getLogger(__name__)

CARD = "model_card.json"
HELDOUT_QRELS = "heldout_qrels.txt"  # TREC qrels of the held-out queries: `mmrerank eval --qrels` it
CARD_VERSION = 1


@dataclass(frozen=True)
class TrainReport:
    name: str
    output: str
    card: dict[str, Any]
    reused: bool
    wall_s: float

    @property
    def weights(self) -> str:
        """The clip checkpoint file, or the vlm_yesno model / adapter directory."""
        return join(self.output, "model.safetensors") if self.card["target"] == "clip" else self.output

    def lines(self) -> list[str]:
        v = self.card.get("validation", {})
        shown = ", ".join(f"{k} {v[k]:.3f}" for k in ("recall@1", "recall@10", "mrr@10", "ndcg@10") if k in v)
        c = self.card["data"]["counts"]
        return [f"train {self.card['target']} {self.name}: {c['train_queries']} training / {c['heldout_queries']} "
                f"held-out queries, {c['examples']} examples, {self.card['training']['steps']} steps"
                f"{' (reused)' if self.reused else ''} in {self.wall_s:.1f} s",
                f"  held-out: {shown}",
                f"  output: {self.output} ({'use as ' + self.card['use_as']})"]


def _fingerprint(cfg: Config) -> str:
    """What the trained weights depend on: the train section, the data URIs, the base and the prompt."""
    tc = cfg.train
    assert tc is not None
    parts = {"train": tc.model_dump(mode="json", exclude={"name", "output", "num_workers", "use_gpu",
                                                           "worker_num_cpus"}),
             "data": [cfg.corpus, cfg.queries, cfg.qrels], "embed_model": cfg.embed.model.model_dump(mode="json")}
    if tc.target == "vlm_yesno":
        r = cfg.rerank
        parts["rerank"] = {k: getattr(r, k) for k in ("model", "revision", "prompt", "prompt_no_caption",
                                                      "positive_token", "negative_token", "use_caption",
                                                      "max_length", "options")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _checked(cfg: Config) -> tuple[Any, str, str]:
    tc = cfg.train
    if tc is None:
        raise ConfigError("train: the config has no train section (see docs/rerankers-and-training.md, 'Training')")
    missing = [k for k in ("corpus", "queries", "qrels") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"train needs {', '.join(missing)} in the config")
    fp = _fingerprint(cfg)
    name = tc.name or f"{tc.target}-{fp[:12]}"
    return tc, name, tc.output or L.model_dir(cfg.root, name)


def _base(cfg: Config, storage: Storage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loop's model inputs and the card's description of the base (checked before any work)."""
    from pipelines.context import reranker_spec

    tc = cfg.train
    assert tc is not None
    if tc.target == "clip":
        rm = resolve_model(tc.clip_model or cfg.embed.model, cfg.storage.options())
        return {"resolved": rm}, {"kind": "open_clip", "name": rm.arch, "weights": rm.weights,
                                  "weights_id": rm.weights_id, "fingerprint": rm.fingerprint}
    base = tc.model or cfg.rerank.model
    if not base:
        raise ConfigError("train.model: target vlm_yesno needs a base model (train.model or rerank.model)")
    if (scheme_of(base) != "file" or os.path.isabs(base)) and not storage.exists(join(base, "config.json")):
        raise ModelLoadError(f"train.model: no model at {base} (config.json missing)")
    rc = cfg.rerank.model_copy(update={"backend": "vlm_yesno", "model": base, "lora_adapter": None})
    return {"spec": reranker_spec(rc, cfg)}, {"kind": "transformers", "model": base, "revision": cfg.rerank.revision}


def _write_output(storage: Storage, ckpt_dir: str, output: str) -> dict[str, str]:
    """Copy the checkpoint's deliverable to ``output``; sha256 of every file written."""
    src = Path(ckpt_dir) / OUTPUT_DIR
    hashes = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        data = f.read_bytes()
        storage.write_bytes(join(output, rel), data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def _last_checkpoint(storage: Storage, run_dir: str) -> str | None:
    """The run's checkpoint with the most steps among the whole ones (its manifest matches every file), or None.

    Ray Train restores its own run state only while its controller lives; after a kill -9 of the driver the
    same command starts a new Ray Train run, and the loop loads this checkpoint (``resume_from``: v2 has no
    ``resume_from_checkpoint``). A kill during Ray Train's copy leaves a checkpoint with some file cut: skipped."""
    best: tuple[int, str] | None = None
    for name in storage.listdir(run_dir):
        # Checkpoints are directories; Ray Train keeps its own files beside them (checkpoint_manager_snapshot.json)
        if not name.startswith("checkpoint_") or storage.info(join(run_dir, name)).get("type") != "directory":
            continue
        problem = checkpoint_problem(storage, join(run_dir, name))
        if problem is not None:
            log.warning("checkpoint %s is not whole (%s): skipped", name, problem)
            continue
        step = int(storage.read_json(join(run_dir, name, STATE_FILE)).get("step", -1))
        if best is None or step > best[0]:
            best = (step, name)
    return None if best is None else best[1]


def run_train(cfg: Config, storage: Storage | None = None) -> TrainReport:
    """Train ``cfg.train.target``; reuses a finished output of the same fingerprint, resumes a killed run."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.evaluate import load_qrels
    from pipelines.ray_env import auto_threads, ensure_ray

    t0 = time.monotonic()
    tc, name, output = _checked(cfg)
    storage = storage or Storage(cfg.storage.options())
    fp = _fingerprint(cfg)
    card_uri = join(output, CARD)
    if storage.exists(card_uri):
        card = storage.read_json(card_uri)
        if card.get("fingerprint") == fp:
            log.info("train %s: %s already holds this training (same fingerprint): reused", name, output)
            return TrainReport(name, output, card, True, time.monotonic() - t0)
        raise ConfigError(f"train.output: {output} holds another training ({card.get('name')}); "
                          "choose another train.output or remove it")
    loop_inputs, base_card = _base(cfg, storage)
    ec = cfg.embed
    assert cfg.corpus and cfg.queries and cfg.qrels
    texts = read_queries(cfg.queries, storage)
    docs, skipped = read_corpus(cfg.corpus, storage, *ec.decode_limits)
    qrels = load_qrels(cfg.qrels, storage)
    run_dir, candidates = read_candidates(tc.candidates, storage) if tc.candidates else (None, None)
    ts = build_training_set(texts, docs, qrels, candidates, tc.heldout_fraction, tc.split_seed, tc.seed,
                            tc.negatives, tc.negatives_per_query, caption_pairs=tc.caption_pairs)
    ts.limits = ec.decode_limits
    log.info("train %s: %s (skipped %d corpus rows that do not decode)", name,
             ", ".join(f"{k} {v}" for k, v in ts.counts.items()), skipped)

    res = ensure_ray(cfg.ray)
    use_gpu = (res.get("GPU", 0) > 0) if tc.use_gpu == "auto" else bool(tc.use_gpu)
    cores = max(1, int(res.get("CPU", 1)))
    if tc.target == "clip":
        from operators.training.clip import train_loop
    else:
        from operators.training.vlm import train_loop
    config = {**loop_inputs, "data": ray.put(ts), "seed": tc.seed, "epochs": tc.epochs,
              "batch_size": tc.batch_size, "loss": tc.loss, "lr": tc.lr, "weight_decay": tc.weight_decay,
              "hard_negatives": tc.negatives != "none", "lora": tc.lora.model_dump(),
              "eval_batch_size": cfg.rerank.batch_size, "storage_options": cfg.storage.options(),
              "torch_threads": auto_threads(cores // tc.num_workers) if not use_gpu else 0}
    fs, path = arrow_filesystem(join(cfg.root, L.TRAINING), cfg.storage.options())
    resume = _last_checkpoint(storage, L.training_dir(cfg.root, name))
    if resume is not None:
        log.info("train %s: resuming from %s", name, resume)
        config["resume_from"] = join(L.training_dir(cfg.root, name), resume)  # Ray Train v2: the loop loads it
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": tc.worker_num_cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0)))
    log.info("train %s: %d %s worker(s), checkpoints under %s", name, tc.num_workers, "GPU" if use_gpu else "CPU",
             L.training_dir(cfg.root, name))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train {name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        hashes = _write_output(storage, d, output)
    heldout = set(ts.heldout_ids)
    storage.write_bytes(join(output, HELDOUT_QRELS), "".join(
        f"{q} 0 {doc} {rel}\n" for q in sorted(heldout) for doc, rel in sorted(qrels[q].items())).encode())
    last = state["history"][-1] if state["history"] else {}
    card = {
        "format_version": CARD_VERSION, "name": name, "target": tc.target, "fingerprint": fp,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_card,
        "data": {"corpus": cfg.corpus, "queries": cfg.queries, "qrels": cfg.qrels, "candidates": run_dir,
                 "counts": ts.counts, "skipped_corpus_rows": skipped},
        "split": {"by": "query_id", "heldout_fraction": tc.heldout_fraction, "split_seed": tc.split_seed,
                  "heldout_qrels": HELDOUT_QRELS, "heldout_query_ids": ts.heldout_ids},
        "training": {"epochs": tc.epochs, "steps": state["step"], "batch_size": tc.batch_size, "loss": tc.loss,
                     "lr": tc.lr,
                     "weight_decay": tc.weight_decay, "seed": tc.seed, "num_workers": tc.num_workers,
                     "use_gpu": use_gpu, "negatives": tc.negatives, "negatives_per_query": tc.negatives_per_query,
                     "lora": bool(state.get("lora", False)), "library": "ray.train.torch.TorchTrainer"},
        "history": state["history"],
        "validation": {k: v for k, v in last.items() if "@" in k},
        "weights": hashes,
        "use_as": (f"embed.model (or rerank.clip_model): {{name: {base_card.get('name')}, pretrained: "
                   f"{join(output, 'model.safetensors')}}}" if tc.target == "clip" else
                   (f"rerank.lora_adapter: {output} (rerank.model: the base)" if state.get("lora")
                    else f"rerank.model: {output}")),
    }
    storage.write_json(card_uri, card)  # last: its presence means the output is complete
    return TrainReport(name, output, card, False, time.monotonic() - t0)
