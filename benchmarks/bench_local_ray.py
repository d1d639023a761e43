"""What keeping idle task workers buys a local run (``pipelines.ray_env.LOCAL_SYSTEM_CONFIG``).

Alternating ``mmrerank run`` CLI processes on one sample, each starting its own local Ray: with the project's
local system config (idle task workers kept 5 min) and with Ray's default (ended after 1 s idle beyond the
node's CPU count). Each run's CPU is the CPU time of every process started while it ran (driver, GCS, raylet,
agents, workers), sampled from /proc every 0.5 s; "processes" counts them (a process living under 0.5 s can
be missed: the counts are a floor)::

    python benchmarks/bench_local_ray.py --rounds 3 --workdir /tmp/bench-local-ray

The config is the test suite's end-to-end one (``tests/reference.py``: tiny embedder, 4 corpus shards,
clip reranker); ratios (ours / Ray's default, same round) are printed, never asserted.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import add_quiet_args, markdown_table, parser, side_logging, spread, wait_quiet
from cpu_profile import sample  # the /proc reader: (pid, start tick) -> CPU seconds, command line

log = logging.getLogger("bench_local_ray")
# Ray's default for the other side: the same CLI with the project's local system config emptied first.
SIDES = {
    "ours": "from pipelines.cli import main; main()",
    "ray default": "import pipelines.ray_env as r; r.LOCAL_SYSTEM_CONFIG.clear(); from pipelines.cli import main; main()",
}


def run_once(side: str, cfg_path: Path, log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    first: dict[tuple[str, str], float] = {}
    seen: dict[tuple[str, str], tuple[float, str]] = {}
    sample(first, seen)
    before = set(seen)
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SIDES[side], "run", str(cfg_path)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            sample(first, seen)
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{side}: the run exited {proc.returncode}; see {log_path}")
    new = [v for k, v in seen.items() if k not in before]
    return {"wall_s": wall, "cpu_s": sum(c for c, _ in new), "processes": len(new),
            "workers": sum(1 for _, cmd in new if cmd.startswith("ray::") or "default_worker" in cmd)}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    ap.add_argument("--workdir", default="/tmp/bench-local-ray")
    ap.add_argument("--json", help="write the per-run figures here")
    add_quiet_args(ap)
    a = ap.parse_args(argv)
    side_logging()
    from pipelines.sample import make_sample
    from tests.helpers import cli_env, write_yaml
    from tests.reference import run_cfg_dict

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    info = make_sample(str(wd / "sample"), docs=60, queries=8, shards=4, seed=3, bad_rows=True, image_size=40)
    env = cli_env()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    for rnd in range(a.rounds):
        for side in SIDES:
            wait_quiet(a.wait_idle, a.max_load)
            tag = f"{side.replace(' ', '-')}-{rnd}"
            cfg = Path(write_yaml(wd / f"{tag}.yaml", run_cfg_dict(str(wd / f"root-{tag}"), info.corpus, info.queries)))
            r = run_once(side, cfg, wd / f"{tag}.log", env)
            runs[side].append(r)
            log.info("round %d, %s: %.1f s wall, %.1f CPU-s, %d processes (%d Ray workers)", rnd, side,
                     r["wall_s"], r["cpu_s"], r["processes"], r["workers"])
    ratio = {k: [o[k] / d[k] for o, d in zip(runs["ours"], runs["ray default"], strict=True)] for k in ("wall_s", "cpu_s")}
    rows = [[side, spread([r["wall_s"] for r in rs]), spread([r["cpu_s"] for r in rs]),
             spread([r["processes"] for r in rs], 0), spread([r["workers"] for r in rs], 0)] for side, rs in runs.items()]
    rows.append(["ours / Ray's default", spread(ratio["wall_s"], 2), spread(ratio["cpu_s"], 2), "", ""])
    print(markdown_table("bench_local_ray: one CLI run, idle task workers kept vs Ray's default",
                         ["side", "wall s", "CPU s (all processes)", "processes", "Ray workers"], rows, a.rounds,
                         ["Ratios per round, then median [min, max]."]))
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
