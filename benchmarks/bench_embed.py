"""Embedding benchmark: the Ray Data embed pipeline against the best plain loop (N one-thread processes).

Both sides embed the same N synthetic corpus images (``pipelines.sample.make_sample``) with the same
model (an open_clip architecture with seeded random weights, e.g. ``ViT-B-32`` or the shipped
``mmr-tiny``) on the CPU, fp32, and the same batch size::

    python benchmarks/bench_embed.py --model ViT-B-32 --images 1000 --batch-size 32
    python benchmarks/bench_embed.py --model mmr-tiny --images 200 --json out.json
    python benchmarks/bench_embed.py --model ViT-B-32 --set embed.decode_num_cpus=0.25
    python benchmarks/bench_embed.py --model ViT-B-32 --rounds 3 --raw-layouts Nx1,1xN
    python benchmarks/bench_embed.py --quick --wait-idle 0                       # smoke

Each side runs in its own fresh subprocess, so peak RSS is clean and nothing is shared or warm.

plain loop: the best plain loop on this box
    ``--raw-layouts`` (default ``Nx1``: as many one-thread worker processes as the pipeline has CPU embedder
    actors, one per CPU; ``Nx1,1xN`` adds the one-process-all-threads row), ``_common.run_workers``. Each
    spawned worker (``torch.set_num_threads``) resolves and builds the model and reads its equal contiguous
    slice of the images' bytes (pyarrow) before it reports ready; timed from every worker ready until the last
    one is done: PIL decodes (``operators.decode.decode_image``, the pipeline's own semantics),
    ``operators.models.image_transform`` preprocesses, the model encodes batches of ``--batch-size``, the
    features are L2-normalised. Start-up = spawn until every worker is ready; steady = the timed part.

ray pipeline
    ``pipelines.embed.embed_kind(cfg, "corpus", force=True)`` on a fresh local Ray (``ray.init`` in that
    subprocess, never reused from an earlier run), writing to a fresh root. To see where the time goes
    the subprocess swaps in thin subclasses of ``ImageEmbedder`` / ``DecodeImages`` and a wrapper around
    ``_run_pipeline`` that only append wall-clock timestamps to a file (a few microseconds per batch);
    the computation is the pipeline's own. Start-up = ``ray.init`` + resolving the model and planning
    the shards in the driver (schema check, fingerprints, the open_clip import) + Ray Data start + the
    embedder actor's process start, imports and model load, i.e. everything from the start until the
    actor's constructor returns: the earliest moment the model could encode. Decode tasks already run
    during the actor's start-up; that overlap is the pipeline's to keep, so it is not taken out.
    Steady = the rest (encode, the write tail and the ``_SUCCESS`` markers); end-to-end = both (not
    ``ray.shutdown``). ``--pipeline-runs K`` (K > 1) runs the pipeline again in the same Ray session:
    those runs reuse Ray's pooled task workers (imports done) but start a new actor and load the model
    again; they show the warm cost and are never the headline.

peak memory
    plain loop: the sum of its processes' peaks (VmHWM), as below. Pipeline: a sampler thread in the
    driver reads ``/proc/<pid>/status`` of the driver and every process descended from it (the local Ray
    instance: gcs_server, raylet, agents, and the raylet's worker processes) every ``--rss-interval`` s.
    "peak RSS" is the sum of per-process peaks (VmHWM), split into driver / Ray workers (tasks + actor) /
    Ray system processes: an upper bound, since the peaks need not coincide and shared pages (torch's
    libraries, the object store) count once per process. "peak PSS" (both sides, every 5th sample) is
    the sampled peak of the summed ``smaps_rollup`` Pss, where shared pages are split among the processes
    mapping them: the fair total.

CPU
    each side records the CPU time of its own processes and the machine's busy time (``/proc/stat``), and
    warns when other processes took more than 5% of the machine: on a shared machine a wall-clock figure
    is only worth something when that share is ~0 (``--wait-idle`` waits for a quiet machine before each
    side). "steady CPU per image" (all processes of a side,
    steady phase only; its ratio plain/pipeline is the pipeline's CPU efficiency) is inflated by other
    load too (torch's OpenMP threads spin while a peer thread is descheduled), so compare quiet runs.

steady window (the rule both sides share)
    images encoded after the LAST embedder actor (plain: every worker) was ready, a batch straddling that mark
    pro rata, / the time from the mark to the end (pipeline: ``embed_kind`` returns; plain: the last worker is
    done). Decode, preprocess and encode fall inside on both sides; reads happen where they happen (the
    pipeline's read tasks may run while its actors start; the plain workers read before they report ready).

The ratios (pipeline / plain, the plain loop of the same round) are printed, never asserted. ``--rounds N``
alternates the sides N times; the final markdown table shows median [min, max] over the rounds (the detailed
report above it is each side's median round). ``--quick``: smoke sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    add_layout_arg,
    add_set_arg,
    apply_sets,
    cpus,
    descendants,
    event,
    finish_pipeline_side,
    fmt,
    items_after,
    layout_name,
    machine_cpu_ticks,
    markdown_table,
    others_share,
    parse_layouts,
    parser,
    proc_files,
    read_events,
    run_side,
    run_workers,
    side_logging,
    split_even,
    spread,
    stop_ray,
    timed_actor,
    torch_threads,
    wait_idle,
)

MB = 1024 * 1024


# --- the plain loop -------------------------------------------------------------------------------------


def _plain_init(payload: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """In a raw worker, before it reports ready: the model, and its slice's image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.models import ModelSpec, build_model, image_transform, resolve_model

    t0 = time.perf_counter()
    rm = resolve_model(ModelSpec(name=payload["model"], pretrained=None, seed=payload["seed"]))
    model, _ = build_model(rm, "cpu", "fp32")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    items = payload["items"][part[0]:part[1]]  # (shard, row)
    rows: list[tuple[str, Any]] = []
    for shard in dict.fromkeys(sh for sh, _ in items):
        take = [r for sh, r in items if sh == shard]
        t = pq.read_table(shard, columns=["doc_id", "image"]).take(pa.array(take))
        rows += zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True)
    return {"model": model, "tf": image_transform(rm.preprocess), "rows": rows, "dim": rm.embed_dim,
            "load_s": load_s, "read_s": time.perf_counter() - t1, "batch_size": payload["batch_size"]}


def _plain_work(state: dict[str, Any], part: tuple[int, int]) -> dict[str, Any]:
    """In a raw worker, timed: decode (the pipeline's caps), preprocess, encode batches, L2-normalise."""
    import numpy as np
    import torch

    from operators import decode as R
    from operators.contracts import RejectError
    from pipelines.config import EmbedConfig

    caps = EmbedConfig()  # the pipeline's default decode caps and formats
    model, tf, bs = state["model"], state["tf"], state["batch_size"]
    ids: list[str] = []
    embs: list[np.ndarray] = []
    buf: list[np.ndarray] = []
    rejected = 0
    t_prep = t_enc = 0.0
    t = time.perf_counter()
    for k, (doc_id, data) in enumerate(state["rows"]):
        try:
            img = R.decode_image(data, caps.max_image_pixels, caps.allowed_formats, caps.max_image_bytes)
        except RejectError:
            rejected += 1
            continue
        buf.append(tf(img).numpy())
        ids.append(doc_id)
        if len(buf) == bs or k == len(state["rows"]) - 1:
            t2 = time.perf_counter()
            t_prep += t2 - t
            with torch.inference_mode():
                feats = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(np.stack(buf))).float(),
                                                      dim=-1)
            embs.append(feats.numpy())
            buf.clear()
            t = time.perf_counter()
            t_enc += t - t2
    if buf:  # the last rows were rejected after a partial batch
        with torch.inference_mode():
            embs.append(torch.nn.functional.normalize(model.encode_image(torch.from_numpy(np.stack(buf))).float(),
                                                      dim=-1).numpy())
    emb = np.concatenate(embs) if embs else np.zeros((0, state["dim"]), np.float32)
    return {"ids": ids, "emb": emb, "rejected": rejected, "decode_preprocess_s": t_prep, "encode_s": t_enc,
            "load_s": state["load_s"], "read_s": state["read_s"]}


def run_plain(a: argparse.Namespace) -> dict[str, Any]:
    """The best plain loop: ``--plain-layout`` worker processes, each over an equal slice of the images."""
    import numpy as np
    import pyarrow.parquet as pq

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    workers, threads = parse_layouts(a.plain_layout)[0]
    items = [(str(shard), r) for shard in sorted(Path(a.corpus).glob("*.parquet"))
             for r in range(pq.ParquetFile(shard).metadata.num_rows)]
    slices = split_even(len(items), workers)
    r = run_workers(_plain_init, _plain_work, {"model": a.model, "seed": a.seed, "batch_size": a.batch_size,
                                               "items": items}, slices, threads)
    sampler.stop()
    ws = r["workers_out"]
    ids = [i for w in ws for i in w["ids"]]
    emb = np.concatenate([w["emb"] for w in ws])
    np.save(Path(a.workdir) / "plain_embeddings.npy", emb)
    (Path(a.workdir) / "plain_ids.json").write_text(json.dumps(ids))
    rss = sampler.report()
    return {
        "side": "plain", "layout": [len(slices), threads], "workers": len(slices), "torch_threads": threads,
        "images": len(ids), "rejected": sum(w["rejected"] for w in ws),
        "startup_s": r["startup_s"], "steady_s": r["steady_s"], "e2e_s": r["e2e_s"],
        "model_load_s": max(w["load_s"] for w in ws), "read_s": max(w["read_s"] for w in ws),
        "read_decode_preprocess_s": max(w["decode_preprocess_s"] for w in ws),
        "encode_s": max(w["encode_s"] for w in ws), "worker_busy_s": [w["t1"] - w["t0"] for w in ws],
        "steady_cpu_s": r["steady_cpu_s"], "steady_img_s": len(ids) / r["steady_s"],
        "e2e_img_s": len(ids) / r["e2e_s"],
        "peak_rss_mb": rss["sum_of_process_peaks_mb"], "peak_pss_mb": sampler.peak_total_pss_kb / 1024, "rss": rss,
    }


# --- the Ray pipeline -----------------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (libtorch, the object store) split among their users."""
    try:
        for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if ln.startswith("Pss:"):
                return int(ln.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _role(pid: int, title: str) -> str:
    if pid == os.getpid():
        return "driver"
    if title.startswith("ray::") or "default_worker.py" in title or "multiprocessing.spawn" in title:
        return "ray_workers"  # (the plain loop's worker processes count here too)
    return "ray_system"


class ProcSampler(threading.Thread):
    """Polls /proc for this process and all its descendants (memory and CPU time).

    Keeps each process's peak VmHWM, the peak of the summed VmRSS and Pss at one instant, each
    process's CPU time, and the whole machine's busy time, so CPU used by processes outside this
    benchmark (the machine may be shared) can be reported.
    """

    def __init__(self, interval: float, pss_every: int = 5) -> None:
        super().__init__(daemon=True, name="proc-sampler")
        self.interval = interval
        # smaps_rollup walks the page tables (~10 ms for a process holding torch): read it less often.
        self.pss_every = max(1, pss_every)
        self.own_cpu_s = 0.0  # CPU time of this thread: the sampler's own cost, reported
        self._stop_ev = threading.Event()
        self.procs: dict[int, dict[str, Any]] = {}  # pid -> {"hwm_kb", "cpu_ticks", "title"}
        self.peak_total_rss_kb = 0
        self.peak_total_pss_kb = 0
        self.samples = 0
        # (time, CPU seconds so far of all our processes, of the embedder actor(s) only)
        self.series: list[tuple[float, float, float]] = []
        self._lock = threading.Lock()
        self._t0 = time.time()
        self._m0 = machine_cpu_ticks()
        self._t1, self._m1 = self._t0, self._m0

    def run(self) -> None:
        while not self._stop_ev.is_set():
            t = time.thread_time()
            self.sample()
            self.own_cpu_s += time.thread_time() - t
            self._stop_ev.wait(self.interval)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join()
        self.sample()
        self._t1, self._m1 = time.time(), machine_cpu_ticks()

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        total_rss = total_pss = 0
        with_pss = self.samples % self.pss_every == 0
        for pid in descendants(os.getpid()):
            files = proc_files(pid)
            if files is None:
                continue
            status, stat, title = files
            f = {ln.split(":", 1)[0]: ln.split(":", 1)[1] for ln in status.splitlines() if ":" in ln}

            def kb(key: str, f: dict[str, str] = f) -> int:
                return int(f[key].split()[0]) if key in f else 0

            total_rss += kb("VmRSS")
            total_pss += _pss_kb(pid) if with_pss else 0
            rec = self.procs.setdefault(pid, {"hwm_kb": 0, "cpu_ticks": 0, "title": ""})
            rec["hwm_kb"] = max(rec["hwm_kb"], kb("VmHWM"))
            rec["cpu_ticks"] = max(rec["cpu_ticks"], int(stat[11]) + int(stat[12]))  # utime + stime
            if title.strip():
                rec["title"] = title.strip()[:120]
        self.peak_total_rss_kb = max(self.peak_total_rss_kb, total_rss)
        self.peak_total_pss_kb = max(self.peak_total_pss_kb, total_pss)
        self.samples += 1
        tck = os.sysconf("SC_CLK_TCK")
        self.series.append((time.time(), sum(r["cpu_ticks"] for r in self.procs.values()) / tck,
                            sum(r["cpu_ticks"] for r in self.procs.values() if "Embedder" in r["title"]) / tck))

    def cpu_at(self, t: float, actor: bool = False) -> float:
        """CPU seconds our processes (or the embedder actors) had used by time ``t`` (first sample at or after)."""
        i = 2 if actor else 1
        return next((x[i] for x in self.series if x[0] >= t), self.series[-1][i] if self.series else 0.0)

    def report(self) -> dict[str, Any]:
        tck = os.sysconf("SC_CLK_TCK")
        mem = {"driver": 0.0, "ray_workers": 0.0, "ray_system": 0.0}
        cpu = dict.fromkeys(mem, 0.0)
        top: list[tuple[float, str]] = []
        for pid, rec in self.procs.items():
            role = _role(pid, rec["title"])
            mb = rec["hwm_kb"] / 1024
            mem[role] += mb
            cpu[role] += rec["cpu_ticks"] / tck
            top.append((mb, f"{role}: {rec['title']} (cpu {rec['cpu_ticks'] / tck:.1f} s)"))
        top.sort(reverse=True)
        ours = sum(cpu.values())
        machine = (self._m1[0] - self._m0[0]) / tck
        wall = self._t1 - self._t0
        return {
            "sum_of_process_peaks_mb": sum(mem.values()), **{f"{k}_mb": v for k, v in mem.items()},
            "peak_total_rss_mb": self.peak_total_rss_kb / 1024,
            "peak_total_pss_mb": self.peak_total_pss_kb / 1024,
            "processes": len(self.procs), "samples": self.samples, "sampler_cpu_s": self.own_cpu_s,
            "interval_s": self.interval, "pss_interval_s": self.interval * self.pss_every,
            "largest": [f"{mb:8.0f} MB  {t}" for mb, t in top[:8]],
            "cpu_s": {**cpu, "ours": ours, "machine_busy": machine, "others": max(0.0, machine - ours),
                      "wall": wall, "cores": os.cpu_count() or 1},
        }


def _timed_embedder(events: str) -> type:
    from operators.embedders import EMBEDDING, ImageEmbedder

    # The pipeline's ImageEmbedder, plus timestamps of its start-up and of every batch.
    return timed_actor(ImageEmbedder, events, "encode", init_rec=torch_threads,
                       call_rec=lambda batch, out: {"rows": len(out[EMBEDDING])})


def _timed_decode(events: str) -> type:
    from operators.embedders import DecodeImages

    class TimedDecodeImages(DecodeImages):
        """The pipeline's DecodeImages, plus a timestamp per batch."""

        def __call__(self, batch: Any) -> Any:
            t0 = time.time()
            out = super().__call__(batch)
            event(events, {"ev": "decode", "pid": os.getpid(), "t0": t0, "t1": time.time(),
                           "rows": batch.num_rows})
            return out

    return TimedDecodeImages


def _pipeline_config(a: argparse.Namespace, root: str) -> Any:
    from pipelines.config import parse_config

    data: dict[str, Any] = {
        "root": root,
        "corpus": a.corpus,
        "ray": {"progress_bars": False},
        "embed": {"model": {"name": a.model, "pretrained": None, "seed": a.seed},
                  "device": "cpu", "precision": "fp32", "batch_size": a.batch_size},
    }
    return parse_config(apply_sets(data, a.set), "bench_embed")


def _summarise_run(events: list[dict[str, Any]], t_start: float, t_run0: float, t_run1: float,
                   t_end: float, init_s: float, images: int) -> dict[str, Any]:
    actor = [e for e in events if e["ev"] == "actor_init"]
    enc = sorted((e for e in events if e["ev"] == "encode"), key=lambda e: e["t0"])
    dec = sorted((e for e in events if e["ev"] == "decode"), key=lambda e: e["t0"])
    ready = max((e["t1"] for e in actor), default=t_run1)
    e2e = t_end - t_start
    startup = ready - t_start
    out: dict[str, Any] = {
        "e2e_s": e2e, "startup_s": startup, "steady_s": e2e - startup,
        "startup_breakdown_s": {
            "ray_init": init_s,
            "resolve_and_plan": t_run0 - (t_start + init_s),
            "to_actor_constructor": (min(e["t0"] for e in actor) - t_run0) if actor else None,
            "actor_model_load": max(e["t1"] - e["t0"] for e in actor) if actor else None,
        },
        "actor_process_start_after_run_start_s": (min(e["proc_start"] for e in actor) - t_run0)
        if actor and all(e.get("proc_start") for e in actor) else None,
        "actor_torch_threads": [e["torch_threads"] for e in actor],
        "actors": len(actor),
        "encode_batches": len(enc),
        "encode_busy_s": sum(e["t1"] - e["t0"] for e in enc),
        "decode_batches": len(dec),
        "decode_busy_s": sum(e["t1"] - e["t0"] for e in dec),
        "decode_pids": len({e["pid"] for e in dec}),
        "tail_after_last_encode_s": (t_end - enc[-1]["t1"]) if enc else None,
        "finalize_s": t_end - t_run1,
    }
    if enc:
        first, last = enc[0]["t0"], enc[-1]["t1"]
        out["first_encode_after_actor_ready_s"] = first - ready
        out["encode_window_s"] = last - first
        out["actor_idle_in_window_s"] = (last - first) - out["encode_busy_s"]
        out["actor_rate_img_s"] = sum(e["rows"] for e in enc) / out["encode_busy_s"]
        out["encode_batch_sizes"] = sorted({e["rows"] for e in enc})
    if dec:
        out["decode_done_after_actor_ready_s"] = dec[-1]["t1"] - ready
    # The window rule both sides share: images encoded after the LAST actor was ready / the time from then.
    out["steady_images"] = items_after(enc, ready)
    out["images_before_ready"] = images - out["steady_images"]
    out["steady_img_s"] = out["steady_images"] / out["steady_s"] if out["steady_s"] > 0 else None
    out["e2e_img_s"] = images / e2e
    return out


def run_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    import ray

    import pipelines.embed as pe
    from pipelines.ray_env import ensure_ray

    sampler = ProcSampler(a.rss_interval)
    sampler.start()
    marks: dict[str, float] = {}
    orig = pe._run_pipeline

    def timed_run_pipeline(*args: Any, **kwargs: Any) -> Any:
        marks["run0"] = time.time()
        try:
            return orig(*args, **kwargs)
        finally:
            marks["run1"] = time.time()

    pe._run_pipeline = timed_run_pipeline
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"side": "pipeline"}
    try:
        for k in range(a.pipeline_runs):
            root = str(Path(a.workdir) / f"pipeline-root-{os.getpid()}-{k}")
            cfg = _pipeline_config(a, root)
            events = Path(a.workdir) / f"pipeline-events-{os.getpid()}-{k}.jsonl"
            events.unlink(missing_ok=True)
            pe.ImageEmbedder = _timed_embedder(str(events))
            pe.DecodeImages = _timed_decode(str(events))
            t_start = time.time()
            init_s = 0.0
            if k == 0:
                ensure_ray(cfg.ray)  # embed_kind calls it again; then it only sets the data context
                init_s = time.time() - t_start
                result["cluster_resources"] = dict(ray.cluster_resources())
                result["config_embed"] = cfg.embed.model_dump(mode="json")
            res = pe.embed_kind(cfg, "corpus", force=True)
            t_end = time.time()
            run = _summarise_run(read_events(events), t_start, marks["run0"], marks["run1"], t_end,
                                 init_s, res.rows_ok)
            sampler.sample()  # the CPU used up to t_end
            t_ready = t_end - run["steady_s"]
            run["steady_cpu_s"] = sampler.cpu_at(t_end) - sampler.cpu_at(t_ready)
            run["steady_cpu_actor_s"] = sampler.cpu_at(t_end, True) - sampler.cpu_at(t_ready, True)
            run.update(warm=k > 0, images=res.rows_ok, rejected=res.rows_rejected, cache=res.cache)
            runs.append(run)
    finally:
        sampler.stop()
        stop_ray(result)
    finish_pipeline_side(result, runs, sampler)
    return result


# --- orchestration ----------------------------------------------------------------------------------------


def _ensure_sample(workdir: Path, images: int, shards: int, image_size: int, seed: int) -> str:
    from pipelines.sample import load_sample_info, make_sample

    out = workdir / f"sample-{images}-{shards}-{image_size}-{seed}"
    want = {"docs": images, "shards": shards, "image_size": image_size, "seed": seed}
    if (out / "sample.json").exists():
        params = json.loads((out / "sample.json").read_text())["params"]
        if all(params.get(k) == v for k, v in want.items()):
            return load_sample_info(str(out)).corpus
    info = make_sample(str(out), docs=images, queries=0, shards=shards, seed=seed, image_size=image_size)
    return info.corpus


def _run_side(side: str, a: argparse.Namespace, corpus: str, workdir: Path, rep: int,
              layout: str = "") -> dict[str, Any]:
    tag = f"{side}-{layout}-{rep}" if layout else f"{side}-{rep}"
    result = workdir / f"result-{tag}.json"
    result.unlink(missing_ok=True)
    log = workdir / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--corpus", corpus,
           "--workdir", str(workdir), "--result", str(result), "--model", a.model,
           "--batch-size", str(a.batch_size), "--seed", str(a.seed),
           "--pipeline-runs", str(a.pipeline_runs), "--rss-interval", str(a.rss_interval)]
    if layout:
        cmd += ["--plain-layout", layout]
    for s in a.set:
        cmd += ["--set", s]
    if a.wait_idle > 0:
        wait_idle(a.wait_idle)
    print(f"[bench] running the {side} side (log: {log}) ...", flush=True)
    wall = run_side(cmd, log, f"{side} side", result=result, verbose=a.verbose)
    r = json.loads(result.read_text())
    r["subprocess_wall_s"] = wall
    return r


def _compare_embeddings(workdir: Path, cache: str) -> dict[str, Any]:
    """Both sides must have computed the same vectors (same model, same preprocessing)."""
    import numpy as np
    import pyarrow.parquet as pq

    ids = json.loads((workdir / "plain_ids.json").read_text())
    plain = np.load(workdir / "plain_embeddings.npy")
    parts = sorted(Path(cache.removeprefix("file://")).glob("*/part-*.parquet"))
    got: dict[str, np.ndarray] = {}
    for p in parts:
        t = pq.read_table(p, columns=["id", "embedding"])
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                          dtype=np.float32).reshape(t.num_rows, -1)
        got.update(zip(t.column("id").to_pylist(), vecs, strict=True))
    missing = [i for i in ids if i not in got]
    diff = max((float(np.abs(got[i] - plain[k]).max()) for k, i in enumerate(ids) if i in got), default=None)
    return {"rows_plain": len(ids), "rows_pipeline": len(got), "missing_in_pipeline": len(missing),
            "max_abs_diff": diff}


def _report(a: argparse.Namespace, plain: dict[str, Any] | None, pipe: dict[str, Any] | None,
            check: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": a.model, "weights": "random (seeded)", "images": a.images,
                           "batch_size": a.batch_size, "image_size": a.image_size, "shards": a.shards,
                           "cpus": cpus(), "overrides": a.set, "plain": plain, "pipeline": pipe,
                           "embedding_check": check}
    print()
    print(f"embed benchmark: model={a.model} (random weights) images={a.images} batch={a.batch_size} "
          f"image_size={a.image_size} shards={a.shards} cpus={cpus()}"
          + (f" overrides={a.set}" if a.set else ""))
    rows = [
        ("start-up (s)", "startup_s", 2), ("steady wall (s)", "steady_s", 2),
        ("steady throughput (img/s)", "steady_img_s", 2), ("end-to-end wall (s)", "e2e_s", 2),
        ("end-to-end throughput (img/s)", "e2e_img_s", 2), ("peak RSS (MB)", "peak_rss_mb", 0),
        ("peak PSS, sampled (MB)", "peak_pss_mb", 0),
        ("steady CPU (core-ms / image)", "steady_cpu_ms_per_img", 1),
    ]
    for side in (plain, pipe):
        if side and side.get("steady_cpu_s") is not None:
            side["steady_cpu_ms_per_img"] = 1000 * side["steady_cpu_s"] / side["images"]
    print(f"  {'':32} {'plain loop':>12} {'ray pipeline':>13}")
    for label, key, nd in rows:
        print(f"  {label:32} {fmt((plain or {}).get(key), nd):>12} {fmt((pipe or {}).get(key), nd):>13}")
    if plain and pipe:
        ratio = pipe["steady_img_s"] / plain["steady_img_s"]
        ratio_e2e = pipe["e2e_img_s"] / plain["e2e_img_s"]
        out["ratio_steady"], out["ratio_e2e"] = ratio, ratio_e2e
        print(f"  {'ratio steady (pipeline / plain)':32} {ratio:>26.3f}   (target >= 0.9 for ViT-B-32)")
        print(f"  {'ratio end-to-end':32} {ratio_e2e:>26.3f}")
        if plain.get("steady_cpu_ms_per_img") and pipe.get("steady_cpu_ms_per_img"):
            eff = plain["steady_cpu_ms_per_img"] / pipe["steady_cpu_ms_per_img"]
            out["ratio_cpu_efficiency"] = eff
            print(f"  {'ratio CPU per image (plain/pipe)':32} {eff:>26.3f}")
    if plain:
        print(f"\n  plain: {plain['workers']} worker process(es) x {plain['torch_threads']} torch thread(s); start-up "
              f"= spawn + imports + resolve_model + build_model ({plain['model_load_s']:.2f} s) + read the slice "
              f"({plain['read_s']:.2f} s), until every worker is ready; steady = decode+preprocess "
              f"{plain['read_decode_preprocess_s']:.2f} s + encode {plain['encode_s']:.2f} s (slowest worker), "
              f"worker busy {', '.join(f'{x:.2f}' for x in plain['worker_busy_s'])} s; RSS = sum of the processes' "
              "peaks")
        print("    PSS (both sides): /proc/<pid>/smaps_rollup Pss summed over the side's processes at each "
              "sample; shared pages are split among the processes mapping them, so it is the fair total")
    if pipe:
        b = pipe["startup_breakdown_s"]
        print(f"  pipeline start-up = ray.init {fmt(b['ray_init'], 2)} s + resolve model & plan shards "
              f"(driver, open_clip import included) {fmt(b['resolve_and_plan'], 2)} s + Ray Data start & actor process/imports until its "
              f"constructor {fmt(b['to_actor_constructor'], 2)} s + model load {fmt(b['actor_model_load'], 2)} s")
        print("    (from the start until the embedder actor is ready; decode tasks already run meanwhile)")
        print(f"  pipeline steady: actor busy {pipe['encode_busy_s']:.2f} s in {pipe['encode_batches']} batches "
              f"({fmt(pipe.get('actor_rate_img_s'), 2)} img/s while encoding), idle in its window "
              f"{fmt(pipe.get('actor_idle_in_window_s'), 2)} s, first batch "
              f"{fmt(pipe.get('first_encode_after_actor_ready_s'), 2)} s after ready, tail after last "
              f"batch {fmt(pipe.get('tail_after_last_encode_s'), 2)} s; decode {pipe['decode_busy_s']:.2f} s "
              f"in {pipe['decode_batches']} batches over {pipe['decode_pids']} worker(s); actor torch threads "
              f"{pipe['actor_torch_threads']}; ray.shutdown {pipe['ray_shutdown_s']:.1f} s (not counted)")
        if pipe.get("steady_cpu_s") is not None:
            act, tot, w = pipe["steady_cpu_actor_s"], pipe["steady_cpu_s"], pipe["steady_s"]
            print(f"  pipeline steady CPU: {tot:.1f} core-s in {w:.1f} s = embedder actor {act:.1f} "
                  f"({act / w:.2f} cores) + every other pipeline process {tot - act:.1f} ({(tot - act) / w:.2f} cores)")
        rss = pipe["rss"]
        print(f"  pipeline RSS: sum of per-process peaks {rss['sum_of_process_peaks_mb']:.0f} MB = driver "
              f"{rss['driver_mb']:.0f} + Ray workers {rss['ray_workers_mb']:.0f} + Ray system "
              f"{rss['ray_system_mb']:.0f} ({rss['processes']} processes); sampled peak of the total at one "
              f"instant {rss['peak_total_rss_mb']:.0f} MB; sampled peak total PSS {rss['peak_total_pss_mb']:.0f} MB")
        for line in rss["largest"][:5]:
            print(f"    {line}")
        for k, run in enumerate(pipe["runs"][1:], start=2):
            print(f"  warm run {k} (same Ray session, pooled workers): e2e {run['e2e_s']:.2f} s, start-up "
                  f"{run['startup_s']:.2f} s, steady {fmt(run['steady_img_s'], 2)} img/s, "
                  f"e2e {run['e2e_img_s']:.2f} img/s")
    for name, side in (("plain", plain), ("pipeline", pipe)):
        if not side:
            continue
        c = side["rss"]["cpu_s"]
        share, warn = others_share(c)
        print(f"  cpu {name}: ours {c['ours']:.1f} s (driver {c['driver']:.1f} of which /proc sampler "
              f"{side['rss']['sampler_cpu_s']:.1f}, {'Ray workers' if name == 'pipeline' else 'loop workers'} "
              f"{c['ray_workers']:.1f}, Ray system "
              f"{c['ray_system']:.1f}); other processes on the machine "
              f"{c['others']:.1f} s = {100 * share:.0f}% of {c['wall']:.0f} s x {c['cores']} cores{warn}")
    if check:
        print(f"  embeddings: {check['rows_pipeline']}/{check['rows_plain']} rows match by id, max |diff| "
              f"{fmt(check['max_abs_diff'], 7) if check['max_abs_diff'] is not None else '-'}")
    return out


def _table(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], layouts: list[str]) -> str:
    """The markdown table: every side over the rounds, ratios to the first raw layout of the same round."""
    ref = runs.get(f"plain-{layouts[0]}") if layouts else None
    rows = []
    for name, rs in runs.items():
        what = f"plain loop, {layout_name(parse_layouts(name[6:])[0])}" if name.startswith("plain-") else "ray pipeline"

        def ratio(key: str, rs: list[dict[str, Any]] = rs) -> str:
            if not ref:
                return "-"
            return spread([r[key] / p[key] if r.get(key) and p.get(key) else None for r, p in zip(rs, ref, strict=True)],
                          3)

        rows.append([what, spread([r["steady_img_s"] for r in rs], 2), ratio("steady_img_s"),
                     spread([r["e2e_img_s"] for r in rs], 2), ratio("e2e_img_s"),
                     spread([r["startup_s"] for r in rs], 2), spread([r["steady_s"] for r in rs], 2),
                     spread([r["peak_pss_mb"] for r in rs], 0)])
    head = ["side", "steady img/s", "steady ratio", "end-to-end img/s", "e2e ratio", "start-up s", "steady s",
            "peak PSS MB"]
    notes = [f"{a.images} images of {a.image_size} px in {a.shards} shards, batch {a.batch_size}"
             + (f", overrides {a.set}" if a.set else "") + ".",
             "steady = images encoded after the last embedder actor (plain: every worker) was ready / the time from "
             "then to the end of embed_kind (plain: the last worker done); decode, preprocess and encode inside on "
             "both sides, reads where they happen (the pipeline's read tasks may run while its actors start; the "
             "plain workers read their slice before they report ready). Ratios: to the plain loop ("
             f"{layout_name(parse_layouts(layouts[0])[0]) if layouts else '-'}) of the same round."]
    return markdown_table(f"bench_embed: {a.model} (random weights)", head, rows, a.rounds, notes)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights): ViT-B-32, mmr-tiny")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="side of the synthetic images")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the sample and the outputs go (default: a new temp dir)")
    ap.add_argument("--json", help="write the full results here")
    add_set_arg(ap, "embed.torch_threads=1")
    ap.add_argument("--sides", default="plain,pipeline", help="which sides to run (comma separated)")
    add_layout_arg(ap)
    ap.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=1,
                    help="alternating rounds of every side; the table shows median [min, max]")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 32 mmr-tiny images of 64 px, batch 8")
    ap.add_argument("--pipeline-runs", type=int, default=1,
                    help="pipeline runs in one Ray session; the first (cold) is the headline")
    ap.add_argument("--rss-interval", type=float, default=1.0,
                    help="seconds between /proc samples (PSS: every 5th sample)")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each side, wait up to this many seconds for the machine to be idle (0: don't)")
    ap.add_argument("--verbose", action="store_true", help="stream the sides' output instead of logging it")
    # internal: one side, in its own process
    ap.add_argument("--side", choices=["plain", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--plain-layout", default="Nx1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick and not a.side:
        a.model, a.images, a.image_size, a.batch_size, a.shards = "mmr-tiny", 32, 64, 8, 2

    if a.side:
        side_logging()
        r = run_plain(a) if a.side == "plain" else run_pipeline(a)
        Path(a.result).write_text(json.dumps(r, indent=2))
        return

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="mmr-bench-embed-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    corpus = _ensure_sample(workdir, a.images, a.shards, a.image_size, a.seed)
    print(f"[bench] sample: {a.images} images of {a.image_size}px in {corpus} ({time.time() - t:.1f} s, not timed)")
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    layouts = [f"{w}x{t}" for w, t in parse_layouts(a.raw_layouts)] if "plain" in sides else []
    names = [f"plain-{lay}" for lay in layouts] + (["pipeline"] if "pipeline" in sides else [])
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(a.rounds):
        for name in names:
            side, _, lay = name.partition("-")
            runs[name].append(_run_side(side, a, corpus, workdir, rep, lay))
    # The detailed report is of each side's median round (by steady img/s).
    mid = {n: sorted(rs, key=lambda r: r["steady_img_s"] or 0)[(len(rs) - 1) // 2] for n, rs in runs.items()}
    plain, pipe = (mid.get(f"plain-{layouts[0]}") if layouts else None), mid.get("pipeline")
    check = _compare_embeddings(workdir, pipe["cache"]) if plain and pipe else None
    out = _report(a, plain, pipe, check)
    print("\n" + _table(a, runs, layouts), flush=True)
    out["all_runs"] = runs
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"\n[bench] results written to {a.json}")


if __name__ == "__main__":
    main()
