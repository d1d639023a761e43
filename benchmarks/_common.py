"""Helpers shared by the ``bench_*.py`` scripts: timing events, /proc facts, quiet-machine waits, side processes.

Imported as the top-level module ``_common`` (a script's own directory is on ``sys.path``, and Ray adds the
driver script's directory to its workers' path, so the timestamping subclasses that the benchmarks ship to
Ray workers can call :func:`event` there). Imports only the standard library at module level: ``gpu_check.py``
runs where Ray cannot be imported, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The repo root on the path (once, for every benchmark): `operators`, `pipelines`, `tests` and `benchmarks.*`
# import from this checkout whether or not it is installed.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --- timing events (one JSON line each, appended from any process) ------------------------------------------


def event(path: str, rec: dict[str, Any]) -> None:
    """Append one JSON line (small O_APPEND writes from several processes do not interleave)."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event :func:`event` appended to ``path`` ([] when there is none)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def timed_actor(base: type, events: str, call_ev: str, *, name: str | None = None, tags: dict[str, Any] | None = None,
                init_rec: Callable[[], dict[str, Any]] | None = None,
                call_rec: Callable[[Any, Any], dict[str, Any]] | None = None) -> type:
    """A subclass of the pipeline's callable class ``base`` that only adds timestamps to ``events``.

    One ``actor_init`` event when its constructor returns (with the process start time, so the actor's
    process start and imports can be told from its model load) and one ``call_ev`` event per call;
    ``tags`` go in both, ``init_rec()`` / ``call_rec(batch, out)`` add fields. The computation stays ``base``'s.
    """
    extra = dict(tags or {})

    class Timed(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            t0 = time.time()
            super().__init__(*args, **kwargs)
            event(events, {"ev": "actor_init", **extra, "pid": os.getpid(), "proc_start": proc_start_time(),
                           "t0": t0, "t1": time.time(), **(init_rec() if init_rec else {})})

        def __call__(self, batch: Any) -> Any:
            t0 = time.time()
            out = super().__call__(batch)
            event(events, {"ev": call_ev, **extra, "pid": os.getpid(), "t0": t0, "t1": time.time(),
                           **(call_rec(batch, out) if call_rec else {})})
            return out

    Timed.__name__ = Timed.__qualname__ = name or f"Timed{base.__name__}"
    return Timed


def torch_threads() -> dict[str, Any]:
    """``{"torch_threads": n}`` of this process (an ``init_rec`` for :func:`timed_actor`)."""
    import torch

    return {"torch_threads": torch.get_num_threads()}


# --- host facts ------------------------------------------------------------------------------------------------


def proc_start_time(pid: int | str = "self") -> float | None:
    """Wall-clock (epoch) start time of a process, from /proc (None when unavailable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def cpus() -> int:
    """CPUs this process may run on (what the pipeline's actors use too)."""
    return len(os.sched_getaffinity(0))


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return busy, busy + v[3] + v[4]  # + idle iowait


def descendants(root: int) -> list[int]:
    """``root`` and every process descended from it (the local Ray instance of a driver), from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def proc_files(pid: int) -> tuple[str, list[str], str] | None:
    """``/proc/<pid>/status`` text, the ``stat`` fields after the command name, and the command line.

    None when the process is gone (the samplers race with processes exiting).
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return status, stat, title


def others_share(cpu_s: dict[str, Any], limit: float = 0.05) -> tuple[float, str]:
    """Share of the machine other processes took during a side (``cpu_s``: others, wall, cores) and a warning.

    Above ``limit`` a wall-clock figure of that side is not worth much (the machine is shared).
    """
    share = cpu_s["others"] / max(1e-9, cpu_s["wall"] * cpu_s["cores"])
    return share, "   <-- WARNING: the machine was not quiet; timings are suspect" if share > limit else ""


def fmt(v: Any, nd: int = 1) -> str:
    """A table cell: ``-`` for None, floats with ``nd`` decimals."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# --- waiting for a quiet machine (it is shared: a side timed under other load is not worth much) ------------


def wait_quiet(max_wait: float, max_load: float = 1.0, poll_s: float = 5.0) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is below ``max_load``.

    Returns what was seen: the load average when asked, when done, how long it waited, and whether the
    machine was quiet at the end (False: it gave up waiting; the figures that follow are suspect).
    """
    t0 = time.time()
    first = os.getloadavg()
    said = False
    while True:
        load = os.getloadavg()
        if load[0] < max_load or time.time() - t0 >= max_wait:
            break
        if not said:
            print(f"[bench] 1-min load average {load[0]:.2f} >= {max_load}; waiting up to {max_wait:.0f} s "
                  "for a quiet machine", flush=True)
            said = True
        time.sleep(poll_s)
    quiet = load[0] < max_load
    if said:
        print(f"[bench] load average {load[0]:.2f} after {time.time() - t0:.0f} s"
              + ("" if quiet else " (gave up waiting: NOT QUIET, figures are suspect)"), flush=True)
    return {"load_when_asked": list(first), "load_at_start": list(load), "waited_s": time.time() - t0,
            "quiet": quiet, "max_load": max_load}


def wait_idle(max_wait: float, threshold: float = 0.15, quiet_s: int = 3) -> float:
    """Wait (up to ``max_wait`` s) until the machine has been < ``threshold`` busy for ``quiet_s`` seconds.

    Finer than :func:`wait_quiet` (busy ticks each second instead of the 1-minute load average).
    Returns the busy fraction of the last second.
    """
    deadline = time.time() + max_wait
    quiet, frac, said = 0, 1.0, False
    while True:
        b0, t0 = machine_cpu_ticks()
        time.sleep(1.0)
        b1, t1 = machine_cpu_ticks()
        frac = (b1 - b0) / max(1, t1 - t0)
        quiet = quiet + 1 if frac < threshold else 0
        if quiet >= quiet_s or time.time() >= deadline:
            return frac
        if not said:
            print(f"[bench] machine is {100 * frac:.0f}% busy; waiting up to {max_wait:.0f} s for it to be idle",
                  flush=True)
            said = True


# --- config overrides and arguments ----------------------------------------------------------------------------


def apply_sets(data: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` items to a raw config mapping, as ``mmrerank --set`` does.

    :func:`pipelines.config.apply_overrides` does the work; a malformed item exits with its message.
    """
    from pipelines.config import ConfigError, apply_overrides

    try:
        return apply_overrides(data, list(items))
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_set_arg(ap: argparse.ArgumentParser, example: str = "embed.batch_size=64") -> None:
    """The repeatable ``--set KEY=VALUE`` pipeline-config override (see :func:`apply_sets`)."""
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"pipeline config override, e.g. {example} (repeatable)")


def add_quiet_args(ap: argparse.ArgumentParser, wait_idle_s: float = 600.0) -> None:
    """``--wait-idle`` / ``--max-load``: the :func:`wait_quiet` rule before each timed side."""
    ap.add_argument("--wait-idle", type=float, default=wait_idle_s,
                    help="before each timed side wait up to this many seconds for a quiet machine (0: don't)")
    ap.add_argument("--max-load", type=float, default=1.0, help="quiet = 1-minute load average below this")


def side_logging() -> None:
    """INFO logging for a side subprocess (its output goes to the side's log file)."""
    import logging

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def finish_pipeline_side(result: dict[str, Any], runs: list[dict[str, Any]], sampler: Any) -> dict[str, Any]:
    """Complete a pipeline side's ``result``: the first (cold) run as the headline, every run, memory figures.

    ``sampler`` is a stopped ``bench_embed.ProcSampler``; call :func:`stop_ray` first.
    """
    import resource

    result.update(runs[0])
    result["runs"] = runs
    result["rss"] = sampler.report()
    result["driver_ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mb"] = result["rss"]["sum_of_process_peaks_mb"]
    result["peak_pss_mb"] = result["rss"]["peak_total_pss_mb"]
    return result


def stop_ray(result: dict[str, Any]) -> None:
    """``ray.shutdown()`` if Ray is up; its time goes in ``result["ray_shutdown_s"]`` (shown, never counted)."""
    import ray

    t = time.time()
    if ray.is_initialized():
        ray.shutdown()
    result["ray_shutdown_s"] = time.time() - t


# --- side subprocesses ------------------------------------------------------------------------------------------


def side_env() -> dict[str, str]:
    """The environment of a side subprocess: offline HF, no Ray auth token (local clusters only)."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def run_side(cmd: Sequence[str], log: Path, what: str, *, result: Path | None = None, verbose: bool = False,
             env: dict[str, str] | None = None) -> float:
    """Run one side's subprocess from the repo root, its output into ``log`` (or the terminal if ``verbose``).

    Exits with the log's tail when it fails or leaves no ``result`` file; returns its wall time (s).
    """
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(list(cmd), stdout=None if verbose else f, stderr=None if verbose else subprocess.STDOUT,
                              cwd=REPO, env=env, check=False)
    wall = time.time() - t
    if proc.returncode != 0 or (result is not None and not result.exists()):
        if not verbose:
            print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"[bench] {what} failed (exit {proc.returncode}); see {log}")
    return wall


# --- the raw side: N one-thread worker processes (the best plain loop on a CPU box) ---------------------------
#
# The pipeline runs as many one-thread actors as the machine has CPUs (on 2 cores: two actors, one torch thread
# each), which beats one process with all the threads (one OpenMP team stalls at every barrier when any other
# process takes a core). The fair baseline is the best plain loop, so each benchmark's raw loop runs the same
# layout: ``workers`` spawned processes with ``torch.set_num_threads(threads)``, each over an equal contiguous
# slice of the items. ``init(payload, part)`` (model load + reading the slice's bytes) runs before the worker
# reports ready; ``work(state, part)`` is timed. The clock starts when every worker is ready and stops when the
# last one finishes: ``steady_s``. ``init``/``work`` must be module-level functions (pickled by reference).


def parse_layouts(spec: str, default_workers: int | None = None) -> list[tuple[int, int]]:
    """``"2x1,1x2"`` -> ``[(2, 1), (1, 2)]`` (workers x torch threads each); ``N`` alone in a term = CPUs."""
    n = default_workers or cpus()
    out = []
    for term in (t.strip().lower() for t in spec.split(",") if t.strip()):
        w, _, th = term.partition("x")
        try:
            out.append((n if w in ("", "n") else int(w), n if th == "n" else int(th or 1)))
        except ValueError:
            raise SystemExit(f"bad layout {term!r}: use WORKERSxTHREADS, e.g. 2x1 or 1x2 (N = CPUs)") from None
    if not out or any(w < 1 or th < 1 for w, th in out):
        raise SystemExit(f"bad layouts {spec!r}")
    return out


def layout_name(layout: tuple[int, int]) -> str:
    """``(2, 1)`` -> ``"2 proc x 1 thr"``."""
    return f"{layout[0]} proc x {layout[1]} thr"


def add_layout_arg(ap: argparse.ArgumentParser, flag: str = "--raw-layouts") -> None:
    """``--raw-layouts``: the raw side's process layouts, each its own row (see :func:`parse_layouts`)."""
    ap.add_argument(flag, default="Nx1", metavar="WxT,...",
                    help="raw loop layouts, each a row: W worker processes x T torch threads each; N = CPUs "
                         "(as many one-thread processes as the pipeline's CPU actors). Default Nx1; "
                         "'Nx1,1xN' adds the one-process-all-threads row")


def split_even(n_items: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges covering ``n_items`` as evenly as possible."""
    parts = max(1, min(parts, n_items)) if n_items else 1
    q, r = divmod(n_items, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


def split_groups(group_of: Sequence[Any], parts: int) -> list[tuple[int, int]]:
    """Like :func:`split_even` over a sequence already sorted by group, but never cutting a group in two.

    (The rerank loops decode each doc once: all pairs of a doc stay in one worker.)
    """
    n = len(group_of)
    cuts = [0]
    for start, _stop in split_even(n, parts)[1:]:
        c = max(start, cuts[-1])
        while 0 < c < n and group_of[c] == group_of[c - 1]:
            c += 1
        cuts.append(c)
    cuts.append(n)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a] or [(0, 0)]


def _worker_main(init: Callable[[Any, Any], Any], work: Callable[[Any, Any], dict[str, Any]], payload: Any,
                 part: Any, threads: int, idx: int, ready_q: Any, go: Any, out_q: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        t0 = time.time()
        state = init(payload, part)
        ready_q.put((idx, {"init_s": time.time() - t0, "proc_start": proc_start_time(), "t_ready": time.time()}))
        go.wait()
        t1, c1 = time.time(), time.process_time()
        res = work(state, part)
        out_q.put((idx, {**res, "t0": t1, "t1": time.time(), "cpu_s": time.process_time() - c1,
                         "torch_threads": torch.get_num_threads()}))
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises
        import traceback

        err = traceback.format_exc()
        ready_q.put((idx, {"error": err}))
        out_q.put((idx, {"error": err}))


def run_workers(init: Callable[[Any, Any], Any], work: Callable[[Any, Any], dict[str, Any]], payload: Any,
                parts: Sequence[Any], threads: int = 1) -> dict[str, Any]:
    """Run ``work(init(payload, part), part)`` in one spawned process per part; see the comment above.

    Returns ``startup_s`` (spawn until every worker is ready: interpreter, imports, ``init``), ``steady_s``
    (all ready until the last one finished), the slowest/fastest worker's busy time, and each worker's result
    dict (in part order) under ``"workers"``.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    t_spawn = time.time()
    procs = [ctx.Process(target=_worker_main, args=(init, work, payload, part, threads, i, ready_q, go, out_q),
                         daemon=True, name=f"bench-worker-{i}") for i, part in enumerate(parts)]
    for p in procs:
        p.start()

    def collect(q: Any, into: dict[int, dict[str, Any]]) -> None:
        import queue

        while len(into) < len(procs):
            try:
                i, rec = q.get(timeout=2.0)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"raw worker(s) {dead} died") from None
                continue
            if "error" in rec:
                raise RuntimeError(f"raw worker {i} failed:\n{rec['error']}")
            into[i] = {**into.get(i, {}), **rec}

    try:
        ready: dict[int, dict[str, Any]] = {}
        collect(ready_q, ready)
        t_go = time.time()
        go.set()
        done: dict[int, dict[str, Any]] = {}
        collect(out_q, done)
        done = {i: {**ready[i], **r} for i, r in done.items()}
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    t_end = max(r["t1"] for r in done.values())
    busy = [r["t1"] - r["t0"] for r in done.values()]
    return {"workers": len(procs), "threads": threads, "startup_s": t_go - t_spawn, "steady_s": t_end - t_go,
            "e2e_s": t_end - t_spawn, "init_s_max": max(r["init_s"] for r in ready.values()),
            "busy_s_max": max(busy), "busy_s_min": min(busy),
            "steady_cpu_s": sum(r["cpu_s"] for r in done.values()),
            "workers_out": [done[i] for i in range(len(procs))]}


# --- one steady-window rule for both sides, and the markdown table ---------------------------------------------


def items_after(batches: Iterable[dict[str, Any]], mark: float, key: str = "rows") -> float:
    """Items that batches (``t0``, ``t1``, ``key``) finished after ``mark``; a batch straddling it counts pro rata."""
    n = 0.0
    for b in batches:
        if b["t1"] <= mark:
            continue
        span = b["t1"] - b["t0"]
        n += b[key] * (1.0 if b["t0"] >= mark or span <= 0 else (b["t1"] - mark) / span)
    return n


def spread(values: Sequence[float | None], nd: int = 1) -> str:
    """``median [min, max]`` of the values (``-`` when there are none; the value alone for one)."""
    import statistics

    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{nd}f}"
    return f"{statistics.median(v):.{nd}f} [{min(v):.{nd}f}, {max(v):.{nd}f}]"


def median(values: Sequence[float | None]) -> float | None:
    """The median of the non-None values (None when there are none)."""
    import statistics

    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def command_line() -> str:
    """This benchmark's command as typed (for the table's caption)."""
    import shlex

    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(shlex.quote(x) for x in [".venv/bin/python", str(script), *sys.argv[1:]])


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], rounds: int,
                   notes: Sequence[str] = ()) -> str:
    """A ready-to-paste markdown block: heading with the date, the command, the table, notes.

    Cells are ``median [min, max]`` over ``rounds`` alternating rounds (see :func:`spread`).
    """
    import datetime
    import platform

    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"### {title} ({day}, {platform.node() or 'host'}, {cpus()} CPUs)", "",
           "```bash", f"{command_line()}", "```", "",
           f"{rounds} alternating round(s); cells: median [min, max] over the rounds.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if notes:
        out.append("")
        out += list(notes)
    return "\n".join(out)
