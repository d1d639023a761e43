"""``mmrerank run``: the nightly job, shards to published reranked results under one run_id.

Stages: embed corpus (cached per shard) -> index (reused when unchanged) -> embed queries -> search ->
rerank -> rejects -> stats -> ``_MANIFEST.json`` (last) -> ``LATEST`` (compare-and-swap). Ray starts while
the preflight checks run.

Resumable: ``_RUN.json`` marks a started run and ``_STAGES/<stage>.json`` a finished stage. Running the
same command again after a crash picks up the newest unfinished run of the same config (or
``--resume RUN_ID``): embedding and indexing are cache hits, finished stages are skipped, an
interrupted stage starts over on its own outputs (deterministic names: nothing duplicated or orphaned).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from operators import layout as L
from operators.embedding_cache import shard_marker
from operators.layout import MANIFEST
from operators.runs import read_latest
from operators.shards import list_shards, plan_shards
from operators.storage import Storage, join
from operators.watchdog import raise_if_terminated
from pipelines.config import Config
from pipelines.context import RunContext
from pipelines.embed import KINDS, embed_kind
from pipelines.index import build_index
from pipelines.publish import TMP, advance_latest, list_files, write_manifest
from pipelines.ray_env import ensure_ray
from pipelines.rerank import run_rerank
from pipelines.search import new_run_id, run_search

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
STAGES = ("embed_corpus", "index", "embed_queries", "search", "rerank", "rejects")


@dataclass
class RunReport:
    run_id: str
    run_dir: str
    resumed: bool
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    published: bool = False

    def table(self) -> list[str]:
        lines = [f"{'stage':<14} {'rows_in':>8} {'ok':>8} {'rejected':>8} {'time_s':>8} {'rows/s':>9}  note"]
        for name in STAGES:
            s = self.stages.get(name)
            if not s:
                continue
            rate = f"{s['rows_in'] / s['wall_s']:.1f}" if s.get("wall_s") and s.get("rows_in") else "-"
            lines.append(f"{name:<14} {s.get('rows_in', 0):>8} {s.get('rows_ok', 0):>8} "
                         f"{s.get('rows_rejected', 0):>8} {s.get('wall_s', 0.0):>8.1f} {rate:>9}  {s.get('note', '')}")
        lines.append(f"run {self.run_id}: {self.wall_s:.1f}s, output {self.run_dir}"
                     f"{' (published: LATEST)' if self.published else ''}")
        return lines


def config_fingerprint(cfg: Config) -> str:
    """What makes two runs "the same job" for resuming (where it runs and progress bars do not count)."""
    d = cfg.redacted_dump()
    d.pop("ray", None)
    for k in ("retries", "connect_timeout", "read_timeout", "retry_deadline_s"):
        d.get("storage", {}).pop(k, None)  # how patiently storage is reached, not what is computed
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def preflight(cfg: Config, storage: Storage, ctx: RunContext | None = None) -> None:
    """Everything that can fail without doing work: storage reachable, inputs there and well-formed,
    models and reranker resolvable. Raises with a message naming the problem (never a secret)."""
    ctx = ctx or RunContext(cfg)
    storage.check_reachable(cfg.root)
    for kind, src in (("corpus", cfg.corpus), ("queries", cfg.queries)):
        if src is None:
            raise ValueError(f"{kind}: `mmrerank run` needs both corpus and queries")
        storage.check_reachable(src)
        plan_shards(list_shards(src, storage), KINDS[kind], storage)
    _ = ctx.embed_model, ctx.reranker  # resolved once here, reused by the stages
    from operators.faiss_shards import check_factory

    check_factory(cfg.index.factory, 8 if "PQ" not in cfg.index.factory else 64)


def start(cfg: Config, storage: Storage, ctx: RunContext | None = None) -> dict[str, float]:
    """Preflight and Ray's start at once; returns the cluster's resources.

    The checks are mostly the driver importing open_clip on one core while a local Ray's processes start
    on the others (bench_run: ~4 s each, one after the other before). A failed check is the error raised,
    once Ray is up (also when Ray itself failed to start); nothing has been written by then.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="preflight") as ex:
        checked = ex.submit(preflight, cfg, storage, ctx) if ctx is not None else ex.submit(preflight, cfg, storage)
        try:
            res = ensure_ray(cfg.ray)  # on the main thread: ray.init installs its SIGTERM handler only there
        finally:
            checked.result()
    return res


def find_unfinished(storage: Storage, cfg: Config) -> str | None:
    """Newest run of this config that started but never wrote its manifest."""
    fp = config_fingerprint(cfg)
    best: tuple[str, str] | None = None
    for run_id in storage.listdir(L.runs_dir(cfg.root)):
        run_dir = L.run_dir(cfg.root, run_id)
        try:
            meta = storage.read_json(L.run_marker(run_dir))
        except FileNotFoundError:
            continue
        if meta.get("config_fingerprint") == fp and not storage.exists(L.manifest_uri(run_dir)):
            if best is None or meta["started"] > best[0]:
                best = (meta["started"], run_id)
    return best[1] if best else None


def run(cfg: Config, resume: str | None = None, run_id: str | None = None, publish: bool = True) -> RunReport:
    """The nightly job. Safe to re-run after a crash: it resumes the unfinished run of this config."""
    t0 = time.perf_counter()
    ctx = RunContext(cfg)
    storage = ctx.storage
    start(cfg, storage, ctx)
    resumed = False
    if resume:
        run_id, resumed = resume, True
        if not storage.exists(L.run_marker(L.run_dir(cfg.root, resume))):
            raise ValueError(f"--resume {resume}: no such run under {cfg.root}/runs")
    elif run_id is None:
        found = find_unfinished(storage, cfg)
        run_id, resumed = (found, True) if found else (new_run_id(), False)
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = L.run_dir(cfg.root, run_id)
    if storage.exists(L.manifest_uri(run_dir)):
        latest, _ = read_latest(storage, cfg.root)
        created = storage.read_json(L.manifest_uri(run_dir)).get("created", "")
        if not (resumed and publish and (latest is None or latest.get("created", "") < created)):
            raise ValueError(f"run {run_id} is already complete ({run_dir}/{MANIFEST}); nothing to resume")
        # Complete but never published (the job failed at the LATEST step): publishing is all that is left.
        log.info("run %s is complete but not published; publishing it", run_id)
        advance_latest(storage, cfg.root, run_id)
        return RunReport(run_id=run_id, run_dir=run_dir, resumed=True, wall_s=time.perf_counter() - t0,
                         published=True,
                         stages=storage.read_json(L.stats_uri(run_dir)).get("stages", {}))
    if storage.exists(L.run_marker(run_dir)):
        started = storage.read_json(L.run_marker(run_dir))
        if started.get("config_fingerprint") != config_fingerprint(cfg):
            raise ValueError(f"run {run_id} was started with another config (fingerprint "
                             f"{str(started.get('config_fingerprint'))[:12]}, now {config_fingerprint(cfg)[:12]}): "
                             "start a new run instead of resuming it")
        for uri in list_files(storage, run_dir):  # a write killed mid-way leaves its temp file
            if TMP.search(uri):
                storage.rm(uri)
    else:
        storage.write_json(L.run_marker(run_dir), {
            "run_id": run_id, "config_fingerprint": config_fingerprint(cfg), "config": cfg.redacted_dump(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if resumed:
        log.info("resuming run %s", run_id)
    report = RunReport(run_id, run_dir, resumed)

    def done(stage: str) -> dict[str, Any] | None:
        uri = L.stage_marker(run_dir, stage)
        return storage.read_json(uri) if storage.exists(uri) else None

    def finish(stage: str, stats: dict[str, Any]) -> None:
        report.stages[stage] = stats
        storage.write_json(L.stage_marker(run_dir, stage), stats)
        raise_if_terminated()  # the stage's output is whole and kept: a resume skips it
        note = f" ({stats['note']})" if stats.get("note") else ""
        log.info("stage %s done: %s rows in, %s ok, %s rejected in %.1f s%s", stage, stats.get("rows_in"),
                 stats.get("rows_ok"), stats.get("rows_rejected"), float(stats.get("wall_s") or 0.0), note)
        log.debug("stage %s stats: %s", stage, {k: v for k, v in stats.items() if k != "shards"})

    rm = ctx.embed_model
    corpus = embed_kind(cfg, "corpus", rm, storage)
    finish("embed_corpus", corpus.stats())
    index = build_index(cfg, corpus, storage)
    finish("index", index.stats())
    queries = embed_kind(cfg, "queries", rm, storage)
    finish("embed_queries", queries.stats())

    prev = done("search")
    if prev is not None:
        report.stages["search"] = prev
    else:
        finish("search", run_search(cfg, run_id=run_id, storage=storage, index=index, rm=rm).stats())
    prev = done("rerank")
    if prev is not None:
        report.stages["rerank"] = prev
    else:
        finish("rerank", run_rerank(cfg, run_id, storage, corpus, spec=ctx.reranker).stats())
    t = time.perf_counter()
    n = _collect_embed_rejects(storage, run_dir, corpus, queries)
    finish("rejects", {"rows_in": n, "rows_ok": n, "rows_rejected": 0, "wall_s": time.perf_counter() - t,
                       "note": "embedding rejects copied into the run"})

    report.wall_s = time.perf_counter() - t0
    stats = {"run_id": run_id, "resumed": resumed, "wall_s": report.wall_s, "stages": report.stages,
             "config_fingerprint": config_fingerprint(cfg)}
    storage.write_json(L.stats_uri(run_dir), stats)
    write_manifest(storage, run_dir, run_id, {"config_fingerprint": config_fingerprint(cfg),
                                              "reranker": report.stages["rerank"].get("note", "")})
    if publish:
        raise_if_terminated()
        advance_latest(storage, cfg.root, run_id)
        report.published = True
    return report


def _collect_embed_rejects(storage: Storage, run_dir: str, *results: Any) -> int:
    """Copy the embedding rejects of this run's shards into ``<run>/rejects`` (deterministic names)."""
    n = 0
    for r in results:
        for s in r.shards:
            for name in shard_marker(storage, r.cache, s.key)["rejects"]:
                t = storage.read_table(join(L.cache_entry(r.cache, s.key), name))
                storage.write_table(join(L.stage_dir(run_dir, L.REJECTS), f"embed_{r.kind}-{s.key}-{name}"), t)
                n += t.num_rows
    return n
