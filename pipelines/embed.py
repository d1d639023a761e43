"""The embedding stage: corpus images and query texts -> per-shard embedding cache on Ray Data.

Layout (per model fingerprint, per input kind; paths from :mod:`operators.layout`)::

    <root>/embeddings/<model-fp>/model.json
    <root>/embeddings/<model-fp>/<kind>/<shard-key>/part-*.parquet, rejects-*.parquet, _SUCCESS.json
    <root>/embeddings/<model-fp>/<kind>/sets/<set-key>.json     the shards of one input, in order

A shard's entry is trusted only when its ``_SUCCESS.json`` exists (written last, after the row counts
check out): unchanged shards are reused, changed or new ones are embedded alone, and a shard that is no
longer in the input simply is not listed in the new set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from operators import layout as L
from operators.contracts import CORPUS, QUERY, InputKind
from operators.embedders import DecodeImages, EmbeddingsSink, ImageEmbedder, TextEmbedder
from operators.models import ResolvedModel, resolve_model
from operators.parts import make_datasink, tiling_errors
from operators.shard_source import ShardSource
from operators.shards import ShardPlan, list_shards, plan_shards, read_source
from operators.storage import Storage
from operators.watchdog import watch
from pipelines.config import Config
from pipelines.ray_env import actor_pool, ensure_ray
from pipelines.stage import StageResult

log = logging.getLogger(__name__)

KINDS: dict[str, InputKind] = {"corpus": CORPUS, "queries": QUERY}


@dataclass
class ShardStats:
    source: str
    key: str
    rows_in: int
    rows_ok: int
    rows_rejected: int
    reused: bool
    reject_types: dict[str, int] = field(default_factory=dict)


@dataclass
class EmbedResult(StageResult):
    """What one kind's embedding produced: where, how many, and what was reused."""

    kind: str
    model_fingerprint: str
    cache: str
    set_uri: str
    dim: int
    dtype: str
    shards: list[ShardStats]
    wall_s: float
    embed_s: float

    @property
    def rows_in(self) -> int:
        return sum(s.rows_in for s in self.shards)

    @property
    def rows_ok(self) -> int:
        return sum(s.rows_ok for s in self.shards)

    @property
    def rows_rejected(self) -> int:
        return sum(s.rows_rejected for s in self.shards)

    @property
    def rows_embedded_now(self) -> int:
        return sum(s.rows_in for s in self.shards if not s.reused)

    def counts(self) -> tuple[int, int, int]:
        return self.rows_in, self.rows_ok, self.rows_rejected

    def note(self) -> str:
        reused = sum(s.reused for s in self.shards)
        return f"{reused}/{len(self.shards)} shards reused" if reused else f"{len(self.shards)} shards embedded"

    def extra(self) -> dict[str, Any]:
        return {"rows_embedded": self.rows_embedded_now, "shards": len(self.shards),
                "shards_reused": sum(s.reused for s in self.shards)}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(rows_in=self.rows_in, rows_ok=self.rows_ok, rows_rejected=self.rows_rejected,
                 rows_embedded_now=self.rows_embedded_now,
                 throughput_rows_per_s=(self.rows_embedded_now / self.embed_s) if self.embed_s else None)
        return d


class EmbedIntegrityError(RuntimeError):
    """The rows written for a shard do not add up to its input rows (a bug, never ignored)."""


def _set_key(plans: list[tuple[ShardPlan, str]]) -> str:
    return hashlib.sha256(json.dumps([k for _, k in plans]).encode()).hexdigest()[:24]


def embed_kind(cfg: Config, kind: str, rm: ResolvedModel | None = None, storage: Storage | None = None,
               force: bool = False, plans: list[ShardPlan] | None = None) -> EmbedResult:
    """Embed one input (``corpus`` or ``queries``) into the cache; reuse shards already there."""
    t0 = time.perf_counter()
    storage = storage or Storage(cfg.storage.options())
    opts = cfg.storage.options()
    src = cfg.corpus if kind == "corpus" else cfg.queries
    if src is None:
        raise ValueError(f"{kind}: not set in the config")
    ik = KINDS[kind]
    rm = rm or resolve_model(cfg.embed.model, opts)
    e = cfg.embed
    if plans is None:
        plans = plan_shards(list_shards(src, storage), ik, storage)  # schema errors surface here
    cache = L.cache_dir(cfg.root, rm.fingerprint, kind)
    lim = e.decode_limits
    compute_id = f"{e.device}|{e.precision}|{e.dtype}|{lim.max_pixels}|{lim.max_bytes}|{lim.allowed_formats}"
    keyed = [(p, p.key(f"{rm.fingerprint}|{compute_id}")) for p in plans]

    stats: dict[str, ShardStats] = {}
    todo: list[tuple[ShardPlan, str]] = []
    for plan, key in keyed:
        marker = L.shard_marker(cache, key)
        if not force and storage.exists(marker):
            m = storage.read_json(marker)
            stats[key] = ShardStats(plan.uri, key, m["rows_in"], m["rows_ok"], m["rows_rejected"], True,
                                    m.get("reject_types", {}))
        else:
            storage.rm(L.cache_entry(cache, key), recursive=True)  # leftovers of an interrupted attempt
            todo.append((plan, key))

    embed_s = 0.0
    if not todo:
        log.info("%s: all %d shard(s) reused from cache %s: no embedding work", kind, len(plans), cache)
    else:
        rows = sum(p.num_rows for p, _ in todo)
        log.info("%s: embedding %d shard(s) / %d rows (%d shard(s) reused) with %s",
                 kind, len(todo), rows, len(plans) - len(todo), rm.describe())
        t1 = time.perf_counter()
        results = _run_pipeline(cfg, kind, rm, todo, cache)
        embed_s = time.perf_counter() - t1
        _finalize(storage, cache, todo, results, stats, rm, cfg)

    storage.write_json(L.model_json(cfg.root, rm.fingerprint), _model_json(rm))
    ordered = [stats[k] for _, k in keyed]
    set_uri = L.cache_set(cache, _set_key(keyed))
    result = EmbedResult(kind, rm.fingerprint, cache, set_uri, rm.embed_dim, e.dtype, ordered,
                         time.perf_counter() - t0, embed_s)
    storage.write_json(set_uri, {"input": src, "shards": [asdict(s) for s in ordered], "dim": rm.embed_dim,
                                 "dtype": e.dtype, "model_fingerprint": rm.fingerprint})
    return result


def _model_json(rm: ResolvedModel) -> dict[str, Any]:
    return {"arch": rm.arch, "name": rm.spec.name, "weights": rm.weights, "weights_id": rm.weights_id,
            "embed_dim": rm.embed_dim, "preprocess": asdict(rm.preprocess), "fingerprint": rm.fingerprint}


def _run_pipeline(cfg: Config, kind: str, rm: ResolvedModel, todo: list[tuple[ShardPlan, str]],
                  cache: str) -> list[dict[str, Any]]:
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    opts = cfg.storage.options()
    res = ensure_ray(cfg.ray)
    # Both the read(+decode) and the write tasks must fit next to the pool, one at a time. Query texts are
    # light work: a second text model would cost more to load than it saves (bench_run, 100 queries:
    # 15.4 s with two actors, 10.2 s with one).
    device, n_actors, actor_res, threads = actor_pool(e, res, "embed", max(e.decode_num_cpus, e.write_num_cpus),
                                                      auto_cpu_actors=2 if kind == "corpus" else 1)
    idc = KINDS[kind].id_column
    # Same resources as decode, so read+decode fuse into one task (no extra object-store hop). With several
    # actors, one batch per read task: a read task's output reaches the pool as one bundle (Ray Data merges
    # the blocks it yields), and the first actor ready takes up to 4 bundles at once; with a few large read
    # tasks that left the second actor without work.
    rows = e.rows_per_read_task if n_actors == 1 else min(e.rows_per_read_task, e.batch_size)
    ds = read_source(ShardSource(todo, idc, opts, rows), num_cpus=e.decode_num_cpus)
    kwargs: dict[str, Any] = {"model": rm, "device": device, "precision": e.precision, "torch_threads": threads,
                              "out_dtype": e.dtype, "storage_options": opts}
    batch_format = "numpy"
    if kind == "corpus":
        decoder = DecodeImages(rm.preprocess, *e.decode_limits, opts)
        if e.decode_in_actor is True or (e.decode_in_actor == "auto" and device == "cpu"):
            kwargs["decoder"], batch_format = decoder, "pyarrow"
        else:
            ds = ds.map_batches(decoder, batch_format="pyarrow", batch_size=e.batch_size, num_cpus=e.decode_num_cpus)
        actor_cls: type = ImageEmbedder
    else:
        actor_cls = TextEmbedder
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=kwargs,
        # A second call in flight: Ray Data batches the next input while the model runs (the UDF itself
        # still runs one at a time).
        compute=ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=2),
        batch_size=e.batch_size,
        batch_format=batch_format,
        **actor_res,
    )
    sink = make_datasink(EmbeddingsSink(cache, rm.embed_dim, e.dtype, f"embed_{kind}", opts), e.write_batch_size,
                         f"Write{kind.title()}Embeddings")
    with watch(f"embed {kind}", cfg.ray.stall_timeout_s):
        ds.write_datasink(sink, ray_remote_args={"num_cpus": e.write_num_cpus})
    return sink.results


def _finalize(storage: Storage, cache: str, todo: list[tuple[ShardPlan, str]], results: list[dict[str, Any]],
              stats: dict[str, ShardStats], rm: ResolvedModel, cfg: Config) -> None:
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault(r["shard"], []).append(r)
    for plan, key in todo:
        recs = sorted(by_key.get(key, []), key=lambda r: r["first_row"])
        ok = sum(r["rows_ok"] for r in recs)
        rej = sum(r["rows_rejected"] for r in recs)
        # Row by row, not only the counts: a dropped row and a duplicated one add up to the right total.
        missing, repeated = tiling_errors([rr for r in recs for rr in r["row_ranges"]], plan.num_rows)
        if ok + rej != plan.num_rows or missing or repeated:
            raise EmbedIntegrityError(
                f"{plan.uri}: {plan.num_rows} rows in but {ok} embedded + {rej} rejected were written "
                f"({missing} rows missing, {repeated} written more than once)")
        types: dict[str, int] = {}
        for r in recs:
            for t, c in r["reject_types"].items():
                types[t] = types.get(t, 0) + c
        storage.write_json(L.shard_marker(cache, key), {
            "source": plan.uri, "source_fingerprint": plan.fingerprint, "kind": plan.kind,
            "model_fingerprint": rm.fingerprint, "dim": rm.embed_dim, "dtype": cfg.embed.dtype,
            "rows_in": plan.num_rows, "rows_ok": ok, "rows_rejected": rej, "reject_types": types,
            "parts": [r["part"] for r in recs if r["part"]],
            "rejects": [r["rejects"] for r in recs if r["rejects"]],
        })
        stats[key] = ShardStats(plan.uri, key, plan.num_rows, ok, rej, False, types)


def run_embed(cfg: Config, kinds: tuple[str, ...] = ("corpus", "queries"), force: bool = False) -> list[EmbedResult]:
    """Embed every configured input kind; the model is resolved (and checked) once, before any work."""
    storage = Storage(cfg.storage.options())
    storage.check_reachable(cfg.root)
    rm = resolve_model(cfg.embed.model, cfg.storage.options())
    sources = {k: cfg.corpus if k == "corpus" else cfg.queries for k in kinds}
    # Plan (and schema-check) every input before embedding anything.
    planned = {k: plan_shards(list_shards(src, storage), KINDS[k], storage)
               for k, src in sources.items() if src is not None}
    return [embed_kind(cfg, k, rm, storage, force, plans) for k, plans in planned.items()]


def summary_lines(results: list[EmbedResult]) -> list[str]:
    lines = [f"{'input':<8} {'shards':>6} {'reused':>6} {'rows_in':>8} {'ok':>8} {'rejected':>8} "
             f"{'rows/s':>8}  cache"]
    for r in results:
        reused = sum(s.reused for s in r.shards)
        rate = f"{r.rows_embedded_now / r.embed_s:.1f}" if r.embed_s else "-"
        lines.append(f"{r.kind:<8} {len(r.shards):>6} {reused:>6} {r.rows_in:>8} {r.rows_ok:>8} "
                     f"{r.rows_rejected:>8} {rate:>8}  {r.cache}")
        types: dict[str, int] = {}
        for s in r.shards:
            for t, c in s.reject_types.items():
                types[t] = types.get(t, 0) + c
        if types:
            lines.append("         rejects: " + ", ".join(f"{t}={c}" for t, c in sorted(types.items())))
    return lines
