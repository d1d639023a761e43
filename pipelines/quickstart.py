"""``mmrerank quickstart``: sample data + the nightly run (+ evaluation) on the embedded default."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from operators.storage import join, normalize
from pipelines.config import Config, parse_config
from pipelines.run import RunReport, run
from pipelines.sample import make_sample

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"


def quickstart_config(out: str) -> Config:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    out = normalize(out)
    data.update(root=join(out, "out"), corpus=join(out, "sample", "corpus"),
                queries=join(out, "sample", "queries"), qrels=join(out, "sample", "qrels.parquet"))
    return parse_config(data, str(DEFAULT_CONFIG))


def quickstart(out: str, docs: int = 200, queries: int = 20, shards: int = 4) -> RunReport:
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
    log.warning("the quickstart models have RANDOM weights: rankings are deterministic but meaningless. "
                "For real models set embed.model to {name: ViT-B-32, pretrained: laion2b_s34b_b79k} and "
                "rerank to e.g. {backend: blip_itm, model: Salesforce/blip-itm-base-coco}.")
    log.info("results: %s/results/*.parquet (one row per query x kept candidate); rejects: %s/rejects/",
             report.run_dir, report.run_dir)
    log.info("look at them: python -c \"import pyarrow.dataset as ds; "
             "print(ds.dataset('%s/results').to_table().to_pandas().head(20))\"", report.run_dir)
    log.info("serve them: mmrerank serve --root %s", cfg.root)
    return report
