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
