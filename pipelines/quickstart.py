"""``mmrerank quickstart``: sample data + the pipeline on the embedded default, in one command."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from operators.storage import join, normalize
from pipelines.config import Config, parse_config
from pipelines.embed import EmbedResult, run_embed, summary_lines
from pipelines.sample import make_sample

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"


def quickstart_config(out: str) -> Config:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    out = normalize(out)
    data.update(root=join(out, "out"), corpus=join(out, "sample", "corpus"),
                queries=join(out, "sample", "queries"))
    return parse_config(data, str(DEFAULT_CONFIG))


def quickstart(out: str, docs: int = 200, queries: int = 20, shards: int = 4) -> list[EmbedResult]:
    cfg = quickstart_config(out)
    info = make_sample(join(normalize(out), "sample"), docs=docs, queries=queries, shards=shards, seed=0,
                       bad_rows=True)
    log.info("sample: %d docs (+%d deliberately broken/odd rows) in %d shards, %d queries",
             info.docs, len(info.bad_rows), info.shards, info.queries_n)
    results = run_embed(cfg)
    for line in summary_lines(results):
        log.info("%s", line)
    log.warning("the quickstart model has RANDOM weights: embeddings are deterministic but meaningless. "
                "For a real model set embed.model to {name: ViT-B-32, pretrained: laion2b_s34b_b79k}.")
    log.info("outputs under %s; look at them with: python -c \"import glob, pyarrow.parquet as pq; "
             "print(pq.read_table(glob.glob('%s/*/part-*.parquet')).slice(0, 5))\"",
             cfg.root, results[0].cache)
    return results
