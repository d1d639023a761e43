"""``mmrerank quickstart``: sample data + the nightly run (+ evaluation) on the embedded default.

Two modes. ``trained=True`` (the CLI default): the binding sample, ``mmrerank train`` of the tiny
retriever (clip) from its shipped pretrained base on the training queries, a nightly run with it,
``mmrerank train`` of the tiny yes/no reranker from its shipped base on that run's candidates (hard
negatives, listwise loss), a nightly run with both (the reranker's order), and retrieval vs rerank on the
held-out queries only. ``trained=False`` (``--random-weights``, and what the tests' fixtures use): the
default sample and the random-weight models, the smoke test of the pipeline itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators.storage import join, normalize
from pipelines.config import Config, parse_config
from pipelines.run import RunReport, run
from pipelines.sample import SampleInfo, make_sample
from pipelines.train import TrainReport

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "quickstart.yaml"
TRAIN_CLIP_CONFIG = CONFIGS / "train-clip.yaml"
TRAIN_VLM_CONFIG = CONFIGS / "train-vlm.yaml"
TRAINED_DOCS, TRAINED_QUERIES = 640, 160  # 160 concept groups of 4 docs, one query each (114 trained on)


def _paths(out: str) -> dict[str, str]:
    out = normalize(out)
    return {"root": join(out, "out"), "corpus": join(out, "sample", "corpus"),
            "queries": join(out, "sample", "queries"), "qrels": join(out, "sample", "qrels.parquet")}


def _merged(path: Path, out: str, **sections: Any) -> Config:
    data = yaml.safe_load(path.read_text())
    data.update(_paths(out))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data, str(path))


def quickstart_config(out: str) -> Config:
    return _merged(DEFAULT_CONFIG, out)


def quickstart(out: str, docs: int = 200, queries: int = 20, shards: int = 4, trained: bool = False) -> RunReport:
    if trained:
        return _trained(out, docs, queries, shards)
    cfg = quickstart_config(out)
    info = make_sample(join(normalize(out), "sample"), docs=docs, queries=queries, shards=shards, seed=0,
                       bad_rows=True)
    log.info("sample: %d docs (+%d deliberately broken/odd rows) in %d shards, %d queries",
             info.docs, len(info.bad_rows), info.shards, info.queries_n)
    report = run(cfg)
    for line in report.table():
        log.info("%s", line)
    from pipelines.evaluate import evaluate, format_table

    if cfg.qrels:
        for line in format_table(evaluate(report.run_dir, cfg.qrels)):
            log.info("%s", line)
    log.warning("the quickstart models have RANDOM weights (--random-weights): rankings are deterministic but "
                "meaningless. Without the flag the quickstart trains them first; for real models set embed.model "
                "to {name: ViT-B-32, pretrained: laion2b_s34b_b79k} and rerank to e.g. "
                "{backend: blip_itm, model: Salesforce/blip-itm-base-coco}.")
    _where(report, cfg)
    return report


def _where(report: RunReport, cfg: Config) -> None:
    log.info("results: %s/results/*.parquet (one row per query x kept candidate); rejects: %s/rejects/",
             report.run_dir, report.run_dir)
    log.info("look at them: python -c \"import pyarrow.dataset as ds; "
             "print(ds.dataset('%s/results').to_table().to_pandas().head(20))\"", report.run_dir)
    log.info("serve them: mmrerank serve --root %s", cfg.root)


@dataclass
class FineTuned:
    """What the quickstart's recipe builds under ``out``: the sample, the retriever fine-tuned from the shipped
    base, a retrieval-only run with it (the reranker's hard negatives), and the reranker fine-tuned from its
    shipped base on that run's candidates."""

    out: str
    sample: SampleInfo
    clip: TrainReport
    candidates: RunReport
    vlm: TrainReport
    vlm_cfg: Config = field(repr=False)  # the reranker's training config: its prompt and answer words

    @property
    def retriever(self) -> dict[str, Any]:
        return {"name": self.clip.card["base_model"]["name"], "pretrained": self.clip.weights}

    @property
    def heldout_qrels(self) -> str:
        from pipelines.train import HELDOUT_QRELS

        return join(self.vlm.output, HELDOUT_QRELS)

    def rerank(self, model: str | None = None, fusion: str = "none") -> dict[str, Any]:
        """The rerank section of a nightly run with the fine-tuned reranker (or ``model``) and ``fusion``."""
        keep = {k: getattr(self.vlm_cfg.rerank, k) for k in ("positive_token", "negative_token", "use_caption")}
        return {**keep, "backend": "vlm_yesno", "model": model or self.vlm.output, "batch_size": 32,
                "fusion": {"method": fusion}}

    def run_config(self, out: str | None = None, **rerank: Any) -> Config:
        """The nightly run's config with both fine-tuned models, on this sample (or the sample under ``out``)."""
        return _merged(DEFAULT_CONFIG, out or self.out, embed={"model": self.retriever}, rerank=self.rerank(**rerank))


def fine_tune(out: str, docs: int = TRAINED_DOCS, queries: int = TRAINED_QUERIES, shards: int = 4, seed: int = 0,
              negatives: str = "hard", bad_rows: bool = True, log_steps: bool = True,
              train: dict[str, Any] | None = None) -> FineTuned:
    """Steps 1-4 of the quickstart: the binding sample (``seed``), ``mmrerank train`` of the retriever and then
    of the reranker (``negatives``: hard = the run's candidates, random = random corpus docs), both from the
    shipped pretrained bases (``operators/bases``, checked against their cards before any work)."""
    from operators.bases import reranker_dir, retriever_weights
    from pipelines.train import run_train

    say = log.info if log_steps else log.debug
    info = make_sample(join(normalize(out), "sample"), docs=docs, queries=queries, shards=shards, seed=seed,
                       bad_rows=bad_rows, binding=True)
    say("[1/6] sample: %d docs in groups of 4 around one binding concept (+%d broken/odd rows), %d queries",
        info.docs, len(info.bad_rows), info.queries_n)
    clip_cfg = _merged(TRAIN_CLIP_CONFIG, out, embed={"model": {"name": "mmr-tiny", "pretrained": retriever_weights()}},
                       train=dict(train or {}))
    clip = run_train(clip_cfg)
    say("[2/6] retriever fine-tuned from the shipped base:")
    for line in clip.lines():
        say("%s", line)
    retriever = {"name": clip_cfg.embed.model.name, "pretrained": clip.weights}
    first = run(_merged(DEFAULT_CONFIG, out, embed={"model": retriever}, rerank={"backend": "none"}), publish=False)
    say("[3/6] nightly run with the fine-tuned retriever (retrieval only): %s", first.run_dir)
    vlm_cfg = _merged(TRAIN_VLM_CONFIG, out, rerank={"model": reranker_dir()},
                      train={**(train or {}), "candidates": first.run_dir, "negatives": negatives})
    vlm = run_train(vlm_cfg)
    say("[4/6] reranker fine-tuned from the shipped base on the run's candidates (%s negatives):", negatives)
    for line in vlm.lines():
        say("%s", line)
    if clip.card["split"]["heldout_query_ids"] != vlm.card["split"]["heldout_query_ids"]:
        raise RuntimeError("the two trainings held out different queries (same split settings expected)")
    return FineTuned(out, info, clip, first, vlm, vlm_cfg)


def _trained(out: str, docs: int, queries: int, shards: int) -> RunReport:
    from pipelines.evaluate import evaluate, format_table

    ft = fine_tune(out, docs, queries, shards)
    # The reranker's order alone: over seeds and new corpora it beats rank fusion with the weaker retriever
    # (benchmarks/bench_quality.py, docs/rerankers-and-training.md "Training"); fusion.method: rrf is one --set away.
    cfg = ft.run_config()
    report = run(cfg)
    log.info("[5/6] nightly run with the fine-tuned retriever and reranker:")
    for line in report.table():
        log.info("%s", line)
    log.info("[6/6] held-out queries only (%d, never trained on): mmrerank eval --run %s --qrels %s",
             len(ft.vlm.card["split"]["heldout_query_ids"]), report.run_dir, ft.heldout_qrels)
    for line in format_table(evaluate(report.run_dir, ft.heldout_qrels)):
        log.info("%s", line)
    _where(report, cfg)
    return report
