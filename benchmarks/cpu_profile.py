"""Where a command's CPU goes, by process kind: runs it while sampling every process's CPU time from /proc.

    python benchmarks/cpu_profile.py --json /tmp/suite-cpu.json -- \\
        .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

Every ``--interval`` seconds each process's user+system time is read; a process's figure is its CPU time at its
last sample minus what it had when first seen (so processes older than the command count only their share
during it). Processes are grouped by kind: Ray's process titles (``ray::MapWorker``, ``ray::IDLE``, ...), Ray's
daemons (raylet, gcs_server, agents, log monitor), pytest workers, the CLI, pip, the rest by executable. A
process living less than one interval is missed: the totals are a floor. Ray's per-instance cost shows as the
count of ``gcs_server`` processes (one per Ray instance started) and the daemons' totals.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import parser

log = logging.getLogger("cpu_profile")
HZ = os.sysconf("SC_CLK_TCK")
_DAEMONS = ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent", "log_monitor", "monitor.py",
            "dashboard.py", "moto.server", "weed", "chrom", "pip", "ruff")


def kind(cmd: str) -> str:
    """A process's kind from its command line."""
    m = re.match(r"ray::(\w+)", cmd)
    if m:
        return f"ray::{m.group(1)}"
    for name in _DAEMONS:
        if name in cmd:
            return name
    if "pipelines.cli" in cmd or "mmrerank" in cmd.split(" ", 2)[:2]:
        return "mmrerank CLI"
    if "pytest" in cmd or "execnet" in cmd or "exec(eval(sys.stdin" in cmd:
        return "pytest (main and workers)"
    return Path(cmd.split(" ", 1)[0]).name or "?"


def sample(first: dict[tuple[str, str], float], last: dict[tuple[str, str], tuple[float, str]]) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        key = (pid, rest[19])  # pid and start time: a reused pid is another process
        cpu = (int(rest[11]) + int(rest[12])) / HZ
        first.setdefault(key, cpu)
        prev = last.get(key)
        last[key] = (cpu, cmd or (prev[1] if prev else ""))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--json", help="write the per-kind totals here")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("cmd", nargs="+", help="the command (after --)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    first: dict[tuple[str, str], float] = {}
    last: dict[tuple[str, str], tuple[float, str]] = {}
    sample(first, {})  # what every process had before the command: not counted
    before = set(first)
    t0 = time.monotonic()
    proc = subprocess.Popen(a.cmd)
    while proc.poll() is None:
        sample(first, last)
        time.sleep(a.interval)
    sample(first, last)
    wall = time.monotonic() - t0
    tot: dict[str, float] = collections.Counter()
    n: dict[str, int] = collections.Counter()
    for key, (cpu, cmd) in last.items():
        if not cmd:  # kernel threads
            continue
        k = kind(cmd)
        tot[k] += cpu - first[key]
        n[k] += key not in before
    cpu_all = sum(tot.values())
    cores = len(os.sched_getaffinity(0))
    log.info("command exited %d after %.0f s; %.0f CPU-s in all (%.0f%% of %d cores)", proc.returncode, wall,
             cpu_all, 100 * cpu_all / (wall * cores), cores)
    log.info("%10s %6s %9s  %s", "CPU-s", "share", "started", "kind")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:a.top]:
        log.info("%10.1f %5.1f%% %9d  %s", v, 100 * v / max(cpu_all, 1e-9), n[k], k)
    if a.json:
        out: dict[str, Any] = {"wall_s": wall, "cores": cores, "rc": proc.returncode,
                               "kinds": {k: {"cpu_s": tot[k], "started": n[k]} for k in tot}}
        Path(a.json).write_text(json.dumps(out, indent=2))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
